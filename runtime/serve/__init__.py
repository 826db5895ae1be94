"""Serving: a continuous batcher over a Pipeline, and the HTTP API on top of it.

The batcher is the API other front ends (Triton's python backend, Ray Serve) build on; it is
stable, torch-free and needs no HTTP package:

    from sdrt import Pipeline
    from sdrt.serve import Batcher, QueueFull, ShuttingDown, RequestTimeout

    batcher = Batcher(Pipeline.load("bundle/"), max_batch_rows=16, max_queue=64,
                      mode="continuous", request_timeout_s=300)
    batcher.start()
    future = batcher.submit({"prompt": "a red bicycle", "num_inference_steps": 20, "seed": 1})
    out = future.result()          # PipelineOutput: .images (PIL, or float32 NHWC in [0, 1]
                                   # with output_type="np"), .timings (queue_ms,
                                   # first_step_ms, total_ms)
    batcher.submit(args, previews=Previews(3, deliver))   # + deliver(index, images) of the
                                   # predicted clean image at 3 evenly spaced steps
    batcher.cancel(future)         # leaves at the next tick, frees its rows
    batcher.stats()                # Stats: counters for metrics (queued, active, unet_calls,
                                   # rows_per_call, requests_per_call, ticks_by_active, ...)
    batcher.stop(drain_deadline_s=30)   # refuse new work, finish what runs, join the thread

- `submit(args)` takes Pipeline keyword arguments (a mapping) or a `GenerationArgs` from
  `sdrt.arguments.check_arguments`. It raises `sdrt.UserError` for a bad value, `QueueFull`
  (with `.retry_after_s`) when `max_queue` requests wait, `ShuttingDown` once `stop` was
  called (requests submitted before `start` wait for it). The future raises
  `RequestTimeout` after `request_timeout_s`, `UserError` for an input found bad while
  preparing (e.g. an image), `ShuttingDown` when the drain deadline passed first,
  `CancelledError` after `cancel`.
- `mode="continuous"` (default): requests join and leave at every U-Net step.
  `mode="request"`: a group admitted together runs to completion before the next is
  admitted (request-level batching, for comparison). `max_batch_rows=2` with continuous mode
  runs one guided request at a time (no batching).
- A seeded request gives the same image as `Pipeline(...)` with the same arguments, whatever
  it was batched with.

`create_app` (in `sdrt.serve.app`, needs `sdrt[serve]`) wraps batchers in the OpenAI-style
HTTP API that `sdrt serve` runs.
"""

from .batcher import MODES, Batcher, QueueFull, RequestTimeout, ShuttingDown, Stats
from .previews import Previews

__all__ = ["MODES", "Batcher", "Previews", "QueueFull", "RequestTimeout", "ShuttingDown", "Stats"]
