"""Run-time LoRA over HTTP: `GET /v1/loras`, `POST /v1/loras` {"name", "path"} (a file inside
`--lora-dir`, never elsewhere), `DELETE /v1/loras/{name}`; and the preload of `--lora-dir`.

Adapters are loaded into every served model exported with `--lora-rank` (or the one a
request's "model" names); requests then name them in their `loras` object.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from ..errors import UserError
from .batcher import Batcher
from .errors import ApiError, bad_value, error_responses
from .requests import parse_json, read_body
from .schema import LoadLoraRequest, LoraDeleted, LoraList
from .settings import Settings

log = logging.getLogger("sdrt.serve")


def lora_file_in(folder: Path, relative: Any) -> Path:
    """`relative` resolved inside `folder`; anything that leads out of it (absolute, "..",
    a symlink pointing elsewhere) is refused."""
    if not isinstance(relative, str) or not relative:
        raise UserError(f"path must be a file name inside the LoRA folder, got {relative!r}")
    root = folder.resolve()
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        raise UserError(
            f"path {relative!r} is outside the server's LoRA folder; give a path relative to "
            "--lora-dir"
        )
    return path


def preload(models: Mapping[str, Batcher], folder: Path) -> None:
    """Load every *.safetensors of `folder`, named by its stem, into each model that takes
    run-time adapters."""
    for name, batcher in _with_adapters(models).items():
        loaded = batcher.pipeline.adapters.load_folder(folder)
        log.info("%s: loaded %d LoRA(s) from %s", name, len(loaded), folder)


def _with_adapters(models: Mapping[str, Batcher]) -> dict[str, Batcher]:
    return {name: b for name, b in models.items() if b.pipeline.adapters is not None}


def add_lora_routes(
    app: FastAPI,
    models: Mapping[str, Batcher],
    settings: Settings,
    authorize: Callable[[Request], None],
) -> None:
    def targets(model: Any) -> dict[str, Batcher]:
        served = _with_adapters(models)
        if not served:
            raise ApiError(400, "no served model takes run-time LoRAs (export with --lora-rank)")
        if model is None:
            return served
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {type(model).__name__}", "model")
        if model not in served:
            raise ApiError(
                404, f"model {model!r} does not take run-time LoRAs here; choose one of "
                f"{', '.join(served)}", "model"
            )  # fmt: skip
        return {model: served[model]}

    @app.get("/v1/loras", response_model=LoraList, responses=error_responses(401))
    async def list_loras(request: Request) -> dict[str, Any]:
        """The run-time LoRAs loaded in each model, least recently used first."""
        authorize(request)
        data = [
            {"id": entry["name"], "object": "lora", "model": name, **entry}
            for name, batcher in _with_adapters(models).items()
            for entry in batcher.pipeline.loras()
        ]
        return {"object": "list", "data": data}

    @app.post(
        "/v1/loras", response_model=LoraList, responses=error_responses(400, 401, 404, 409, 413)
    )
    async def load_lora(request: Request) -> dict[str, Any]:
        """Load a file of --lora-dir as a run-time LoRA (body: LoadLoraRequest)."""
        authorize(request)
        fields = parse_json(await read_body(request, settings.max_body_bytes))
        unknown = sorted(set(fields) - set(LoadLoraRequest.model_fields))
        if unknown:
            raise ApiError(
                400, f"unknown field {unknown[0]!r}; send name, path and model", unknown[0]
            )
        if settings.lora_dir is None:
            raise ApiError(400, "this server has no LoRA folder; start it with --lora-dir DIR")
        chosen = targets(fields.get("model"))
        try:
            path = lora_file_in(settings.lora_dir, fields.get("path"))
            name = fields.get("name")
            loaded = []
            for model, batcher in chosen.items():
                # reading and copying a file takes a while: off the event loop
                entry = await asyncio.to_thread(batcher.pipeline.load_lora, name, path)
                loaded.append({"id": name, "object": "lora", "model": model, **entry})
        except UserError as err:
            raise bad_value(err) from err
        return {"object": "list", "data": loaded}

    @app.delete(
        "/v1/loras/{name}", response_model=LoraDeleted, responses=error_responses(401, 404, 409)
    )
    async def unload_lora(request: Request, name: str) -> dict[str, Any]:
        """Unload a run-time LoRA from every model holding it (409 while a request uses it)."""
        authorize(request)
        holders = [
            b for b in _with_adapters(models).values() if name in b.pipeline.adapters.names()
        ]
        if not holders:
            raise ApiError(404, f"no LoRA named {name!r} is loaded; see GET /v1/loras", "name")
        try:
            for batcher in holders:
                batcher.pipeline.unload_lora(name)
        except UserError as err:
            raise ApiError(409, str(err), "name") from err
        return {"id": name, "object": "lora", "deleted": True}
