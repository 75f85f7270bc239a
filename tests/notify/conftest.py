"""Fixtures of the notify tests: notify processes with test timings, the SMTP sink, profiles in Redis,
producing message requests and reading what notify produced."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loyalist.events import Event, decode_event
from loyalist.kafka import make_producer
from loyalist.redis import make_redis
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW, MESSAGE_DLQ, MESSAGE_REQUESTS
from tests.conftest import ServiceProcess, free_port, settings_env

# Fast timings for tests: short leases, a quick scheduler, small backoffs, quiet hours off unless a test
# configures them, and an email cap window of a few seconds so a deferred send comes due within the test.
TEST_POLICY = {"caps": [{"channel": "email", "max_count": 1, "window_s": 4, "action": "defer"},
                        {"channel": "sms", "max_count": 1, "window_s": 3600, "action": "skip"}],
               "quiet_hours": []}
FAST_ENV = {
    "LOYALIST_NOTIFY_LEASE_S": "2",
    "LOYALIST_NOTIFY_SCHEDULE_POLL_S": "0.2",
    "LOYALIST_NOTIFY_RETRY_BASE_S": "0.1",
    "LOYALIST_NOTIFY_RETRY_CAP_S": "0.4",
    "LOYALIST_NOTIFY_RETRY_IMMEDIATE": "1",
    "LOYALIST_NOTIFY_RETRY_MAX_ATTEMPTS": "4",
    "LOYALIST_NOTIFY_SESSION_TIMEOUT_MS": "6000",
    "LOYALIST_NOTIFY_POLICY_JSON": json.dumps(TEST_POLICY),
}


def launch_notify(settings: Settings, name: str, **env: str) -> ServiceProcess:
    """A notify process on its own port. Each one joins the namespace's consumer group, so tests run one at
    a time (module-scoped fixtures stop theirs at the end of the module)."""
    port = free_port()
    svc_settings = settings.model_copy(update={"notify_port": port})
    log_dir = settings.state_dir / "test-logs" / settings.namespace
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **settings_env(svc_settings), "PYTHONUNBUFFERED": "1",
                "LOYALIST_NOTIFY_PUBLIC_URL": f"http://127.0.0.1:{port}",
                "LOYALIST_NOTIFY_INSTANCE_ID": f"test-{name}", **FAST_ENV, **env}
    svc = ServiceProcess("notify", svc_settings, full_env, log_dir / f"notify-{name}-{uuid.uuid4().hex[:6]}.log")
    return svc.start()


@pytest.fixture(scope="module")
def notify_factory(stack_settings: Settings) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(name: str, **env: str) -> ServiceProcess:
        svc = launch_notify(stack_settings, name, **env)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.kill(hard=True)  # safe by design, and quicker than a graceful drain


def unique_email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.test"


def sink_messages(settings: Settings, to: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"http://127.0.0.1:{settings.smtp_sink_http_port}/messages", params={"to": to}, timeout=10)
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def wait_for(check: Callable[[], Any], timeout_s: float = 30, interval_s: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what or check}; last={last!r}")


def profile_doc(profile_id: str, email: str | None, *, subscribed: bool | None = True, timezone: str = "UTC",
                phone: str | None = None, first_name: str = "Ada") -> dict[str, Any]:
    """A profile document exactly as the architecture contract describes it."""
    consent: dict[str, Any] = {}
    if subscribed is not None:
        consent["email"] = {"subscribed": subscribed, "updated_at": "2024-01-01T00:00:00Z"}
        consent["sms"] = {"subscribed": subscribed, "updated_at": "2024-01-01T00:00:00Z"}
    return {
        "profile_id": profile_id, "user_id": f"user-{profile_id}", "email": email, "phone": phone,
        "timezone": timezone, "locale": "en-US", "traits": {"first_name": first_name},
        "first_seen_at": "2024-01-01T00:00:00Z", "last_seen_at": "2024-06-01T00:00:00Z", "orders_count": 1,
        "revenue_total": 59.0, "currency": "USD", "revenue_by_currency": {"USD": 59.0},
        "average_order_value": 59.0, "first_order_at": "2024-02-01T00:00:00Z",
        "last_order_at": "2024-02-01T00:00:00Z", "refunds_count": 0, "cancellations_count": 0,
        "rfm": {"frequency": 0, "recency_days": 100, "T_days": 120, "monetary_value": 0.0},
        "cart": None, "consent": consent, "engagement": {}, "segments": [],
        "predictions": {"churn_probability": 0.4, "p_alive": 0.6, "expected_orders_90d": 0.3,
                        "predicted_clv_365d": 80.0, "expected_next_order_at": None},
        "loyalty": {"balance": 0, "lifetime_points": 0, "tier": None, "expiring": []},
    }


def put_profiles(settings: Settings, *docs: dict[str, Any]) -> None:
    async def run() -> None:
        client = make_redis(settings)
        try:
            for doc in docs:
                await client.set(settings.redis_key("profile", doc["profile_id"]), orjson.dumps(doc), ex=3600)
        finally:
            await client.aclose()

    asyncio.run(run())


def request_doc(profile_id: str | None, template_id: str = "abandoned_checkout", *, category: str = "marketing",
                channel: str = "email", key: str | None = None, data: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    return {
        "idempotencyKey": key or f"test:{uuid.uuid4()}", "profileId": profile_id, "channel": channel,
        "category": category, "templateId": template_id,
        "data": data if data is not None else {
            "checkout_id": "chk-1", "currency": "USD", "recovery_url": "https://shop.example/cart/recover/chk-1",
            "items": [{"name": "Linen shirt", "image_url": "https://shop.example/i/1.jpg", "price": 59.0,
                       "quantity": 1}]},
        "journeyId": "j-test", "nodeId": "n1", "requestedAt": "2024-01-01T00:00:00Z", **extra,
    }


def produce_requests(settings: Settings, *docs: dict[str, Any]) -> None:
    async def run() -> None:
        producer = make_producer(settings, client_id="notify-test")
        await producer.start()
        try:
            for doc in docs:
                key = (doc.get("profileId") or doc["idempotencyKey"]).encode()
                await producer.send_and_wait(settings.topic(MESSAGE_REQUESTS.name), orjson.dumps(doc), key=key)
        finally:
            await producer.stop()

    asyncio.run(run())


def read_topic(settings: Settings, topic_name: str) -> list[tuple[bytes | None, bytes]]:
    """Everything currently in a topic of this namespace."""
    async def run() -> list[tuple[bytes | None, bytes]]:
        topic = settings.topic(topic_name)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in range(settings.kafka_partitions)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            out: list[tuple[bytes | None, bytes]] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                positions = [await consumer.position(tp) for tp in partitions]
                if all(pos >= end[tp] for pos, tp in zip(positions, partitions, strict=True)):
                    break
                batch = await consumer.getmany(timeout_ms=300)
                for records in batch.values():
                    out.extend((r.key, r.value) for r in records)
            return out
        finally:
            await consumer.stop()

    return asyncio.run(run())


def notify_events(settings: Settings, profile_id: str) -> list[Event]:
    events = [decode_event(v) for _, v in read_topic(settings, EVENTS_RAW.name)]
    return [e for e in events if e.source == "notify"
            and (e.context.get("loyalist") or {}).get("profileId") == profile_id]


def dlq_entries(settings: Settings) -> list[dict[str, Any]]:
    return [orjson.loads(v) for _, v in read_topic(settings, MESSAGE_DLQ.name)]


def message_log(svc: ServiceProcess, headers: dict[str, str], **params: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{svc.url}/v1/messages", params=params, headers=headers, timeout=10)
    resp.raise_for_status()
    return resp.json()["messages"]  # type: ignore[no-any-return]
