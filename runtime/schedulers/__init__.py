"""Pure-numpy schedulers, one file per family, built by name from a diffusers scheduler config."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .common import Scheduler, predicted_clean

# name -> (module in this package, class, config overrides the name implies)
SCHEDULERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddim": ("ddim", "DDIMScheduler", {}),
    "ddpm": ("ddpm", "DDPMScheduler", {}),
    "pndm": ("pndm", "PNDMScheduler", {}),
    "lcm": ("lcm", "LCMScheduler", {}),
    "euler": ("euler", "EulerScheduler", {}),
    "euler_karras": ("euler", "EulerScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("euler_ancestral", "EulerAncestralScheduler", {}),
    "dpmpp_2m": ("dpm_solver", "DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("dpm_solver", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": (
        "dpm_solver",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++"},
    ),
    "unipc": ("unipc", "UniPCMultistepScheduler", {}),
    "lms": ("lms", "LMSDiscreteScheduler", {}),
    "heun": ("heun", "HeunDiscreteScheduler", {}),
    "flow_match_euler": ("flow_match", "FlowMatchEulerDiscreteScheduler", {}),
    "flow_match_heun": ("flow_match", "FlowMatchHeunDiscreteScheduler", {}),
}

# The schedulers of flow-matching (velocity-predicting) transformers; every other name is for
# the noise-predicting U-Nets. A bundle may only be driven by the names of its own kind.
FLOW_SCHEDULERS = frozenset({"flow_match_euler", "flow_match_heun"})


def compatible_schedulers(default: str) -> list[str]:
    """The names that can drive a bundle whose manifest scheduler is `default`: the flow
    schedulers for a flow-matching bundle, the others for a U-Net one."""
    flow = default in FLOW_SCHEDULERS
    return [name for name in SCHEDULERS if (name in FLOW_SCHEDULERS) == flow]


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """A fresh scheduler `name` configured from a diffusers `scheduler_config` mapping."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    module_name, class_name, overrides = SCHEDULERS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)({**config, **overrides})


__all__ = [
    "FLOW_SCHEDULERS",
    "SCHEDULERS",
    "Scheduler",
    "compatible_schedulers",
    "make_scheduler",
    "predicted_clean",
]
