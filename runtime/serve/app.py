"""The HTTP API: OpenAI Images endpoints over one Batcher per model, health, readiness and
Prometheus metrics. `create_app` returns a plain FastAPI app (Ray Serve can wrap it)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..errors import UserError
from ..images import generation_metadata, numpy_to_pil, save_png
from .batcher import Batcher, QueueFull, RequestTimeout, ShuttingDown
from .errors import ApiError, bad_value
from .lora_routes import add_lora_routes, preload
from .metrics import Metrics
from .requests import ImageRequest, image_request, open_upload, parse_json, read_body
from .settings import Settings

log = logging.getLogger("sdrt.serve")
DISCONNECT_POLL_S = 0.1


class ServerState:
    """Readiness and draining, shared by the routes, the lifespan and the signal handler."""

    def __init__(self, models: Mapping[str, Batcher], settings: Settings) -> None:
        self.models, self.settings = models, settings
        self.ready = threading.Event()
        self.draining = False

    def drain(self) -> None:
        """Refuse new requests (503) and let the running ones finish, up to the deadline."""
        self.draining = True
        for batcher in self.models.values():
            batcher.stop(self.settings.drain_deadline_s)

    def warm_up(self) -> None:
        """One 1-step request per model, so the first user request pays no first-call cost."""
        try:
            for batcher in self.models.values():
                if self.settings.warmup:
                    batcher.submit({"prompt": "", "num_inference_steps": 1}).result()
            self.ready.set()
        except Exception:  # a model that cannot run keeps /ready at 503
            log.exception("warm-up failed")


def create_app(models: Mapping[str, Batcher], settings: Settings | None = None) -> FastAPI:
    """Starts the batchers at startup and drains them at shutdown."""
    settings = settings or Settings()
    if settings.lora_dir is not None:
        preload(models, settings.lora_dir)
    state = ServerState(models, settings)
    metrics = Metrics(models)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        for batcher in models.values():
            batcher.start()
        threading.Thread(target=state.warm_up, name="sdrt-warmup", daemon=True).start()
        yield
        await asyncio.to_thread(state.drain)

    app = FastAPI(title="sdrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sdrt = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}; see GET /v1/models"
        return JSONResponse(ApiError(err.status_code, message).body(), err.status_code)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "missing or wrong API key; send Authorization: Bearer <key>")

    def pick(model: str | None) -> tuple[str, Batcher]:
        if model is None and len(models) == 1:
            return next(iter(models.items()))
        if model not in models:
            served = ", ".join(models)
            raise ApiError(
                404 if model else 400,
                f"model {model!r} is not served here; choose one of {served}"
                if model
                else f"model is required when several are served; choose one of {served}",
                "model",
            )
        return model, models[model]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        if state.draining:
            raise ApiError(503, "the server is shutting down")
        if not state.ready.is_set():
            raise ApiError(503, "the models are still loading or warming up; retry shortly")
        # what each model's Pipeline.load took (ms per part, see Pipeline.load) and whether its
        # graphs came from the graph cache: the cold start a replica pays
        pipelines = {name: b.pipeline for name, b in state.models.items()}
        return {
            "status": "ready",
            "load_ms": {name: p.load_timings for name, p in pipelines.items()},
            "graph_cache": {name: p.graph_cache_status for name, p in pipelines.items()},
        }

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "sdrt"} for name in models
            ],
        }

    add_lora_routes(app, models, settings, authorize)

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        authorize(request)
        body = await read_body(request, settings.max_body_bytes)
        fields = parse_json(body)
        wanted = image_request(fields, settings.limits.max_images or 1, text=False)
        return await generate(request, wanted, {})

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        authorize(request)
        await read_body(request, settings.max_body_bytes)
        form = await request.form(max_files=3, max_fields=32)
        fields = {key: value for key, value in form.items() if not hasattr(value, "read")}
        uploads = {key: value for key, value in form.items() if hasattr(value, "read")}
        wanted = image_request({**fields, **uploads}, settings.limits.max_images or 1, text=True)
        picture = uploads.get("image") or uploads.get("image[]")
        if picture is None:
            raise ApiError(400, "image is required: upload the picture to edit", "image")
        extras = {"image": await _image(picture, "image", settings, "RGB")}
        names = {"image_name": picture.filename}
        if "mask" in uploads:
            extras["mask_image"] = await _image(uploads["mask"], "mask", settings, "L")
            names["mask_name"] = uploads["mask"].filename
        return await generate(request, wanted, extras, **names)

    async def generate(
        request: Request, wanted: ImageRequest, extras: dict[str, Any], **names: Any
    ) -> JSONResponse:
        name, batcher = pick(wanted.model)
        started, status = time.perf_counter(), "500"
        try:
            # numpy out, PNG encoding in a worker thread: the batcher thread only steps
            call = {"seed": secrets.randbelow(2**31), **wanted.call, **extras, "output_type": "np"}
            try:
                args = batcher.pipeline.arguments(**call, limits=settings.limits)
                future = batcher.submit(args)
            except UserError as err:
                raise bad_value(err) from err
            except QueueFull as err:
                retry = {"Retry-After": str(err.retry_after_s)}
                raise ApiError(429, str(err), headers=retry) from err
            except ShuttingDown as err:
                raise ApiError(503, str(err)) from err
            out = await _result(request, batcher, future)
            if out is None:
                status = "499"  # the client went away; its rows are freed
                return JSONResponse({}, 499)
            metadata = generation_metadata(args, **names)
            data = await asyncio.to_thread(_encode_pngs, out.images, metadata)
            status = "200"
            return JSONResponse(
                {"created": int(time.time()), "data": data},
                headers={
                    "x-sdrt-queue-ms": f"{out.timings['queue_ms']:.1f}",
                    "x-sdrt-first-step-ms": f"{out.timings['first_step_ms']:.1f}",
                },
            )
        except ApiError as err:
            status = str(err.status)
            raise
        finally:
            metrics.requests.labels(name, status).inc()
            if status == "200":
                metrics.latency.labels(name).observe(time.perf_counter() - started)

    return app


async def _result(request: Request, batcher: Batcher, future: Any) -> Any:
    """The batcher's output, or None after cancelling it when the client disconnected."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if await request.is_disconnected():
            batcher.cancel(future)
            return None
    try:
        return waiting.result()
    except asyncio.CancelledError:
        return None
    except UserError as err:
        raise bad_value(err) from err
    except RequestTimeout as err:
        raise ApiError(504, str(err)) from err
    except ShuttingDown as err:
        raise ApiError(503, str(err)) from err
    except Exception as err:
        log.exception("generation failed")
        raise ApiError(
            500, f"generation failed ({type(err).__name__}); see the server log"
        ) from err


async def _image(upload: Any, what: str, settings: Settings, mode: str) -> Any:
    data = await upload.read()
    return open_upload(data, what, settings.max_image_pixels).convert(mode)


def _encode_pngs(images: Any, metadata: dict[str, Any]) -> list[dict[str, Any]]:
    data = []
    for image in numpy_to_pil(images):
        buffer = io.BytesIO()
        save_png(image, buffer, metadata)
        data.append(
            {"b64_json": base64.b64encode(buffer.getvalue()).decode(), "revised_prompt": None}
        )
    return data
