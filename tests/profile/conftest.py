"""Fixtures for the profile service tests: a running profile process, producing events straight to
``events.raw`` (as ingest does) and polling the profile API."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from loyalist.events import Event, encode_event
from loyalist.kafka import make_producer
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def make_event(kind: str = "track", *, name: str | None = None, at: datetime | None = None,
               message_id: str | None = None, source: str = "test", received_at: datetime | None = None,
               **fields: Any) -> Event:
    at = at or T0
    body: dict[str, Any] = {"type": kind, "messageId": message_id or uuid.uuid4().hex, "timestamp": at,
                            "receivedAt": received_at or datetime.now(UTC), "source": source, **fields}
    if name:
        body["event"] = name
    return Event.model_validate(body)


def order(user_id: str, total: float, at: datetime, *, order_id: str | None = None, **props: Any) -> Event:
    return make_event(name="Order Completed", at=at, userId=user_id,
                      properties={"order_id": order_id or uuid.uuid4().hex, "total": total, "currency": "USD",
                                  **props})


async def produce_async(settings: Settings, events: list[Event]) -> None:
    producer = make_producer(settings, client_id="profile-tests", linger_ms=5)
    await producer.start()
    try:
        topic = settings.topic(EVENTS_RAW.name)
        futures = [await producer.send(topic, encode_event(e), key=e.partition_key.encode()) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def produce(settings: Settings, events: list[Event]) -> None:
    asyncio.run(produce_async(settings, events))


def wait_for(check: Callable[[], Any], *, timeout_s: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class ProfileClient:
    def __init__(self, client: httpx.Client, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.client.get(path, params=params, headers=self.headers)

    def profile(self, identifier: str, **params: Any) -> dict[str, Any] | None:
        resp = self.get(f"/v1/profiles/{identifier}", **params)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def must(self, identifier: str, **params: Any) -> dict[str, Any]:
        doc = self.profile(identifier, **params)
        assert doc is not None, f"no profile for {identifier} {params}"
        return doc

    def wait_profile(self, identifier: str, predicate: Callable[[dict[str, Any]], bool] = lambda p: True,
                     timeout_s: float = 30, **params: Any) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            doc = self.profile(identifier, **params)
            return doc if doc is not None and predicate(doc) else None

        return wait_for(check, timeout_s=timeout_s, what=f"profile {identifier} {params}")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def profile_service(start_service: Callable[..., Any]) -> Any:
    return start_service("profile")


@pytest.fixture()
def api(profile_service: Any, api_headers: dict[str, str]) -> Iterator[ProfileClient]:
    with profile_service.client() as client:
        yield ProfileClient(client, api_headers)


__all__ = ["T0", "ProfileClient", "make_event", "order", "produce", "timedelta", "uid", "wait_for"]


async def read_key_async(settings: Settings, topic_name: str, key: str, *, min_count: int = 1,
                         timeout_s: float = 20) -> list[dict[str, Any]]:
    """Messages with this key on a topic (reads only the key's partition, from the beginning)."""
    import orjson
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.partitioner import DefaultPartitioner

    topic = settings.topic(topic_name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = list(range(settings.kafka_partitions))  # every topic is created with this count
        partition = DefaultPartitioner()(key.encode(), partitions, partitions)
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=5000)
            for record in batch.get(tp, []):
                if record.key == key.encode():
                    found.append(orjson.loads(record.value))
            if len(found) >= min_count and not batch.get(tp):
                break
        return found
    finally:
        await consumer.stop()


def read_key(settings: Settings, topic_name: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
    return asyncio.run(read_key_async(settings, topic_name, key, **kwargs))
