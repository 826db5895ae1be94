"""Read and validate a bundle's manifest.json: the one contract between export and runtime.

Every problem found is a UserError naming the file and what to do, so a serving process fails
at load time with a reason instead of producing wrong images later.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
# each text encoder and the folder of the tokenizer that feeds it
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
REQUIRED_KEYS = (
    "schema_version",
    "family",
    "prediction_type",
    "latent_channels",
    "vae_scale_factor",
    "vae_scaling_factor",
    "text_max_length",
    "default_size",
    "scheduler",
    "scheduler_config",
    "components",
)


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
class Bundle:
    root: Path
    manifest: dict[str, Any]
    components: dict[str, ComponentInfo]

    def tokenizer_dirs(self) -> dict[str, Path]:
        """Text encoder name -> its tokenizer folder, in the order the encoders run."""
        return {enc: self.root / tok for enc, tok in TOKENIZERS.items() if enc in self.components}

    def path(self, component: str) -> Path:
        return self.root / self.components[component].file

    @classmethod
    def load(cls, root: str | Path, verify_hashes: bool = True) -> Bundle:
        root = Path(root)
        manifest = read_manifest(root)
        components = {name: _component(name, info) for name, info in manifest["components"].items()}
        missing = [c for c in REQUIRED_COMPONENTS if c not in components]
        if missing:
            raise UserError(f"{root / MANIFEST} lists no {', '.join(missing)}; re-export it")
        for info in components.values():
            check_files(root, info, verify_hashes)
            for variant in manifest["components"][info.name].get("static_variants", []):
                check_files(root, _variant(info, variant), verify_hashes)
        bundle = cls(root, manifest, components)
        for folder in bundle.tokenizer_dirs().values():
            if not folder.is_dir():
                raise UserError(f"{folder} is missing; re-export the bundle")
        return bundle


def read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise UserError(
            f"bundle {root} does not exist or is not a directory; create one with `sdrt export`"
        )
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{path} is missing; {root} is not a complete sdrt bundle (re-run `sdrt export`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-export the bundle") from err
    if not isinstance(manifest, dict):
        raise UserError(f"{path} does not hold a JSON object; re-export the bundle")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; re-export the bundle")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema version {manifest['schema_version']}, this sdrt "
            f"reads version {SCHEMA_VERSION}; re-export with this sdrt"
        )
    return manifest


def _component(name: str, info: Any) -> ComponentInfo:
    if name not in COMPONENTS:
        raise UserError(f"manifest names an unknown component {name!r}; re-export the bundle")
    try:
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
    except (KeyError, TypeError) as err:
        raise UserError(f"manifest entry for {name} lacks {err}; re-export the bundle") from err


def _variant(info: ComponentInfo, variant: dict[str, Any]) -> ComponentInfo:
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


def check_files(root: Path, info: ComponentInfo, verify_hashes: bool) -> None:
    files = [info.file] + ([info.external_data] if info.external_data else [])
    for file in files:
        if not (root / file).is_file():
            raise UserError(f"{root / file} is missing from the bundle; re-export it")
    if (
        verify_hashes
        and file_sha256(root / info.file, root / info.external_data if info.external_data else None)
        != info.sha256
    ):
        raise UserError(
            f"{root / info.file} does not match the sha256 in {MANIFEST}: the file "
            "is corrupted or was replaced; re-export the bundle"
        )


def file_sha256(path: Path, external_data: Path | None = None) -> str:
    """One digest over the graph and its external weights, so either changing is caught."""
    digest = hashlib.sha256()
    for part in (path, external_data):
        if part is None:
            continue
        with part.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
