"""Read and validate a bundle: manifest.json (the one contract between export and runtime) and
every file the runtime will open.

Every path is resolved inside the bundle (symlinks included) before it is opened, every file
the runtime reads is hashed against the manifest, and a graph may reference only external-data
files the manifest lists. Each problem is a UserError naming the file and what to do, so a
serving process fails at load time with a reason instead of producing wrong images later.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from .errors import UserError
from .manifest_schema import COMPONENTS, SCHEMA_VERSION, problems
from .onnx_references import GraphReferences, graph_references

__all__ = ["COMPONENTS", "MANIFEST", "SCHEMA_VERSION", "Bundle", "ComponentInfo", "read_manifest"]

MANIFEST = "manifest.json"
# bytes hashed per call (hashlib and zlib release the GIL while they hash); a multiple of
# mmap.ALLOCATIONGRANULARITY, as window offsets must be
HASH_CHUNK = 1 << 24
# each text encoder and the folder of the tokenizer that feeds it
TOKENIZERS = {
    "text_encoder": "tokenizer",
    "text_encoder_2": "tokenizer_2",
    "text_encoder_3": "tokenizer_3",
}


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    file: str
    sha256: str
    precision: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    external_data: str | None
    # ONNX Runtime contrib ops only its CUDA provider runs (op -> count), from --cuda-fusions
    cuda_only_ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class HashCheck:
    """One sha256 the manifest records, over these files read in order."""

    files: tuple[Path, ...]
    sha256: str

    def run(self) -> None:
        """Refuse the file (UserError) unless its contents still give the recorded digest."""
        try:
            digest = file_sha256(*self.files)
        except PermissionError as err:
            raise unreadable(err, self.files[0]) from err
        if digest != self.sha256:
            raise UserError(
                f"{self.files[0]} does not match the sha256 in {MANIFEST}: the file "
                "is corrupted or was replaced; re-export the bundle"
            )


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    components: dict[str, ComponentInfo]

    def tokenizer_dirs(self) -> dict[str, Path]:
        """Text encoder name -> its tokenizer folder, in the order the encoders run."""
        return {enc: self.root / tok for enc, tok in TOKENIZERS.items() if enc in self.components}

    def path(self, component: str) -> Path:
        return self.root / self.components[component].file

    def source_check(self, info: ComponentInfo) -> HashCheck:
        """The hash check of one graph of this bundle and its external data."""
        data = (self.root / info.external_data,) if info.external_data else ()
        return HashCheck((self.root / info.file, *data), info.sha256)

    @classmethod
    def load(
        cls, root: str | Path, verify_hashes: bool = True, trusted_key: str | Path | None = None
    ) -> Bundle:
        """Validate the bundle at `root`. With `trusted_key` (a PEM public key) the bundle must
        also carry a signature by the matching private key over all of its files
        (`sdrt sign`); an unsigned or altered bundle is refused. Containment and the graphs'
        references are checked even with `verify_hashes=False`."""
        bundle, checks = cls.open(root, trusted_key)
        if verify_hashes:
            for check in checks:
                check.run()
        return bundle

    @classmethod
    def open(
        cls, root: str | Path, trusted_key: str | Path | None = None
    ) -> tuple[Bundle, list[HashCheck]]:
        """Everything `load` checks but the hashes, and the hash checks still to run, largest
        file first: `Pipeline.load` runs them while the engines load (reading the graphs with
        `graph_references` first is safe: it is a bounds-checked parser of our own)."""
        root = Path(root)
        try:
            return cls._open(root, trusted_key)
        except PermissionError as err:
            raise unreadable(err, root) from err

    @classmethod
    def _open(cls, root: Path, trusted_key: str | Path | None) -> tuple[Bundle, list[HashCheck]]:
        if trusted_key is not None:
            from .signing import verify_bundle

            verify_bundle(root, trusted_key)
        manifest = read_manifest(root)
        components = {name: _component(name, info) for name, info in manifest["components"].items()}
        listed = _listed_external_data(root, manifest)
        checks = []
        for info in components.values():
            checks.append(check_files(root, info, listed, manifest))
            for variant in manifest["components"][info.name].get("static_variants", []):
                checks.append(check_files(root, variant_info(info, variant), listed, manifest))
        bundle = cls(root, manifest, components)
        for folder in bundle.tokenizer_dirs().values():
            checks += check_tokenizer(root, folder.name, manifest["tokenizer_files"])
        checks.sort(key=lambda check: -sum(f.stat().st_size for f in check.files))
        return bundle, checks


def unreadable(err: PermissionError, path: Path) -> UserError:
    return UserError(
        f"cannot read {err.filename or path}: permission denied; ask for read access "
        "to the whole bundle or copy it somewhere readable"
    )


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest as JSON, checked against the declared schema (one line per problem)."""
    if not root.is_dir():
        raise UserError(
            f"bundle {root} does not exist or is not a directory; create one with `sdrt export`"
        )
    path = inside(root, MANIFEST, "the manifest")
    if not path.is_file():
        raise UserError(
            f"{path} is missing; {root} is not a complete sdrt bundle (re-run `sdrt export`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-export the bundle") from err
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema version {version}, this sdrt reads versions up to "
            f"{SCHEMA_VERSION}; upgrade sdrt or re-export with this one"
        )
    found = problems(manifest)
    if found:
        lines = "\n".join(f"  {problem}" for problem in found)
        raise UserError(f"{path} is not a valid sdrt manifest; re-export the bundle:\n{lines}")
    return manifest


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, refused unless it resolves (after symlinks) inside `root`."""
    path = root / relative
    if PurePath(relative).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise UserError(
            f"{what} {relative!r} in {root} points outside the bundle; sdrt opens only files "
            "inside it (re-export the bundle)"
        )
    return path


def _component(name: str, info: dict[str, Any]) -> ComponentInfo:
    return ComponentInfo(
        name=name,
        file=info["file"],
        sha256=info["sha256"],
        precision=info["precision"],
        inputs=info["inputs"],
        outputs=info["outputs"],
        external_data=info.get("external_data"),
        cuda_only_ops=dict(info.get("cuda_only_ops") or {}),
    )


def variant_info(info: ComponentInfo, variant: dict[str, Any]) -> ComponentInfo:
    """A static-shape copy of a component, checked like the component itself; weights it
    shares with the component were checked with the component."""
    shared = variant.get("shares_external_data", False)
    return ComponentInfo(
        info.name,
        variant["file"],
        variant["sha256"],
        info.precision,
        info.inputs,
        info.outputs,
        None if shared else variant.get("external_data"),
        info.cuda_only_ops,
    )


def _listed_external_data(root: Path, manifest: dict[str, Any]) -> set[Path]:
    """Every external-data file the manifest lists (and so hashes), resolved."""
    entries = [
        entry
        for component in manifest["components"].values()
        for entry in [component, *component.get("static_variants", [])]
    ]
    return {
        inside(root, entry["external_data"], "external data").resolve()
        for entry in entries
        if entry.get("external_data")
    }


def check_files(
    root: Path, info: ComponentInfo, listed: set[Path], manifest: dict[str, Any]
) -> HashCheck:
    """The graph and its external data exist inside the bundle, the graph's inputs and outputs
    are its role's, the manifest's numbers agree with it and it references only listed data
    files; returns its hash check."""
    graph = inside(root, info.file, f"{info.name} file")
    data = None
    if info.external_data:
        data = inside(root, info.external_data, f"{info.name} external data")
    for file in (graph, data):
        if file is not None and not file.is_file():
            raise UserError(f"{file} is missing from the bundle; re-export it")
    check = HashCheck((graph,) if data is None else (graph, data), info.sha256)
    try:
        refs = graph_references(graph)
    except UserError:
        check.run()  # a file that is not what was exported: say so rather than how it breaks
        raise
    for location in sorted(refs.external_files):
        target = inside(graph.parent, location, f"external data named inside {graph.name}")
        if target.resolve() not in listed:
            raise UserError(
                f"{graph} reads external data {location!r} that {MANIFEST} does not list and "
                "hash; refusing it (re-export the bundle)"
            )
    for kind, declared, actual in (
        ("inputs", info.inputs, refs.inputs),
        ("outputs", info.outputs, refs.outputs),
    ):
        if sorted(t["name"] for t in declared) != sorted(actual):
            raise UserError(
                f"{graph} has {kind} {sorted(actual)}, but a {info.name} takes "
                f"{sorted(t['name'] for t in declared)}; the file is not this bundle's "
                f"{info.name} (re-export the bundle)"
            )
    check_graph_numbers(graph, info.name, refs, manifest)
    return check


def check_graph_numbers(
    graph: Path, component: str, refs: GraphReferences, manifest: dict[str, Any]
) -> None:
    """The manifest's latent layout against what the graph itself states: the U-Net's input
    and output channels, the VAE decoder's latent channels and its upsampling (one Resize per
    doubling in an exported decoder, dynamic shapes or not; a decoder without Resize nodes
    states no factor and is not checked for it). A number edited in the manifest
    would otherwise size wrong latents and images, or fail deep inside the engine."""
    expected: list[tuple[str, str, int, int | str | None]] = []
    latent = manifest["latent_channels"]
    if component == "unet":
        unet_in = manifest.get("unet_in_channels", 4)
        expected += [
            ("unet_in_channels", "its input sample's channels", unet_in, _channels(refs, "sample")),
            ("latent_channels", "its output's channels", latent, _channels(refs, "noise_pred")),
        ]
    elif component == "vae_decoder":
        resizes = refs.op_counts.get("Resize", 0)
        expected += [
            ("latent_channels", "its input latent's channels", latent, _channels(refs, "latent")),
            (
                "vae_scale_factor",
                f"its {resizes} 2x upsamplings",
                manifest["vae_scale_factor"],
                2**resizes if resizes else None,  # upsampling by other ops: not stated
            ),
        ]
    for key, what, declared, actual in expected:
        if isinstance(actual, int) and declared != actual:
            raise UserError(
                f"{MANIFEST} says {key} {declared}, but {graph.name} has {actual} ({what}); "
                "the manifest was edited or belongs to another export (re-export the bundle)"
            )


def _channels(refs: GraphReferences, tensor: str) -> int | str | None:
    """Dimension 1 (channels, NCHW) of a graph input or output, as the graph states it."""
    shape = refs.shapes.get(tensor, [])
    return shape[1] if len(shape) > 1 else None


def check_tokenizer(root: Path, folder: str, listed: dict[str, dict[str, str]]) -> list[HashCheck]:
    """The folder holds exactly the files the manifest lists (the tokenizer picks its files by
    name, so an added file could change what it reads); returns each file's hash check."""
    path = inside(root, folder, "tokenizer folder")
    if not path.is_dir():
        raise UserError(f"{path} is missing; re-export the bundle")
    expected = listed.get(folder)
    if expected is None:
        raise UserError(f"{MANIFEST} lists no hashes for {folder}/; re-export the bundle")
    present = {p.name for p in path.iterdir()}
    if present != set(expected):
        extra, missing = sorted(present - set(expected)), sorted(set(expected) - present)
        raise UserError(
            f"{path} differs from {MANIFEST}"
            + (f"; unlisted: {', '.join(extra)}" if extra else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + "; re-export the bundle"
        )
    checks = []
    for name, digest in expected.items():
        file = inside(root, f"{folder}/{name}", "tokenizer file")
        if not file.is_file():
            raise UserError(f"{file} is not a regular file; re-export the bundle")
        checks.append(HashCheck((file,), digest))
    return checks


def tokenizer_hashes(root: Path, folders: list[str]) -> dict[str, dict[str, str]]:
    """folder -> file -> sha256, as the manifest records them (export side)."""
    return {
        folder: {p.name: file_sha256(p) for p in sorted((root / folder).iterdir())}
        for folder in folders
    }


def file_sha256(*parts: Path | None) -> str:
    """One digest over the files in order (a graph, then its external weights, if any), so
    any of them changing is caught."""
    digest = hashlib.sha256()
    for window in mapped_windows(parts):
        digest.update(window)
    return digest.hexdigest()


def mapped_windows(parts: Iterable[Path | None]) -> Iterator[mmap.mmap]:
    """The files' bytes in order, as read-only mappings of HASH_CHUNK bytes, each valid until
    the next is taken: no copy into a buffer (10 % faster than reading 3.4 GB), and each
    window is unmapped once used, so RSS stays small."""
    for part in parts:
        if part is None:
            continue
        with part.open("rb") as f:
            size = f.seek(0, 2)
            for start in range(0, size, HASH_CHUNK):
                length = min(HASH_CHUNK, size - start)
                with mmap.mmap(f.fileno(), length, offset=start, access=mmap.ACCESS_READ) as window:
                    yield window
