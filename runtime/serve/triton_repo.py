"""`sdrt triton-repo`: write a Triton model repository whose python-backend model runs a bundle.

The model is decoupled: `execute` hands each request to sdrt's continuous batcher and returns at
once; the batcher's thread sends the response when the image is done, so requests that arrive
while others are denoising join them at the next U-Net step. The config records what the
repository was made from (sdrt version, the bundle's sha256 values, TensorRT engine keys) so that
the model refuses to start on a bundle that changed since.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..bundle import Bundle
from ..engine_cache import ENGINES_DIR
from ..errors import UserError

MODEL_TEMPLATE = '''"""Written by `sdrt triton-repo`: Triton runs sdrt's model class."""

from sdrt.serve.triton_model import TritonPythonModel  # noqa: F401
'''

# KServe v2 inputs: (name, Triton config type, optional). Scalars travel as shape [1].
INPUTS = (
    ("prompt", "TYPE_STRING", False),
    ("negative_prompt", "TYPE_STRING", True),
    ("num_inference_steps", "TYPE_INT32", True),
    ("guidance_scale", "TYPE_FP32", True),
    ("seed", "TYPE_INT64", True),
    ("height", "TYPE_INT32", True),
    ("width", "TYPE_INT32", True),
    ("scheduler", "TYPE_STRING", True),
    ("loras", "TYPE_STRING", True),  # JSON {"name": scale}: run-time LoRAs (--lora-rank bundles)
)
# config type -> (KServe v2 datatype a client sends, numpy dtype)
WIRE_TYPES = {
    "TYPE_STRING": ("BYTES", object),
    "TYPE_INT32": ("INT32", np.int32),
    "TYPE_INT64": ("INT64", np.int64),
    "TYPE_FP32": ("FP32", np.float32),
}
# model_config.proto's ModelInstanceGroup.Kind; KIND_AUTO: on the GPUs where Triton finds any,
# else on the CPU (the python backend then reports the kind it chose)
KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
BUNDLE_DIR = "bundle"  # where --copy-bundle puts the bundle, inside the model folder


@dataclass(frozen=True)
class RepoOptions:
    name: str = "sdrt"
    instances: int = 1
    kind: str = "auto"
    backend: str = "onnxruntime"
    copy_bundle: bool = False
    max_batch_rows: int | None = None  # None: the batcher's default for the backend
    max_queue: int = 64
    request_timeout_s: float = 600.0
    python_env: str | None = None  # a venv with sdrt installed, for the python backend's stub
    lora_dir: str | None = None  # LoRA files each instance loads at start, named by stem


def write_repository(bundle_dir: str | Path, out: str | Path, options: RepoOptions) -> Path:
    """Write OUT/<name>/{config.pbtxt, 1/model.py} (and the bundle copy); returns the model dir.

    Everything is written into a staging folder renamed into place, so a failure leaves nothing.
    """
    _check_options(options)
    bundle = Bundle.load(bundle_dir)  # verifies every sha256 before they are recorded
    engine_keys = _engine_keys(bundle.root) if options.backend == "tensorrt" else []
    if options.backend == "tensorrt" and not engine_keys:
        raise UserError(
            f"{bundle.root} has no TensorRT engines; run `sdrt build {bundle_dir}` on the GPU "
            "type Triton will run on, or pass --backend onnxruntime"
        )
    bf16 = any(c.precision == "bf16" for c in bundle.components.values())
    if bf16 and options.backend == "onnxruntime" and options.kind == "cpu":
        raise UserError(
            f"{bundle.root} is bf16, which ONNX Runtime's CPU provider cannot run; pass --kind "
            "gpu or --backend tensorrt, or export the bundle with --dtype fp32 for the CPU"
        )
    model_dir = Path(out) / options.name
    if model_dir.exists():
        raise UserError(f"{model_dir} already exists; remove it or pick another --name")
    staging = model_dir.with_name(f".{options.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "1").mkdir(parents=True)
        if options.copy_bundle:
            shutil.copytree(bundle.root, staging / BUNDLE_DIR)
            bundle_ref = BUNDLE_DIR
        else:
            bundle_ref = str(bundle.root.resolve())
        sha256 = {name: info.sha256 for name, info in sorted(bundle.components.items())}
        (staging / "config.pbtxt").write_text(
            config_pbtxt(options, bundle_ref, sha256, engine_keys)
        )
        (staging / "1" / "model.py").write_text(MODEL_TEMPLATE)
        staging.rename(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def request_tensors(values: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, str]]:
    """Client side: each value (a scalar, or a list for a deliberately wrong shape) as the
    (array, KServe datatype) the model's config declares; text is UTF-8 encoded."""
    types = {name: WIRE_TYPES[config_type] for name, config_type, _ in INPUTS}
    tensors = {}
    for name, value in values.items():
        datatype, dtype = types[name]
        items = value if isinstance(value, list) else [value]
        if dtype is object:
            items = [item.encode() for item in items]
        tensors[name] = (np.array(items, dtype), datatype)
    return tensors


def config_pbtxt(
    options: RepoOptions, bundle_ref: str, sha256: dict[str, str], engine_keys: list[str]
) -> str:
    """The model's config.pbtxt: KServe v2 tensors, decoupled policy, instances, provenance."""
    inputs = ",\n".join(
        f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ]'
        + (" optional: true" if optional else "")
        + " }"
        for name, dtype, optional in INPUTS
    )
    parameters = {
        "sdrt_version": __version__,
        "bundle": bundle_ref,
        "backend": options.backend,
        "bundle_sha256": json.dumps(sha256, sort_keys=True),
        "engine_keys": json.dumps(engine_keys),
        "max_queue": str(options.max_queue),
        "request_timeout_s": str(options.request_timeout_s),
    }
    if options.max_batch_rows is not None:
        parameters["max_batch_rows"] = str(options.max_batch_rows)
    if options.lora_dir is not None:
        parameters["lora_dir"] = str(Path(options.lora_dir).resolve())
    if options.python_env is not None:
        # Triton sources DIR/bin/activate before starting the stub: with the venv's bin first on
        # PATH the stub's embedded Python takes the venv as its prefix (pyvenv.cfg) and imports
        # sdrt from it. PYTHONPATH is not read: the stub runs an isolated interpreter.
        parameters["EXECUTION_ENV_PATH"] = str(Path(options.python_env).resolve())
    params = ",\n".join(
        f"  {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}"
        for key, value in parameters.items()
    )
    return (
        f"# written by sdrt {__version__} (`sdrt triton-repo`); regenerate instead of editing\n"
        f"name: {_quote(options.name)}\n"
        'backend: "python"\n'
        "max_batch_size: 0  # batching happens inside: sdrt's step-level batcher\n"
        "model_transaction_policy { decoupled: true }\n"
        f"input [\n{inputs}\n]\n"
        'output [\n  { name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }\n]\n'
        f"instance_group [ {{ count: {options.instances} kind: {KINDS[options.kind]} }} ]\n"
        f"parameters [\n{params}\n]\n"
    )


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _engine_keys(root: Path) -> list[str]:
    folder = root / ENGINES_DIR
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _check_options(options: RepoOptions) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", options.name) or options.name.startswith("."):
        raise UserError(
            f"--name {options.name!r} is not a Triton model name; use letters, digits, _ . -"
        )
    if options.instances < 1:
        raise UserError(f"--instances must be >= 1, got {options.instances}")
    if options.kind not in KINDS:
        raise UserError(f"--kind must be auto, gpu or cpu, got {options.kind!r}")
    if options.backend not in ("onnxruntime", "tensorrt"):
        raise UserError(f"--backend must be onnxruntime or tensorrt, got {options.backend!r}")
    if options.max_batch_rows is not None and options.max_batch_rows < 1:
        raise UserError(f"--max-batch-rows must be >= 1, got {options.max_batch_rows}")
    if (
        options.python_env is not None
        and not (Path(options.python_env) / "bin" / "activate").is_file()
    ):
        raise UserError(
            f"--python-env {options.python_env} has no bin/activate; give a virtualenv made with "
            "the server's Python version in which sdrt is installed"
        )
    if options.max_queue < 1:
        raise UserError(f"--max-queue must be >= 1, got {options.max_queue}")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `sdrt triton-repo` to the command line."""
    parser = commands.add_parser(
        "triton-repo", help="write a Triton model repository that serves a bundle"
    )
    parser.add_argument("bundle")
    parser.add_argument("out", help="model repository folder (created if absent)")
    parser.add_argument("--name", default="sdrt", help="Triton model name (default sdrt)")
    parser.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    parser.add_argument(
        "--kind",
        choices=tuple(KINDS),
        default="auto",
        help="instance kind (default auto: the GPUs where Triton finds any, else the CPU)",
    )
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    parser.add_argument(
        "--copy-bundle", action="store_true", help="copy the bundle into the model folder"
    )
    parser.add_argument("--max-batch-rows", type=int, help="U-Net rows per call (batcher default)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests (default 64)")
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds per request (default 600)"
    )
    parser.add_argument(
        "--python-env",
        metavar="VENV",
        help="virtualenv (server's Python version, sdrt installed) the model runs in; "
        "default: the server's own Python",
    )
    parser.add_argument(
        "--lora-dir",
        help="run-time LoRAs (*.safetensors, named by stem) each instance loads at start",
    )
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    options = RepoOptions(
        name=args.name,
        instances=args.instances,
        kind=args.kind,
        backend=args.backend,
        copy_bundle=args.copy_bundle,
        max_batch_rows=args.max_batch_rows,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        python_env=args.python_env,
        lora_dir=args.lora_dir,
    )
    model_dir = write_repository(args.bundle, args.out, options)
    print(f"wrote {model_dir} (start: tritonserver --model-repository={Path(args.out)})")
    return 0
