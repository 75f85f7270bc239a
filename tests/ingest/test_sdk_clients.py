"""The unmodified PyPI clients ``segment-analytics-python`` and ``rudder-sdk-python``, pointed at ingest,
deliver every call type with every field intact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics.client import Client as SegmentClient

from loyalist.events import Event

pytestmark = pytest.mark.integration


def _exercise(client: Any, tag: str) -> dict[str, dict[str, Any]]:
    """One call of each type with explicit ids; returns what was sent, by messageId."""
    user, anon = f"{tag}-user-{uuid.uuid4().hex[:6]}", f"{tag}-anon-{uuid.uuid4().hex[:6]}"
    when = datetime.now(UTC) - timedelta(minutes=5)
    context = {"ip": "198.51.100.7", "locale": "de-DE", "campaign": {"source": "newsletter", "medium": "email"}}
    integrations = {"All": False, "Loyalist": True}
    sent: dict[str, dict[str, Any]] = {}

    def mid(kind: str) -> str:
        message_id = f"{tag}-{kind}-{uuid.uuid4()}"
        return message_id

    m = mid("identify")
    traits = {"email": f"{user}@example.com", "first_name": "Ada", "plan": "gold", "age": 36,
              "address": {"city": "Berlin", "country": "DE"}}
    client.identify(user_id=user, traits=traits, context=context, timestamp=when, anonymous_id=anon,
                    integrations=integrations, message_id=m)
    sent[m] = {"type": "identify", "userId": user, "anonymousId": anon, "traits": traits}

    m = mid("track")
    props = {"order_id": "1001", "total": 59.9, "currency": "EUR", "discount": 5.0, "coupon": "SPRING",
             "products": [{"product_id": "p-1", "sku": "SKU-1", "name": "Mug", "price": 12.5, "quantity": 2},
                          {"product_id": "p-2", "sku": "SKU-2", "name": "Tea", "price": 34.9, "quantity": 1}]}
    client.track(user_id=user, event="Order Completed", properties=props, context=context, timestamp=when,
                 anonymous_id=anon, integrations=integrations, message_id=m)
    sent[m] = {"type": "track", "userId": user, "event": "Order Completed", "properties": props}

    m = mid("page")
    page_props = {"url": "https://shop.example/mugs", "title": "Mugs", "referrer": "https://search.example/"}
    client.page(user_id=user, category="Catalog", name="Mugs", properties=page_props, context=context,
                timestamp=when, anonymous_id=anon, integrations=integrations, message_id=m)
    sent[m] = {"type": "page", "userId": user, "name": "Mugs", "properties": {**page_props, "category": "Catalog"}}

    m = mid("screen")
    client.screen(user_id=user, category="App", name="Cart", properties={"items": 2}, context=context,
                  timestamp=when, anonymous_id=anon, integrations=integrations, message_id=m)
    sent[m] = {"type": "screen", "userId": user, "name": "Cart", "properties": {"items": 2, "category": "App"}}

    m = mid("group")
    group_traits = {"name": "Acme GmbH", "employees": 42}
    client.group(user_id=user, group_id="acme", traits=group_traits, context=context, timestamp=when,
                 anonymous_id=anon, integrations=integrations, message_id=m)
    sent[m] = {"type": "group", "userId": user, "groupId": "acme", "traits": group_traits}

    m = mid("alias")
    client.alias(previous_id=anon, user_id=user, context=context, timestamp=when, integrations=integrations,
                 message_id=m)
    sent[m] = {"type": "alias", "userId": user, "previousId": anon}

    for doc in sent.values():
        doc.update(context=context, integrations=integrations, timestamp=when)
    client.flush()
    return sent


def _assert_intact(sent: dict[str, dict[str, Any]], delivered: dict[str, list[tuple[bytes, Event]]],
                   library: str) -> None:
    assert set(delivered) == set(sent), f"missing: {set(sent) - set(delivered)}"
    for message_id, doc in sent.items():
        [(key, event)] = delivered[message_id]
        wire = event.model_dump(by_alias=True, exclude_none=True)
        assert key == doc["userId"].encode()
        for field in ("type", "userId", "anonymousId", "event", "name", "groupId", "previousId", "traits",
                      "properties", "integrations"):
            if field in doc:
                assert wire[field] == doc[field], (message_id, field, wire.get(field))
        # The client's own context keys are all there, next to the library the client added.
        for k, v in doc["context"].items():
            assert event.context[k] == v
        assert library in event.context["library"]["name"]
        # analytics-python sends milliseconds.
        assert event.original_timestamp is not None
        assert abs(event.original_timestamp - doc["timestamp"]) < timedelta(milliseconds=1)
        # The client's clock is ours, so the skew-corrected time is the sent time (to the client's precision).
        assert abs(event.timestamp - doc["timestamp"]) < timedelta(seconds=2)
        assert event.source == "web"


def test_segment_analytics_python_delivers_every_call(ingest: Any, kafka_raw: Any) -> None:
    errors: list[Any] = []
    client = SegmentClient(ingest.settings.dev_write_key, host=ingest.url, on_error=lambda e, b: errors.append(e),
                           max_retries=2)
    try:
        sent = _exercise(client, "segment")
    finally:
        client.shutdown()
    assert errors == []
    _assert_intact(sent, kafka_raw.by_ids(sent), "analytics-python")


def test_rudder_sdk_python_delivers_every_call_gzipped(ingest: Any, kafka_raw: Any) -> None:
    errors: list[Any] = []
    client = RudderClient(ingest.settings.dev_write_key, host=ingest.url, on_error=lambda e, b: errors.append(e),
                          max_retries=2, gzip=True)
    try:
        sent = _exercise(client, "rudder")
    finally:
        client.shutdown()
    assert errors == []
    delivered = kafka_raw.by_ids(sent)
    _assert_intact(sent, delivered, "analytics-python")
    # Rudder's top-level "channel" is kept in the context.
    assert all(v[0][1].context["channel"] == "server" for v in delivered.values())
