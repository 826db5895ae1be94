"""An fp16 ONNX made at build time, for TensorRT builders that keep the graph's types.

TensorRT 10 can lower an fp32 network to fp16 itself (weak typing, `BuilderFlag.FP16`).
TensorRT 11 and TensorRT-RTX build strongly typed networks only: the engine computes in the
types the ONNX has. For an fp32 bundle the fp16 graph is therefore made here, with the export's
own policy (`optimize.keep_fp32_nodes`: nodes whose measured activations leave the fp16 range
stay fp32), measured on inputs shaped like the smallest request the engine will take.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sdrt.engine_cache import Profile
from sdrt.errors import UserError
from sdrt.tokenizer import ClipTokenizer

# Token ids for text encoders come from real prompts; a random id is not a sentence.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk, highly detailed",
    "",
    "portrait of an old man, dramatic lighting, 85mm",
)


def calibration_feeds(
    profile: Profile,
    dtypes: Mapping[str, str],
    tokenizer_dir: Path | None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One input set at the profile's minimum shapes, drawn as the export draws its samples:
    timesteps across the schedule, N(0, 1) for other floats, prompt ids for integer inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shapes in profile.items():
        shape, dtype = shapes.min, np.dtype(dtypes[name])
        if dtype.kind in "iu":
            feeds[name] = prompt_ids(tokenizer_dir, shape).astype(dtype)
        elif name == "timestep":
            feeds[name] = rng.uniform(0, 999, shape).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def prompt_ids(tokenizer_dir: Path | None, shape: tuple[int, ...]) -> np.ndarray:
    if tokenizer_dir is None or len(shape) != 2:
        raise UserError(
            f"cannot make calibration token ids of shape {shape} without the component's "
            "tokenizer; export the bundle with --dtype fp16 instead"
        )
    prompts = [CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)] for i in range(shape[0])]
    return ClipTokenizer.from_dir(tokenizer_dir).encode(prompts, shape[1])


def write_fp16_onnx(
    source: Path, feeds: Mapping[str, np.ndarray], folder: Path
) -> tuple[Path, int]:
    """Convert the fp32 graph at `source` to fp16 into `folder` (weights as external data, so
    any size fits); returns the new file and how many nodes were kept fp32."""
    try:
        import onnx
        import onnxruntime as ort

        from . import optimize
        from .onnx_export import save_onnx
    except ImportError as err:
        raise UserError(
            f"converting {source.name} to fp16 at build time needs the export extra ({err.name} "
            "is missing); run `pip install 'sdrt[export]'`, or export the bundle with --dtype fp16"
        ) from err
    model = onnx.load(str(source))
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()]
    try:
        keep = optimize.keep_fp32_nodes(model, feeds, providers=providers)
    except ValueError as err:
        raise UserError(f"{source.name}: {err}; or export the bundle with --dtype fp16") from err
    converted = optimize.convert_fp16(model, keep)
    target = folder / source.name
    save_onnx(converted, target, external_data=True)
    return target, len(keep)
