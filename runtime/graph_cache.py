"""ONNX Runtime's optimized graphs kept on disk, so that later loads skip the graph optimizer.

An entry is a folder `CACHE/<key>/` with `model.onnx`, its weights `model.onnx.data` and
`record.json`. The key hashes everything that changes what the optimizer writes: the source
graph's sha256 (from the manifest), the ORT version, the execution provider and the options
that change its graph, the optimization level, and this CPU's instruction set (ORT's NCHWc
layout pass writes weights blocked for the CPU's vector width, and ORT warns that such a graph
is only valid where it was made). `record.json` holds each file's size and CRC-32 as written;
an entry whose files no longer match is removed and rebuilt, never used. CRC-32, not sha256:
it catches damage as well, at 2.2 GB/s against 1.4 (measured here), and a load checks 4.1 GB
of cache beside the bundle's own 4.1 GB of sha256; a digest of any strength cannot stop
someone who can write the folder, since they can write the record too. Entries are written
in a staging folder and renamed into place whole, so a killed load leaves nothing half done
(ORT's files are not fsynced: data a power cut loses fails the CRC, and is rebuilt).

Pure file handling: ONNX Runtime itself is called by the backend, which passes `store` a
function that writes the optimized model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .atomic_files import write_atomic
from .bundle import mapped_windows
from .engine_cache import staged_directory
from .errors import UserError

MODEL = "model.onnx"
WEIGHTS = "model.onnx.data"
RECORD = "record.json"
RECORD_VERSION = 1
CACHE_ENV = "SDRT_GRAPH_CACHE"
OFF = "off"


@dataclass(frozen=True)
class GraphKey:
    """What an optimized graph was made from and for; all of it goes into the folder name."""

    source_sha256: str
    runtime: str  # "onnxruntime-1.32.0"
    provider: str  # the first execution provider, e.g. "CPUExecutionProvider"
    host: str  # instruction-set tag of this CPU (see `host_tag`)
    options: dict[str, str] = field(default_factory=dict)  # session/provider options that matter

    def folder_name(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        provider = self.provider.removesuffix("ExecutionProvider").lower()
        return re.sub(r"[^A-Za-z0-9._+-]+", "-", f"{self.runtime}-{provider}-{digest}")


@dataclass(frozen=True)
class CachedGraph:
    """A committed entry: the optimized model to give ONNX Runtime, and its files' checksums."""

    model: Path
    crc32: dict[str, str]  # file name in the entry -> CRC-32 as written

    def verify(self) -> bool:
        """Whether every file still has the checksum it was written with (reads them all)."""
        return all(file_crc32(self.model.parent / name) == crc for name, crc in self.crc32.items())


def file_crc32(path: Path) -> str:
    crc = 0
    for window in mapped_windows([path]):
        crc = zlib.crc32(window, crc)
    return f"{crc:08x}"


def default_cache_dir() -> Path | None:
    """$SDRT_GRAPH_CACHE ("off": no cache), else $XDG_CACHE_HOME/sdrt/onnxruntime (XDG's
    default is ~/.cache)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return None if chosen == OFF else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdrt" / "onnxruntime"


def cache_dir_option(value: str | Path | bool | None) -> Path | None:
    """The `graph_cache` option as a folder: True means the default, None, False or "off"
    none."""
    if value is None or value is False or value == OFF:
        return None
    return default_cache_dir() if value is True else Path(value)


@cache
def host_tag() -> str:
    """A short hash of what the CPU can execute (the flags line of /proc/cpuinfo on Linux,
    the processor name elsewhere), with the machine architecture."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    flags = flags or platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def lookup(cache_dir: Path, key: GraphKey) -> CachedGraph | None:
    """The committed entry for `key`, or None when there is none or its record is unusable
    (then it is removed, so that the next `store` rebuilds it). File checksums are checked by
    `CachedGraph.verify`, which the caller runs before trusting the entry."""
    folder = cache_dir / key.folder_name()
    if not (folder / RECORD).is_file():
        return None
    try:
        record = json.loads((folder / RECORD).read_text())
        if record.get("record_version") != RECORD_VERSION or record.get("key") != asdict(key):
            raise ValueError("the record describes another key")
        files = {str(name): str(crc) for name, crc in record["crc32"].items()}
        sizes = {str(name): int(size) for name, size in record["bytes"].items()}
        if MODEL not in files or set(files) != set(sizes):
            raise ValueError("the record lists no model")
        for name, size in sizes.items():
            if (folder / name).stat().st_size != size:
                raise ValueError(f"{name} is not {size} bytes")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        discard(folder)
        return None
    return CachedGraph(folder / MODEL, files)


def store(cache_dir: Path, key: GraphKey, write: Callable[[Path], Any]) -> CachedGraph:
    """Run `write(path)`, which must write the optimized model at `path` (weights beside it
    as WEIGHTS), in a staging folder; record each file's checksum and commit the folder."""
    folder = cache_dir / key.folder_name()
    try:
        with staged_directory(folder) as staging:
            write(staging / MODEL)
            names = sorted(p.name for p in staging.iterdir())
            checksums = {name: file_crc32(staging / name) for name in names}
            sizes = {name: (staging / name).stat().st_size for name in names}
            record = {
                "record_version": RECORD_VERSION,
                "key": asdict(key),
                "crc32": checksums,
                "bytes": sizes,
            }
            write_atomic(staging / RECORD, json.dumps(record, indent=1, sort_keys=True))
    except PermissionError as err:
        raise UserError(
            f"cannot write the graph cache {cache_dir}: permission denied; pass a writable "
            "folder as graph_cache (--graph-cache DIR) or turn it off (--graph-cache off)"
        ) from err
    return CachedGraph(folder / MODEL, checksums)


def discard(folder: Path) -> None:
    """Remove an entry that cannot be trusted (a later `store` writes it again)."""
    shutil.rmtree(folder, ignore_errors=True)


def key_options(options: Mapping[str, Any]) -> dict[str, str]:
    """Options as the string map a key holds (sorted, so equal options give equal keys)."""
    return {str(name): str(value) for name, value in sorted(options.items())}
