"""Errors as the OpenAI API returns them: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from ..errors import UserError

# HTTP status -> (OpenAI error type, code)
KINDS = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "unavailable"),
    504: ("server_error", "timeout"),
}

# words an error sentence starts from -> the request field it is about
FIELDS = {
    "negative_prompt": "negative_prompt",
    "prompt": "prompt",
    "images": "n",
    "n": "n",
    "num_inference_steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "scheduler": "scheduler",
    "seed": "seed",
    "strength": "strength",
    "height": "size",
    "width": "size",
    "size": "size",
    "mask_image": "mask",
    "mask": "mask",
    "image": "image",
    "response_format": "response_format",
    "model": "model",
}


ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def error_responses(*statuses: int) -> dict[int, dict[str, Any]]:
    """The OpenAPI `responses` entries of these error statuses, for a route's declaration."""
    return {
        status: {"description": "an OpenAI-shaped error", "content": ERROR_BODY}
        for status in statuses
    }


class ApiError(Exception):
    """An error response: status, one sentence, and the request field it is about."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind, code = KINDS.get(self.status, KINDS[500])
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}


def bad_value(err: UserError) -> ApiError:
    """400 for a UserError, naming the field its sentence is about."""
    message = str(err)
    words = message.replace(",", " ").replace(":", " ").replace(";", " ").split()
    named = [FIELDS[word] for word in words if word in FIELDS]
    return ApiError(400, message, named[0] if named else None)
