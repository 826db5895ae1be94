"""What export does differently per denoiser family: which modules a random-weight preset
builds, which graphs a pipeline has, and what the manifest says about them.

One module per family; `export_family(name)` is the only place that maps a name to one. A
new family is one more module here (and its runtime twin in runtime/families/).
"""

from __future__ import annotations

from types import ModuleType

from . import flux, sd3, unet

FAMILIES: dict[str, ModuleType] = {"sd1": unet, "sd2": unet, "sdxl": unet, "sd3": sd3, "flux": flux}
# diffusers pipeline class -> family module, for `sdrt export FOLDER`
PIPELINE_CLASSES: dict[str, ModuleType] = {
    name: module for module in (unet, sd3, flux) for name in module.PIPELINE_CLASSES
}


def export_family(family: str) -> ModuleType:
    return FAMILIES[family]
