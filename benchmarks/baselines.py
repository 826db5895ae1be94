"""The PyTorch paths every sdrt backend is compared with: eager diffusers (SDPA attention) and
the same pipeline under torch.compile."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from sdrt.export.parity import run_diffusers

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
        )
        return Generated(images, None)

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def torch_stages(pipe: Any, workload: Workload) -> dict[str, Callable[[], Any]]:
    """One call of each stage. Module attributes are looked up at call time, so a module
    compiled after this is the one timed."""
    unet_param = next(pipe.unet.parameters())
    device, dtype = unet_param.device, unet_param.dtype
    feeds = {
        name: torch.from_numpy(value).to(device, dtype)
        for name, value in workload.unet_feeds.items()
        if name != "timestep"
    }
    timestep = torch.from_numpy(workload.timestep).to(device)
    added = {name: feeds[name] for name in ADDED_CONDITIONS if name in feeds} or None
    latent = torch.from_numpy(workload.latent).to(device, pipe.vae.dtype)
    negative = [workload.negative_prompt] if workload.negative_prompt else None
    return {
        "text_encoder": lambda: pipe.encode_prompt(
            prompt=[workload.prompt],
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=workload.guided,
            negative_prompt=negative,
        ),
        "unet_step": lambda: pipe.unet(
            feeds["sample"],
            timestep,
            encoder_hidden_states=feeds["encoder_hidden_states"],
            timestep_cond=feeds.get("timestep_cond"),
            cross_attention_kwargs=None,
            added_cond_kwargs=added,
            return_dict=False,
        )[0],
        "vae_decode": lambda: pipe.vae.decode(latent, return_dict=False, generator=None)[0],
    }


def prepare_eager(pipe: Any, device: str, dtype: str) -> tuple[Any, float, dict[str, Any]]:
    """Move `pipe` to `device` in `dtype`; returns it, the seconds taken and what it runs."""
    start = time.perf_counter()
    pipe.to(device, TORCH_DTYPES[dtype])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    attention = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    return pipe, seconds, {"precision": dtype, "attention": ", ".join(attention)}


def compile_pipeline(pipe: Any, device: str) -> dict[str, Any]:
    """Compile the U-Net and the VAE decoder in place, as diffusers' own guide does; the
    compilation itself happens on the first calls, which the harness times separately."""
    mode = COMPILE_MODES[device]
    pipe.unet = torch.compile(pipe.unet, mode=mode)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode)
    return {"mode": mode, "compiled": "unet, vae.decode"}


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
