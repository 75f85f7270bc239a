"""The timer poller against real Cassandra and Kafka: a timer written through the store is fired at its due time
even when the periodic scan is far away, and each timer is fired once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loyalist.cassandra import connect
from loyalist.kafka import make_producer
from loyalist.settings import Settings
from loyalist.topics import JOURNEY_TIMERS
from services.journeys.store import TimerStore, shard_of
from services.journeys.timers import TimerPoller

pytestmark = pytest.mark.integration


async def _wakeups(consumer: AIOKafkaConsumer, instance_ids: set[str], timeout_s: float) -> list[dict[str, object]]:
    seen: list[dict[str, object]] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline and len(seen) < len(instance_ids):
        for records in (await consumer.getmany(timeout_ms=200)).values():
            for record in records:
                wakeup = orjson.loads(record.value)
                wakeup["producedAt"] = record.timestamp / 1000  # the poller's producer stamps the record
                if wakeup["instanceId"] in instance_ids:
                    seen.append(wakeup)
    return seen


def test_timers_fire_at_their_due_slot_between_periodic_scans(stack_settings: Settings) -> None:
    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    topic = stack_settings.topic(JOURNEY_TIMERS.name)

    async def scenario() -> tuple[list[dict[str, object]], int, list[dict[str, object]]]:
        producer = make_producer(stack_settings, client_id="test-timer-poller")
        consumer = AIOKafkaConsumer(bootstrap_servers=stack_settings.kafka_bootstrap, enable_auto_commit=False)
        await producer.start()
        await consumer.start()
        store = TimerStore(session, stack_settings.kafka_partitions)
        # One scan at start, then none for ten minutes: only the due-time wake-ups can fire these timers.
        poller = TimerPoller(store, producer, topic, lambda: set(range(stack_settings.kafka_partitions)),
                             interval_s=600)
        parts = [TopicPartition(topic, p) for p in range(stack_settings.kafka_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)
        poller.start()
        try:
            await asyncio.sleep(1.0)  # the first scan (cursors read, nothing due) is behind us
            now = datetime.now(UTC)
            profiles = [f"p-{uuid.uuid4().hex[:8]}" for _ in range(3)]
            instance_ids = {f"i-{uuid.uuid4().hex[:8]}" for _ in profiles}
            rows = [store.row(profile_id=pid, journey_id="j-poller", instance_id=iid, node_id="wait",
                              due=now + timedelta(seconds=1.5 + i))
                    for i, (pid, iid) in enumerate(zip(profiles, sorted(instance_ids), strict=True))]
            await store.write(rows)  # one write, three due times: each gets its own wake-up
            fired = await _wakeups(consumer, instance_ids, timeout_s=60)
            left = 0
            for pid, (_, params) in zip(profiles, rows, strict=True):
                left += len(await store.due(shard_of(pid, stack_settings.kafka_partitions), params[1],
                                            datetime.now(UTC) + timedelta(hours=1)))
            again = await _wakeups(consumer, instance_ids, timeout_s=3)
            return fired, left, again
        finally:
            await poller.stop()
            await consumer.stop()
            await producer.stop()

    try:
        fired, left, again = asyncio.run(scenario())
    finally:
        cluster.shutdown()
    assert len(fired) == 3, fired
    for wakeup in fired:
        assert wakeup["nodeId"] == "wait"
        # Never before its due time (a scan only takes timers due by the time it started).
        assert float(str(wakeup["producedAt"])) >= datetime.fromisoformat(str(wakeup["due"])).timestamp()
    assert left == 0  # fired timers are deleted after Kafka acknowledged their wake-ups
    assert again == []  # and fired once
