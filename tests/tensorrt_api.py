"""The TensorRT Python API as each major version offers it, read without a GPU or TensorRT.

- TensorRT 10: the `tensorrt-stubs` 10.13 .pyi files that `scripts/install.sh --test` puts in
  the venv (what `.ci/typecheck-tensorrt.sh` checks against).
- TensorRT 11: the real bindings wheel `tensorrt-cu12-bindings` 11.4 from PyPI. Its
  `tensorrt.so` needs libnvinfer to import, but every class, method, property and enum member
  pybind11 registers is a NUL-terminated name in it. The linker merges a name into a longer one
  ending with it ("Logger" into "ILogger"), so a name counts as present when an identifier in
  the file equals it or ends with it. The wheel is downloaded once into tests/.cache/.
- What sdrt uses: every `trt.X` / `trt.X.Y` path in the TensorRT files (the module reached as
  `trt`, `module`, or `<...>.module`), and every attribute name in them that names a member of
  some TensorRT 10 class (methods called on builders, configs, networks, engines, contexts).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).parent / ".cache"
TENSORRT_FILES = (
    "runtime/backends/tensorrt.py",
    "runtime/engine_cache.py",
    "export/tensorrt_build.py",
)
TRT11_WHEEL = ("tensorrt-cu12-bindings", "11.4.0.106")
WHEEL_TAGS = ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64")  # stable cache

# BuilderFlag members TensorRT 11 removed: absent from the 11.4 bindings' names (INT8 cannot be
# seen that way, "UINT8" ends with it, but the 10.16 -> 11.0 pyCore.cpp diff removes it too).
# The TRT-11 test fake is built from this table; a test checks it against the wheel.
BUILDER_FLAGS_REMOVED_IN_11 = frozenset(
    {
        "FP16",
        "INT8",
        "OBEY_PRECISION_CONSTRAINTS",
        "PREFER_PRECISION_CONSTRAINTS",
        "REJECT_EMPTY_ALGORITHMS",
        "WEIGHTLESS",
    }
)
HIDDEN_BY_LONGER_NAMES = frozenset({"INT8"})

# Paths sdrt uses that exist in one major version only, each guarded in the code.
# None since sdrt stopped using TensorRT 10's weak typing (BuilderFlag.FP16, gone in 11): every
# build is strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED, kept but ignored in 11).
VERSION_SPECIFIC: dict[str, tuple[str, ...]] = {}

# Attribute names sdrt uses on its own or Python objects that happen to name a TensorRT 10
# member too, and are not TensorRT 11 names.
NOT_TENSORRT = {
    "append": "list.append",
    "precision": "ComponentSpec.precision, BuildJob.precision",
}


# ---- TensorRT 10: the stubs ------------------------------------------------------------------


@cache
def stub_api() -> tuple[dict[str, set[str]], set[str]]:
    """(class -> member names, module-level names) of the tensorrt-stubs in this venv."""
    site = Path(sysconfig.get_paths()["purelib"])
    bindings = site / "tensorrt_bindings" / "tensorrt.pyi"
    package = site / "tensorrt" / "__init__.pyi"
    if not bindings.is_file():
        pytest.fail(
            f"tensorrt-stubs are not installed in {sys.prefix}; run `{sys.executable} -m pip "
            "install --no-deps tensorrt-stubs==10.13.0.35.1` (`scripts/install.sh --test` does)"
        )
    classes: dict[str, set[str]] = {}
    module_names: set[str] = set()
    for path in (bindings, package):
        for node in ast.parse(_valid_python(path.read_text())).body:
            if isinstance(node, ast.ClassDef):
                members = set().union(*(_bound_names(b) for b in node.body))
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                classes[node.name] = members | {f"<base>{b}" for b in bases}
                module_names.add(node.name)
            else:
                module_names |= _bound_names(node)
    return classes, module_names


def _valid_python(text: str) -> str:
    """The stub lines that are not Python, patched as .ci/typecheck-tensorrt.sh patches them."""
    text = re.sub(r"([(, ])in: ", r"\1in_: ", text)
    return text.replace(
        "power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = 0)"
    )


def _bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.ImportFrom):
        return {alias.asname or alias.name for alias in node.names}
    return set()


def in_trt10(path: str) -> bool:
    classes, module_names = stub_api()
    owner, _, member = path.partition(".")
    if not member:
        return owner in module_names
    return owner in classes and _class_has(classes, owner, member)


def _class_has(classes: dict[str, set[str]], owner: str, member: str) -> bool:
    members = classes.get(owner, set())
    if member in members:
        return True
    bases = [m.removeprefix("<base>") for m in members if m.startswith("<base>")]
    return any(_class_has(classes, base, member) for base in bases)


# ---- TensorRT 11: names in the real bindings -------------------------------------------------


@cache
def trt11_wheel() -> Path:
    """The cached wheel; downloaded once. Fails (never skips) when it cannot be had."""
    name, version = TRT11_WHEEL
    wheels = CACHE / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += [*WHEEL_TAGS, f"{name}=={version}", "-d", str(wheels)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        except (OSError, subprocess.TimeoutExpired) as error:
            reason = str(error)
        found = sorted(wheels.glob(pattern))
        if not found:
            pytest.fail(
                f"cannot download {name}=={version} from PyPI to check sdrt's use of the "
                f"TensorRT 11 API ({reason}); put the wheel into {wheels} by hand"
            )
    return found[0]


@cache
def trt11_names() -> frozenset[str]:
    """Identifiers in the 11.x bindings: the native module's strings and the package's Python."""
    with zipfile.ZipFile(trt11_wheel()) as wheel:
        native = wheel.read("tensorrt_bindings/tensorrt.so")
        package = wheel.read("tensorrt_bindings/__init__.py").decode()
    names = {
        s.decode("ascii")
        for s in native.split(b"\0")
        if re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]*", s)
    }
    for node in ast.parse(package).body:
        names |= _bound_names(node)
    return frozenset(names)


def in_trt11(name: str) -> bool:
    names = trt11_names()
    return name in names or any(n.endswith(name) for n in names)


def in_trt11_path(path: str) -> bool:
    return all(in_trt11(part) for part in path.split("."))


# ---- what sdrt uses --------------------------------------------------------------------------


def _chain(node: ast.expr) -> list[str] | None:
    """a.b.c as ["a", "b", "c"]; None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _trees() -> Iterator[ast.Module]:
    for relative in TENSORRT_FILES:
        yield _with_parents(ast.parse((ROOT / relative).read_text()))


def used_module_paths() -> set[str]:
    """`X` and `X.Y` for every attribute chain rooted at the TensorRT module."""
    paths = set()
    for tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or isinstance(
                getattr(node, "parent", None), ast.Attribute
            ):
                continue
            chain = _chain(node)
            if chain is None:
                continue
            if chain[0] in ("trt", "module"):
                rest = chain[1:]
            elif "module" in chain[1:]:
                rest = chain[chain.index("module", 1) + 1 :]
            else:
                continue
            if rest:
                paths.add(".".join(rest[:2]))
    return paths


def used_member_names() -> set[str]:
    """Attribute names used in the TensorRT files (also through hasattr/getattr/setattr) that
    name a member of some TensorRT 10 class, dunders left out."""
    classes, _ = stub_api()
    members = set().union(*classes.values())
    used = set()
    for tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr", "setattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                used.add(node.args[1].value)
    return {n for n in used & members if not n.startswith("__")}


def _with_parents(tree: ast.Module) -> ast.Module:
    """ast.walk gives no parents; used_module_paths needs them to take whole chains only."""
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    return tree
