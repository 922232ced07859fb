"""ASGI middleware in front of every route: the request size limit (413 before anything parses the body), the
arrival time (time to first token counts from it), the request counter of /metrics, and a body without a
Content-Type read as JSON (as llama-server reads it; FastAPI would refuse it)."""
from __future__ import annotations

import json
import time

from .schemas import error_body

KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


class RequestLimits:
    def __init__(self, app, max_bytes: int, metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["t_arrival"] = time.perf_counter()
        if scope["method"] not in ("GET", "HEAD") and not any(k == b"content-type" for k, _ in scope.get("headers", ())):
            scope = dict(scope, headers=[*scope.get("headers", ()), (b"content-type", b"application/json")])
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        status = []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            receive = await self._bounded_body(scope, receive)
            if receive is None:
                await _send_json(counted_send, 413, f"the request body exceeds the server's limit of {self.max_bytes} "
                                                    f"bytes (--max-request-bytes)")
                return
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(endpoint=path, status=str(status[0] if status else 499)).inc()

    async def _bounded_body(self, scope, receive):
        """A receive that replays the body read here, or None when the body is too large."""
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return None
        if scope["method"] in ("GET", "HEAD"):
            return receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return None
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        return replay


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps(error_body(message, code="request_too_large")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
