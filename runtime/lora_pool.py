"""The adapter pool: LoRAs loaded at run time into the banks a `--lora-rank` bundle's graphs
read (export/lora_branch.py), and the per-row inputs that select them.

Each loaded adapter owns one slot of R rank rows in every layer's banks (slot 0 is zeros, "no
adapter"). The banks are bound to the engines once (`bind_banks`); loading an adapter writes
its slot in place, so no session, engine or graph changes. A request holds its adapters
(`hold`) from submission to its last step: a held adapter is never evicted or unloaded.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .lora_files import LORA_SUFFIX, Adapter, check_lora_file, check_scale, read_adapter
from .signing import verify_file

INDEX, SCALE = "lora_index", "lora_scale"
DEFAULT_MAX_LORAS = 16
MAX_LORAS_LIMIT = 1024
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_max_loras(max_loras: int, what: str = "max_loras") -> int:
    """The pool's capacity; `what` names it as the user set it (an argument or a flag)."""
    if not 1 <= max_loras <= MAX_LORAS_LIMIT:
        raise UserError(f"{what} must be in 1-{MAX_LORAS_LIMIT}, got {max_loras!r}")
    return max_loras


def bank_inputs(layer: str) -> tuple[str, str]:
    """The graph inputs holding a layer's down (A) and up (B) banks (export's names)."""
    return f"lora_a.{layer}", f"lora_b.{layer}"


@dataclass(eq=False)  # one hold is one request's: compared and hashed by identity
class Hold:
    """A request's adapters: its rank columns (bank row, scale), held until `release`."""

    index: np.ndarray  # int64 [r]: bank row of each rank column (0: the zero row)
    scale: np.ndarray  # float32 [r]
    names: tuple[str, ...] = ()
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Let the pool evict or unload these adapters again; later calls do nothing."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def rows(self, count: int) -> dict[str, np.ndarray]:
        """The branch inputs for `count` rows of this request."""
        return {INDEX: np.tile(self.index, (count, 1)), SCALE: np.tile(self.scale, (count, 1))}


NO_ADAPTER = Hold(np.zeros(1, np.int64), np.zeros(1, np.float32))


def stack_rows(parts: list[np.ndarray]) -> np.ndarray:
    """Per-row branch inputs of several requests in one call: each request has as many rank
    columns as its adapters' ranks add up to; the shorter ones are padded with zeros, which
    select the zero row (index) and weigh nothing (scale)."""
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts])


@dataclass
class _Loaded:
    """A loaded adapter: what `describe` tells and where it sits; its factors live in the banks
    only (the file's arrays are dropped once copied)."""

    file: str
    rank: int
    layers: dict[str, int]  # component -> adapted layers
    size: int
    slot: int
    users: int = 0

    @classmethod
    def of(cls, adapter: Adapter, slot: int) -> _Loaded:
        layers = {component: len(factors) for component, factors in adapter.layers.items()}
        return cls(adapter.file, adapter.rank, layers, adapter.size, slot)


class AdapterPool:
    """Up to `max_loras` adapters for one pipeline's engines; thread-safe."""

    def __init__(
        self,
        branch: dict[str, Any],
        engines: Mapping[str, Any],
        max_loras: int = DEFAULT_MAX_LORAS,
        trusted_key: str | Path | None = None,
    ) -> None:
        """`trusted_key`: a public key (PEM); each adapter file must then carry a signature
        by its pair (FILE.sig, `sdrt sign FILE --key PRIVATE.pem`)."""
        check_max_loras(max_loras)
        self.branch = branch
        self.rank = int(branch["rank"])
        self.max_loras = max_loras
        self.trusted_key = trusted_key
        bank_rows = (max_loras + 1) * self.rank
        self.banks: dict[str, dict[str, np.ndarray]] = {}
        self._changed: dict[str, Callable[[str, slice], None]] = {}
        for component, records in branch["layers"].items():
            engine = engines[component]
            if not hasattr(engine, "bind_banks"):
                raise UserError(
                    f"the {type(engine).__name__} backend cannot run LoRA adapters yet; use "
                    "backend='onnxruntime'"
                )
            banks = {}
            for record in records:
                down, up = bank_inputs(record["name"])
                banks[down] = _committed((bank_rows, record["in"]))
                banks[up] = _committed((bank_rows, record["out"]))
            self.banks[component] = banks
            self._changed[component] = engine.bind_banks(banks)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path) -> dict[str, Any]:
        """Read LoRA file `path` into a free slot (evicting the least recently used adapter
        no request holds when full) under `name`; replaces an unheld adapter of that name.
        A bad file changes nothing."""
        _check_name(name)
        path = check_lora_file(path)
        if self.trusted_key is not None:
            verify_file(path, self.trusted_key)
        adapter = read_adapter(path, self.branch)  # every check before the pool changes
        with self._lock:
            old = self._loaded.get(name)
            if old is not None and old.users:
                raise UserError(
                    f"LoRA {name!r} is in use by {old.users} request(s); load the new file "
                    "under another name"
                )
            slot = old.slot if old is not None else self._free_slot(name)
            self._write(slot, adapter)
            self._loaded[name] = _Loaded.of(adapter, slot)
            self._loaded.move_to_end(name)
        return self.describe(name)

    def load_folder(self, folder: Path) -> list[str]:
        """Load every *.safetensors of `folder`, each named by its file's stem."""
        if not folder.is_dir():
            raise UserError(f"LoRA folder {folder} is not a folder")
        paths = sorted(folder.glob(f"*{LORA_SUFFIX}"))
        for path in paths:
            self.load(path.stem, path)
        return [path.stem for path in paths]

    def unload(self, name: str) -> None:
        with self._lock:
            loaded = self._get(name)
            if loaded.users:
                raise UserError(
                    f"LoRA {name!r} is in use by {loaded.users} request(s); unload it when "
                    "they finish"
                )
            del self._loaded[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def describe(self, name: str) -> dict[str, Any]:
        with self._lock:
            loaded = self._get(name)
            return {
                "name": name,
                "file": loaded.file,
                "rank": loaded.rank,
                "layers": dict(loaded.layers),
                "bytes": loaded.size,
                "in_use": loaded.users,
            }

    def hold(self, loras: Mapping[str, Any]) -> Hold:
        """The rank columns for a request's {name: scale}; its adapters stay loaded until the
        hold is released. Several adapters stack along the rank, up to R columns in all."""
        if not loras:
            return NO_ADAPTER
        scales = {name: check_scale(scale, f"LoRA {name!r}") for name, scale in loras.items()}
        with self._lock:
            chosen = [(self._get(name), scale) for name, scale in scales.items()]
            total = sum(loaded.rank for loaded, _ in chosen)
            if total > self.rank:
                raise UserError(
                    f"the LoRAs {', '.join(scales)} have rank {total} together, above this "
                    f"bundle's LoRA rank {self.rank}; use fewer adapters in one request"
                )
            index = np.concatenate(
                [loaded.slot * self.rank + np.arange(loaded.rank) for loaded, _ in chosen]
            )
            scale = np.concatenate([np.full(loaded.rank, s, np.float32) for loaded, s in chosen])
            for loaded, _ in chosen:
                loaded.users += 1
            for name in scales:
                self._loaded.move_to_end(name)
        names = tuple(scales)
        return Hold(index.astype(np.int64), scale, names, lambda: self._release(names))

    def _release(self, names: tuple[str, ...]) -> None:
        with self._lock:
            for name in names:
                if name in self._loaded:
                    self._loaded[name].users -= 1

    def _get(self, name: str) -> _Loaded:
        loaded = self._loaded.get(name)
        if loaded is None:
            known = ", ".join(self._loaded) or "none"
            raise UserError(f"unknown LoRA {name!r}; load it first (loaded: {known})")
        return loaded

    def _free_slot(self, name: str) -> int:
        used = {loaded.slot for loaded in self._loaded.values()}
        free = [slot for slot in range(1, self.max_loras + 1) if slot not in used]
        if free:
            return free[0]
        for victim, loaded in self._loaded.items():  # least recently used first
            if not loaded.users:
                del self._loaded[victim]
                return loaded.slot
        raise UserError(
            f"cannot load LoRA {name!r}: all {self.max_loras} slots hold adapters in use; "
            "retry when a request finishes, or raise max_loras"
        )

    def _write(self, slot: int, adapter: Adapter) -> None:
        """Fill `slot`'s rows of every bank: the adapter's factors (alpha / rank folded into up
        as it is copied), zeros elsewhere (a layer or component it does not adapt, rank
        columns past its own). Each bank row is written once, straight from the file's arrays."""
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        for component, banks in self.banks.items():
            adapted = adapter.layers.get(component, {})
            for record in self.branch["layers"][component]:
                down_name, up_name = bank_inputs(record["name"])
                down_rows, up_rows = banks[down_name][rows], banks[up_name][rows]
                factors = adapted.get(record["name"])
                rank = 0 if factors is None else len(factors.down)
                if factors is not None:
                    down_rows[:rank] = factors.down
                    np.multiply(
                        factors.up.T, np.float32(factors.alpha_over_rank), out=up_rows[:rank]
                    )
                down_rows[rank:] = 0.0
                up_rows[rank:] = 0.0
                self._changed[component](down_name, rows)
                self._changed[component](up_name, rows)


def _committed(shape: tuple[int, int]) -> np.ndarray:
    """A bank of zeros whose every page is written now. np.zeros leaves them to be mapped on
    first write, which would then happen inside a load, at a page fault per 4 KiB (most of a
    load's time on the machines measured); and a full pool's memory is taken at start, so
    the sixteenth adapter cannot be the one that runs the machine out of it."""
    return np.full(shape, 0.0, np.float32)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(
            f"LoRA name {name!r} is not 1-64 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit); pick a simpler name"
        )
