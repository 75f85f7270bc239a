"""A short path through the ASGI stack for the tracking endpoints, ingest's hot path.

FastAPI's per-request machinery (telemetry checks, router matching over every route, dependency solving,
the exit-stack and exception-wrapping layers, CORS and metrics middleware) cost more CPU than the tracking
call itself. This ASGI layer sits in front of the whole FastAPI app and answers ``POST`` to the exact
tracking paths by calling the very same endpoint functions, with the same error bodies (``ApiError`` → its
JSON, anything unexpected → the shared 500 body) and the same RED metrics as
:class:`loyalist.http.MetricsMiddleware`.

Requests with an ``Origin`` header (browsers, which need CORS headers) and every other path go through the
full FastAPI stack, where the same routes are declared and documented in the OpenAPI document.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from loyalist.http import ApiError
from loyalist.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


class TrackingFastPath:
    def __init__(self, app: FastAPI, routes: Mapping[str, Endpoint], service: str = "ingest") -> None:
        self.app = app
        self.routes = dict(routes)
        self.service = service
        self._in_flight = HTTP_IN_FLIGHT.labels(service)
        self._duration = {path: HTTP_DURATION.labels(service, "POST", path) for path in self.routes}
        self._counted: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST" or any(name == b"origin" for name, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope["app"] = self.app  # what Starlette sets for request.app
        self._in_flight.inc()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                response = await endpoint(Request(scope, receive))
            except ApiError as exc:
                response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
            except Exception:
                log.exception("unhandled error")
                response = JSONResponse({"code": "internal_error", "message": "unexpected server error"},
                                        status_code=500)
            await response(scope, receive, send_status)
        finally:
            self._in_flight.dec()
            path = scope["path"]
            counter = self._counted.get((path, status))
            if counter is None:
                counter = self._counted[(path, status)] = HTTP_REQUESTS.labels(self.service, "POST", path, str(status))
            counter.inc()
            self._duration[path].observe(time.perf_counter() - started)
