"""One JSON error shape for every failure: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            # The location of a JSON syntax error is a character position, not a field.
            detail = first.get("ctx", {}).get("error", first.get("msg"))
            logger.info("rejected %s %s: invalid JSON body: %s", request.method, request.url.path, detail)
            return error_response(400, f"the request body is not valid JSON: {detail} "
                                       f"(at character {first['loc'][-1]})", code="invalid_json")
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(location) or None
        received = first.get("input")
        message = f"{param or 'body'}: {first.get('msg')}" + (
            f" (received {received!r})" if received is not None and not isinstance(received, dict) else "")
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.error("request %s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return error_response(500, f"internal error: {exc}")
