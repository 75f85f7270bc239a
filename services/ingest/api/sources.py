"""Registering platform sources (a Shopify shop, a WooCommerce site, a Zendesk account) with their webhook
signing secret. Bearer API token with the ``sources:write`` / ``sources:read`` scope."""

from __future__ import annotations

import secrets
from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from loyalist.auth import Credential, require_scope
from loyalist.http import ERROR_RESPONSES, ApiError
from services.ingest.adapters.sources import SourceStore, normalize_shop
from services.ingest.api.webhooks import source_store

router = APIRouter(prefix="/v1/sources", tags=["sources"], responses=ERROR_RESPONSES)

Platform = Literal["shopify", "woocommerce", "zendesk"]
_WEBHOOK_PATHS = {"shopify": "/v1/webhooks/shopify", "woocommerce": "/v1/webhooks/woocommerce",
                  "zendesk": "/v1/webhooks/zendesk/{shop}"}


class SourceIn(BaseModel):
    platform: Platform
    shop: str = Field(min_length=1, max_length=200, pattern=r"^[!-~]+$",
                      description="Shopify: the myshopify.com domain; WooCommerce: the site URL; Zendesk: a name")
    secret: str | None = Field(default=None, min_length=8, max_length=500,
                               description="the platform's webhook signing secret; generated when absent")
    source: str | None = Field(default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$",
                               description="Event.source of this shop's events; defaults to the platform name")


class SourceOut(BaseModel):
    platform: str
    shop: str
    source: str
    webhook_path: str
    secret: str | None = Field(default=None, description="only in the answer to the registration")


def _out(platform: str, shop: str, source: str, secret: str | None = None) -> SourceOut:
    return SourceOut(platform=platform, shop=shop, source=source, secret=secret,
                     webhook_path=_WEBHOOK_PATHS[platform].format(shop=shop))


@router.post("", status_code=201, response_model=SourceOut, summary="Register (or re-key) a platform source")
async def register_source(body: SourceIn, request: Request,
                          _: Credential = Depends(require_scope("sources:write"))) -> SourceOut:
    store: SourceStore = source_store(request)
    secret = body.secret or secrets.token_urlsafe(32)
    saved = await store.put(body.platform, body.shop, body.source or body.platform, secret)
    return _out(saved.platform, saved.shop, saved.source, secret)


@router.get("", response_model=list[SourceOut], summary="List registered platform sources (no secrets)")
async def list_sources(request: Request, _: Credential = Depends(require_scope("sources:read"))) -> list[SourceOut]:
    return [_out(s.platform, s.shop, s.source) for s in await source_store(request).list()]


@router.delete("/{platform}/{shop:path}", status_code=204, summary="Remove a platform source",
               responses={404: {"description": "No such source"}})
async def delete_source(platform: Platform, shop: str, request: Request,
                        _: Credential = Depends(require_scope("sources:write"))) -> Response:
    store = source_store(request)
    if await store.get(platform, shop) is None:
        raise ApiError(404, "not_found", f"no {platform} source {normalize_shop(platform, shop)!r}")
    await store.delete(platform, shop)
    return Response(status_code=204)
