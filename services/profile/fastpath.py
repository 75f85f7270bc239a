"""A short path through the ASGI stack for ``GET /v1/profiles/{identifier}``, the read other services make most.

FastAPI's per-request machinery (router matching over every route, dependency solving, query validation, the
exit-stack and exception layers, the metrics middleware) costs about as much CPU as the read itself. This
layer answers the plain form of that request (no query string but ``by``) with the functions the route uses
(the token check, the identifier's resolution, the observation day), so with the same bodies, the same errors
and the same RED metrics. Every other request (``as_of``, ``observation_date``, other paths, browsers sending
``Origin``) goes through FastAPI, where the route is declared and documented.
"""

from __future__ import annotations

import logging
import time
from typing import Any, get_args
from urllib.parse import parse_qsl

from fastapi import FastAPI
from fastapi.responses import ORJSONResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from loyalist.auth import authorize
from loyalist.http import ApiError
from loyalist.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS
from services.profile.api import LookupKind, live_profile

log = logging.getLogger(__name__)

PREFIX = "/v1/profiles/"
ROUTE = "/v1/profiles/{identifier}"  # the route's template: the label MetricsMiddleware gives it
LOOKUP_KINDS = frozenset(get_args(LookupKind))


def plain_read(scope: Scope) -> tuple[str, str | None] | None:
    """(identifier, by) when ``scope`` is a plain profile read this layer answers, else None.

    >>> plain_read({"type": "http", "method": "GET", "path": "/v1/profiles/u1", "query_string": b"by=user_id",
    ...             "headers": []})
    ('u1', 'user_id')
    >>> plain_read({"type": "http", "method": "GET", "path": "/v1/profiles/u1/events", "query_string": b"",
    ...             "headers": []}) is None
    True
    >>> plain_read({"type": "http", "method": "GET", "path": "/v1/profiles/u1", "query_string": b"as_of=x",
    ...             "headers": []}) is None
    True
    """
    if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].startswith(PREFIX):
        return None
    identifier = scope["path"][len(PREFIX):]
    if not identifier or "/" in identifier or any(name == b"origin" for name, _ in scope["headers"]):
        return None
    by: str | None = None
    if scope["query_string"]:
        params = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if len(params) != 1 or params[0][0] != "by" or params[0][1] not in LOOKUP_KINDS:
            return None  # FastAPI validates and answers the rest
        by = params[0][1]
    return identifier, by


class ProfileReadFastPath:
    def __init__(self, app: FastAPI, service: str = "profile") -> None:
        self.app = app
        self.service = service
        self._in_flight = HTTP_IN_FLIGHT.labels(service)
        self._duration = HTTP_DURATION.labels(service, "GET", ROUTE)
        self._counted: dict[int, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        read = plain_read(scope)
        if read is None:
            await self.app(scope, receive, send)
            return
        identifier, by = read
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
            request = Request(scope, receive)
            response: Response
            try:
                scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
                await authorize(request, scheme or None, token or None, "profiles:read")
                response = ORJSONResponse(await live_profile(request, identifier, by))  # type: ignore[arg-type]
            except ApiError as exc:
                response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
            except Exception:
                log.exception("unhandled error")
                response = JSONResponse({"code": "internal_error", "message": "unexpected server error"},
                                        status_code=500)
            await response(scope, receive, send_status)
        finally:
            self._in_flight.dec()
            counter = self._counted.get(status)
            if counter is None:
                counter = self._counted[status] = HTTP_REQUESTS.labels(self.service, "GET", ROUTE, str(status))
            counter.inc()
            self._duration.observe(time.perf_counter() - started)


def serve_fast(app: FastAPI) -> ProfileReadFastPath:
    return ProfileReadFastPath(app)
