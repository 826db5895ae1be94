"""The continuous batcher in-process: batched images equal Pipeline alone, modes admit as
specified, and cancelled, timed-out and overflowing requests leave cleanly."""

from __future__ import annotations

import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from sdrt import Pipeline
from sdrt.serve import Batcher, QueueFull, RequestTimeout, ShuttingDown

MIXED = [
    {"prompt": "cat", "num_inference_steps": 3, "guidance_scale": 7.5, "scheduler": "ddim"},
    {"prompt": "dog", "num_inference_steps": 5, "guidance_scale": 1.0, "scheduler": "euler"},
    {"prompt": ["fox", "owl"], "num_inference_steps": 4, "guidance_scale": 3.0},
    {"prompt": "eel", "num_inference_steps": 2, "guidance_scale": 7.5, "scheduler": "euler_a"},
    {"prompt": "bee", "num_inference_steps": 4, "height": 32, "width": 48, "scheduler": "ddim"},
    {"prompt": "yak", "num_inference_steps": 3, "height": 32, "width": 48, "guidance_scale": 1.0},
]


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return Pipeline.load(tiny_bundle, device="cpu")


def test_batched_requests_equal_pipeline_alone(runtime):
    batcher = Batcher(runtime, max_batch_rows=16)
    calls = [{**call, "seed": seed, "output_type": "np"} for seed, call in enumerate(MIXED)]
    futures = [batcher.submit(call) for call in calls]  # queued before start: admitted together
    batcher.start()
    outputs = [f.result(timeout=120) for f in futures]
    batcher.stop()
    for call, out in zip(calls, outputs, strict=True):
        alone = runtime(**call).images
        assert out.images.shape == alone.shape
        assert np.abs(out.images - alone).max() <= 1e-5
        assert 0 <= out.timings["queue_ms"] <= out.timings["first_step_ms"]
    stats = batcher.stats()
    assert max(stats.requests_per_call) == 4  # the four 64x64 requests shared a U-Net call
    assert stats.completed == len(MIXED) and stats.images == len(MIXED) + 1


class RecordingUnet:
    """The tiny U-Net, noting for each call whether the conditioning came as host rows."""

    def __init__(self, engine):
        self.engine, self.host_rows = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, feeds):
        hidden = feeds["encoder_hidden_states"]
        self.host_rows.append(len(hidden) if isinstance(hidden, np.ndarray) else None)
        return self.engine.run(feeds)


def test_lone_request_feeds_its_conditioning_uploaded_once_and_shared_calls_feed_rows(
    runtime, monkeypatch
):
    unet = RecordingUnet(runtime.engines["unet"])
    monkeypatch.setitem(runtime.engines, "unet", unet)
    call = dict(prompt="cat", num_inference_steps=3, scheduler="ddim", seed=1, output_type="np")
    batcher = Batcher(runtime, max_batch_rows=16)
    batcher.start()
    lone = batcher.submit(call).result(timeout=60).images
    assert unet.host_rows == [None] * 3  # as Pipeline does: no host copy per step
    unet.host_rows.clear()
    futures = [batcher.submit({**call, "prompt": p}) for p in ("a", "b")]  # may share calls
    for future in futures:
        future.result(timeout=60)
    batcher.stop()
    assert set(unet.host_rows) <= {None, 4} and len(unet.host_rows) >= 3
    assert np.abs(lone - runtime(**call).images).max() <= 1e-6


@pytest.mark.parametrize(
    ("mode", "requests_per_call"),
    [
        # A (2 steps) and B (6) admitted together; C (2) waits for rows
        ("continuous", {2: 4, 1: 2}),  # C joins as soon as A leaves
        ("request", {2: 2, 1: 6}),  # C waits until B has finished too
    ],
)
def test_modes_admit_as_specified(runtime, mode, requests_per_call):
    batcher = Batcher(runtime, max_batch_rows=4, mode=mode)
    futures = [
        batcher.submit({"prompt": p, "num_inference_steps": steps, "scheduler": "ddim"})
        for p, steps in (("a", 2), ("b", 6), ("c", 2))
    ]
    batcher.start()
    for future in futures:
        future.result(timeout=60)
    batcher.stop()
    assert dict(batcher.stats().requests_per_call) == requests_per_call


def test_cancelled_request_leaves_and_others_finish(runtime):
    batcher = Batcher(runtime, max_batch_rows=4)
    first = batcher.submit({"prompt": "a", "num_inference_steps": 2})
    second = batcher.submit({"prompt": "b", "num_inference_steps": 2})
    batcher.cancel(first)
    batcher.start()
    assert len(second.result(timeout=60).images) == 1
    with pytest.raises(CancelledError):
        first.result()
    batcher.stop()
    stats = batcher.stats()
    assert (stats.cancelled, stats.completed, stats.active) == (1, 1, 0)
    assert set(stats.requests_per_call) == {1}


def test_full_queue_refuses_with_retry_after_and_stop_refuses_new_work(runtime):
    batcher = Batcher(runtime, max_queue=1)
    kept = batcher.submit({"prompt": "a", "num_inference_steps": 2})
    with pytest.raises(QueueFull) as full:
        batcher.submit({"prompt": "b", "num_inference_steps": 2})
    assert full.value.retry_after_s >= 1
    batcher.start()
    batcher.stop(drain_deadline_s=60)  # drains the queued request
    assert len(kept.result(timeout=0).images) == 1
    with pytest.raises(ShuttingDown):
        batcher.submit({"prompt": "c", "num_inference_steps": 2})


def test_request_past_its_timeout_fails_and_frees_its_rows(runtime):
    batcher = Batcher(runtime, request_timeout_s=0.001)
    future = batcher.submit({"prompt": "a", "num_inference_steps": 2})
    time.sleep(0.01)  # past the deadline before the first tick
    batcher.start()
    with pytest.raises(RequestTimeout):
        future.result(timeout=60)
    batcher.stop()
    stats = batcher.stats()
    assert (stats.timed_out, stats.active, stats.unet_calls) == (1, 0, 0)


def test_bad_arguments_are_refused_at_submit(runtime):
    from sdrt.errors import UserError

    with pytest.raises(UserError, match="unknown scheduler"):
        Batcher(runtime).submit({"prompt": "a", "scheduler": "nope"})


def test_a_failing_tick_fails_its_requests_and_the_batcher_keeps_serving(runtime, monkeypatch):
    batcher = Batcher(runtime, max_batch_rows=4)
    doomed = batcher.submit({"prompt": "a", "num_inference_steps": 2})
    real_groups = batcher._groups
    monkeypatch.setattr(batcher, "_groups", lambda: 1 / 0)
    batcher.start()
    with pytest.raises(ZeroDivisionError):
        doomed.result(timeout=60)
    monkeypatch.setattr(batcher, "_groups", real_groups)
    assert len(batcher.submit({"prompt": "b", "num_inference_steps": 2}).result(60).images) == 1
    batcher.stop()


def test_static_variant_batch_is_the_smallest_that_holds_the_rows():
    from types import SimpleNamespace

    from sdrt.serve.batcher import static_batch

    # stands for OnnxRuntimeEngine.variants (runtime/backends/onnxruntime.py StaticVariant.dims)
    sizes = {"latent_height": 8, "latent_width": 8}
    unet = SimpleNamespace(
        variants=[SimpleNamespace(dims={"unet_batch": b, **sizes}) for b in (8, 2)]
    )
    assert static_batch(unet, 1, (1, 4, 8, 8)) == 2
    assert static_batch(unet, 3, (3, 4, 8, 8)) == 8
    assert static_batch(unet, 9, (9, 4, 8, 8)) == 0  # too many rows: the dynamic graph
    assert static_batch(unet, 2, (2, 4, 8, 16)) == 0  # no variant of this size
    assert static_batch(SimpleNamespace(), 2, (2, 4, 8, 8)) == 0  # a backend without variants
