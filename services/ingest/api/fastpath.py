"""A short path through the ASGI stack for the tracking endpoints, ingest's hot path.

FastAPI's per-request machinery costs more CPU than the tracking call itself. This layer
(:class:`loyalist.http.ShortPath`) answers ``POST`` to the exact tracking paths by calling the very same
endpoint functions, with the same error bodies and RED metrics. Requests with an ``Origin`` header (browsers,
which need CORS headers) and every other path go through the full FastAPI stack, where the same routes are
declared and documented in the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from loyalist.http import ShortPath

Endpoint = Callable[[Request], Awaitable[Response]]


class TrackingFastPath(ShortPath):
    def __init__(self, app: FastAPI, routes: Mapping[str, Endpoint], service: str = "ingest") -> None:
        super().__init__(app, service)
        self.routes = dict(routes)

    def match(self, scope: Scope) -> tuple[str, Endpoint] | None:
        endpoint = self.routes.get(scope["path"])
        if endpoint is None or scope["method"] != "POST" or any(name == b"origin" for name, _ in scope["headers"]):
            return None
        return scope["path"], endpoint

    async def answer(self, request: Request, matched: Endpoint) -> Response:
        return await matched(request)
