"""A short path through the ASGI stack for ``GET /v1/profiles/{identifier}``, the read other services make most.

FastAPI's per-request machinery (router matching over every route, dependency solving, query validation, the
exit-stack and exception layers, the metrics middleware) costs about as much CPU as the read itself. This
layer (:class:`loyalist.http.ShortPath`) answers the plain form of that request (no query string but ``by``)
with the functions the route uses (the token check, the identifier's resolution, the observation day), so
with the same bodies, the same errors and the same RED metrics. Every other request (``as_of``,
``observation_date``, other paths, browsers sending ``Origin``) goes through FastAPI, where the route is
declared and documented.
"""

from __future__ import annotations

from typing import get_args
from urllib.parse import parse_qsl

from fastapi import FastAPI
from fastapi.responses import ORJSONResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from loyalist.auth import authorize
from loyalist.http import ShortPath
from services.profile.api import LookupKind, live_profile

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


class ProfileReadFastPath(ShortPath):
    def __init__(self, app: FastAPI, service: str = "profile") -> None:
        super().__init__(app, service)

    def match(self, scope: Scope) -> tuple[str, tuple[str, str | None]] | None:
        read = plain_read(scope)
        return None if read is None else (ROUTE, read)

    async def answer(self, request: Request, matched: tuple[str, str | None]) -> Response:
        identifier, by = matched
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        await authorize(request, scheme or None, token or None, "profiles:read")
        return ORJSONResponse(await live_profile(request, identifier, by))  # type: ignore[arg-type]


def serve_fast(app: FastAPI) -> ProfileReadFastPath:
    return ProfileReadFastPath(app)
