"""Platform payloads (shaped like the platforms' documented examples) → canonical events. Pure."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.ingest.adapters.schema_files import load_schema_documents
from services.ingest.domain.schemas import SchemaRegistry
from services.ingest.domain.shopify import map_shopify
from services.ingest.domain.support import map_support, map_zendesk, verify_zendesk, zendesk_signature
from services.ingest.domain.tracking import MessageRejected
from services.ingest.domain.woocommerce import map_woocommerce
from services.ingest.pipeline import event_record

PAYLOADS = Path(__file__).parent / "payloads"
NOW = datetime(2024, 6, 1, tzinfo=UTC)
SHOP = "loyalist-dev.myshopify.com"
SCHEMAS = SchemaRegistry.from_documents(load_schema_documents())


def load(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text())


def valid(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each document passes the envelope and its JSON Schema; returns the wire form."""
    return [json.loads(event_record(doc, SCHEMAS)[1]) for doc in docs]


def test_shopify_order_created_keeps_line_items_discounts_currency_and_shop() -> None:
    [event] = valid(map_shopify("orders/create", load("shopify_orders_create.json"), shop=SHOP, source="shopify",
                                received_at=NOW))
    assert event["event"] == "Order Completed" and event["userId"] == "115310627314723954"
    assert event["context"]["traits"]["email"] == "jon@example.com"
    props = event["properties"]
    assert props["order_id"] == "820982911946154508" and props["order_number"] == "1234"
    assert (props["total"], props["subtotal"], props["tax"], props["shipping"], props["discount"]) == (
        403.0, 388.0, 0.0, 10.0, 20.0)
    assert props["currency"] == "USD" and props["shop_id"] == SHOP
    assert props["coupon"] == "TENOFF"
    assert props["discounts"] == [{"code": "TENOFF", "amount": 10.0, "type": "fixed_amount"}]
    assert [p["sku"] for p in props["products"]] == ["IPOD2008PINK", "IPOD2008PINK"]
    assert props["products"][0] == {"product_id": "632910392", "variant_id": "808950810", "sku": "IPOD2008PINK",
                                    "name": "IPod Nano - 8GB", "price": 199.0, "quantity": 1,
                                    "line_item_id": "866550311766439020"}
    assert props["products"][1]["discount"] == 10.0
    assert event["timestamp"] == "2022-01-01T00:00:00Z"  # processed_at, in UTC
    assert event["messageId"] == f"shopify:{SHOP}:orders/create:820982911946154508"


@pytest.mark.parametrize(("topic", "event_name"), [
    ("orders/paid", "Order Updated"), ("orders/updated", "Order Updated"), ("orders/cancelled", "Order Cancelled"),
])
def test_shopify_order_topics(topic: str, event_name: str) -> None:
    [event] = valid(map_shopify(topic, load("shopify_orders_create.json"), shop=SHOP, source="shopify",
                                received_at=NOW))
    assert event["event"] == event_name
    assert event["properties"]["products"]
    if topic == "orders/cancelled":
        assert event["properties"]["reason"] == "customer"
    if topic == "orders/paid":
        assert event["properties"]["status"] == "paid"


def test_shopify_refund_uses_the_known_order_customer() -> None:
    [event] = valid(map_shopify("refunds/create", load("shopify_refunds_create.json"), shop=SHOP, source="shopify",
                                received_at=NOW, known_order_customer={"userId": "115310627314723954"}))
    assert event["event"] == "Order Refunded" and event["userId"] == "115310627314723954"
    props = event["properties"]
    assert (props["order_id"], props["refund_id"], props["total"], props["currency"]) == (
        "820982911946154508", "890088186047892319", 199.0, "USD")
    assert props["products"][0]["sku"] == "IPOD2008PINK" and props["reason"] == "Things were damaged"
    [unknown] = map_shopify("refunds/create", load("shopify_refunds_create.json"), shop=SHOP, source="shopify",
                            received_at=NOW)
    assert unknown["anonymousId"] == f"shopify-order:{SHOP}:820982911946154508"


def test_shopify_checkout_is_checkout_started_with_recovery_url() -> None:
    [event] = valid(map_shopify("checkouts/update", load("shopify_checkouts_create.json"), shop=SHOP,
                                source="shopify", received_at=NOW))
    props = event["properties"]
    assert event["event"] == "Checkout Started" and event["userId"] == "603851970716743426"
    assert props["checkout_id"] == "123123123" and props["value"] == 398.0 and props["currency"] == "USD"
    assert props["recovery_url"].startswith("https://checkout.local/")
    assert [p["variant"] for p in props["products"] if "variant" in p] == ["Black"]
    assert [p["brand"] for p in props["products"]] == ["Apple", "Apple"]


def test_shopify_customer_is_identify_with_consent() -> None:
    [event] = valid(map_shopify("customers/update", load("shopify_customers_update.json"), shop=SHOP,
                                source="shopify", received_at=NOW))
    assert event["type"] == "identify" and event["userId"] == "706405506930370084"
    traits = event["traits"]
    assert traits["email"] == "bob@biller.com" and traits["first_name"] == "Bob"
    assert traits["consent"]["email"]["subscribed"] is True
    assert traits["total_spent"] == 0.0


def test_shopify_unknown_topic_and_bad_body() -> None:
    with pytest.raises(MessageRejected) as info:
        map_shopify("products/create", {"id": 1}, shop=SHOP, source="shopify", received_at=NOW)
    assert info.value.code == "unsupported_topic"
    with pytest.raises(MessageRejected):
        map_shopify("orders/create", [], shop=SHOP, source="shopify", received_at=NOW)


def test_woocommerce_order_created_guest_by_email() -> None:
    [event] = valid(map_woocommerce("order.created", load("woocommerce_order.json"), shop="https://example.com",
                                    source="woocommerce", received_at=NOW))
    assert event["event"] == "Order Completed" and event["anonymousId"] == "email:john.doe@example.com"
    props = event["properties"]
    assert (props["order_id"], props["total"], props["tax"], props["shipping"], props["currency"]) == (
        "727", 29.35, 1.35, 10.0, "USD")
    assert props["subtotal"] == 18.0
    assert [(p["product_id"], p.get("variant_id"), p["quantity"], p["price"]) for p in props["products"]] == [
        ("93", None, 2, 3.0), ("22", "23", 1, 12.0)]
    assert event["timestamp"] == "2017-03-22T19:28:02Z"


def test_woocommerce_status_changes() -> None:
    order = load("woocommerce_order.json")
    cancelled = valid(map_woocommerce("order.updated", {**order, "status": "cancelled"}, shop="s", source="w",
                                      received_at=NOW))
    refunded = valid(map_woocommerce("order.updated", {**order, "status": "refunded",
                                                       "refunds": [{"id": 726, "reason": "", "total": "-29.35"}]},
                                     shop="s", source="w", received_at=NOW))
    paid = valid(map_woocommerce("order.updated", order, shop="s", source="w", received_at=NOW))
    pending = valid(map_woocommerce("order.created", {**order, "status": "pending"}, shop="s", source="w",
                                    received_at=NOW))
    assert [e["event"] for e in cancelled] == ["Order Cancelled"]
    assert [e["event"] for e in refunded] == ["Order Refunded"] and refunded[0]["properties"]["total"] == 29.35
    assert [e["event"] for e in paid] == ["Order Completed", "Order Updated"]
    assert paid[0]["messageId"] == valid(map_woocommerce("order.created", order, shop="s", source="w",
                                                         received_at=NOW))[0]["messageId"]
    assert [e["event"] for e in pending] == ["Checkout Started"]


def test_woocommerce_customer_identify() -> None:
    [event] = valid(map_woocommerce("customer.updated", load("woocommerce_customer.json"), shop="s",
                                    source="woocommerce", received_at=NOW))
    assert event["type"] == "identify" and event["userId"] == "25"
    assert event["traits"]["email"] == "john.doe@example.com"
    assert event["traits"]["address"]["city"] == "San Francisco"


def test_zendesk_ticket_created_and_solved() -> None:
    created = load("zendesk_ticket_created.json")
    [opened] = valid(map_zendesk(created, account="acme", source="zendesk", received_at=NOW))
    assert opened["event"] == "Ticket Opened" and opened["anonymousId"] == "zendesk-user:8447388090494"
    assert opened["properties"]["ticket_id"] == "5158" and opened["properties"]["priority"] == "low"
    assert opened["properties"]["tags"] == ["tag_1", "damaged"]
    solved_payload = {**created, "id": "other-event", "type": "zen:event-type:ticket.status_changed",
                      "time": "2024-05-15T13:05:31Z", "event": {"current": "SOLVED", "previous": "OPEN"}}
    [solved] = valid(map_zendesk(solved_payload, account="acme", source="zendesk", received_at=NOW))
    assert solved["event"] == "Ticket Solved"
    assert solved["properties"]["resolution_time_seconds"] == 86400.0
    assert solved["properties"]["previous_status"] == "open"


def test_zendesk_signature() -> None:
    body = b'{"a": 1}'
    signature = zendesk_signature(b"secret", "2024-05-14T13:05:31Z", body)
    assert verify_zendesk(b"secret", "2024-05-14T13:05:31Z", body, signature)
    assert not verify_zendesk(b"secret", "2024-05-14T13:05:32Z", body, signature)
    assert not verify_zendesk(b"other", "2024-05-14T13:05:31Z", body, signature)


@pytest.mark.parametrize(("payload", "event_name"), [
    ({"type": "ticket.opened", "id": "t1", "email": "a@b.co", "ticket": {"id": "9", "subject": "Late parcel"}},
     "Ticket Opened"),
    ({"type": "ticket.solved", "id": "t2", "userId": "u1", "ticket": {"id": "9", "resolution_time_seconds": 60}},
     "Ticket Solved"),
    ({"type": "satisfaction.rated", "id": "t3", "userId": "u1", "rating": "Good", "ticket": {"id": "9"}},
     "Satisfaction Rated"),
    ({"type": "nps.responded", "id": "t4", "userId": "u1", "score": "6", "comment": "meh"}, "NPS Responded"),
])
def test_support_format(payload: dict[str, Any], event_name: str) -> None:
    [event] = valid(map_support(payload, source="support", received_at=NOW))
    assert event["event"] == event_name
    if event_name == "NPS Responded":
        assert event["properties"]["category"] == "detractor"
    if event_name == "Satisfaction Rated":
        assert event["properties"]["rating"] == "good"


@pytest.mark.parametrize(("payload", "code"), [
    ({"type": "ticket.exploded", "id": "x", "userId": "u"}, "invalid_type"),
    ({"type": "ticket.opened", "userId": "u"}, "missing_id"),
    ({"type": "ticket.opened", "id": "x"}, "missing_identity"),
    ({"type": "nps.responded", "id": "x", "userId": "u", "score": 11}, "invalid_score"),
    ({"type": "satisfaction.rated", "id": "x", "userId": "u", "rating": "meh"}, "invalid_rating"),
])
def test_support_rejections(payload: dict[str, Any], code: str) -> None:
    with pytest.raises(MessageRejected) as info:
        map_support(payload, source="support", received_at=NOW)
    assert info.value.code == code
