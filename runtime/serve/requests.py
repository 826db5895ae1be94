"""From an HTTP request to Pipeline keyword arguments: the body read within its size limit,
OpenAI Images fields translated (`n`, `size` as WIDTHxHEIGHT, `response_format`), sdrt fields
passed on, uploads decoded only after their header's pixel count is checked.

The values themselves are checked by `sdrt.arguments.check_arguments`, as for `Pipeline`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import ApiError

OPENAI_FIELDS = ("model", "prompt", "n", "size", "response_format", "user")
# sdrt fields -> the type a multipart (text) value is read as
SDRT_FIELDS = {
    "negative_prompt": str,
    "num_inference_steps": int,
    "guidance_scale": float,
    "scheduler": str,
    "seed": int,
    "strength": float,
    "loras": dict,  # run-time LoRA name -> scale; a JSON object in a form field
}
UPLOADS = ("image", "image[]", "mask")
KINDS_SAID = {int: "an integer", float: "a number", dict: "a JSON object"}


@dataclass
class ImageRequest:
    model: str | None
    n: int
    call: dict[str, Any]  # Pipeline keyword arguments


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette reads a form from this instead of the spent stream
    return body


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, f"the request body is over {limit} bytes (got {size}); send a smaller one", None
    )


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err}); send a JSON object") from err
    if not isinstance(fields, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(fields).__name__}")
    return fields


def image_request(fields: Mapping[str, Any], max_images: int, text: bool) -> ImageRequest:
    """OpenAI + sdrt fields -> ImageRequest; `text` when values come from a form (strings)."""
    unknown = sorted(set(fields) - set(OPENAI_FIELDS) - set(SDRT_FIELDS) - set(UPLOADS))
    if unknown:
        known = ", ".join((*OPENAI_FIELDS, *SDRT_FIELDS))
        raise ApiError(400, f"unknown field {unknown[0]!r}; the fields are {known}", unknown[0])
    if "prompt" not in fields:
        raise ApiError(400, "prompt is required; send the text to draw", "prompt")
    if not isinstance(fields["prompt"], str):
        kind = type(fields["prompt"]).__name__
        raise ApiError(400, f"prompt must be a string, got {kind}", "prompt")
    n = _integer(fields.get("n", 1), "n", text)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_images:
        raise ApiError(400, f"n must be an integer from 1 to {max_images}, got {n!r}", "n")
    if fields.get("response_format", "b64_json") not in ("b64_json", None):
        raise ApiError(
            400,
            f"response_format {fields['response_format']!r} is not supported; use b64_json",
            "response_format",
        )
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {type(model).__name__}", "model")
    call: dict[str, Any] = {"prompt": [fields["prompt"]] * n}
    if fields.get("size") is not None:
        call["width"], call["height"] = parse_size(fields["size"])
    for name, kind in SDRT_FIELDS.items():
        if fields.get(name) is not None:
            call[name] = _typed(fields[name], name, kind) if text else fields[name]
    return ImageRequest(model, n, call)


def parse_size(size: Any) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" -> (width, height)."""
    parts = size.lower().split("x") if isinstance(size, str) else []
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ApiError(400, f"size must be WIDTHxHEIGHT, e.g. 512x512, got {size!r}", "size")
    return int(parts[0]), int(parts[1])


def _integer(value: Any, name: str, text: bool) -> Any:
    return _typed(value, name, int) if text and isinstance(value, str) else value


def _typed(value: Any, name: str, kind: type) -> Any:
    """A form's text value as `kind`, or 400 naming the field."""
    if kind is str or not isinstance(value, str):
        return value
    try:
        return json.loads(value) if kind is dict else kind(value)
    except ValueError as err:
        raise ApiError(
            400,
            f"{name} must be {KINDS_SAID[kind]}, got {value!r}",
            name,
        ) from err


def open_upload(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Decode an uploaded picture, refusing one over `max_pixels` from its header alone (a
    decompression bomb is never decoded)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ApiError(
            413, f"{what} has too many pixels to decode; send a smaller image", what
        ) from err
    except (UnidentifiedImageError, OSError) as err:
        raise ApiError(
            400, f"{what} is not an image file (PNG, JPEG, WebP...); upload a picture", what
        ) from err
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ApiError(
            413,
            f"{what} is {image.width}x{image.height} = {pixels} pixels, over the limit of "
            f"{max_pixels}; send a smaller image",
            what,
        )
    try:
        image.load()
    except (OSError, ValueError) as err:
        raise ApiError(
            400, f"{what} is truncated or corrupt ({err}); upload it again", what
        ) from err
    return image
