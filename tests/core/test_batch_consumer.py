"""The stream consumers' batch pacing, against the local Kafka."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

from aiokafka.structs import ConsumerRecord

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
