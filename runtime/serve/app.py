"""The HTTP API: OpenAI Images endpoints over one Batcher per model (JSON answers or
Server-Sent Events with previews, images inline or at a URL served here), health, readiness,
Prometheus metrics, /openapi.json and /docs. `create_app` returns a plain FastAPI app (Ray
Serve can wrap it)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..errors import UserError
from ..images import encode_image, generation_metadata, numpy_to_pil
from ..schedulers import SCHEDULERS, compatible_schedulers
from .batcher import Batcher, QueueFull, RequestTimeout, ShuttingDown
from .errors import ApiError, bad_value, error_responses
from .image_store import ImageStore, StoreFull
from .lora_routes import add_lora_routes, preload
from .metrics import Metrics
from .previews import Previews
from .requests import ImageRequest, image_request, open_upload, parse_json, read_body
from .schema import ImagesResponse, openapi
from .settings import Settings

log = logging.getLogger("sdrt.serve")
DISCONNECT_POLL_S = 0.1
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LISTED_SIZES = ("1024x1024", "1024x1536", "1536x1024")  # the sizes OpenAI's responses name
ZERO_USAGE = {
    "total_tokens": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
}
ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503, 504)


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
    store = ImageStore(settings.image_url_ttl_s, settings.image_store_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        for batcher in models.values():
            batcher.start()
        threading.Thread(target=state.warm_up, name="sdrt-warmup", daemon=True).start()
        yield
        await asyncio.to_thread(state.drain)

    app = FastAPI(
        title="sdrt",
        summary="OpenAI Images API over Stable Diffusion bundles",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.sdrt = state

    def api_schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            base = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            manifests = [batcher.pipeline.manifest for batcher in models.values()]
            limits = settings.limits
            app.openapi_schema = openapi(
                base,
                max_images=limits.max_images or 1,
                max_steps=limits.max_steps or 1000,
                max_side=limits.max_side or 2048,
                size_multiple=max(m.get("size_multiple", 8) for m in manifests),
                max_partial_images=settings.max_partial_images,
                schedulers=[  # those some served bundle takes (each bundle: its kind's)
                    name
                    for name in SCHEDULERS
                    if any(name in compatible_schedulers(m["scheduler"]) for m in manifests)
                ],
                models=list(models),
            )
            if settings.api_key is not None:  # /docs' Authorize button; probes stay open
                schemes = app.openapi_schema["components"].setdefault("securitySchemes", {})
                schemes["apiKey"] = {"type": "http", "scheme": "bearer"}
                for path, operations in app.openapi_schema["paths"].items():
                    for operation in operations.values():
                        if path not in ("/health", "/ready"):
                            operation["security"] = [{"apiKey": []}]
        return app.openapi_schema

    app.openapi = api_schema  # type: ignore[method-assign]

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
        if not model and len(models) == 1:  # None or "": the one model served
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

    @app.get("/ready", responses={503: ERRORS[503]})
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

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: ERRORS[401]})
    async def prometheus(request: Request) -> Response:
        authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "sdrt"} for name in models
            ],
        }

    add_lora_routes(app, models, settings, authorize)

    @app.post("/v1/images/generations", responses={200: {"model": ImagesResponse}, **ERRORS})
    async def generations(request: Request) -> Response:
        authorize(request)
        body = await read_body(request, settings.max_body_bytes)
        wanted = image_request(
            parse_json(body), settings.limits, settings.max_partial_images, edit=False
        )
        return await generate(request, wanted, {}, "image_generation")

    @app.post("/v1/images/edits", responses={200: {"model": ImagesResponse}, **ERRORS})
    async def edits(request: Request) -> Response:
        authorize(request)
        await read_body(request, settings.max_body_bytes)
        form = await request.form(max_files=3, max_fields=32)
        fields = {key: value for key, value in form.items() if not hasattr(value, "read")}
        uploads = {key: value for key, value in form.items() if hasattr(value, "read")}
        wanted = image_request(
            {**fields, **uploads}, settings.limits, settings.max_partial_images, edit=True
        )
        picture = uploads.get("image") or uploads.get("image[]")
        if picture is None:
            raise ApiError(400, "image is required: upload the picture to edit", "image")
        extras = {"image": await _image(picture, "image", settings, "RGB")}
        names = {"image_name": picture.filename}
        if "mask" in uploads:
            extras["mask_image"] = await _image(uploads["mask"], "mask", settings, "L")
            names["mask_name"] = uploads["mask"].filename
        return await generate(request, wanted, extras, "image_edit", **names)

    @app.get(
        "/v1/images/files/{image_id}",
        response_class=Response,
        responses={
            200: {"content": {t: {} for t in MEDIA_TYPES.values()}, "description": "the image"},
            401: ERRORS[401],
            404: ERRORS[404],
        },
    )
    async def image_file(request: Request, image_id: str) -> Response:
        """An image answered with response_format url, until it expires (--image-url-ttl)."""
        authorize(request)
        image = store.get(image_id)
        if image is None:
            raise ApiError(
                404,
                f"image {image_id!r} is not here: it expired (--image-url-ttl), was evicted "
                "(--image-store-mb) or never existed; generate it again",
            )
        return Response(image.data, media_type=image.media_type)

    async def generate(
        request: Request,
        wanted: ImageRequest,
        extras: dict[str, Any],
        kind: str,
        **names: Any,
    ) -> Response:
        name, batcher = pick(wanted.model)
        if wanted.response_format == "url" and not wanted.stream and not store.max_bytes:
            raise ApiError(
                400,
                "response_format url is off on this server (--image-store-mb 0); use b64_json",
                "response_format",
            )
        started, status = time.perf_counter(), "500"
        try:
            # numpy out, encoding in a worker thread: the batcher thread only steps
            call = {"seed": secrets.randbelow(2**31), **wanted.call, **extras, "output_type": "np"}
            try:
                args = batcher.pipeline.arguments(**call, limits=settings.limits)
                if wanted.stream:
                    response = await _stream(batcher, args, wanted, kind, names)
                    status = "200"
                    return response
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
            encoded = await asyncio.to_thread(_encode, out.images, wanted, metadata)
            if wanted.response_format == "url":
                data = [{"url": _store(request, store, image, wanted)} for image in encoded]
            else:
                data = [{"b64_json": base64.b64encode(image).decode()} for image in encoded]
            status = "200"
            return JSONResponse(
                {"created": int(time.time()), "data": data, **_echo(args, wanted, event=False)},
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


async def _result(request: Request | None, batcher: Batcher, future: Any) -> Any:
    """The batcher's output, or None after cancelling it when the client disconnected (or,
    without `request`, was cancelled)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if request is not None and await request.is_disconnected():
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


def _encode(images: Any, wanted: ImageRequest, metadata: dict[str, Any]) -> list[bytes]:
    return [
        encode_image(image, wanted.output_format, wanted.output_compression, metadata)
        for image in numpy_to_pil(images)
    ]


def _store(request: Request, store: ImageStore, image: bytes, wanted: ImageRequest) -> str:
    try:
        image_id = store.put(image, MEDIA_TYPES[wanted.output_format], wanted.output_format)
    except StoreFull as err:
        raise ApiError(503, str(err)) from err
    return f"{str(request.base_url).rstrip('/')}/v1/images/files/{image_id}"


def _echo(args: Any, wanted: ImageRequest, event: bool) -> dict[str, Any]:
    """The fields ImagesResponse (or a stream event) repeats, within the values OpenAI's schema
    lists: a size or quality it does not list is left out (a response) or "auto" (an event,
    where they are required)."""
    size = f"{args.width}x{args.height}"
    echo = {"background": "opaque", "output_format": wanted.output_format}
    for key, value in (
        ("size", size if size in LISTED_SIZES else None),
        ("quality", wanted.quality),
    ):
        if value is not None or event:
            echo[key] = value or "auto"
    return echo


async def _stream(
    batcher: Batcher, args: Any, wanted: ImageRequest, kind: str, names: dict[str, Any]
) -> StreamingResponse:
    """Submit with previews and answer with Server-Sent Events: `{kind}.partial_image` per
    preview (each image of the request), then `{kind}.completed` per image. A failure after
    the answer began is an `error` event carrying the OpenAI error object. A client that goes
    away cancels the request (Starlette closes the generator on disconnect)."""
    loop = asyncio.get_running_loop()
    previews: asyncio.Queue = asyncio.Queue()

    def deliver(index: int, images: Any) -> None:
        loop.call_soon_threadsafe(previews.put_nowait, (index, images))

    count = wanted.partial_images
    future = batcher.submit(args, Previews(count, deliver) if count else None)
    metadata = generation_metadata(args, **names)

    async def encoded(images: Any, fields: dict[str, Any]) -> list[bytes]:
        chunks = await asyncio.to_thread(_encode, images, wanted, metadata)
        return [
            _event(fields["type"], {**fields, "b64_json": base64.b64encode(c).decode()})
            for c in chunks
        ]

    async def events() -> Any:
        waiting = asyncio.wrap_future(future)
        try:
            while not (waiting.done() and previews.empty()):
                getter = asyncio.ensure_future(previews.get())
                await asyncio.wait({getter, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                index, images = getter.result()
                fields = {
                    "type": f"{kind}.partial_image",
                    "created_at": int(time.time()),
                    **_echo(args, wanted, event=True),
                    "partial_image_index": index,
                }
                for chunk in await encoded(images, fields):
                    yield chunk
            try:
                out = await _result(None, batcher, future)
            except ApiError as err:
                yield _event("error", err.body())
                return
            if out is None:
                return
            fields = {
                "type": f"{kind}.completed",
                "created_at": int(time.time()),
                **_echo(args, wanted, event=True),
                "usage": ZERO_USAGE,
            }
            for chunk in await encoded(out.images, fields):
                yield chunk
        finally:
            if not future.done():
                batcher.cancel(future)

    return StreamingResponse(events(), media_type="text/event-stream")


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
