"""What a result was measured on: machine, date, library versions and the command line, so a
figure in bench.json can be reproduced or rejected later."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from importlib import metadata
from typing import Any

# report key -> distributions that provide it, first installed wins
DISTRIBUTIONS = {
    "torch": ("torch",),
    "diffusers": ("diffusers",),
    "transformers": ("transformers",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-rtx-cu13"),
    "numpy": ("numpy",),
}


def versions() -> dict[str, str | None]:
    """Installed versions (None when absent); sdrt's comes from the package itself, which is
    right even for an uninstalled checkout."""
    import sdrt

    found: dict[str, str | None] = {"sdrt": sdrt.__version__}
    for key, names in DISTRIBUTIONS.items():
        found[key] = next((v for v in map(_version, names) if v), None)
    return found


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine(device: str, device_name: str | None) -> dict[str, Any]:
    return {
        "device": device,
        "device_name": device_name or cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        # other processes' load makes CPU timings (OpenMP above all) far slower; record it
        "load_average_1min": os.getloadavg()[0],
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The command as a user would retype it: the program's name, not its install path."""
    return shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
