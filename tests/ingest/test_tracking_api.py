"""The tracking API against a real ingest process, Kafka, Cassandra and Redis."""

from __future__ import annotations

import gzip
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

pytestmark = pytest.mark.integration


def mid() -> str:
    return f"test-{uuid.uuid4()}"


def test_track_reaches_kafka_keyed_by_user_with_server_times(track_client: httpx.Client, kafka_raw: Any,
                                                              ingest: Any) -> None:
    message_id = mid()
    sent_at = datetime.now(UTC) + timedelta(hours=1)  # client clock one hour ahead
    happened = sent_at - timedelta(seconds=30)
    body = {
        "userId": "user-1", "anonymousId": "anon-1", "event": "Product Added", "messageId": message_id,
        "properties": {"product_id": "p1", "price": 9.5, "quantity": 2, "currency": "EUR"},
        "context": {"ip": "203.0.113.9", "library": {"name": "test", "version": "1"}},
        "integrations": {"All": True}, "timestamp": happened.isoformat(), "sentAt": sent_at.isoformat(),
    }
    before = datetime.now(UTC)
    response = track_client.post("/v1/track", json=body)
    after = datetime.now(UTC)
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True

    [(key, event)] = kafka_raw.by_ids([message_id])[message_id]
    assert key == b"user-1"
    assert event.source == "web"  # the dev write key's source
    assert event.type == "track" and event.event == "Product Added"
    assert event.properties == body["properties"]
    assert event.context == body["context"] and event.integrations == {"All": True}
    assert before <= event.received_at <= after
    # Clock-skew correction: the event happened 30 s before the client sent it, by the server clock.
    assert abs((event.received_at - event.timestamp) - timedelta(seconds=30)) < timedelta(milliseconds=1)
    assert event.original_timestamp == happened


def test_message_id_generated_and_anonymous_key(track_client: httpx.Client, kafka_raw: Any) -> None:
    anon = f"anon-{uuid.uuid4()}"
    assert track_client.post("/v1/page", json={"anonymousId": anon, "name": "Home",
                                                "properties": {"url": "https://shop/"}}).status_code == 200
    [event] = kafka_raw.where(lambda e: e.anonymous_id == anon, 1)
    assert event.type == "page" and event.name == "Home"
    assert uuid.UUID(event.message_id)


def test_resent_message_acknowledged_once_in_kafka(track_client: httpx.Client, kafka_raw: Any) -> None:
    message_id = mid()
    body = {"userId": "user-dup", "traits": {"email": "dup@example.com"}, "messageId": message_id}
    first = track_client.post("/v1/identify", json=body)
    second = track_client.post("/v1/identify", json=body)
    batch = track_client.post("/v1/batch", json={"batch": [{**body, "type": "identify"}]})
    assert first.json() == {"success": True, "duplicate": False}
    assert second.json() == {"success": True, "duplicate": True}
    assert batch.json() == {"success": True, "accepted": 1, "duplicates": 1}
    found = kafka_raw.by_ids([message_id])
    # Wait a little longer for a second copy that must not come.
    assert len(found[message_id]) == 1


def test_same_message_id_from_another_source_is_not_a_duplicate(ingest: Any, kafka_raw: Any,
                                                                basic_auth: Any) -> None:
    from loyalist.auth import CredentialStore
    from loyalist.cassandra import connect

    cluster, session = connect(ingest.settings, keyspace=ingest.settings.keyspace)
    try:
        CredentialStore(session).create("second_source_key", "write_key", "pos", source="pos", scopes={"track"})
    finally:
        cluster.shutdown()
    message_id = mid()
    body = {"userId": "u-x", "event": "Store Visited", "messageId": message_id}
    with httpx.Client(base_url=ingest.url) as client:
        assert client.post("/v1/track", json=body, headers=basic_auth("dev_write_key")).json()["duplicate"] is False
        assert client.post("/v1/track", json=body, headers=basic_auth("second_source_key")).json()["duplicate"] is False
    copies = kafka_raw.by_ids([message_id])[message_id]
    assert sorted(e.source for _, e in copies) == ["pos", "web"]


def test_batch_keeps_valid_messages_and_names_rejected_indices(track_client: httpx.Client, kafka_raw: Any) -> None:
    good = [mid(), mid(), mid()]
    batch = [
        {"type": "identify", "userId": "b-1", "traits": {"email": "b1@example.com"}, "messageId": good[0]},
        {"type": "track", "event": "Signed Up"},  # no identity
        {"type": "launch", "userId": "b-1"},  # unknown type
        {"type": "group", "userId": "b-1", "groupId": "acme", "messageId": good[1]},
        {"type": "track", "userId": "b-1", "event": "Order Completed", "properties": {"total": 3}},  # no order_id
        "not an object",
        {"type": "alias", "userId": "b-1", "previousId": "anon-b", "messageId": good[2]},
        {"type": "track", "userId": "b-1", "event": "Big", "properties": {"blob": "x" * 40_000}},
    ]
    response = track_client.post("/v1/batch", json={"batch": batch, "context": {"app": {"name": "pos"}}})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_messages" and body["accepted"] == 3
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [
        (1, "missing_identity"), (2, "invalid_type"), (4, "schema_violation"), (5, "invalid_message"),
        (7, "message_too_large"),
    ]
    found = kafka_raw.by_ids(good)
    assert {m: len(v) for m, v in found.items()} == dict.fromkeys(good, 1)
    # The batch-level context was merged into each message.
    assert all(v[0][1].context["app"] == {"name": "pos"} for v in found.values())
    alias = found[good[2]][0][1]
    assert alias.previous_id == "anon-b" and alias.user_id == "b-1"


@pytest.mark.parametrize(
    ("path", "content", "status", "code"),
    [
        ("/v1/track", b"{not json", 400, "invalid_json"),
        ("/v1/track", b"", 400, "invalid_json"),
        ("/v1/track", b'{"event": "x"}', 400, "missing_identity"),
        ("/v1/track", b'{"userId": "u"}', 400, "missing_event"),
        ("/v1/group", b'{"userId": "u"}', 400, "missing_group_id"),
        ("/v1/alias", b'{"userId": "u"}', 400, "missing_previous_id"),
        ("/v1/identify", b'{"userId": "u", "traits": [1]}', 400, "invalid_field"),
        ("/v1/identify", b'{"userId": "u", "timestamp": "yesterday"}', 400, "invalid_timestamp"),
        ("/v1/track", b'[1, 2]', 400, "invalid_message"),
        ("/v1/batch", b'{"batch": {}}', 400, "invalid_batch"),
        ("/v1/batch", b'[]', 400, "invalid_batch"),
        ("/v1/track", orjson.dumps({"userId": "u", "event": "e", "properties": {"x": "y" * 33_000}}), 413,
         "body_too_large"),
        ("/v1/batch", orjson.dumps({"batch": [{"type": "track", "userId": "u", "event": "e",
                                               "properties": {"x": "y" * 30_000}}] * 18}), 413, "body_too_large"),
        ("/v1/batch", orjson.dumps({"batch": [{"type": "page", "userId": "u"}] * 2501}), 413, "too_many_messages"),
    ],
)
def test_bad_input_is_a_clear_4xx(track_client: httpx.Client, path: str, content: bytes, status: int,
                                  code: str) -> None:
    response = track_client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert response.json()["message"]


def test_write_key_checks(ingest: Any, basic_auth: Any) -> None:
    body = {"userId": "u", "event": "e"}
    with httpx.Client(base_url=ingest.url) as client:
        missing = client.post("/v1/track", json=body)
        wrong = client.post("/v1/track", json=body, headers=basic_auth("nope"))
        api_token = client.post("/v1/track", json=body, headers=basic_auth(ingest.settings.dev_api_token))
        in_body = client.post("/v1/track", json={**body, "writeKey": ingest.settings.dev_write_key})
    assert (missing.status_code, missing.json()["code"]) == (401, "missing_write_key")
    assert (wrong.status_code, wrong.json()["code"]) == (401, "invalid_write_key")
    assert (api_token.status_code, api_token.json()["code"]) == (401, "invalid_write_key")
    assert in_body.status_code == 200


def test_gzip_body_and_first_party_path(track_client: httpx.Client, kafka_raw: Any) -> None:
    message_id = mid()
    payload = gzip.compress(orjson.dumps({"batch": [{"type": "track", "anonymousId": "gz", "event": "Zipped",
                                                     "messageId": message_id}]}))
    response = track_client.post("/lp/v1/batch", content=payload,
                                 headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
    assert response.status_code == 200, response.text
    assert kafka_raw.by_ids([message_id])[message_id][0][1].event == "Zipped"
    bomb = gzip.compress(b'{"batch": [' + b" " * 2_000_000 + b"]}")
    assert track_client.post("/v1/batch", content=bomb, headers={"Content-Encoding": "gzip"}).status_code == 413


def test_cors_for_configured_storefront_origin(ingest: Any) -> None:
    with httpx.Client(base_url=ingest.url) as client:
        allowed = client.options("/v1/batch", headers={"Origin": "http://localhost:8080",
                                                       "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "content-type"})
        denied = client.options("/v1/batch", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:8080"
    assert "access-control-allow-origin" not in denied.headers


def test_rate_limit_per_write_key_answers_429(private_ingest: Any, basic_auth: Any, ingest: Any) -> None:
    proc = private_ingest(LOYALIST_INGEST_RATE_LIMIT_PER_S="1", LOYALIST_INGEST_RATE_LIMIT_BURST="3").wait_ready()
    # A key of its own so other tests' traffic does not share the bucket.
    from loyalist.auth import CredentialStore
    from loyalist.cassandra import connect

    cluster, session = connect(ingest.settings, keyspace=ingest.settings.keyspace)
    try:
        CredentialStore(session).create("rate_limited_key", "write_key", "limited", source="limited")
    finally:
        cluster.shutdown()
    with httpx.Client(base_url=proc.url, headers=basic_auth("rate_limited_key")) as client:
        statuses = [client.post("/v1/track", json={"userId": "u", "event": "e"}) for _ in range(5)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = statuses[3]
    assert limited.status_code == 429
    assert limited.json()["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1


def test_large_batch_keeps_per_customer_order(track_client: httpx.Client, kafka_raw: Any) -> None:
    """Large batches are produced as hand-built per-partition record batches: every message arrives once,
    keyed by its customer, and one customer's messages keep their order."""
    users = [f"order-{uuid.uuid4().hex[:6]}-{n}" for n in range(7)]
    batch = [{"type": "track", "userId": users[i % 7], "event": "Step", "properties": {"n": i}, "messageId": mid()}
             for i in range(140)]
    response = track_client.post("/v1/batch", json={"batch": batch})
    assert response.json() == {"success": True, "accepted": 140, "duplicates": 0}
    found = kafka_raw.by_ids([m["messageId"] for m in batch])
    assert all(len(copies) == 1 for copies in found.values()) and len(found) == 140
    assert all(copies[0][0] == copies[0][1].user_id.encode() for copies in found.values())  # type: ignore[union-attr]
    for user in users:
        seen = kafka_raw.where(lambda e, user=user: e.user_id == user, 20)
        assert [e.properties["n"] for e in seen] == sorted(e.properties["n"] for e in seen)
        assert len(seen) == 20
