"""The Triton python-backend model that `sdrt triton-repo` points at (decoupled mode).

`execute` turns each request's KServe v2 tensors into generation arguments and submits them to
sdrt's batcher, then returns without waiting; the batcher's thread sends each request's one
final response when its image is done. So Triton's own scheduler never holds a request: every
request joins the step-level batch at the next U-Net call. Bad input gets a Triton error
(INVALID_ARG) with sdrt's one-sentence message and the model keeps serving.

Runs inside Triton's stub process, which provides `triton_python_backend_utils`; the parsing of
tensors (`request_arguments`) is plain numpy so it is tested without Triton.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .batcher import Batcher, QueueFull, ShuttingDown, Stats

Reader = Callable[[str], "np.ndarray | None"]  # input name -> its tensor, None when absent

# input name -> (Pipeline keyword, conversion of the one element)
_SCALARS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "prompt": ("prompt", lambda v: _text(v, "prompt")),
    "negative_prompt": ("negative_prompt", lambda v: _text(v, "negative_prompt")),
    "num_inference_steps": ("num_inference_steps", int),
    "guidance_scale": ("guidance_scale", float),
    "seed": ("seed", int),
    "height": ("height", int),
    "width": ("width", int),
    "scheduler": ("scheduler", lambda v: _text(v, "scheduler")),
    "loras": ("loras", lambda v: _json_object(_text(v, "loras"), "loras")),
}


def request_arguments(read: Reader) -> dict[str, Any]:
    """Pipeline keyword arguments from a request's tensors; absent inputs keep the defaults."""
    kwargs: dict[str, Any] = {}
    for name, (keyword, convert) in _SCALARS.items():
        tensor = read(name)
        if tensor is None:
            continue
        if np.size(tensor) != 1:
            raise UserError(
                f"input {name} must hold one element, got shape {list(np.shape(tensor))}; "
                "send one request per image"
            )
        kwargs[keyword] = convert(np.asarray(tensor).reshape(-1)[0])
    if "prompt" not in kwargs:
        raise UserError("input prompt is missing; send it as a BYTES tensor of shape [1]")
    return kwargs


def image_tensor(image: np.ndarray) -> np.ndarray:
    """float HxWx3 in [0, 1] -> the UINT8 output, rounded as PIL images are."""
    return (np.asarray(image) * 255).round().astype(np.uint8)


# Batcher figures exported beside Triton's own metrics: gauge name -> (description, reader)
GAUGES: dict[str, tuple[str, Callable[[Stats], float]]] = {
    "sdrt_unet_calls": ("U-Net calls run by the batcher", lambda s: s.unet_calls),
    "sdrt_unet_rows": ("U-Net rows (images x guidance) run", lambda s: s.unet_rows),
    "sdrt_unet_shared_calls": (
        "U-Net calls that carried more than one request (step-level batching at work)",
        lambda s: sum(n for k, n in s.requests_per_call.items() if k > 1),
    ),
    "sdrt_active_requests": ("requests between admission and decode", lambda s: s.active),
    "sdrt_queued_requests": ("requests waiting for rows", lambda s: s.queued),
}


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"input {name} is not UTF-8 text ({err}); send UTF-8") from err
    if isinstance(value, str):
        return value
    raise UserError(f"input {name} must be BYTES (text), got {type(value).__name__}")


def _json_object(text: str, name: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f'input {name} is not JSON ({err}); send e.g. {{"style": 0.8}}') from err
    if not isinstance(value, dict):
        raise UserError(f"input {name} must be a JSON object of name -> scale, got {text!r}")
    return value


def bundle_path(reference: str, model_dir: str) -> Path:
    """The config's bundle reference: absolute, or inside the model folder (--copy-bundle)."""
    path = Path(reference)
    return path if path.is_absolute() else Path(model_dir) / path


def check_provenance(recorded: dict[str, str], actual: dict[str, str], bundle: Path) -> None:
    """Refuse a bundle whose files changed since the repository was written."""
    if recorded != actual:
        changed = sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))
        raise UserError(
            f"{bundle} changed since `sdrt triton-repo` wrote this model ({', '.join(changed)}); "
            "run `sdrt triton-repo` again"
        )


class TritonPythonModel:
    """Triton's python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        from ..pipeline import Pipeline

        self.pb = pb_utils
        params = {
            key: value["string_value"]
            for key, value in json.loads(args["model_config"])["parameters"].items()
        }
        bundle = bundle_path(params["bundle"], args["model_repository"])
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        self.pipe = Pipeline.load(bundle, backend=params["backend"], device=device)
        check_provenance(
            json.loads(params["bundle_sha256"]),
            {name: info.sha256 for name, info in self.pipe.bundle.components.items()},
            bundle,
        )
        options: dict[str, Any] = {
            "max_queue": int(params["max_queue"]),
            "request_timeout_s": float(params["request_timeout_s"]),
        }
        if "max_batch_rows" in params:
            options["max_batch_rows"] = int(params["max_batch_rows"])
        if params.get("lora_dir") and self.pipe.adapters is not None:
            self.pipe.adapters.load_folder(Path(params["lora_dir"]))
        self.batcher = Batcher(self.pipe, mode="continuous", **options)
        self.batcher.start()
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        # the families must outlive their metrics, so both are kept
        self.metric_families = {
            name: pb_utils.MetricFamily(name, text, pb_utils.MetricFamily.GAUGE)
            for name, (text, _) in GAUGES.items()
        }
        self.gauges = {name: family.Metric(labels) for name, family in self.metric_families.items()}

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                kwargs = request_arguments(lambda name, r=request: _tensor(self.pb, r, name))
                future = self.batcher.submit({**kwargs, "output_type": "np"})
            except UserError as err:
                self._send_error(sender, str(err), self.pb.TritonError.INVALID_ARG)
                continue
            except (QueueFull, ShuttingDown) as err:
                self._send_error(sender, str(err), self.pb.TritonError.UNAVAILABLE)
                continue
            future.add_done_callback(lambda f, s=sender: self._respond(s, f))
        return None

    def finalize(self) -> None:
        self.batcher.stop(drain_deadline_s=30.0)

    def _respond(self, sender: Any, future: Future) -> None:
        """Runs on the batcher's thread when the request's image is done (or failed)."""
        stats = self.batcher.stats()
        for name, (_, read) in GAUGES.items():
            self.gauges[name].set(float(read(stats)))
        try:
            images = future.result().images
        except UserError as err:
            self._send_error(sender, str(err), self.pb.TritonError.INVALID_ARG)
            return
        except Exception as err:  # the request failed, the model lives on
            self._send_error(sender, f"{type(err).__name__}: {err}", self.pb.TritonError.INTERNAL)
            return
        output = self.pb.Tensor("image", image_tensor(images[0]))
        sender.send(
            self.pb.InferenceResponse(output_tensors=[output]),
            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )

    def _send_error(self, sender: Any, message: str, code: Any) -> None:
        sender.send(
            self.pb.InferenceResponse(error=self.pb.TritonError(message, code)),
            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )


def _tensor(pb_utils: Any, request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
