"""From an HTTP request to Pipeline keyword arguments: the body read within its size limit,
OpenAI Images fields translated (`n`, `size` as WIDTHxHEIGHT or auto, `quality` as a step
preset) or kept for the answer (formats, streaming), sdrt fields passed on, uploads decoded
only after their header's pixel count is checked. The fields are those of `schema.py`.

The values themselves are checked by `sdrt.arguments.check_arguments`, as for `Pipeline`.
"""

from __future__ import annotations

import io
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..arguments import DEFAULT_STEPS, Limits
from .errors import ApiError
from .schema import IGNORED, CreateImageEditRequest, CreateImageRequest

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
# quality -> share of the default step count (DEFAULT_STEPS): the preset name it runs as
QUALITY_PRESETS = {
    "low": ("low", 0.5),
    "medium": ("medium", 1.0),
    "auto": ("medium", 1.0),
    "standard": ("medium", 1.0),
    "high": ("high", 1.5),
    "hd": ("high", 1.5),
}
KINDS_SAID = {int: "an integer", float: "a number", dict: "a JSON object"}


@dataclass
class ImageRequest:
    model: str | None
    n: int
    call: dict[str, Any]  # Pipeline keyword arguments
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100
    quality: str | None = None  # the preset that ran; None when num_inference_steps was given
    stream: bool = False
    partial_images: int = 0


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


def image_request(
    fields: Mapping[str, Any], limits: Limits, max_partial_images: int, edit: bool
) -> ImageRequest:
    """OpenAI + sdrt fields -> ImageRequest; an edit's values come from a form (strings).
    A null is the same as a field left out."""
    model_class = CreateImageEditRequest if edit else CreateImageRequest
    known = [name for name in model_class.model_fields if name not in UPLOADS]
    unknown = sorted(set(fields) - set(known) - set(UPLOADS))
    if unknown:
        raise ApiError(
            400, f"unknown field {unknown[0]!r}; the fields are {', '.join(known)}", unknown[0]
        )
    fields = {k: _whole_number(v) for k, v in fields.items() if v is not None}
    if "prompt" not in fields:
        raise ApiError(400, "prompt is required; send the text to draw", "prompt")
    for name in ("prompt", "model", "user"):
        if name in fields and not isinstance(fields[name], str):
            kind = type(fields[name]).__name__
            raise ApiError(400, f"{name} must be a string, got {kind}", name)
    for name in ("quality", "response_format", "output_format", "background", *IGNORED):
        if name in fields and name != "user":
            _choice(fields[name], name, model_class.model_fields[name].annotation)
    n = _whole(fields, "n", 1, 1, limits.max_images or 1, edit)
    compression = _whole(fields, "output_compression", 100, 0, 100, edit)
    partial_images = _whole(fields, "partial_images", 0, 0, min(3, max_partial_images), edit)
    stream = _flag(fields.get("stream", False), edit)
    call: dict[str, Any] = {"prompt": [fields["prompt"]] * n}
    if fields.get("size", "auto") != "auto":
        call["width"], call["height"] = parse_size(fields["size"])
    for name, kind in SDRT_FIELDS.items():
        if name in fields and name in known:
            call[name] = _typed(fields[name], name, kind) if edit else fields[name]
    quality = None
    if "num_inference_steps" not in call:
        quality, share = QUALITY_PRESETS[fields.get("quality", "auto")]
        steps = max(1, round(DEFAULT_STEPS * share))
        call["num_inference_steps"] = min(steps, limits.max_steps or steps)
    return ImageRequest(
        fields.get("model"),
        n,
        call,
        fields.get("response_format", "b64_json"),
        fields.get("output_format", "png"),
        compression,
        quality,
        stream,
        partial_images,
    )


def _choice(value: Any, name: str, annotation: Any) -> None:
    """400 unless `value` is one of the Literal choices inside `annotation` (X | None)."""
    choices = [c for arg in typing.get_args(annotation) for c in typing.get_args(arg)]
    if value in choices:
        return
    if name == "background" and value == "transparent":
        raise ApiError(
            400,
            "background 'transparent' is not supported: the models served here draw no alpha "
            "channel; use opaque or auto",
            name,
        )
    raise ApiError(400, f"{name} must be one of {', '.join(choices)}, got {value!r}", name)


def _whole(
    fields: Mapping[str, Any], name: str, default: int, lowest: int, highest: int, text: bool
) -> int:
    """An integer field within [lowest, highest] (a form's text read as one), or 400."""
    value = fields.get(name, default)
    value = _typed(value, name, int) if text else value
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
        raise ApiError(
            400, f"{name} must be an integer from {lowest} to {highest}, got {value!r}", name
        )
    return value


def _whole_number(value: Any) -> Any:
    """JSON's 2.0 is the integer 2 (JSON Schema says so); other values pass as they are."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _flag(value: Any, text: bool) -> bool:
    if text and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ApiError(400, f"stream must be true or false, got {value!r}", "stream")
    return value


def parse_size(size: Any) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" -> (width, height)."""
    parts = size.lower().split("x") if isinstance(size, str) else []
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ApiError(400, f"size must be WIDTHxHEIGHT, e.g. 512x512, got {size!r}", "size")
    return int(parts[0]), int(parts[1])


def _typed(value: Any, name: str, kind: type) -> Any:
    """A form's text value as `kind`, or 400 naming the field."""
    if kind is str or not isinstance(value, str):
        return value
    try:
        if kind is dict:  # a JSON object in a form field; an empty field is no value
            return json.loads(value) if value.strip() else {}
        return kind(value)
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
