"""ASGI middleware around every request: request id, API key, body size limit, access log and
request metrics. Pure ASGI (not BaseHTTPMiddleware) so streaming and disconnect detection pass
through untouched."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from edgemoe.server.errors import error_body

logger = logging.getLogger("edgemoe.server.access")

OPEN_PATHS = {"/health"}


class RequestGuard:
    def __init__(self, app, settings, metrics, known_paths: set[str]):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:12]
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=time.perf_counter(), prompt_tokens=0, completion_tokens=0)
        path = scope["path"]
        route = path if path in self.known_paths else "other"
        status_holder = {"status": 500}

        async def send_with_status(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            rejection = self._check_auth(scope, path)
            if rejection is None:
                receive, rejection = await self._limit_body(scope, receive)
            if rejection is not None:
                await self._reject(send_with_status, *rejection)
            else:
                await self.app(scope, receive, send_with_status)
        finally:
            status = status_holder["status"]
            seconds = time.perf_counter() - state["started"]
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.prompt_tokens.inc(state.get("prompt_tokens", 0))
            self.metrics.generated_tokens.inc(state.get("completion_tokens", 0))
            logger.info("request %s %s %s -> %d, prompt %d tok, generated %d tok, %.3f s", request_id,
                        scope["method"], path, status, state.get("prompt_tokens", 0),
                        state.get("completion_tokens", 0), seconds)

    def _check_auth(self, scope, path: str):
        key = self.settings.api_key
        if not key or path in OPEN_PATHS or scope["method"] == "OPTIONS":
            return None
        headers = dict(scope["headers"])
        supplied = headers.get(b"authorization", b"").decode("latin-1")
        token = supplied[7:] if supplied.lower().startswith("bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), key.encode()):
            message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not token else
                       "invalid API key: send the key the server was started with (--api-key)")
            return 401, message, "invalid_api_key", {"www-authenticate": "Bearer"}
        return None

    async def _limit_body(self, scope, receive):
        """Read the body up to max_body_bytes, then replay it; a larger body is rejected with 413."""
        limit = self.settings.max_body_bytes
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        too_large = (413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)",
                     "body_too_large", {})
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return receive, too_large
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None  # client went away; let the app see the disconnect
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return receive, too_large
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay, None

    @staticmethod
    async def _reject(send, status: int, message: str, code: str, extra_headers: dict):
        body = json.dumps(error_body(status, message, code=code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in extra_headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
