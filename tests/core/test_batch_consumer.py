"""The stream consumers' batch pacing and offset commits, against the local Kafka."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

from aiokafka.structs import ConsumerRecord, TopicPartition

from loyalist.consumer import BatchConsumer
from loyalist.kafka import ensure_topics, make_producer
from loyalist.settings import Settings
from loyalist.topics import Topic


async def _consume_a_trickle(settings: Settings, interval_ms: int) -> list[int]:
    """Batch sizes a consumer sees while 60 records arrive one every ~10 ms."""
    topic = Topic(f"pace-{uuid.uuid4().hex[:8]}", "batch pacing test", key="n", partitions=1)
    await ensure_topics(settings, [topic])
    paced = settings.model_copy(update={"consumer_min_batch_interval_ms": interval_ms})
    sizes: list[int] = []
    reading, seen = asyncio.Event(), asyncio.Event()

    async def handler(records: Sequence[ConsumerRecord]) -> None:  # type: ignore[type-arg]
        sizes.append(len(records))
        reading.set()
        if sum(sizes) >= 60:
            seen.set()

    consumer = BatchConsumer(paced, settings.topic(topic.name), group_id=f"pace-{uuid.uuid4().hex[:8]}",
                             handler=handler, service="test", stage="pace")
    producer = make_producer(settings, client_id="pace-test", linger_ms=0)
    await producer.start()
    await consumer.start()
    try:
        await producer.send_and_wait(settings.topic(topic.name), b"first", key=b"k")
        await asyncio.wait_for(reading.wait(), 30)  # assigned and reading
        for n in range(59):
            await producer.send_and_wait(settings.topic(topic.name), str(n).encode(), key=b"k")
            await asyncio.sleep(0.01)
        await asyncio.wait_for(seen.wait(), 30)
    finally:
        await consumer.stop()
        await producer.stop()
    return sizes


async def test_a_stage_quicker_than_its_input_takes_batches_at_most_every_interval(stack_settings: Settings) -> None:
    started = time.monotonic()
    paced = await _consume_a_trickle(stack_settings, 200)
    elapsed = time.monotonic() - started
    # Each batch is followed by a wait of the rest of the interval: at most one batch per 200 ms (+1 for the
    # last), so the trickle arrives in few batches of several records ...
    assert sum(paced) == 60
    assert len(paced) <= elapsed / 0.2 + 1
    assert max(paced) >= 5
    # ... where an unpaced consumer takes nearly every record on its own.
    unpaced = await _consume_a_trickle(stack_settings, 0)
    assert sum(unpaced) == 60
    assert len(unpaced) > 2 * len(paced)


async def _committed_while_records_keep_coming(settings: Settings, interval_ms: int
                                               ) -> tuple[list[int], int | None, int]:
    """A consumer fed 40 records, one every ~25 ms: the committed offsets seen after each batch while records
    keep coming, the committed offset once they stopped, and how many records there were."""
    topic = Topic(f"commit-{uuid.uuid4().hex[:8]}", "offset commit test", key="n", partitions=1)
    await ensure_topics(settings, [topic])
    name = settings.topic(topic.name)
    tuned = settings.model_copy(update={"consumer_commit_interval_ms": interval_ms,
                                        "consumer_min_batch_interval_ms": 0})
    group = f"commit-{uuid.uuid4().hex[:8]}"
    handled, reading = 0, asyncio.Event()
    consumer: BatchConsumer | None = None
    seen: list[int] = []
    ahead: list[int] = []  # committed offsets past what was handled (must stay empty)
    tp = TopicPartition(name, 0)

    async def handler(records: Sequence[ConsumerRecord]) -> None:  # type: ignore[type-arg]
        nonlocal handled
        assert consumer is not None
        # What the group has committed while this batch is handled: never past what was handled before it.
        committed = await consumer.consumer.committed(tp) or 0
        seen.append(committed)
        ahead.extend([committed] if committed > handled else [])
        handled += len(records)
        reading.set()

    consumer = BatchConsumer(tuned, name, group_id=group, handler=handler, service="test", stage="commit",
                             poll_ms=100)
    producer = make_producer(settings, client_id="commit-test", linger_ms=0)
    await producer.start()
    await consumer.start()
    try:
        await producer.send_and_wait(name, b"first", key=b"k")
        await asyncio.wait_for(reading.wait(), 30)
        for n in range(39):
            await producer.send_and_wait(name, str(n).encode(), key=b"k")
            await asyncio.sleep(0.025)
        deadline = time.monotonic() + 10
        final = None
        while time.monotonic() < deadline:  # the input ran dry: everything handled is committed soon after
            final = await consumer.consumer.committed(tp)
            if final == 40:
                break
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await producer.stop()
    assert not ahead, f"offsets committed before their records were handled: {ahead}"
    return seen, final, handled


async def test_offsets_are_committed_at_most_every_interval_and_at_once_when_the_input_runs_dry(
        stack_settings: Settings) -> None:
    seen, final, handled = await _committed_while_records_keep_coming(stack_settings, 600)
    assert handled == 40 and final == 40  # every handled record committed once the records stopped
    # ~1 s of records with a 600 ms interval: the committed offset moved at most a few times, where committing
    # after every batch moves it with nearly every batch.
    assert len(set(seen)) <= 4
    per_batch, final, handled = await _committed_while_records_keep_coming(stack_settings, 0)
    assert handled == 40 and final == 40
    assert len(set(per_batch)) > 2 * 4
