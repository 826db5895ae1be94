"""An fp16 ONNX made at build time, for an fp32 bundle's fp16 TensorRT engines.

Every TensorRT sdrt builds for computes in the types its ONNX has (strongly typed): TensorRT 11
and TensorRT-RTX know nothing else, and TensorRT 10's weak typing (`BuilderFlag.FP16`) may lower
the timestep embedding to fp16, which every other path keeps fp32 on purpose. The fp16 graph is
therefore made here, with the export's own policy (`optimize.keep_fp32_nodes`: the timestep
embedding and the nodes whose measured activations leave the fp16 range stay fp32), measured
on inputs like deployment's (`sdrt.export.calibration`): the calibration prompts' token ids,
the U-Net's conditioning from the bundle's own text encoders run by ONNX Runtime, timesteps
across the schedule, at the engine's opt size where the CUDA provider measures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from sdrt.bundle import Bundle
from sdrt.engine_cache import Profile
from sdrt.errors import UserError
from sdrt.families import family_for

from .calibration import CUDA, PROMPTS, TIMESTEPS, calibration_providers

TEXT_INPUT = "input_ids"


def calibration_feeds(
    bundle: Bundle, component: str, profile: Profile
) -> list[dict[str, np.ndarray]]:
    """The measuring inputs for `component` of `bundle`, at the profile's opt shapes where the
    CUDA provider measures, else at its minimum (on the CPU a full-size U-Net takes tens of
    minutes per round), as the export sizes its own."""
    on_cuda = CUDA in calibration_providers()
    shapes = {name: (r.opt if on_cuda else r.min) for name, r in profile.items()}
    dtypes = {spec["name"]: spec["dtype"] for spec in bundle.components[component].inputs}
    rng = np.random.default_rng(0)
    if TEXT_INPUT in shapes:
        ids = prompt_ids(bundle, component, shapes[TEXT_INPUT])
        return [{TEXT_INPUT: ids.astype(dtypes[TEXT_INPUT])}]
    if component == "vae_decoder":
        latent = rng.standard_normal(shapes["latent"]) / float(
            bundle.manifest["vae_scaling_factor"]
        )
        return [{"latent": latent.astype(dtypes["latent"])}]
    if "timestep" not in shapes:  # the VAE encoder: pixels in [-1, 1]
        return [{n: rng.uniform(-1, 1, s).astype(dtypes[n]) for n, s in shapes.items()}]
    rows = shapes["timestep"][0]
    encode = prompt_encoder(bundle)
    feeds = []
    for index, t in enumerate(TIMESTEPS):
        prompt = PROMPTS[index % len(PROMPTS)]
        conditioning = encode([("", prompt)[row % 2] for row in range(rows)])
        feed = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
        feed |= conditioning | {"timestep": np.full(rows, t)}
        if "time_ids" in feed:  # SDXL: original size, crop, target size, in pixels
            scale = int(bundle.manifest["vae_scale_factor"])
            side = [d * scale for d in shapes["sample"][2:]]
            feed["time_ids"] = np.tile(np.array([*side, 0, 0, *side]), (rows, 1))
        feeds.append({name: np.asarray(feed[name]).astype(dtypes[name]) for name in shapes})
    for name, value in feeds[0].items():
        if value.shape != tuple(shapes[name]):
            raise UserError(
                f"{component} input {name} is {tuple(shapes[name])} in the profile but the "
                f"bundle's text encoders give {value.shape}; re-export the bundle"
            )
    return feeds


def prompt_ids(bundle: Bundle, component: str, shape: Sequence[int]) -> np.ndarray:
    """Token ids of the calibration prompts (and the empty negative prompt), cycled to fill the
    batch, from the component's own tokenizer."""
    tokenizer = family_for(bundle.manifest).tokenizers(bundle).get(component)
    if tokenizer is None or len(shape) != 2:
        raise UserError(
            f"cannot make calibration token ids of shape {tuple(shape)} without {component}'s "
            "tokenizer; export the bundle with --dtype fp16 instead"
        )
    texts = ["", *PROMPTS]
    prompts = [texts[i % len(texts)] for i in range(shape[0])]
    return tokenizer.encode(prompts, shape[1])


def prompt_encoder(bundle: Bundle) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """A function from prompts to the denoiser's text conditioning (encoder_hidden_states, and
    SDXL's text_embeds or a transformer's pooled_projections), computed as generation computes
    it: the bundle's own text encoders on ONNX Runtime's CPU provider, through the family's
    `encode_text`."""
    from sdrt.backends import load_engine
    from sdrt.pipeline import Pipeline

    family = family_for(bundle.manifest)
    tokenizers = family.tokenizers(bundle)
    engines = {
        name: load_engine("onnxruntime", bundle, name, "cpu", graph_cache=False)
        for name in tokenizers
    }
    encoders = Pipeline(bundle, engines, tokenizers)
    return lambda prompts: family.encode_text(encoders, prompts)


def write_fp16_onnx(
    source: Path, feeds: Sequence[Mapping[str, np.ndarray]], folder: Path
) -> tuple[Path, int]:
    """Convert the fp32 graph at `source` to fp16 into `folder` (weights as external data, so
    any size fits); returns the new file and how many nodes were kept fp32."""
    try:
        import onnx

        from . import optimize
        from .onnx_export import save_onnx
    except ImportError as err:
        raise UserError(
            f"converting {source.name} to fp16 at build time needs the export extra ({err.name} "
            "is missing); run `pip install 'sdrt[export]'`, or export the bundle with --dtype fp16"
        ) from err
    model = onnx.load(str(source))
    try:
        keep = optimize.keep_fp32_nodes(model, feeds, providers=calibration_providers())
    except ValueError as err:
        raise UserError(f"{source.name}: {err}; or export the bundle with --dtype fp16") from err
    converted = optimize.convert_fp16(model, keep)
    target = folder / source.name
    save_onnx(converted, target, external_data=True)
    return target, len(keep)
