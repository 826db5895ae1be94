"""`sdrt serve BUNDLE [BUNDLE...]`: load each bundle, batch it, serve the HTTP API; SIGTERM or
SIGINT drains (new requests get 503, running ones finish up to a deadline), then exit 0."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from ..arguments import Limits
from ..errors import UserError
from ..lora_pool import DEFAULT_MAX_LORAS, check_max_loras
from .batcher import DEFAULT_MAX_BATCH_ROWS, MODES
from .ray_command import add_arguments as add_ray_arguments
from .settings import Settings


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve bundles over an OpenAI-style HTTP API")
    serve.add_argument("bundles", nargs="+", metavar="BUNDLE", help="model name: folder name")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("SDRT_API_KEY"),
        help="require Authorization: Bearer KEY (default: $SDRT_API_KEY)",
    )
    serve.add_argument("--backend", default="onnxruntime")
    serve.add_argument("--device", default="auto")
    serve.add_argument(
        "--max-batch-rows",
        type=int,
        default=DEFAULT_MAX_BATCH_ROWS,
        help="U-Net rows per call (a guided image takes 2); 2 = one request at a time",
    )
    serve.add_argument("--batching", choices=MODES, default="continuous")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    serve.add_argument("--request-timeout", type=float, default=300.0, help="seconds, then 504")
    serve.add_argument("--drain-timeout", type=float, default=30.0, help="seconds on shutdown")
    serve.add_argument("--max-body-mb", type=float, default=25.0)
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    serve.add_argument("--max-images", type=int, default=4, help="largest n per request")
    serve.add_argument("--max-steps", type=int, default=150)
    serve.add_argument("--max-size", type=int, default=2048, help="largest width or height")
    serve.add_argument("--no-warmup", action="store_true", help="ready without a warm-up run")
    serve.add_argument(
        "--image-url-ttl",
        type=float,
        default=60.0,
        help='minutes a response_format "url" image stays served (default 60)',
    )
    serve.add_argument(
        "--image-store-mb",
        type=float,
        default=256.0,
        help="memory for those images, oldest dropped first; 0 turns url off (default 256)",
    )
    serve.add_argument(
        "--max-partial-images",
        type=int,
        default=3,
        help="streamed previews a request may ask for, 0-3 (default 3; 0: none)",
    )
    serve.add_argument(
        "--lora-dir",
        type=Path,
        help="load every *.safetensors here as a run-time LoRA named by its stem; POST "
        "/v1/loras loads files from here only",
    )
    serve.add_argument(
        "--max-loras",
        type=int,
        default=DEFAULT_MAX_LORAS,
        help="run-time LoRAs held at once per model, least recently used evicted (default 16)",
    )
    serve.add_argument(
        "--trusted-key", help="public key (PEM): refuse any bundle not signed by its pair"
    )
    add_ray_arguments(serve)
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        from .ray_command import serve_on_ray

        return serve_on_ray(args, _settings(args))
    try:
        import uvicorn

        from .app import create_app
        from .server import DrainingServer
    except ImportError as err:
        raise UserError(
            f"sdrt serve needs the serve extra ({err.name} is missing); "
            "run `pip install 'sdrt[serve]'`"
        ) from err
    from .batcher import load_batchers

    settings = _settings(args)
    if args.api_key is None and not _loopback(args.host):
        print(
            f"sdrt: warning: serving on {args.host} without --api-key: anyone who can reach "
            "it can use it",
            file=sys.stderr,
        )
    models = load_batchers(
        args.bundles,
        backend=args.backend,
        device=args.device,
        trusted_key=args.trusted_key,
        max_loras=args.max_loras,
        max_batch_rows=args.max_batch_rows,
        max_queue=args.max_queue,
        mode=args.batching,
        request_timeout_s=args.request_timeout,
    )
    app = create_app(models, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info")
    DrainingServer(config, app.state.sdrt.drain).run()
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    for flag, value in (
        ("--max-images", args.max_images),
        ("--max-steps", args.max_steps),
        ("--max-size", args.max_size),
        ("--max-image-pixels", args.max_image_pixels),
    ):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.max_body_mb <= 0 or args.drain_timeout < 0:
        raise UserError("--max-body-mb must be > 0 and --drain-timeout >= 0")
    if args.image_url_ttl <= 0 or args.image_store_mb < 0:
        raise UserError(
            f"--image-url-ttl must be > 0 and --image-store-mb >= 0, got "
            f"{args.image_url_ttl} and {args.image_store_mb}"
        )
    check_max_loras(args.max_loras, "--max-loras")
    if not 0 <= args.max_partial_images <= 3:
        raise UserError(f"--max-partial-images must be 0 to 3, got {args.max_partial_images}")
    return Settings(
        api_key=args.api_key or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        limits=Limits(args.max_steps, args.max_images, args.max_size),
        drain_deadline_s=args.drain_timeout,
        warmup=not args.no_warmup,
        image_url_ttl_s=args.image_url_ttl * 60,
        image_store_bytes=int(args.image_store_mb * 2**20),
        max_partial_images=args.max_partial_images,
        lora_dir=args.lora_dir,
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
