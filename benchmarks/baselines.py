"""The PyTorch paths every sdrt backend is compared with: eager diffusers (SDPA attention) and
the same pipeline under torch.compile."""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from sdrt.export.parity import denoiser, run_diffusers

from .harness import Generated
from .memory import MemoryProbe, torch_probe
from .workload import Workload

TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# reduce-overhead adds CUDA graphs on top of the default mode; they exist only on CUDA.
COMPILE_MODES = {"cuda": "reduce-overhead", "cpu": "default"}
# SDXL's U-Net inputs that diffusers passes as `added_cond_kwargs`
ADDED_CONDITIONS = ("text_embeds", "time_ids")


class TorchRunner:
    """A diffusers pipeline as a benchmark runner. Stages call its modules with exactly the
    arguments its own loop passes (a 0-d timestep, the same keywords): a compiled module guards
    on them, and any difference would time a recompilation."""

    def __init__(self, pipe: Any, workload: Workload, device: str) -> None:
        self.pipe = pipe
        self.workload = workload
        self.device = device
        self.memory: MemoryProbe = torch_probe(device)
        self.stages = torch_stages(pipe, workload)

    def stage(self, name: str) -> Callable[[], Any]:
        call = self.stages[name]

        def run() -> Any:
            with torch.no_grad():
                return call()

        return run

    def generate(self, batch: int) -> Generated:
        images = run_diffusers(
            self.pipe,
            self.workload.scheduler,
            self.workload.latents[batch],
            **self.workload.call(batch),
            **self.workload.eager_call,
        )
        return Generated(images, None)

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def torch_stages(pipe: Any, workload: Workload) -> dict[str, Callable[[], Any]]:
    """One call of each stage. Module attributes are looked up at call time, so a module
    compiled after this is the one timed."""
    param = next(denoiser(pipe).parameters())
    device, dtype = param.device, param.dtype
    feeds = {
        name: torch.from_numpy(value).to(device, dtype)
        for name, value in workload.unet_feeds.items()
        if name != "timestep"
    }
    timestep = torch.from_numpy(workload.timestep).to(device)
    latent = torch.from_numpy(workload.latent).to(device, pipe.vae.dtype)
    negative = [workload.negative_prompt] if workload.negative_prompt else None
    prompt_options = {  # each family's encode_prompt takes some of these (Flux: no guidance)
        "prompt_2": None,  # SD3 and Flux: the same prompt for every encoder
        "prompt_3": None,
        "do_classifier_free_guidance": workload.guided,
        "negative_prompt": negative,
        **workload.eager_call,
    }
    accepted = inspect.signature(pipe.encode_prompt).parameters
    prompt_options = {k: v for k, v in prompt_options.items() if k in accepted}
    return {
        "text_encoder": lambda: pipe.encode_prompt(
            prompt=[workload.prompt], device=device, num_images_per_prompt=1, **prompt_options
        ),
        "unet_step": _denoiser_step(pipe, workload, feeds, timestep),
        "vae_decode": lambda: pipe.vae.decode(latent, return_dict=False, generator=None)[0],
    }


def _denoiser_step(
    pipe: Any, workload: Workload, feeds: dict[str, torch.Tensor], timestep: torch.Tensor
) -> Callable[[], Any]:
    """One denoiser call as the pipeline's loop makes it: the U-Net with a 0-d timestep and
    keywords; a transformer through its export wrapper (the same call, e.g. Flux's t / 1000),
    with the timestep per row."""
    if hasattr(pipe, "unet"):
        added = {name: feeds[name] for name in ADDED_CONDITIONS if name in feeds} or None
        return lambda: pipe.unet(
            feeds["sample"],
            timestep,
            encoder_hidden_states=feeds["encoder_hidden_states"],
            timestep_cond=feeds.get("timestep_cond"),
            cross_attention_kwargs=None,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
    from sdrt.export.families import export_family
    from sdrt.export.load import family_of

    (component,) = [
        c for c in export_family(family_of(pipe)).components(pipe) if c.name == "transformer"
    ]
    wrapper = type(component.module)
    rows = {**feeds, "timestep": timestep.expand(len(feeds["sample"])).to(feeds["sample"].dtype)}
    ordered = [rows[spec.name] for spec in component.inputs]
    return lambda: wrapper(pipe.transformer)(*ordered)


def prepare_eager(pipe: Any, device: str, dtype: str) -> tuple[Any, float, dict[str, Any]]:
    """Move `pipe` to `device` in `dtype`; returns it, the seconds taken and what it runs."""
    start = time.perf_counter()
    pipe.to(device, TORCH_DTYPES[dtype])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    attention = sorted({type(p).__name__ for p in denoiser(pipe).attn_processors.values()})
    return pipe, seconds, {"precision": dtype, "attention": ", ".join(attention)}


def compile_pipeline(pipe: Any, device: str) -> dict[str, Any]:
    """Compile the denoiser and the VAE decoder in place, as diffusers' own guide does; the
    compilation itself happens on the first calls, which the harness times separately."""
    mode = COMPILE_MODES[device]
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    setattr(pipe, name, torch.compile(getattr(pipe, name), mode=mode))
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode)
    return {"mode": mode, "compiled": f"{name}, vae.decode"}


def release_torch(device: str) -> None:
    """Return PyTorch's cached device memory, compiled graphs and CUDA graph pools included,
    so the engine paths measured next have it."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_name(device: str) -> str | None:
    return torch.cuda.get_device_name() if device == "cuda" else None
