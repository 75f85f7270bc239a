"""Watching Kafka from the outside: latency taps on output topics and consumer-group progress.

A ``Tap`` reads a topic from its current end and records, for each record that passes a filter, how long
after the originating event was *accepted by ingest* the record became readable — the time stamps the
services put on their outputs (``cause.receivedAt`` on ``profile.changed``, ``eventAcceptedAt`` on
``segment.membership`` and ``message.requests``).

>>> parse_ts("2026-01-01T00:00:01.5Z") - parse_ts("2026-01-01T00:00:00Z")
1.5
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from loyalist.settings import Settings

JSON = dict[str, Any]


def parse_ts(value: str) -> float:
    """Epoch seconds of an ISO 8601 timestamp (``Z`` or offset)."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


class Tap:
    """Latencies of the records of one topic: ``now - accepted_at(record)`` for records ``accepted_at`` can date."""

    def __init__(self, settings: Settings, topic: str,
                 accepted_at: Callable[[JSON], str | tuple[str, int] | None]) -> None:
        """``accepted_at`` dates a record; ``(stamp, n)`` says the record is the output of ``n`` accepted events
        dated no later than ``stamp`` (they all count, with that latency)."""
        self.settings = settings
        self.topic = settings.topic(topic)
        self.accepted_at = accepted_at
        self.latencies: list[float] = []
        self.records = 0
        self.samples: list[JSON] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, client_id="bench-tap", enable_auto_commit=False,
            # A long poll, as the services' consumers use: the broker answers as soon as a record arrives, so it
            # adds no latency, and an idle tap no longer sends ~100 fetches a second. With 10 ms, the bench and its
            # load generator used 19% of a core during the funnel run, against 11-12% with 500 ms, and Kafka used
            # 19% against 15-17%. In four alternating runs on 2026-12-07, the stress-mix p99s were 3.5-5.3 s
            # with 500 ms and 4.9-7.5 s with 10 ms. A single earlier run had read the opposite; that was not
            # reproduced.
            fetch_max_wait_ms=500, isolation_level="read_committed",
        )
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self.topic) or set()
        if not parts:
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, so nothing produced after start() is skipped
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    self.records += 1
                    try:
                        value = orjson.loads(rec.value)
                        stamp = self.accepted_at(value)
                    except Exception:
                        continue
                    if stamp:
                        stamp, weight = stamp if isinstance(stamp, tuple) else (stamp, 1)
                        self.latencies.extend([now - parse_ts(stamp)] * max(1, weight))
                        if len(self.samples) < 3:
                            self.samples.append(value)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._consumer is not None:
            await self._consumer.stop()


async def group_progress(settings: Settings) -> dict[str, tuple[int, int]]:
    """For every consumer group of the namespace: (committed offsets summed, end offsets summed) over the
    partitions it has committed on."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bench-admin")
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="bench-admin")
    await admin.start()
    await consumer.start()
    try:
        groups = [g[0] for g in await admin.list_consumer_groups() if str(g[0]).startswith(settings.namespace)]
        out: dict[str, tuple[int, int]] = {}
        for group in groups:
            offsets = await admin.list_consumer_group_offsets(group)
            # only the group's input topics (faust also commits on its changelogs and repartition topics)
            tps = [tp for tp in offsets if tp.topic.startswith(settings.namespace + ".")]
            if not tps:
                continue
            ends = await consumer.end_offsets(tps)
            out[group] = (sum(max(offsets[tp].offset, 0) for tp in tps), sum(ends[tp] for tp in tps))
        return out
    finally:
        await consumer.stop()
        await admin.close()


async def topic_size(settings: Settings, topic: str) -> int:
    """Records in a topic (sum of end offsets; these topics are never truncated during a run)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="bench-admin")
    await consumer.start()
    try:
        name = settings.topic(topic)
        parts = consumer.partitions_for_topic(name) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(name) or set()
        tps = [TopicPartition(name, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()
