"""What pip installs for each extra: exactly one ONNX Runtime flavour, the right one.

The built sdrt wheel is resolved by pip itself (`install --dry-run --report`), offline: every
distribution it names is served as an empty stand-in wheel from a local folder (`--no-index
--find-links`), with onnxruntime-gpu in a CUDA 12 (1.26) and a CUDA 13 (1.31) version, as on
PyPI, each with its real extras (`DEPENDENCIES`). The resolution is pip's; only the packages'
contents are fake.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sdrt import UserError
from sdrt.backends.onnxruntime import check_one_flavour, installed_flavours

ROOT = Path(__file__).resolve().parents[1]
# onnxruntime-gpu on PyPI: 1.26 the last built for CUDA 12, 1.27 on for CUDA 13
VERSIONS = {"onnxruntime": ["1.32.0"], "onnxruntime-gpu": ["1.26.0", "1.31.1"]}
# Requires-Dist of the real wheels, as PyPI's metadata gave them on 2026-12-03 (pip install
# --dry-run --no-deps --report): onnxruntime-gpu's [cuda] and [cudnn] extras, and cuDNN's own
# dependency on cuBLAS. Their base dependencies (numpy, protobuf, ...) are left out.
CUDA12_EXTRAS = [
    'nvidia-cuda-nvrtc-cu12~=12.0; extra == "cuda"',
    'nvidia-cuda-runtime-cu12~=12.0; extra == "cuda"',
    'nvidia-cufft-cu12~=11.0; extra == "cuda"',
    'nvidia-curand-cu12~=10.0; extra == "cuda"',
    'nvidia-cudnn-cu12~=9.0; extra == "cudnn"',
]
CUDA13_EXTRAS = [
    'nvidia-cuda-nvrtc~=13.0; extra == "cuda"',
    'nvidia-cuda-runtime~=13.0; extra == "cuda"',
    'nvidia-cufft~=12.0; extra == "cuda"',
    'nvidia-curand~=10.0; extra == "cuda"',
    'nvidia-cudnn-cu13~=9.0; extra == "cudnn"',
]
DEPENDENCIES = {
    ("onnxruntime-gpu", "1.26.0"): CUDA12_EXTRAS,
    ("onnxruntime-gpu", "1.31.1"): CUDA13_EXTRAS,
    ("nvidia-cudnn-cu12", "9.28.0.42"): ["nvidia-cublas-cu12"],
    ("nvidia-cudnn-cu13", "9.28.1.4"): ["nvidia-cublas"],
}
LIBRARY_VERSIONS = {  # what `~=` in the extras accepts
    "nvidia-cuda-nvrtc-cu12": "12.9.86", "nvidia-cuda-runtime-cu12": "12.9.79",
    "nvidia-cufft-cu12": "11.4.1.4", "nvidia-curand-cu12": "10.3.10.19",
    "nvidia-cudnn-cu12": "9.28.0.42", "nvidia-cublas-cu12": "12.9.1.4",
    "nvidia-cuda-nvrtc": "13.0.88", "nvidia-cuda-runtime": "13.0.96", "nvidia-cufft": "12.0.0.61",
    "nvidia-curand": "10.4.0.35", "nvidia-cudnn-cu13": "9.28.1.4", "nvidia-cublas": "13.1.0.3",
}  # fmt: skip


def stand_in_wheel(folder: Path, name: str, version: str) -> None:
    """An installable wheel that holds nothing but its metadata (and the real one's
    dependencies where `DEPENDENCIES` lists them)."""
    dist = f"{name.replace('-', '_')}-{version}"
    requires = DEPENDENCIES.get((name, version), [])
    extras = sorted({r.split('extra == "')[1].rstrip('"') for r in requires if "extra ==" in r})
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        [f"Provides-Extra: {e}\n" for e in extras] + [f"Requires-Dist: {r}\n" for r in requires]
    )
    files = {
        f"{dist}.dist-info/METADATA": metadata,
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256="
        + base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip("=")
        + f",{len(text.encode())}"
        for path, text in files.items()
    ]
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def pip(*args: str) -> subprocess.CompletedProcess:
    # No pip configuration: this machine's index, find-links and constraints stay out of it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """The sdrt wheel built from this checkout, beside a stand-in for every distribution its
    metadata names."""
    src = tmp_path_factory.mktemp("src")
    for item in ("pyproject.toml", "README.md", "runtime", "export", "benchmarks"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, src / item)
    house = tmp_path_factory.mktemp("wheelhouse")
    built = pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(house), str(src))
    assert built.returncode == 0, built.stderr
    (wheel,) = house.glob("sdrt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    requires = [
        Requirement(line.split(":", 1)[1].strip())
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    names = {canonicalize_name(r.name) for r in requires} - {"sdrt"}
    for name in names:
        for version in VERSIONS.get(name, ["99.0"]):
            stand_in_wheel(house, name, version)
    for name, version in LIBRARY_VERSIONS.items():
        stand_in_wheel(house, name, version)
    return house


def resolve(house: Path, target: str) -> dict[str, str]:
    """What `pip install target` would install, name -> version."""
    done = pip(
        "install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(house),
        "--quiet", "--report", "-", target,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]}


def flavours(installed: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in installed.items() if canonicalize_name(k) in VERSIONS}


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("", {}),
        ("[cpu]", {"onnxruntime": "1.32.0"}),
        ("[cuda]", {"onnxruntime-gpu": "1.31.1"}),
        ("[cuda12]", {"onnxruntime-gpu": "1.26.0"}),
        ("[cuda13]", {"onnxruntime-gpu": "1.31.1"}),
        ("[dev]", {"onnxruntime": "1.32.0"}),
        ("[export,cuda13]", {"onnxruntime-gpu": "1.31.1"}),
    ],
)
def test_each_extra_resolves_to_exactly_one_onnxruntime_flavour(wheelhouse, extra, expected):
    installed = resolve(wheelhouse, f"sdrt{extra}")
    assert "sdrt" in installed
    assert flavours(installed) == expected


@pytest.mark.parametrize(
    "extra, suffix",
    [("[cuda]", ""), ("[cuda13]", ""), ("[cuda12]", "-cu12"), ("[export,cuda13]", "")],
)
def test_the_cuda_extras_bring_the_nvidia_libraries_onnxruntime_gpu_loads(
    wheelhouse, extra, suffix
):
    """Without them a process that never imports torch finds no CUDA library to load."""
    installed = {canonicalize_name(n) for n in resolve(wheelhouse, f"sdrt{extra}")}
    libraries = ["cuda-runtime", "cublas", "curand", "cuda-nvrtc", "cufft"]
    cudnn = f"nvidia-cudnn-cu{suffix[-2:] or 13}"
    assert {f"nvidia-{lib}{suffix}" for lib in libraries} | {cudnn} <= installed
    other = "" if suffix else "-cu12"
    assert not {f"nvidia-{lib}{other}" for lib in libraries} & installed  # one CUDA major


def test_two_flavours_in_one_folder_are_refused_with_the_command_that_repairs_it(tmp_path):
    site, other = tmp_path / "site-packages", tmp_path / "elsewhere"
    cpu, gpu = ("onnxruntime", "1.32.0", site), ("onnxruntime-gpu", "1.31.1", site)
    check_one_flavour([cpu])  # one is fine
    check_one_flavour([gpu])
    # on a PYTHONPATH before the other: the first one found is imported, nothing overwritten
    check_one_flavour([cpu, ("onnxruntime-gpu", "1.31.1", other)])
    with pytest.raises(UserError) as err:
        check_one_flavour([cpu, gpu])
    assert (
        "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1`"
        in str(err.value)
    )


class FakeDistribution:
    """importlib.metadata.Distribution (Python 3.10-3.13) as far as installed_flavours reads
    it: metadata["Name"], version, locate_file(path)."""

    def __init__(self, name: str, version: str, root: Path):
        self.metadata, self.version, self.root = {"Name": name}, version, root

    def locate_file(self, path: str) -> Path:
        return self.root / path


def test_installed_flavours_reads_name_version_and_folder_of_each_distribution(tmp_path):
    dists = [
        FakeDistribution("onnxruntime", "1.32.0", tmp_path),
        FakeDistribution("numpy", "2.0", tmp_path),
        FakeDistribution("onnxruntime-gpu", "1.31.1", tmp_path),
    ]
    found = installed_flavours(lambda: dists)
    assert found == [
        ("onnxruntime", "1.32.0", (tmp_path / "onnxruntime").resolve()),
        ("onnxruntime-gpu", "1.31.1", (tmp_path / "onnxruntime").resolve()),
    ]
    with pytest.raises(UserError, match="both installed"):
        check_one_flavour(found)
    # this environment: at most one flavour per folder, or the backend would not have imported
    assert {name for name, _, _ in installed_flavours()} <= {"onnxruntime", "onnxruntime-gpu"}


def test_without_onnxruntime_loading_a_bundle_names_the_extras(tiny_bundle, monkeypatch):
    from sdrt import Pipeline

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    monkeypatch.delitem(sys.modules, "sdrt.backends.onnxruntime")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"pip install 'sdrt\[cpu\]'.*'sdrt\[cuda13\]'"):
        Pipeline.load(tiny_bundle, device="cpu")
