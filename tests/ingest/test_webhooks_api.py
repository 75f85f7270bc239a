"""Signed platform webhooks and the support endpoint against a live ingest process."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.ingest.domain.commerce import sign_base64
from services.ingest.domain.support import zendesk_signature

pytestmark = pytest.mark.integration

PAYLOADS = Path(__file__).parent / "payloads"
DEV_SECRET = "dev_webhook_secret"  # documented in docs/ingest.md


def payload(name: str, **overrides: Any) -> bytes:
    return json.dumps({**json.loads((PAYLOADS / name).read_text()), **overrides}).encode()


def shopify_headers(shop: str, topic: str, body: bytes, secret: str, webhook_id: str | None = None) -> dict[str, str]:
    return {
        "Content-Type": "application/json", "X-Shopify-Topic": topic, "X-Shopify-Shop-Domain": shop,
        "X-Shopify-Hmac-Sha256": sign_base64(secret.encode(), body), "X-Shopify-API-Version": "2024-07",
        "X-Shopify-Webhook-Id": webhook_id or str(uuid.uuid4()),
    }


@pytest.fixture(scope="module")
def shop(ingest: Any, api_headers: dict[str, str]) -> dict[str, str]:
    name = f"shop-{uuid.uuid4().hex[:8]}.myshopify.com"
    with httpx.Client(base_url=ingest.url, headers=api_headers) as client:
        response = client.post("/v1/sources", json={"platform": "shopify", "shop": name,
                                                    "secret": "shpss_test_secret_123"})
    assert response.status_code == 201, response.text
    assert response.json()["webhook_path"] == "/v1/webhooks/shopify"
    return {"shop": name, "secret": "shpss_test_secret_123"}


def test_shopify_order_refund_and_redelivery(ingest: Any, shop: dict[str, str], kafka_raw: Any) -> None:
    order_id = int(uuid.uuid4().int % 10**15)
    order = payload("shopify_orders_create.json", id=order_id)
    refund = payload("shopify_refunds_create.json", order_id=order_id, id=order_id + 1)
    webhook_id = str(uuid.uuid4())
    with httpx.Client(base_url=ingest.url) as client:
        first = client.post("/v1/webhooks/shopify", content=order,
                            headers=shopify_headers(shop["shop"], "orders/create", order, shop["secret"], webhook_id))
        again = client.post("/v1/webhooks/shopify", content=order,
                            headers=shopify_headers(shop["shop"], "orders/create", order, shop["secret"], webhook_id))
        other_id = client.post("/v1/webhooks/shopify", content=order,
                               headers=shopify_headers(shop["shop"], "orders/create", order, shop["secret"]))
        refunded = client.post("/v1/webhooks/shopify", content=refund,
                               headers=shopify_headers(shop["shop"], "refunds/create", refund, shop["secret"]))
    assert first.status_code == 200, first.text
    assert again.json() == {"success": True, "duplicate": True}
    assert other_id.json()["duplicates"] == 1
    assert refunded.status_code == 200, refunded.text
    order_mid = f"shopify:{shop['shop']}:orders/create:{order_id}"
    refund_mid = f"shopify:{shop['shop']}:refunds/create:{order_id + 1}"
    found = kafka_raw.by_ids([order_mid, refund_mid])
    [(key, completed)] = found[order_mid]
    assert key == b"115310627314723954" and completed.event == "Order Completed"
    assert completed.source == "shopify" and len(completed.properties["products"]) == 2
    assert completed.properties["discounts"][0]["code"] == "TENOFF"
    [(_, refund_event)] = found[refund_mid]
    # Refund payloads name only the order: ingest remembered whose order it was.
    assert refund_event.user_id == "115310627314723954" and refund_event.properties["total"] == 199.0


def test_bad_signature_is_401_and_produces_nothing(ingest: Any, shop: dict[str, str], kafka_raw: Any) -> None:
    order_id = int(uuid.uuid4().int % 10**15)
    body = payload("shopify_orders_create.json", id=order_id)
    headers = shopify_headers(shop["shop"], "orders/create", body, "not-the-secret")
    with httpx.Client(base_url=ingest.url) as client:
        forged = client.post("/v1/webhooks/shopify", content=body, headers=headers)
        tampered = client.post("/v1/webhooks/shopify", content=body.replace(b"403.00", b"1.00"),
                               headers=shopify_headers(shop["shop"], "orders/create", body, shop["secret"]))
        unknown = client.post("/v1/webhooks/shopify", content=body,
                              headers=shopify_headers("nobody.myshopify.com", "orders/create", body, "x"))
    assert (forged.status_code, forged.json()["code"]) == (401, "invalid_signature")
    assert (tampered.status_code, tampered.json()["code"]) == (401, "invalid_signature")
    assert (unknown.status_code, unknown.json()["code"]) == (401, "unknown_shop")
    mid = f"shopify:{shop['shop']}:orders/create:{order_id}"
    assert kafka_raw.by_ids([mid], timeout_s=3) == {}


def test_woocommerce_with_the_dev_secret(ingest: Any, kafka_raw: Any) -> None:
    order_id = int(uuid.uuid4().int % 10**9)
    body = payload("woocommerce_order.json", id=order_id)
    headers = {"Content-Type": "application/json", "X-WC-Webhook-Topic": "order.created",
               "X-WC-Webhook-Resource": "order", "X-WC-Webhook-Event": "created",
               "X-WC-Webhook-Source": "http://localhost:8080/", "X-WC-Webhook-ID": "12",
               "X-WC-Webhook-Delivery-ID": str(uuid.uuid4()),
               "X-WC-Webhook-Signature": sign_base64(DEV_SECRET.encode(), body)}
    with httpx.Client(base_url=ingest.url) as client:
        ping = client.post("/v1/webhooks/woocommerce", content=b"webhook_id=12",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = client.post("/v1/webhooks/woocommerce", content=body, headers=headers)
        customer = payload("woocommerce_customer.json")
        identify = client.post("/v1/webhooks/woocommerce", content=customer, headers={
            **headers, "X-WC-Webhook-Topic": "customer.updated", "X-WC-Webhook-Delivery-ID": str(uuid.uuid4()),
            "X-WC-Webhook-Signature": sign_base64(DEV_SECRET.encode(), customer)})
        unsupported = client.post("/v1/webhooks/woocommerce", content=customer, headers={
            **headers, "X-WC-Webhook-Topic": "product.created", "X-WC-Webhook-Delivery-ID": str(uuid.uuid4()),
            "X-WC-Webhook-Signature": sign_base64(DEV_SECRET.encode(), customer)})
    assert ping.json()["ping"] is True
    assert response.status_code == 200, response.text
    assert identify.status_code == 200, identify.text
    assert unsupported.json()["ignored"] is True
    mid = f"woocommerce:http://localhost:8080:order:{order_id}"
    [(key, event)] = kafka_raw.by_ids([mid])[mid]
    assert key == b"email:john.doe@example.com" and event.properties["total"] == 29.35


def test_zendesk_event_webhook(ingest: Any, kafka_raw: Any) -> None:
    event_id = str(uuid.uuid4())
    body = payload("zendesk_ticket_created.json", id=event_id)
    stamp = "2024-05-14T13:05:31Z"
    with httpx.Client(base_url=ingest.url) as client:
        good = client.post("/v1/webhooks/zendesk/dev", content=body, headers={
            "Content-Type": "application/json", "X-Zendesk-Webhook-Signature-Timestamp": stamp,
            "X-Zendesk-Webhook-Signature": zendesk_signature(DEV_SECRET.encode(), stamp, body)})
        bad = client.post("/v1/webhooks/zendesk/dev", content=body, headers={
            "X-Zendesk-Webhook-Signature-Timestamp": stamp, "X-Zendesk-Webhook-Signature": "AAAA"})
    assert good.status_code == 200, good.text
    assert bad.status_code == 401
    mid = f"zendesk:dev:{event_id}"
    [(_, event)] = kafka_raw.by_ids([mid])[mid]
    assert event.event == "Ticket Opened" and event.properties["subject"] == "Broken mug"


def test_support_endpoint(track_client: httpx.Client, kafka_raw: Any) -> None:
    fact = str(uuid.uuid4())
    ok = track_client.post("/v1/support/events", json={
        "type": "satisfaction.rated", "id": fact, "email": "Rater@Example.com", "rating": "bad",
        "comment": "slow", "helpdesk": "gorgias", "ticket": {"id": "77"}})
    again = track_client.post("/v1/support/events", json={
        "type": "satisfaction.rated", "id": fact, "email": "rater@example.com", "rating": "bad",
        "helpdesk": "gorgias", "ticket": {"id": "77"}})
    bad = track_client.post("/v1/support/events", json={"type": "nps.responded", "id": "x", "userId": "u",
                                                        "score": 42})
    assert ok.status_code == 200, ok.text
    assert again.json()["duplicate"] is True
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_score")
    mid = f"support:gorgias:{fact}"
    [(key, event)] = kafka_raw.by_ids([mid])[mid]
    assert key == b"email:rater@example.com"
    assert event.event == "Satisfaction Rated" and event.properties["rating"] == "bad"
    assert event.context["traits"]["email"] == "rater@example.com"


def test_sources_api_requires_scope_and_hides_secrets(ingest: Any, api_headers: dict[str, str]) -> None:
    with httpx.Client(base_url=ingest.url) as client:
        anonymous = client.post("/v1/sources", json={"platform": "woocommerce", "shop": "https://x.example"})
        created = client.post("/v1/sources", headers=api_headers,
                              json={"platform": "woocommerce", "shop": "https://Woo.Example/"})
        listed = client.get("/v1/sources", headers=api_headers)
        deleted = client.delete("/v1/sources/woocommerce/https://woo.example", headers=api_headers)
        missing = client.delete("/v1/sources/woocommerce/https://woo.example", headers=api_headers)
        invalid = client.post("/v1/sources", headers=api_headers, json={"platform": "magento", "shop": "x"})
    assert anonymous.status_code == 401
    assert created.status_code == 201 and len(created.json()["secret"]) >= 32
    assert created.json()["shop"] == "https://woo.example"
    assert all(s["secret"] is None for s in listed.json())
    assert {"platform": "shopify", "shop": "loyalist-dev.myshopify.com"}.items() <= next(
        s for s in listed.json() if s["platform"] == "shopify" and s["shop"] == "loyalist-dev.myshopify.com").items()
    assert deleted.status_code == 204 and missing.status_code == 404
    assert invalid.status_code == 422
