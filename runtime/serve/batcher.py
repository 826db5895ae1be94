"""Step-level (continuous) batching: one thread owns the engines and, every tick, runs one U-Net
call over all active requests of one latent size.

A tick: drop cancelled and timed-out requests; admit waiting ones in FIFO order while rows are
free (their prompts encoded together); per latent size, one `denoise.step` over every active
request (up to `max_batch_rows` rows); decode the finished ones together per size.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..arguments import GenerationArgs
from ..backends.base import upload_constants
from ..denoise import RequestState, Timer, start_request, step
from ..errors import UserError
from ..images import numpy_to_pil
from ..lora_pool import DEFAULT_MAX_LORAS, NO_ADAPTER, Hold, check_max_loras
from ..pipeline import Pipeline, PipelineOutput
from .previews import Previews, send_previews

MODES = ("continuous", "request")
DEFAULT_MAX_BATCH_ROWS = 16
# Timer stages spent in engines; the rest of a tick is the batcher's own bookkeeping (the
# vae_encode stage also holds the scheduler set-up of admitted requests, a small cost)
ENGINE_STAGES = ("text_encoder_ms", "vae_encode_ms", "unet_ms", "vae_decode_ms")


class QueueFull(Exception):
    """The waiting queue is at `max_queue`; retry after `retry_after_s` seconds."""

    def __init__(self, max_queue: int, retry_after_s: int) -> None:
        super().__init__(
            f"the queue is full ({max_queue} requests waiting); retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The batcher is not running: not started yet, or stopping."""


class RequestTimeout(Exception):
    """The request did not finish within `request_timeout_s`."""


@dataclass
class Job:
    args: GenerationArgs
    future: Future
    submitted: float
    deadline: float
    state: RequestState | None = None
    loras: Hold = NO_ADAPTER  # its run-time adapters, held until the future is done
    admitted: float | None = None
    first_step: float | None = None  # when its first U-Net call finished
    previews: Previews | None = None  # streamed partial images, if asked for

    def rows(self, guided: bool) -> int:
        return len(self.args.prompts) * (2 if guided else 1)


@dataclass
class Stats:
    """Cumulative counters read by /metrics and the benchmark (copy via `Batcher.stats`)."""

    queued: int = 0
    active: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    images: int = 0
    unet_calls: int = 0
    unet_rows: int = 0
    unet_seconds: float = 0.0
    rows_per_call: collections.Counter = field(default_factory=collections.Counter)
    requests_per_call: collections.Counter = field(default_factory=collections.Counter)
    adapters_per_call: collections.Counter = field(default_factory=collections.Counter)
    # active requests -> [ticks, tick seconds, engine seconds]: bookkeeping = tick - engine
    ticks_by_active: dict[int, list[float]] = field(default_factory=dict)


class Batcher:
    """Runs requests for one Pipeline; thread-safe `submit`, one worker thread."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_queue: int = 64,
        mode: str = "continuous",
        request_timeout_s: float = 300.0,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"unknown batching mode {mode!r}; choose one of {', '.join(MODES)}")
        if max_batch_rows < 1 or max_queue < 0 or request_timeout_s <= 0:
            raise UserError(
                "max_batch_rows must be >= 1, max_queue >= 0 and request_timeout_s > 0; "
                f"got {max_batch_rows}, {max_queue}, {request_timeout_s}"
            )
        self.pipeline = pipeline
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.mode = mode
        self.request_timeout_s = request_timeout_s
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._accepting = True  # requests may queue before `start`
        self._drain_deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._stats = Stats()
        self._unet_ms_per_row = 0.0  # running estimate, for Retry-After

    # ---- caller side -------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (requests submitted before wait for it)."""
        with self._wake:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="sdrt-batcher", daemon=True)
            self._thread.start()

    def submit(
        self, args: GenerationArgs | Mapping[str, Any], previews: Previews | None = None
    ) -> Future:
        """Queue a request; the future resolves to a PipelineOutput (images as
        `args.output_type` asks, timings queue_ms / first_step_ms / total_ms). Raises
        UserError for bad arguments, QueueFull, or ShuttingDown. `previews`: partial images
        to hand over while it runs (see sdrt.serve.previews)."""
        if not isinstance(args, GenerationArgs):
            args = self.pipeline.arguments(**args)
        now = time.monotonic()
        job = Job(args, Future(), now, now + self.request_timeout_s, previews=previews)
        with self._wake:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.max_queue, self._retry_after_s())
            job.loras = self.pipeline.hold_loras(args)  # an unknown adapter fails here
            job.future.add_done_callback(lambda _: job.loras.release())
            self._waiting.append(job)
            self._wake.notify()
        return job.future

    def cancel(self, future: Future) -> None:
        """Cancel a request; it leaves at the next tick and frees its rows."""
        future.cancel()
        with self._wake:
            self._wake.notify()

    def stop(self, drain_deadline_s: float = 30.0) -> None:
        """Refuse new requests, finish the queued and active ones for up to
        `drain_deadline_s`, then fail what is left with ShuttingDown and join the thread."""
        with self._wake:
            self._accepting = False
            self._drain_deadline = time.monotonic() + drain_deadline_s
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> Stats:
        """A consistent copy of the counters."""
        with self._wake:
            copy = Stats(**vars(self._stats))
            copy.rows_per_call = collections.Counter(self._stats.rows_per_call)
            copy.requests_per_call = collections.Counter(self._stats.requests_per_call)
            copy.adapters_per_call = collections.Counter(self._stats.adapters_per_call)
            copy.ticks_by_active = {k: list(v) for k, v in self._stats.ticks_by_active.items()}
            copy.queued, copy.active = len(self._waiting), len(self._active)
            return copy

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _retry_after_s(self) -> int:
        """Seconds until about one queue's worth of rows has run, at least 1."""
        rows = sum(job.rows(self.pipeline.guided(job.args)) for job in self._waiting)
        steps = max((job.args.num_inference_steps for job in self._waiting), default=1)
        seconds = rows * steps * self._unet_ms_per_row / 1e3 / self.max_batch_rows
        return max(1, int(np.ceil(seconds)))

    # ---- worker side -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while self._accepting and not self._waiting and not self._active:
                    self._wake.wait()
                if not self._accepting and not self._waiting and not self._active:
                    return
                if time.monotonic() > self._drain_deadline:
                    self._fail_all(ShuttingDown("the server shut down before this finished"))
                    return
            try:
                self._tick()
            except Exception as err:  # noqa: BLE001 - a bug here must not leave futures hanging
                with self._wake:
                    self._fail_all(err)

    def _tick(self) -> None:
        start = time.perf_counter()
        timer = Timer()
        self._drop_finished_early()
        admitted = self._admit()
        if admitted:
            self._prepare(admitted, timer)
        active = len(self._active)
        for group in self._groups():
            self._step_group(group, timer)
        send_previews(self.pipeline, self._active, timer)
        self._finish([job for job in self._active if job.state and job.state.done], timer)
        engine = sum(timer.ms.get(stage, 0.0) for stage in ENGINE_STAGES) / 1e3
        with self._wake:
            entry = self._stats.ticks_by_active.setdefault(active, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            entry[2] += engine

    def _drop_finished_early(self) -> None:
        """Cancelled requests and those past their deadline leave now, freeing their rows."""
        now = time.monotonic()
        with self._wake:
            for queue in (self._waiting, self._active):
                for job in list(queue):
                    if job.future.cancelled():
                        self._stats.cancelled += 1
                    elif now > job.deadline:
                        self._stats.timed_out += 1
                        _fail(
                            job,
                            RequestTimeout("the request timed out; retry, or ask for fewer steps"),
                        )
                    else:
                        continue
                    queue.remove(job)

    def _admit(self) -> list[Job]:
        """FIFO: take waiting requests while their latent size's group has rows free; in
        "request" mode only when nothing is active, so a group runs to completion."""
        if not self._waiting or (self.mode == "request" and self._active):
            return []  # an unlocked look: a request queued meanwhile joins at the next tick
        rows: collections.Counter = collections.Counter()
        for job in self._active:
            rows[job.args.height, job.args.width] += self._rows(job)
        admitted = []
        with self._wake:
            while self._waiting:
                job = self._waiting[0]
                size, need = (job.args.height, job.args.width), self._rows(job)
                if rows[size] and rows[size] + need > self.max_batch_rows:
                    break
                rows[size] += need
                job.admitted = time.monotonic()
                admitted.append(self._waiting.popleft())
        return admitted

    def _rows(self, job: Job) -> int:
        return job.rows(self.pipeline.guided(job.args))

    def _prepare(self, jobs: list[Job], timer: Timer) -> None:
        """Encode every admitted request's prompts in one call per text encoder, then set up
        each one's scheduler, rng and latents (img2img: encode its image), and upload its
        conditioning once: a request alone in its U-Net call feeds it as Pipeline does,
        instead of its host arrays at every step."""
        tick = time.perf_counter()
        try:
            conds = self.pipeline.conditionings(
                [job.args for job in jobs], [job.loras for job in jobs]
            )
        except Exception as err:  # a failing engine fails these requests only
            for job in jobs:
                self._fail_job(job, err)
            return
        tick = timer("text_encoder_ms", tick)
        for job, cond in zip(jobs, conds, strict=True):
            try:
                job.state = start_request(
                    self.pipeline, job.args, cond, self.pipeline.guided(job.args)
                )
                job.state.cond_device = upload_constants(
                    self.pipeline.denoiser, {**cond, **job.state.layout.constants}
                )
            except Exception as err:  # e.g. an image the VAE cannot take
                self._fail_job(job, err)
                continue
            if job.previews is not None:
                job.previews.plan(job.state)
            self._active.append(job)
        timer("vae_encode_ms", tick)

    def _groups(self) -> list[list[Job]]:
        """Active requests by latent size, each split in FIFO order into U-Net calls of at
        most `max_batch_rows` rows (a request larger than that runs alone)."""
        by_size: dict[tuple[int, int], list[Job]] = {}
        for job in self._active:
            by_size.setdefault((job.args.height, job.args.width), []).append(job)
        groups = []
        for jobs in by_size.values():
            current: list[Job] = []
            for job in jobs:
                if (
                    current
                    and sum(map(self._rows, current)) + self._rows(job) > self.max_batch_rows
                ):
                    groups.append(current)
                    current = []
                current.append(job)
            groups.append(current)
        return groups

    def _step_group(self, jobs: list[Job], timer: Timer) -> None:
        unet = self.pipeline.denoiser
        rows = sum(job.state.rows for job in jobs)
        latents = jobs[0].state.latents
        before = timer.ms.get("unet_ms", 0.0)
        try:
            step(unet, [job.state for job in jobs], timer, static_batch(unet, rows, latents.shape))
        except Exception as err:  # fail the group, keep serving the others
            for job in jobs:
                self._fail_job(job, err)
            return
        seconds = (timer.ms["unet_ms"] - before) / 1e3
        now = time.monotonic()
        with self._wake:
            self._stats.unet_calls += 1
            self._stats.unet_rows += rows
            self._stats.unet_seconds += seconds
            self._stats.rows_per_call[rows] += 1
            self._stats.requests_per_call[len(jobs)] += 1
            self._stats.adapters_per_call[len({n for job in jobs for n in job.loras.names})] += 1
        self._unet_ms_per_row = seconds * 1e3 / rows
        for job in jobs:
            job.first_step = job.first_step or now

    def _finish(self, jobs: list[Job], timer: Timer) -> None:
        """Decode finished requests, one VAE call per latent size, and resolve their futures."""
        by_size: dict[tuple[int, ...], list[Job]] = {}
        for job in jobs:
            by_size.setdefault(job.state.latents.shape[1:], []).append(job)
        for group in by_size.values():
            tick = time.perf_counter()
            try:
                images = self.pipeline.decode_latents(
                    np.concatenate([j.state.latents for j in group])
                )
            except Exception as err:  # a failing engine fails these requests only
                for job in group:
                    self._fail_job(job, err)
                continue
            timer("vae_decode_ms", tick)
            start = 0
            for job in group:
                count = len(job.args.prompts)
                self._resolve(job, images[start : start + count])
                start += count

    def _resolve(self, job: Job, images: np.ndarray) -> None:
        now = time.monotonic()
        timings = {
            "queue_ms": ((job.admitted or now) - job.submitted) * 1e3,
            "first_step_ms": ((job.first_step or now) - job.submitted) * 1e3,
            "total_ms": (now - job.submitted) * 1e3,
        }
        output = numpy_to_pil(images) if job.args.output_type == "pil" else images
        with self._wake:
            self._active.remove(job)
            if not job.future.cancelled():
                self._stats.completed += 1
                self._stats.images += len(images)
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            job.future.set_result(PipelineOutput(output, timings))

    def _fail_job(self, job: Job, err: BaseException) -> None:
        with self._wake:
            if job in self._active:
                self._active.remove(job)
            self._stats.failed += 1
        _fail(job, err)

    def _fail_all(self, err: BaseException) -> None:
        for job in [*self._waiting, *self._active]:
            _fail(job, err)
        self._waiting.clear()
        self._active.clear()


def _fail(job: Job, err: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
        job.future.set_exception(err)


def static_batch(unet: Any, rows: int, latent_shape: tuple[int, ...]) -> int:
    """The batch of the smallest static (CUDA-graph) variant the engine runs at this latent
    size that holds `rows`, to pad the call to; 0 when it has none (run `rows` as they are)."""
    height, width = latent_shape[2:]
    batches = [
        variant.dims["unet_batch"]
        for variant in getattr(unet, "variants", [])
        if variant.dims.get("latent_height") == height
        and variant.dims.get("latent_width") == width
        and variant.dims.get("unet_batch", 0) >= rows
    ]
    return min(batches, default=0)


def load_batchers(
    bundles: Sequence[str],
    *,
    backend: str = "onnxruntime",
    device: str = "auto",
    trusted_key: str | None = None,
    max_loras: int = DEFAULT_MAX_LORAS,
    **options: Any,
) -> dict[str, Batcher]:
    """One Batcher per bundle, named by its folder (the API's `model`), for `sdrt serve` and
    each Ray replica alike; `max_loras` sizes the LoRA pool of each bundle exported with
    --lora-rank; `options` go to every Batcher."""
    check_max_loras(max_loras)
    names = [Path(bundle).resolve().name for bundle in bundles]
    if len(set(names)) != len(names):
        raise UserError(f"two bundles share a folder name ({', '.join(names)}); rename one")
    return {
        name: Batcher(
            Pipeline.load(
                bundle,
                backend=backend,
                device=device,
                trusted_key=trusted_key,
                max_loras=max_loras,
            ),
            **options,
        )
        for name, bundle in zip(names, bundles, strict=True)
    }
