"""HTTP plumbing shared by every service's FastAPI app: one error shape, health/readiness/metrics
endpoints and RED metrics per route.

Every 4xx/5xx body is ``{"code": <machine-readable>, "message": <human>, ...details}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loyalist import __version__
from loyalist.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS, SERVICE_UP, render_latest

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool]]


class ApiError(Exception):
    """Raise from any route or dependency to answer with a clear, machine-readable error."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **details: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid credentials"},
    403: {"description": "The credential lacks the required scope"},
}


class StatusCapture:
    """An ASGI ``send`` that remembers the response status (500 until one is sent) for the RED metrics."""

    __slots__ = ("send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task overhead) recording RED metrics by route template."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        in_flight = HTTP_IN_FLIGHT.labels(self.service)
        in_flight.inc()
        sent = StatusCapture(send)
        try:
            await self.app(scope, receive, sent)
        finally:
            in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            HTTP_REQUESTS.labels(self.service, method, path, str(sent.status)).inc()
            HTTP_DURATION.labels(self.service, method, path).observe(time.perf_counter() - started)


INTERNAL_ERROR_BODY = {"code": "internal_error", "message": "unexpected server error"}


class ShortPath:
    """An ASGI layer in front of a whole FastAPI app that answers a service's hottest requests itself.

    FastAPI's per-request machinery (telemetry checks, router matching over every route, dependency solving,
    the exit-stack and exception-wrapping layers, middleware) can cost more CPU than a hot request's own work.
    A subclass says which requests it answers (:meth:`match`: the route label and what :meth:`answer` needs)
    and answers them; this class gives them the same error bodies (``ApiError`` → its JSON, anything
    unexpected → the shared 500 body) and the same RED metrics as :class:`MetricsMiddleware`. Every other
    request goes through FastAPI, where the same routes are declared and documented."""

    def __init__(self, app: FastAPI, service: str) -> None:
        self.app = app
        self.service = service
        self._in_flight = HTTP_IN_FLIGHT.labels(service)
        self._durations: dict[tuple[str, str], Any] = {}
        self._counted: dict[tuple[str, str, int], Any] = {}

    def match(self, scope: Scope) -> tuple[str, Any] | None:
        """(route label, what :meth:`answer` needs) when this layer answers the request, else None."""
        raise NotImplementedError

    async def answer(self, request: Request, matched: Any) -> Response:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self.match(scope) if scope["type"] == "http" else None
        if matched is None:
            await self.app(scope, receive, send)
            return
        route, detail = matched
        method = scope["method"]
        started = time.perf_counter()
        scope["app"] = self.app  # what Starlette sets for request.app
        self._in_flight.inc()
        sent = StatusCapture(send)
        try:
            try:
                response = await self.answer(Request(scope, receive), detail)
            except ApiError as exc:
                response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
            except Exception:
                log.exception("unhandled error")
                response = JSONResponse(INTERNAL_ERROR_BODY, status_code=500)
            await response(scope, receive, sent)
        finally:
            self._in_flight.dec()
            status = sent.status
            counter = self._counted.get((method, route, status))
            if counter is None:
                counter = self._counted[(method, route, status)] = HTTP_REQUESTS.labels(
                    self.service, method, route, str(status))
            counter.inc()
            duration = self._durations.get((method, route))
            if duration is None:
                duration = self._durations[(method, route)] = HTTP_DURATION.labels(self.service, method, route)
            duration.observe(time.perf_counter() - started)


def failing_live_checks(app: FastAPI) -> list[str]:
    """The names of the app's liveness checks that fail now (what ``/healthz`` reports as ``dead``)."""
    return sorted(name for name, alive in app.state.live_checks.items() if not alive())


def create_service_app(
    service: str,
    *,
    title: str,
    description: str,
    lifespan: Callable[[FastAPI], Any] | None = None,
    version: str = __version__,
) -> FastAPI:
    """A FastAPI app with Loyalist's error shape and ops endpoints. Register readiness checks with
    ``app.state.ready_checks[name] = async_callable`` and liveness checks (cheap, no I/O: a failing one gets the
    process restarted) with ``app.state.live_checks[name] = callable``."""
    app = FastAPI(
        title=title,
        description=description,
        version=version,
        lifespan=lifespan,
    )
    app.state.ready_checks = {}
    app.state.live_checks = {}
    app.state.service = service
    SERVICE_UP.labels(service, version).set(1)
    app.add_middleware(MetricsMiddleware, service=service)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(
            {"code": "validation_error", "message": f"{where}: {first['msg']}", "detail": errors},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"code": code, "message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(INTERNAL_ERROR_BODY, status_code=500)

    @app.get("/healthz", tags=["ops"], summary="Liveness: the process is serving",
             responses={503: {"description": "A part of the process stopped for good: restart it"}})
    async def healthz() -> JSONResponse:
        dead = failing_live_checks(app)
        if dead:
            return JSONResponse({"status": "dead", "service": service, "dead": dead}, status_code=503)
        return JSONResponse({"status": "ok", "service": service})

    @app.get("/readyz", tags=["ops"], summary="Readiness: every dependency answers",
             responses={503: {"description": "A dependency is not ready"}})
    async def readyz() -> JSONResponse:
        checks: dict[str, bool] = {}
        for name, check in app.state.ready_checks.items():
            try:
                checks[name] = bool(await check())
            except Exception:
                checks[name] = False
        ok = all(checks.values()) and getattr(app.state, "started", False)
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "service": service, "checks": checks},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        body, content_type = render_latest()
        return Response(body, media_type=content_type)

    return app
