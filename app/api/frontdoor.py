"""What every request passes first, as plain ASGI: a request id, a JSON access
log line, metrics, and the cap on requests in flight."""

from __future__ import annotations

import json
import logging
import time
import uuid

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.api import metrics
from app.api.problems import CAUSES, TYPE_PREFIX

access_log = logging.getLogger("rewards.access")

# Health answers must stay fast under overload: they skip the cap.
UNCAPPED = frozenset({"/healthz", "/readyz", "/metrics"})

CLIENT_CLOSED_REQUEST = 499


def _overloaded_body() -> bytes:
    status, title = CAUSES["overloaded"]
    return json.dumps({"type": TYPE_PREFIX + "overloaded", "title": title, "status": status,
                       "detail": "too many requests in flight in this process"}).encode()


class FrontDoor:
    def __init__(self, app: ASGIApp, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._overloaded = _overloaded_body()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        request_id = given.decode("latin-1")[:128] or uuid.uuid4().hex
        status: int | None = None
        client_left = False

        async def receive_noting_departure() -> Message:
            nonlocal client_left
            message = await receive()
            client_left = client_left or message["type"] == "http.disconnect"
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        capped = scope["path"] not in UNCAPPED
        try:
            if capped and self.in_flight >= self.max_in_flight:
                metrics.OVERLOADED.labels("in_flight").inc()
                await send_with_id({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/problem+json"), (b"retry-after", b"1")]})
                await send({"type": "http.response.body", "body": self._overloaded})
                return
            if capped:
                self.in_flight += 1
            try:
                await self.app(scope, receive_noting_departure, send_with_id)
            finally:
                if capped:
                    self.in_flight -= 1
        finally:
            if client_left and (status is None or status >= 500):
                # The client went away before its body was whole (as a load
                # generator's connections do when it stops), and Litestar's
                # 500 for the body it could not read went nowhere: 499, as
                # nginx logs it, so that no server-error alert fires on it.
                status = CLIENT_CLOSED_REQUEST
            elif status is None:
                status = 500  # what the server sends for an answer never started
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or "unmatched"
            metrics.REQUESTS.labels(scope["method"], route, str(status)).inc()
            metrics.LATENCY.labels(route).observe(elapsed)
            access_log.info("request", extra={"fields": {
                "request_id": request_id, "method": scope["method"], "path": scope["path"],
                "route": route, "status": status, "ms": round(elapsed * 1000, 2)}})
