"""sdrt backends as benchmark runners: the numpy Pipeline driving one backend's engines."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdrt import Pipeline
from sdrt.arguments import Limits
from sdrt.errors import UserError

from .harness import Generated
from .memory import MemoryProbe, engine_probe
from .workload import Workload

# Each backend at its fastest setting: ONNX Runtime captures CUDA graphs by default, TensorRT
# only when asked.
BACKEND_OPTIONS: dict[str, dict[str, Any]] = {"tensorrt": {"cuda_graph": True}}


class SdrtRunner:
    """Stages run the engines on the workload's inputs, the text stage the Pipeline's own
    conditioning step; `generate` is the Pipeline call users make."""

    def __init__(self, pipeline: Pipeline, workload: Workload, memory: MemoryProbe) -> None:
        self.pipeline = pipeline
        self.workload = workload
        self.memory = memory
        engines = pipeline.engines
        request = pipeline.arguments(**workload.call(1), scheduler=workload.scheduler)
        self.stages: dict[str, Callable[[], Any]] = {
            "text_encoder": lambda: pipeline.conditionings([request]),
            "unet_step": lambda: pipeline.denoiser.run(workload.unet_feeds),
            "vae_decode": lambda: engines["vae_decoder"].run({"latent": workload.latent}),
        }

    def stage(self, name: str) -> Callable[[], Any]:
        return self.stages[name]

    def generate(self, batch: int) -> Generated:
        out = self.pipeline(
            **self.workload.call(batch),
            scheduler=self.workload.scheduler,
            latents=self.workload.latents[batch],
            output_type="np",
        )
        return Generated(out.images, out.timings)

    def synchronize(self) -> None:
        pass  # engines return host arrays: a call has finished on the device when it returns


def load_runner(
    bundle: Path, backend: str, device: str, workload: Workload
) -> tuple[SdrtRunner, float, dict[str, Any]]:
    """Load the bundle's engines (raising UserError when the backend, its engines or the
    device are missing); returns the runner, the seconds loading took and what it runs on."""
    memory = engine_probe(device)
    memory.start()  # before loading, so the engines' own allocations count
    start = time.perf_counter()
    options = BACKEND_OPTIONS.get(backend, {})
    pipeline = Pipeline.load(bundle, backend=backend, device=device, **options)
    # --batch-sizes and the size are the user's explicit ask, not a typo to guard against
    pipeline.limits = Limits(max_images=None, max_pixels=None)
    seconds = time.perf_counter() - start
    details = {
        "precision": sorted({c.precision for c in pipeline.bundle.components.values()}),
        "provider": sorted({getattr(e, "provider", backend) for e in pipeline.engines.values()}),
        "options": options,
        "load_ms": {k: round(v, 1) for k, v in pipeline.load_timings.items()},
        "graph_cache": pipeline.graph_cache_status,
    }
    return SdrtRunner(pipeline, workload, memory), seconds, details


def bundle_size(bundle: Path, height: int | None, width: int | None) -> tuple[int, int]:
    """The size to benchmark: the bundle's native one unless given, and always one its engines
    can run, checked before any timing starts."""
    from sdrt.bundle import read_manifest

    manifest = read_manifest(Path(bundle))
    multiple = manifest.get("size_multiple", 8)
    native_height, native_width = manifest["default_size"]
    sizes = {"height": height or native_height, "width": width or native_width}
    for name, value in sizes.items():
        if value % multiple:
            raise UserError(
                f"--{name} {value} is not a multiple of {multiple}, which this model needs; "
                "pick another size"
            )
    return sizes["height"], sizes["width"]


def check_same_model(pipe: Any, bundle: Path, model: str) -> None:
    """Refuse a --bundle exported from another architecture than the model being measured,
    naming each difference, before any timing: its rows would be compared with the wrong
    eager run (or, for a different text width, not run at all)."""
    from sdrt.bundle import read_manifest

    exported = _architecture_of_manifest(read_manifest(Path(bundle)))
    measured = _architecture_of_pipeline(pipe)
    differences = [
        f"{what} {exported[what]} in the bundle, {measured[what]} in {model}"
        for what in exported
        if exported[what] != measured[what]
    ]
    if differences:
        raise UserError(
            f"--bundle {bundle} was not exported from the model benchmarked: "
            + "; ".join(differences)
            + "; pass the bundle exported from this model, or leave out --bundle to export one"
        )


def _architecture_of_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    components = manifest["components"]
    text = {i["name"]: i["shape"] for i in components["unet"]["inputs"]}["encoder_hidden_states"]
    return {
        "text encoders": "+".join(n for n in components if n.startswith("text_encoder")),
        "text width": text[-1],
        "latent channels": manifest["latent_channels"],
        "U-Net input channels": manifest.get("unet_in_channels", 4),
        "VAE scale factor": manifest["vae_scale_factor"],
    }


def _architecture_of_pipeline(pipe: Any) -> dict[str, Any]:
    encoders = ("text_encoder", "text_encoder_2")
    return {
        "text encoders": "+".join(n for n in encoders if getattr(pipe, n, None) is not None),
        "text width": pipe.unet.config.cross_attention_dim,
        "latent channels": pipe.vae.config.latent_channels,
        "U-Net input channels": pipe.unet.config.in_channels,
        "VAE scale factor": pipe.vae_scale_factor,
    }
