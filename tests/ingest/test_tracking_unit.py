"""Pure mapping and validation of tracking calls (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loyalist.events import decode_event, encode_event
from services.ingest.adapters.schema_files import load_schema_documents
from services.ingest.domain.schemas import SchemaRegistry
from services.ingest.domain.tracking import MessageRejected, normalize_message
from services.ingest.pipeline import event_record

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
SCHEMAS = SchemaRegistry.from_documents(load_schema_documents())


def norm(raw: Any, call_type: str | None = "track", **kw: Any) -> dict[str, Any]:
    return normalize_message(raw, call_type=call_type, received_at=NOW, source="web",
                             new_message_id=lambda: "generated", **kw)


def test_fields_map_onto_the_envelope() -> None:
    doc = norm({"userId": "u", "anonymousId": "a", "event": "Product Viewed", "properties": {"sku": "1"},
                "context": {"ip": "1.2.3.4"}, "integrations": {"All": True}, "messageId": "m-1"})
    assert doc["type"] == "track" and doc["source"] == "web" and doc["messageId"] == "m-1"
    assert doc["timestamp"] == doc["receivedAt"] == NOW
    assert "sentAt" not in doc and "originalTimestamp" not in doc


def test_endpoint_type_wins_over_body_type() -> None:
    assert norm({"userId": "u", "type": "identify", "event": "x"}, "track")["type"] == "track"


def test_clock_skew_from_batch_sent_at() -> None:
    sent_at = NOW + timedelta(minutes=10)  # the client clock is 10 minutes fast
    doc = norm({"userId": "u", "event": "e", "timestamp": (sent_at - timedelta(seconds=3)).isoformat()},
               batch_sent_at=sent_at)
    assert doc["timestamp"] == NOW - timedelta(seconds=3)
    assert doc["originalTimestamp"] == sent_at - timedelta(seconds=3)


def test_numeric_ids_are_strings_and_blank_ids_are_missing() -> None:
    doc = norm({"userId": 1234, "anonymousId": "  ", "event": "e"})
    assert doc["userId"] == "1234" and "anonymousId" not in doc


def test_page_category_and_unknown_fields_are_kept() -> None:
    doc = norm({"anonymousId": "a", "category": "Docs", "name": "Intro", "channel": "web", "version": 2,
                "custom": {"x": 1}}, "page")
    assert doc["properties"] == {"category": "Docs"}
    assert doc["context"] == {"channel": "web", "extra": {"custom": {"x": 1}}}


def test_batch_context_is_merged_message_keys_win() -> None:
    doc = norm({"userId": "u", "event": "e", "context": {"ip": "1.1.1.1"}},
               batch_context={"ip": "9.9.9.9", "locale": "fr"})
    assert doc["context"] == {"ip": "1.1.1.1", "locale": "fr"}


def test_rudder_identify_traits_from_context() -> None:
    doc = norm({"userId": "u", "context": {"traits": {"email": "a@b.c"}}}, "identify")
    assert doc["traits"] == {"email": "a@b.c"}


@pytest.mark.parametrize(
    ("raw", "call_type", "code"),
    [
        ({"event": "e"}, "track", "missing_identity"),
        ({"userId": "u"}, "track", "missing_event"),
        ({"userId": "u", "event": 5}, "track", "invalid_field"),
        ({"userId": "u", "event": "e", "properties": []}, "track", "invalid_field"),
        ({"userId": True, "event": "e"}, "track", "invalid_field"),
        ({"userId": "x" * 201, "event": "e"}, "track", "invalid_field"),
        ({"userId": "u"}, "group", "missing_group_id"),
        ({"previousId": "p"}, "alias", "missing_identity"),
        ({"userId": "u"}, "alias", "missing_previous_id"),
        ({"userId": "u", "type": "nope"}, None, "invalid_type"),
        ({"userId": "u", "event": "e", "timestamp": "2024-13-01"}, "track", "invalid_timestamp"),
        ({"userId": "u", "event": "e", "sentAt": {"a": 1}}, "track", "invalid_timestamp"),
        ("text", "track", "invalid_message"),
    ],
)
def test_rejections_have_codes(raw: Any, call_type: str | None, code: str) -> None:
    with pytest.raises(MessageRejected) as info:
        norm(raw, call_type)
    assert info.value.code == code


def test_event_record_bytes_are_encode_event() -> None:
    doc = norm({"userId": "u", "event": "Order Completed", "timestamp": "2024-06-01T11:00:00.123Z",
                "properties": {"order_id": "1", "total": 10.5, "currency": "EUR",
                               "products": [{"product_id": "p", "price": 10.5, "quantity": 1}]}})
    event, value = event_record(doc, SCHEMAS)
    assert value == encode_event(event)
    assert decode_event(value) == event


def test_schema_violation_is_reported_with_its_location() -> None:
    doc = norm({"userId": "u", "event": "Order Completed", "properties": {"order_id": "1", "currency": "euro"}})
    with pytest.raises(MessageRejected) as info:
        event_record(doc, SCHEMAS)
    assert info.value.code == "schema_violation"
    assert "properties.currency" in info.value.message


def test_every_schema_file_is_versioned_and_unique() -> None:
    keys = [(s.call_type, s.event, s.version) for s in SCHEMAS.schemas]
    assert len(keys) == len(set(keys))
    assert {"identify", "track", "page", "screen", "group", "alias"} <= {s.call_type for s in SCHEMAS.schemas}
    for name in ("Order Completed", "Order Refunded", "Order Cancelled", "Order Updated", "Checkout Started",
                 "Ticket Opened", "Ticket Solved", "Satisfaction Rated", "NPS Responded"):
        assert SCHEMAS.schema_for("track", name, 1).event == name  # type: ignore[union-attr]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["userId", "anonymousId", "event", "name", "properties", "traits",
                                        "context", "timestamp", "sentAt", "messageId", "groupId", "previousId",
                                        "type", "category", "extra"]), json_values, max_size=10),
       st.sampled_from([None, "identify", "track", "page", "screen", "group", "alias"]))
def test_any_json_object_is_an_event_or_a_coded_rejection(raw: dict[str, Any], call_type: str | None) -> None:
    try:
        event, value = event_record(norm(raw, call_type), SCHEMAS)
    except MessageRejected as exc:
        assert exc.code and exc.message
        return
    assert decode_event(value) == event
    assert event.user_id or event.anonymous_id
