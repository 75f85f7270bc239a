"""Bad input against the public ingest API, as a real process on the real Kafka: oversized, malformed,
deeply nested and hostile payloads get a clear 4xx ``{code, message}``; a batch keeps exactly its valid
messages (nothing stored half); script and template text in traits is kept as inert data, never evaluated.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loyalist.settings import Settings
from tests.chaos.harness import read_log

pytestmark = pytest.mark.integration

HOSTILE_STRINGS = [
    "<script>alert(document.cookie)</script>",
    "\"><img src=x onerror=alert(1)>",
    "{{ 7 * 7 }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for x in range(10**9) %}x{% endfor %}",
    "${7*7}",
    "'; DROP TABLE events; --",
    "\u0000\u202e\ufeff",
    "../../etc/passwd",
]


@pytest.fixture(scope="module")
def ingest(start_service: Callable[..., Any]) -> Any:
    return start_service("ingest")


@pytest.fixture(scope="module")
def client(ingest: Any, stack_settings: Settings) -> httpx.Client:
    return httpx.Client(base_url=ingest.url, auth=(stack_settings.dev_write_key, ""), timeout=30)


def assert_clear_4xx(resp: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if statuses:
        assert resp.status_code in statuses, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert isinstance(body.get("code"), str) and body["code"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    return body  # type: ignore[no-any-return]


def logged(settings: Settings, prefix: str) -> dict[str, dict[str, Any]]:
    """Events of this test (message id prefix) as they are in events.raw."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> dict[str, dict[str, Any]]:
        name = settings.topic("events.raw")
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        out: dict[str, dict[str, Any]] = {}
        try:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=1000)
                for tp, records in batch.items():
                    for rec in records:
                        value = orjson.loads(rec.value)
                        if str(value.get("messageId", "")).startswith(prefix):
                            out[value["messageId"]] = value
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(read())


def test_oversized_single_message_is_413_and_not_logged(client: httpx.Client, stack_settings: Settings) -> None:
    prefix = f"fz-big-{secrets.token_hex(3)}"
    resp = client.post("/v1/track", json={"userId": "u1", "event": "Big", "messageId": f"{prefix}-1",
                                          "properties": {"blob": "x" * 40_000}})
    assert_clear_4xx(resp, 413)
    big_batch = {"batch": [{"type": "track", "userId": "u1", "event": "Big", "messageId": f"{prefix}-b{i}",
                            "properties": {"blob": "y" * 2_000}} for i in range(300)]}
    assert_clear_4xx(client.post("/v1/batch", json=big_batch), 413)
    too_many = {"batch": [{"type": "track", "userId": "u1", "event": "E", "messageId": f"{prefix}-n{i}"}
                          for i in range(2_501)]}
    assert_clear_4xx(client.post("/v1/batch", json=too_many), 400, 413)
    assert logged(stack_settings, prefix) == {}


def test_deeply_nested_payload_is_rejected_cleanly(client: httpx.Client) -> None:
    nested = "[" * 5_000 + "]" * 5_000
    body = '{"userId":"u1","event":"Deep","properties":{"x":' + nested + "}}"
    resp = client.post("/v1/track", content=body, headers={"Content-Type": "application/json"})
    # either refused as too deep (4xx) or accepted as data — never a crash
    assert resp.status_code < 500, resp.text[:300]
    if resp.status_code >= 400:
        assert_clear_4xx(resp)


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[]", b'"text"', b"\xff\xfe\x00", b'{"userId": }',
                                 b'{"batch": "nope"}', b'{"batch": [1, 2]}', b"{" * 100_000])
def test_malformed_bodies_get_a_clear_400(client: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/track", "/v1/batch", "/v1/identify"):
        resp = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert_clear_4xx(resp)


def test_batch_keeps_exactly_its_valid_messages(client: httpx.Client, stack_settings: Settings) -> None:
    prefix = f"fz-mix-{secrets.token_hex(3)}"
    batch = [
        {"type": "track", "userId": "u1", "event": "Fine", "messageId": f"{prefix}-ok1"},
        {"type": "track", "event": "No identity", "messageId": f"{prefix}-bad1"},
        {"type": "teleport", "userId": "u1", "messageId": f"{prefix}-bad2"},
        {"type": "identify", "userId": "u2", "messageId": f"{prefix}-ok2", "traits": {"email": "a@b.test"}},
        "not an object",
    ]
    resp = client.post("/v1/batch", json={"batch": batch})
    assert resp.status_code in (200, 400), resp.text[:300]
    if resp.status_code == 400:
        body = assert_clear_4xx(resp)
        assert sorted(r["index"] for r in body.get("rejected", [])) == [1, 2, 4], body
    assert set(logged(stack_settings, prefix)) == {f"{prefix}-ok1", f"{prefix}-ok2"}


def test_script_and_template_text_is_kept_as_inert_data(client: httpx.Client, stack_settings: Settings) -> None:
    prefix = f"fz-xss-{secrets.token_hex(3)}"
    for i, text in enumerate(HOSTILE_STRINGS):
        resp = client.post("/v1/identify", json={"userId": f"{prefix}-u{i}", "messageId": f"{prefix}-{i}",
                                                 "traits": {"first_name": text, "note": text}})
        if resp.status_code != 200:
            assert_clear_4xx(resp)  # refusing e.g. a NUL byte is fine; crashing is not
    stored = logged(stack_settings, prefix)
    for i, text in enumerate(HOSTILE_STRINGS):
        event = stored.get(f"{prefix}-{i}")
        if event is not None:
            # byte-for-byte what was sent: not evaluated ("49"), not stripped, not double-encoded
            assert event["traits"]["first_name"] == text


def test_unknown_write_key_is_401_and_nothing_logged(ingest: Any, stack_settings: Settings) -> None:
    prefix = f"fz-key-{secrets.token_hex(3)}"
    with httpx.Client(base_url=ingest.url, timeout=10) as anon:
        assert_clear_4xx(anon.post("/v1/track", json={"userId": "u", "event": "E", "messageId": f"{prefix}-1"}), 401)
        assert_clear_4xx(anon.post("/v1/track", auth=("wrong_key", ""),
                                   json={"userId": "u", "event": "E", "messageId": f"{prefix}-2"}), 401)
    assert logged(stack_settings, prefix) == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)
call_bodies = st.fixed_dictionaries(
    {}, optional={"userId": json_values, "anonymousId": json_values, "event": json_values, "type": json_values,
                  "messageId": json_values, "timestamp": json_values, "sentAt": json_values,
                  "properties": json_values, "traits": json_values, "context": json_values},
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/track", "/v1/identify", "/v1/page", "/v1/group", "/v1/alias", "/v1/batch"]),
       body=st.one_of(call_bodies, json_values, st.builds(lambda b: {"batch": b}, st.lists(call_bodies, max_size=5))))
def test_any_json_body_gets_an_answer_never_a_crash(client: httpx.Client, path: str, body: Any) -> None:
    resp = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code < 500, (path, body, resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        assert_clear_4xx(resp)
    else:
        assert resp.json().get("success") is True, resp.text[:300]


def test_read_log_helper_counts_records(stack_settings: Settings) -> None:
    # the verifier itself: a topic with nothing of ours reads as empty, not as an error
    assert isinstance(asyncio.run(read_log(stack_settings, "message.dlq")), dict)
