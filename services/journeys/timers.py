"""Timer wake-ups: each worker scans the Cassandra timer shards of the ``journey.timers`` partitions it owns
and produces a wake-up for every due timer to that topic (keyed by profile, so the step runs in order with
the customer's events). A timer row is deleted only after Kafka acknowledged its wake-up: at least once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaProducer

from services.journeys.store import TimerStore, minute_of

log = logging.getLogger(__name__)

# How far back a shard without a cursor looks (a fresh deployment, or a shard never owned before).
INITIAL_LOOKBACK_MINUTES = 24 * 60


class TimerPoller:
    def __init__(self, store: TimerStore, producer: AIOKafkaProducer, topic: str,
                 owned_shards: Callable[[], set[int]], *, interval_s: float = 0.2) -> None:
        self.store = store
        self.producer = producer
        self.topic = topic
        self.owned_shards = owned_shards
        self.interval_s = interval_s
        self._cursors: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="journey-timers")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.poll_once(datetime.now(UTC))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer poll failed; retrying")
                await asyncio.sleep(1.0)
            await asyncio.sleep(self.interval_s)

    async def poll_once(self, now: datetime) -> int:
        """Fire every due timer of the owned shards; returns how many wake-ups were produced."""
        fired = 0
        for shard in sorted(self.owned_shards()):
            fired += await self._poll_shard(shard, now)
        return fired

    async def _poll_shard(self, shard: int, now: datetime) -> int:
        current = minute_of(now)
        cursor = self._cursors.get(shard)
        if cursor is None:
            stored = await self.store.cursor(shard)
            cursor = stored if stored is not None else current - INITIAL_LOOKBACK_MINUTES
        fired = 0
        start = cursor
        for minute in range(start, current + 1):
            rows = await self.store.due(shard, minute, now)
            if rows:
                await asyncio.gather(*(self.producer.send_and_wait(
                    self.topic, orjson.dumps(r.wakeup()), key=r.profile_id.encode()) for r in rows))
                await self.store.delete(rows)
                fired += len(rows)
            if minute < current:
                cursor = minute + 1  # a past minute is complete: every row in it was due and is now fired
        if cursor != self._cursors.get(shard):
            self._cursors[shard] = cursor
            await self.store.set_cursor(shard, cursor)
        return fired
