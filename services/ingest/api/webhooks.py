"""Shop-platform and help-desk webhooks, and the generic support endpoint.

Each webhook is verified (HMAC over the raw body with the shop's secret) before anything is parsed;
a bad signature is a 401 and produces nothing. Deliveries are deduplicated by the platform's delivery id
(recorded only after Kafka acknowledged) and, independently, by the events' derived messageIds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Path, Request, Response

from loyalist.events import utcnow
from loyalist.http import ApiError
from services.ingest.adapters.sources import PlatformSource, SourceStore
from services.ingest.api.docs import RESPONSES, TrackingResponse
from services.ingest.api.plumbing import authenticate, header_write_key, json_response, parse_json, read_body
from services.ingest.api.tracking import ingestor
from services.ingest.domain.commerce import verify_hmac_base64
from services.ingest.domain.shopify import map_shopify
from services.ingest.domain.support import map_support, map_zendesk, verify_zendesk
from services.ingest.domain.tracking import NON_BLANK_PATTERN, MessageRejected
from services.ingest.domain.woocommerce import map_woocommerce
from services.ingest.metrics import WEBHOOKS
from services.ingest.pipeline import Ingestor

router = APIRouter(tags=["webhooks"])

_RAW_JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


def source_store(request: Request) -> SourceStore:
    store = getattr(request.app.state, "sources", None)
    if store is None:
        raise ApiError(503, "not_ready", "ingest is starting", headers={"Retry-After": "1"})
    return store  # type: ignore[no-any-return]


async def _verified_source(request: Request, platform: str, shop: str | None) -> PlatformSource:
    if not shop:
        WEBHOOKS.labels(platform, "", "unknown_shop").inc()
        raise ApiError(401, "unknown_shop", f"the {platform} webhook does not name its shop")
    try:
        found = await source_store(request).get(platform, shop)
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(503, "sources_unavailable", "shop sources cannot be read right now",
                       headers={"Retry-After": "5"}) from exc
    if found is None:
        WEBHOOKS.labels(platform, "", "unknown_shop").inc()
        raise ApiError(401, "unknown_shop", f"no {platform} source is registered for {shop!r} (POST /v1/sources)")
    return found


def _bad_signature(platform: str, topic: str) -> ApiError:
    WEBHOOKS.labels(platform, topic, "invalid_signature").inc()
    return ApiError(401, "invalid_signature", "the webhook signature does not match the body and the shop's secret")


async def _deliver(
    request: Request,
    *,
    platform: str,
    topic: str,
    source: PlatformSource,
    delivery_id: str | None,
    body: bytes,
    mapper: Callable[[Any, datetime], list[dict[str, Any]]],
) -> Response:
    pipeline: Ingestor = ingestor(request)
    guard = pipeline.guard
    received_at = utcnow()
    dedup_key = (platform, "delivery", source.shop, delivery_id) if delivery_id else None
    if dedup_key and await guard.seen_once(dedup_key):
        WEBHOOKS.labels(platform, topic, "duplicate").inc()
        return json_response({"success": True, "duplicate": True})
    payload = parse_json(body)
    try:
        docs = mapper(payload, received_at)
    except MessageRejected as exc:
        if exc.code == "unsupported_topic":
            # A 2xx, or the platform retries and finally disables the whole subscription.
            WEBHOOKS.labels(platform, topic, "ignored").inc()
            return json_response({"success": True, "ignored": True, "reason": exc.message})
        WEBHOOKS.labels(platform, topic, exc.code).inc()
        raise ApiError(422, exc.code, exc.message) from exc
    prepared = pipeline.prepare_documents(docs, source=source.source)
    outcome = await pipeline.publish(prepared, source=source.source, limiter_id=f"{platform}:{source.shop}")
    if dedup_key:
        await guard.record_once(dedup_key, pipeline.config.webhook_dedup_ttl_s)
    WEBHOOKS.labels(platform, topic, "accepted").inc()
    return json_response({"success": True, "duplicates": outcome.duplicates,
                          "events": [{"messageId": p.event.message_id, "type": p.event.type, "event": p.event.event}
                                     for p in prepared]})


@router.post(
    "/v1/webhooks/shopify", summary="Shopify webhooks (orders, refunds, checkouts, customers)",
    response_model=TrackingResponse, responses=RESPONSES, openapi_extra=_RAW_JSON_BODY,
)
async def shopify_webhook(request: Request) -> Response:
    """Headers: `X-Shopify-Topic`, `X-Shopify-Shop-Domain`, `X-Shopify-Hmac-Sha256` (base64 HMAC-SHA256 of
    the raw body with the shop's secret), `X-Shopify-Webhook-Id` (deduplication)."""
    headers = request.headers
    topic = headers.get("x-shopify-topic", "")
    source = await _verified_source(request, "shopify", headers.get("x-shopify-shop-domain"))
    body = await read_body(request, ingestor(request).config.max_webhook_bytes)
    if not verify_hmac_base64(source.secret.encode(), body, headers.get("x-shopify-hmac-sha256")):
        raise _bad_signature("shopify", topic)
    guard = ingestor(request).guard
    known_customer = None
    if topic == "refunds/create":
        payload = parse_json(body)
        if isinstance(payload, dict) and payload.get("order_id") is not None:
            known_customer = await guard.order_customer("shopify", source.shop, str(payload["order_id"]))

    def mapper(payload: Any, received_at: datetime) -> list[dict[str, Any]]:
        return map_shopify(topic, payload, shop=source.shop, source=source.source, received_at=received_at,
                           known_order_customer=known_customer)

    response = await _deliver(request, platform="shopify", topic=topic, source=source, body=body, mapper=mapper,
                              delivery_id=headers.get("x-shopify-webhook-id") or headers.get("x-shopify-event-id"))
    if topic.startswith("orders/"):
        await _remember_order(request, "shopify", source.shop, body)
    return response


async def _remember_order(request: Request, platform: str, shop: str, body: bytes) -> None:
    from services.ingest.domain.shopify import order_customer

    payload = parse_json(body)
    if isinstance(payload, dict) and payload.get("id") is not None:
        who, _ = order_customer(payload)
        if who:
            await ingestor(request).guard.remember_order_customer(platform, shop, str(payload["id"]), who)


@router.post(
    "/v1/webhooks/woocommerce", summary="WooCommerce webhooks (orders, customers)",
    response_model=TrackingResponse, responses=RESPONSES, openapi_extra=_RAW_JSON_BODY,
)
async def woocommerce_webhook(request: Request) -> Response:
    """Headers: `X-WC-Webhook-Topic`, `X-WC-Webhook-Source` (the site URL), `X-WC-Webhook-Signature`
    (base64 HMAC-SHA256 of the raw body), `X-WC-Webhook-Delivery-ID` (deduplication)."""
    headers = request.headers
    topic = headers.get("x-wc-webhook-topic", "")
    body = await read_body(request, ingestor(request).config.max_webhook_bytes)
    if not topic and body.startswith(b"webhook_id="):
        # WooCommerce pings a new webhook with a form body and no topic: answer 200 so it is activated.
        return json_response({"success": True, "ping": True})
    source = await _verified_source(request, "woocommerce", headers.get("x-wc-webhook-source"))
    if not verify_hmac_base64(source.secret.encode(), body, headers.get("x-wc-webhook-signature")):
        raise _bad_signature("woocommerce", topic)

    def mapper(payload: Any, received_at: datetime) -> list[dict[str, Any]]:
        return map_woocommerce(topic, payload, shop=source.shop, source=source.source, received_at=received_at)

    return await _deliver(request, platform="woocommerce", topic=topic, source=source, body=body, mapper=mapper,
                          delivery_id=headers.get("x-wc-webhook-delivery-id"))


@router.post(
    "/v1/webhooks/zendesk/{account}", summary="Zendesk event webhooks (ticket.*, user.*)",
    response_model=TrackingResponse, responses=RESPONSES, openapi_extra=_RAW_JSON_BODY,
)
async def zendesk_webhook(request: Request, account: str = Path(max_length=200)) -> Response:
    """`account` is the name the Zendesk source was registered with. Headers: `X-Zendesk-Webhook-Signature`
    (base64 HMAC-SHA256 of timestamp + body), `X-Zendesk-Webhook-Signature-Timestamp`."""
    headers = request.headers
    source = await _verified_source(request, "zendesk", account)
    body = await read_body(request, ingestor(request).config.max_webhook_bytes)
    if not verify_zendesk(source.secret.encode(), headers.get("x-zendesk-webhook-signature-timestamp"), body,
                          headers.get("x-zendesk-webhook-signature")):
        raise _bad_signature("zendesk", "")

    def mapper(payload: Any, received_at: datetime) -> list[dict[str, Any]]:
        return map_zendesk(payload, account=source.shop, source=source.source, received_at=received_at)

    return await _deliver(request, platform="zendesk", topic="event", source=source, body=body, mapper=mapper,
                          delivery_id=None)


_PRESENT = {"type": "string", "pattern": NON_BLANK_PATTERN, "maxLength": 190}
SUPPORT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["type", "id"],
    "properties": {
        "type": {"enum": ["ticket.opened", "ticket.updated", "ticket.solved", "satisfaction.rated", "nps.responded"]},
        "id": {"type": "string", "pattern": NON_BLANK_PATTERN, "maxLength": 150,
               "description": "unique per fact (deduplication)"},
        "userId": {"type": "string", "maxLength": 190}, "email": {"type": "string", "maxLength": 190},
        "anonymousId": {"type": "string", "maxLength": 190},
        "timestamp": {"type": "string", "format": "date-time", "pattern": "^[12][0-9]{3}-"},
        "helpdesk": {"type": "string", "maxLength": 40},
        "ticket": {"type": "object", "properties": {
            "id": {"type": "string"}, "subject": {"type": "string"}, "status": {"type": "string"},
            "previous_status": {"type": "string"}, "priority": {"type": "string"}, "channel": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "resolution_time_seconds": {"type": "number", "minimum": 0}}},
        "rating": {"enum": ["good", "bad"]}, "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "comment": {"type": "string"}, "surveyId": {"type": "string"},
    },
    "anyOf": [{"required": ["userId"], "properties": {"userId": _PRESENT}},
              {"required": ["email"], "properties": {"email": _PRESENT}},
              {"required": ["anonymousId"], "properties": {"anonymousId": _PRESENT}}],
    "allOf": [
        {"if": {"properties": {"type": {"const": "nps.responded"}}}, "then": {"required": ["score"]}},
        {"if": {"properties": {"type": {"const": "satisfaction.rated"}}}, "then": {"required": ["rating"]}},
        {"if": {"properties": {"type": {"enum": ["ticket.opened", "ticket.updated", "ticket.solved"]}}},
         "then": {"required": ["ticket"], "properties": {"ticket": {
             "required": ["id"], "properties": {"id": {"type": "string", "pattern": NON_BLANK_PATTERN}}}}}},
    ],
}}}}}


@router.post(
    "/v1/support/events", tags=["support"], summary="Help-desk facts: tickets, satisfaction ratings, NPS",
    response_model=TrackingResponse, responses=RESPONSES, openapi_extra=SUPPORT_BODY,
)
async def support_event(request: Request) -> Response:
    """Authenticated with a write key like the tracking API (HTTP Basic username, or `writeKey`)."""
    pipeline = ingestor(request)
    header_key = header_write_key(request)
    payload = parse_json(await read_body(request, pipeline.config.max_message_bytes))
    credential = await authenticate(request, header_key, payload)
    try:
        docs = map_support(payload, source=credential.source, received_at=utcnow())
    except MessageRejected as exc:
        raise ApiError(400, exc.code, exc.message) from exc
    prepared = pipeline.prepare_documents(docs, source=credential.source)
    outcome = await pipeline.publish(prepared, source=credential.source, limiter_id=credential.name)
    return json_response({"success": True, "duplicate": outcome.duplicates > 0,
                           "events": [{"messageId": p.event.message_id, "event": p.event.event} for p in prepared]})
