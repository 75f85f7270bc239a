"""Timer wake-ups: each worker scans the Cassandra timer shards of the ``journey.timers`` partitions it owns
and produces a wake-up for every due timer to that topic (keyed by profile, so the step runs in order with
the customer's events). A timer row is deleted only after Kafka acknowledged its wake-up: at least once.

Scans run every ``interval_s`` (for timers this worker did not write: another worker's before a rebalance)
and, earlier, at the due time of every timer this worker writes itself (the store tells the poller, and the
poller keeps those due times, rounded up to ``slot_s``, until they pass), so a timer is fired on time without
scanning Cassandra ten times a second: timers due close together share one scan.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
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
# Due times kept for wake-ups at most; past that, the periodic scan (every interval_s) fires the rest.
MAX_DUE_SLOTS = 10_000


class DueSlots:
    """Upcoming scan times of the timers a worker wrote: due times rounded up to ``slot_s``, so timers due
    within the same slot share one scan. At most ``limit`` are kept; the periodic scan fires the rest.

    >>> slots = DueSlots(0.1)
    >>> [slots.add(due) for due in (100.03, 100.07, 100.31)]
    [100.1, 100.1, 100.4]
    >>> slots.next_after(100.0), slots.next_after(100.1), slots.next_after(100.4)
    (100.1, 100.4, inf)
    """

    __slots__ = ("_heap", "_members", "limit", "slot_s")

    def __init__(self, slot_s: float, limit: int = MAX_DUE_SLOTS) -> None:
        self.slot_s = slot_s
        self.limit = limit
        self._heap: list[float] = []
        self._members: set[float] = set()

    def add(self, due: float) -> float:
        """Remember the slot of a timer due at ``due`` (epoch seconds); returns that slot."""
        at = round(math.ceil(due / self.slot_s - 1e-4) * self.slot_s, 6)  # not a slot late for float noise
        if at not in self._members and len(self._heap) < self.limit:
            self._members.add(at)
            heapq.heappush(self._heap, at)
        return at

    def next_after(self, now: float) -> float:
        """The earliest slot after ``now`` (slots up to ``now`` are forgotten: a scan at ``now`` covers them);
        ``inf`` when there is none."""
        while self._heap and self._heap[0] <= now:
            self._members.discard(heapq.heappop(self._heap))
        return self._heap[0] if self._heap else math.inf


class TimerPoller:
    def __init__(self, store: TimerStore, producer: AIOKafkaProducer, topic: str,
                 owned_shards: Callable[[], set[int]], *, interval_s: float = 0.5, slot_s: float = 0.1) -> None:
        self.store = store
        self.producer = producer
        self.topic = topic
        self.owned_shards = owned_shards
        self.interval_s = interval_s
        self.slots = DueSlots(slot_s)
        self._cursors: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_poll = 0.0  # epoch seconds of the next scan
        self._woken = asyncio.Event()
        store.on_written = self.due_at

    def due_at(self, due: datetime) -> None:
        """A timer due at ``due`` was written: scan at its slot (``due`` rounded up to ``slot_s``)."""
        at = self.slots.add(due.timestamp())
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
            started = time.time()
            self._next_poll = min(started + self.interval_s, self.slots.next_after(started))
            try:
                await self.poll_once(datetime.fromtimestamp(started, UTC))
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
