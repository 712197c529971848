"""One JSON error shape for every failure: `{"error": {"message", "type", "param", "code"}}`,
as OpenAI's API returns it. Validation errors are reported as 400, like OpenAI does."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable_error"}


class ApiError(Exception):
    """An error answered with `status` and the error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _field_location(errors: list[dict]) -> list[str]:
    """Location of the first error without "body" and without the union member that pydantic
    appends: `stop: 5` fails as ("stop", "str") and ("stop", "list[str]"), and the field is "stop"."""
    location = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    for other in errors[1:]:
        other_location = [str(p) for p in other.get("loc", ()) if p != "body"]
        if other_location[:1] != location[:1]:
            continue
        shared = 0
        while shared < min(len(location), len(other_location)) and location[shared] == other_location[shared]:
            shared += 1
        location = location[:shared]
    return location


def _as_json(value) -> str:
    """A received value as the client wrote it (JSON), not as Python prints it."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """Return the message, the field and the error code of a failed validation."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {detail}", None, "invalid_json"
    if tuple(first.get("loc", ())) == ("body",):
        if first.get("type") == "missing":
            return "the request body is missing; send a JSON object", None, "invalid_json"
        if isinstance(first.get("input"), (bytes, str)):
            return ("the request body must be a JSON object; send it with the header "
                    "'content-type: application/json'"), None, "invalid_json"
    param = ".".join(_field_location(errors)) or None
    message = first.get("msg", "invalid value")
    if "ctx" in first and "error" in first["ctx"]:
        message = str(first["ctx"]["error"])
    received = first.get("input")
    text = f"{param or 'request body'}: {message}"
    if received is not None and not isinstance(received, (dict, list)) and first.get("type") != "missing":
        text += f" (received {_as_json(received)})"
    return text, param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on "
                                                               f"{request.url.path}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param, code = _describe_validation(exc)
        logger.info("rejected %s %s: %s", request.method, request.url.path, message)
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        request_id = getattr(request.state, "request_id", "-")
        logger.error("request %s %s %s failed: %s", request_id, request.method, request.url.path, exc,
                     exc_info=exc)
        return error_response(500, f"internal error: {exc}", code="internal_error")
