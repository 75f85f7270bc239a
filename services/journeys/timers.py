"""Timer wake-ups: each worker scans the Cassandra timer shards of the ``journey.timers`` partitions it owns
and produces a wake-up for every due timer to that topic (keyed by profile, so the step runs in order with
the customer's events). A timer row is deleted only after Kafka acknowledged its wake-up: at least once.

Scans run every ``interval_s`` (for timers this worker did not write: another worker's before a rebalance)
and, earlier, at the due time of every timer this worker writes itself (the store tells the poller), so a
timer is fired on time without scanning Cassandra ten times a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaProducer

from loyalist.kafka import produce_many
from services.journeys.store import TimerStore, minute_of

log = logging.getLogger(__name__)

# How far back a shard without a cursor looks (a fresh deployment, or a shard never owned before).
INITIAL_LOOKBACK_MINUTES = 24 * 60
# Partitions (shard, minute) one timer read may name.
MAX_PARTITIONS_PER_READ = 100


class TimerPoller:
    def __init__(self, store: TimerStore, producer: AIOKafkaProducer, topic: str,
                 owned_shards: Callable[[], set[int]], *, interval_s: float = 0.5) -> None:
        self.store = store
        self.producer = producer
        self.topic = topic
        self.owned_shards = owned_shards
        self.interval_s = interval_s
        self._cursors: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_poll = 0.0  # epoch seconds of the next scan
        self._woken = asyncio.Event()
        store.on_written = self.due_at

    def due_at(self, due: datetime) -> None:
        """A timer due at ``due`` was written: scan no later than then."""
        at = due.timestamp()
        if at < self._next_poll:
            self._next_poll = at
            self._woken.set()

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
            self._next_poll = time.time() + self.interval_s
            try:
                await self.poll_once(datetime.now(UTC))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer poll failed; retrying")
                await asyncio.sleep(1.0)
            await self._sleep_until_next_poll()

    async def _sleep_until_next_poll(self) -> None:
        while (wait := self._next_poll - time.time()) > 0:
            self._woken.clear()
            try:
                await asyncio.wait_for(self._woken.wait(), timeout=wait + 0.001)
            except TimeoutError:
                return

    async def poll_once(self, now: datetime) -> int:
        """Fire every due timer of the owned shards; returns how many wake-ups were produced.

        One read covers every owned shard (an IN on both partition key columns), so a poll costs one request
        however many partitions this worker owns; a shard that is behind (a fresh cursor) is read a hundred
        minute-partitions per request."""
        shards = sorted(self.owned_shards())
        if not shards:
            return 0
        current = minute_of(now)
        missing = [s for s in shards if s not in self._cursors]
        if missing:
            stored = await asyncio.gather(*(self.store.cursor(s) for s in missing))
            for shard, cursor in zip(missing, stored, strict=True):
                self._cursors[shard] = cursor if cursor is not None else current - INITIAL_LOOKBACK_MINUTES
        by_start: dict[int, list[int]] = {}
        for shard in shards:
            by_start.setdefault(min(self._cursors[shard], current), []).append(shard)
        reads = []
        for start, group in by_start.items():
            minutes = list(range(start, current + 1))
            per_read = max(1, MAX_PARTITIONS_PER_READ // len(group))
            for i in range(0, len(minutes), per_read):
                reads.append(self.store.due_many(group, minutes[i:i + per_read], now))
        rows = [r for chunk in await asyncio.gather(*reads) for r in chunk]
        if rows:
            futures = await produce_many(self.producer, self.topic,
                                         [(r.profile_id.encode(), orjson.dumps(r.wakeup())) for r in rows])
            await asyncio.gather(*futures)
            await self.store.delete(rows)
        # Every past minute is complete: each row in it was due and is now fired.
        moved = [s for s in shards if self._cursors[s] != current]
        for shard in moved:
            self._cursors[shard] = current
        await asyncio.gather(*(self.store.set_cursor(s, current) for s in moved))
        return len(rows)
