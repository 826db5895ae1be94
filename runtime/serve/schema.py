"""The HTTP API's request and response models: the fields `requests.py` reads and the shapes
`app.py` answers with, published at /openapi.json and /docs. OpenAI's Images API fields
(as in its published OpenAPI description) plus sdrt's own; `openapi` fills in the limits the
server was started with (largest n, steps, side; partial images; schedulers; models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Quality = Literal["low", "medium", "high", "auto", "standard", "hd"]
OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["b64_json", "url"]
# "transparent" is refused with 400: the models served here draw no alpha channel
Background = Literal["opaque", "auto"]
IGNORED = ("moderation", "style", "user", "input_fidelity")


# a request's run-time LoRAs: name -> scale (the edit form carries this as JSON text)
LORAS = {"type": "object", "additionalProperties": {"type": "number"}}
LORA_NAME = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # lora_pool.NAME


class _Fields(BaseModel):
    """What generations and edits share; the edit form adds its uploads and `strength`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the text to draw")
    model: str | None = Field(None, description="a served model (GET /v1/models)")
    n: int | None = Field(None, ge=1, description="images to make; null means 1")
    size: str | None = Field(
        None, description="WIDTHxHEIGHT, or auto (the bundle's size; for edits the image's)"
    )
    quality: Quality | None = Field(
        None, description="a step-count preset (see the README); num_inference_steps wins"
    )
    response_format: ResponseFormat | None = Field(
        None, description="b64_json (default) or url (served here for a limited time)"
    )
    output_format: OutputFormat | None = Field(None, description="default png")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="JPEG/WebP quality, 100 best (default)"
    )
    background: Background | None = Field(None, description="transparent gets a 400")
    stream: bool | None = Field(None, description="answer with Server-Sent Events")
    partial_images: int | None = Field(
        None, ge=0, le=3, description="streamed previews (predicted clean image) before the end"
    )
    user: str | None = Field(None, description="accepted and ignored")
    negative_prompt: str | None = Field(None, description="sdrt: what not to draw")
    num_inference_steps: int | None = Field(None, ge=1, description="sdrt: denoising steps")
    guidance_scale: float | None = Field(None, ge=0, description="sdrt: classifier-free guidance")
    scheduler: str | None = Field(None, description="sdrt: the sampler")
    seed: int | None = Field(None, ge=0, description="sdrt: same seed, same image")


class CreateImageRequest(_Fields):
    loras: dict[str, float] | None = Field(
        None, description="sdrt: run-time LoRA name -> scale (bundles exported with --lora-rank)"
    )
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted and ignored")
    style: Literal["vivid", "natural"] | None = Field(None, description="accepted and ignored")


class CreateImageEditRequest(_Fields):
    image: bytes = Field(description="the picture to edit (PNG, JPEG, WebP...)")
    mask: bytes | None = Field(None, description="white = repaint; the image's size")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="accepted and ignored")
    loras: str | None = Field(
        None,
        description='sdrt: run-time LoRA name -> scale as JSON text, e.g. {"style": 0.8}',
        json_schema_extra={"contentMediaType": "application/json", "contentSchema": LORAS},
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="sdrt: share of the schedule run from the image"
    )


class LoadLoraRequest(BaseModel):
    """POST /v1/loras."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=LORA_NAME, description="what requests call it in `loras`")
    path: str = Field(
        min_length=1, description="a .safetensors file, relative to the server's --lora-dir"
    )
    model: str | None = Field(
        None, description="load into this model only (default: every one with --lora-rank)"
    )


class _Answer(BaseModel):
    """A response body: nothing beyond its fields (a stray `revised_prompt: null` is an error)."""

    model_config = ConfigDict(extra="forbid")


class ImageData(_Answer):
    b64_json: str = Field(None, description="the encoded image, with response_format b64_json")
    url: str = Field(None, description="where to GET it, with response_format url")


class ImagesResponse(_Answer):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = Field(None)
    output_format: OutputFormat = Field(None)
    size: Literal["1024x1024", "1024x1536", "1536x1024"] = Field(
        None, description="given only for the sizes OpenAI's schema lists"
    )
    quality: Literal["low", "medium", "high"] = Field(
        None, description="the preset that ran; absent when num_inference_steps was given"
    )


class InputTokensDetails(_Answer):
    text_tokens: int
    image_tokens: int


class ImagesUsage(_Answer):
    """All zero: sdrt does not count tokens; OpenAI's event schema requires the object."""

    total_tokens: int
    input_tokens: int
    output_tokens: int
    input_tokens_details: InputTokensDetails


class _Event(_Answer):
    b64_json: str
    created_at: int
    size: Literal["1024x1024", "1024x1536", "1536x1024", "auto"] = Field(
        description="auto for the sizes OpenAI's schema does not list"
    )
    quality: Literal["low", "medium", "high", "auto"]
    background: Literal["opaque"]
    output_format: OutputFormat


class ImageGenPartialImageEvent(_Event):
    type: Literal["image_generation.partial_image"]
    partial_image_index: int


class ImageGenCompletedEvent(_Event):
    type: Literal["image_generation.completed"]
    usage: ImagesUsage


class ImageEditPartialImageEvent(_Event):
    type: Literal["image_edit.partial_image"]
    partial_image_index: int


class ImageEditCompletedEvent(_Event):
    type: Literal["image_edit.completed"]
    usage: ImagesUsage


class Lora(_Answer):
    """A loaded run-time LoRA in one model."""

    id: str = Field(description="its name")
    object: Literal["lora"]
    model: str
    name: str
    file: str = Field(description="the file's name")
    rank: int
    layers: dict[str, int] = Field(description="adapted layers per component")
    bytes: int = Field(description="size of its factors")
    in_use: int = Field(description="requests holding it now")


class LoraList(_Answer):
    object: Literal["list"]
    data: list[Lora]


class LoraDeleted(_Answer):
    id: str
    object: Literal["lora"]
    deleted: Literal[True]


class ErrorDetail(_Answer):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Answer):
    error: ErrorDetail


MODELS = (
    CreateImageRequest,
    CreateImageEditRequest,
    LoadLoraRequest,
    ImagesResponse,
    ImageGenPartialImageEvent,
    ImageGenCompletedEvent,
    ImageEditPartialImageEvent,
    ImageEditCompletedEvent,
    ErrorResponse,
)
EVENTS = {
    "/v1/images/generations": (ImageGenPartialImageEvent, ImageGenCompletedEvent),
    "/v1/images/edits": (ImageEditPartialImageEvent, ImageEditCompletedEvent),
}
BODIES = {
    "/v1/images/generations": ("application/json", CreateImageRequest),
    "/v1/images/edits": ("multipart/form-data", CreateImageEditRequest),
    "/v1/loras": ("application/json", LoadLoraRequest),
}


def size_pattern(multiple: int, max_side: int) -> str:
    """A regular expression for "auto" or WIDTHxHEIGHT with both sides multiples of
    `multiple` up to `max_side`: exact, so a generated size is one the server takes."""
    sides = "|".join(str(side) for side in range(max_side // multiple * multiple, 0, -multiple))
    return f"^(auto|({sides})x({sides}))$"


def openapi(
    base: dict[str, Any],
    *,
    max_images: int,
    max_steps: int,
    max_side: int,
    size_multiple: int,
    max_partial_images: int,
    schedulers: list[str],
    models: list[str],
) -> dict[str, Any]:
    """FastAPI's schema with the request bodies, streamed events and this server's limits."""
    components = base.setdefault("components", {}).setdefault("schemas", {})
    for model in MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    for name in ("CreateImageRequest", "CreateImageEditRequest"):
        fields = components[name]["properties"]
        _limit(fields["n"], maximum=max_images)
        _limit(fields["num_inference_steps"], maximum=max_steps)
        _limit(fields["partial_images"], maximum=min(3, max_partial_images))
        _limit(fields["size"], pattern=size_pattern(size_multiple, max_side))
        _limit(fields["scheduler"], enum=schedulers)
        _limit(fields["model"], enum=models)
    _limit(components["LoadLoraRequest"]["properties"]["model"], enum=models)
    for name, field in components["CreateImageEditRequest"]["properties"].items():
        components["CreateImageEditRequest"]["properties"][name] = _not_null(field)
    for path, (media, model) in BODIES.items():
        operation = base["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {media: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    for path, answers in EVENTS.items():
        operation = base["paths"][path]["post"]
        events = [_sse(e.model_fields["type"].annotation.__args__[0], e) for e in answers]
        events.append(_sse("error", ErrorResponse))
        content = operation["responses"]["200"]["content"]
        content["text/event-stream"] = {"schema": {"anyOf": events}}
    return base


def _sse(name: str, model: type[BaseModel]) -> dict[str, Any]:
    """One Server-Sent Event as OpenAPI 3.2 describes an event-stream item: `event` names it,
    `data` is the JSON text of `model`."""
    data = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": data,
            },
        },
    }


def _not_null(field: dict[str, Any]) -> dict[str, Any]:
    """A form field's schema without the null branch: a multipart form cannot send null."""
    branches = [b for b in field.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) != 1:
        return field
    rest = {k: v for k, v in field.items() if k not in ("anyOf", "default")}
    return {**rest, **branches[0]}


def _limit(field: dict[str, Any], **constraints: Any) -> None:
    """Put `constraints` on the non-null branch of an optional field's schema."""
    branches = field.get("anyOf", [field])
    target = next(b for b in branches if b.get("type") != "null")
    target.update(constraints)
