"""The storefront tracker (``/sdk/loyalist.js``, also first-party under the alias prefix) and, in
development, a small demo storefront instrumented with it (``/demo/store``)."""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from loyalist.http import ApiError

STATIC = Path(__file__).resolve().parent.parent / "static"
TRACKER = (STATIC / "loyalist.js").read_bytes()
DEMO = (STATIC / "demo.html").read_text()

router = APIRouter(tags=["storefront"])


def tracker_response() -> Response:
    return Response(TRACKER, media_type="application/javascript; charset=utf-8",
                    headers={"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"})


@router.get("/sdk/loyalist.js", summary="The storefront JavaScript tracker", response_class=Response,
            responses={200: {"content": {"application/javascript": {}}, "description": "loyalist.js"}})
async def tracker() -> Response:
    return tracker_response()


@router.get("/demo/store", summary="Demo storefront (development only)", response_class=HTMLResponse,
            responses={404: {"description": "Not in development"}})
async def demo_store(request: Request, consent: str | None = Query(default=None, max_length=20),
                     product: str | None = Query(default=None, max_length=50)) -> HTMLResponse:
    settings = request.app.state.settings
    if settings.env != "development":
        raise ApiError(404, "not_found", "the demo storefront exists only in development")
    require = consent == "required"
    page = DEMO
    for placeholder, value in {
        "TITLE": f"Product {product}" if product else "Home",
        "SDK_URL": "/sdk/loyalist.js", "API_HOST": "", "WRITE_KEY": settings.dev_write_key,
        "REQUIRE_CONSENT": "true" if require else "false", "CONSENT_QS": "consent=required" if require else "",
    }.items():
        page = page.replace("{{" + placeholder + "}}", html.escape(value, quote=True))
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})
