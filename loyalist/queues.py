"""Where a poll of a time-ordered queue partition starts reading.

The schedules (segment re-evaluations, deferred messages, loyalty reviews) are Cassandra partitions clustered by
due time; a poller reads what is due and deletes each entry once handled. A deleted entry stays in its partition
as a tombstone until compaction purges it, ``gc_grace_seconds`` after the delete (10 days by default), and a read
of ``due_at <= now`` from the partition's start scans every one of them, on every poll: the reads get slower all
the time, and at 100,000 tombstones (``tombstone_failure_threshold``) Cassandra fails them, so the queue stops.
At 50 entries a second that is 33 minutes after the start.

So each poll reads ``due_at >= floor``: the floor is the time up to which an earlier poll found everything
handled, less ``slack``. Writers never store a due time before their own clock (:func:`not_before`), so an entry
written after a poll is at or after that poll's ``now``, and ``slack`` covers the writers' clocks being behind
the poller's. Floors are kept in ``queue_floors`` (saved at most every ``save_every``; an older floor is safe,
it only reads more), so a restarted poller does not start over from the partition's start.

>>> from datetime import UTC, datetime, timedelta
>>> floors = ReadFloors(slack=timedelta(seconds=30))
>>> now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
>>> floors.floor(3) is None  # never polled: from the start
True
>>> floors.advance(3, now, oldest_left=None)  # everything due was handled
True
>>> floors.floor(3)
datetime.datetime(2026, 1, 1, 11, 59, 30, tzinfo=datetime.timezone.utc)
>>> floors.advance(3, now + timedelta(minutes=5), oldest_left=now + timedelta(minutes=1))  # one entry left
True
>>> floors.floor(3)
datetime.datetime(2026, 1, 1, 12, 0, 30, tzinfo=datetime.timezone.utc)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from datetime import UTC, datetime, timedelta

from cassandra.cluster import Session

from loyalist.cassandra import execute

log = logging.getLogger(__name__)

DEFAULT_SLACK = timedelta(seconds=30)


def not_before(due: datetime, now: datetime) -> datetime:
    """The due time to store for an entry due at ``due``: never before the writer's ``now`` (an overdue entry
    fires at once either way), so a poll that already read up to ``now`` cannot miss it."""
    return max(due, now)


class ReadFloors:
    """The read floor of each shard of one queue (pure: no I/O)."""

    def __init__(self, *, slack: timedelta = DEFAULT_SLACK) -> None:
        self.slack = slack
        self._floors: dict[Hashable, datetime] = {}

    def floor(self, shard: Hashable) -> datetime | None:
        """The lower bound of the next read of ``shard`` (None: from the start)."""
        return self._floors.get(shard)

    def seed(self, shard: Hashable, floor: datetime) -> None:
        """A floor saved earlier (by this poller before a restart, or another one)."""
        current = self._floors.get(shard)
        self._floors[shard] = floor if current is None else max(current, floor)

    def advance(self, shard: Hashable, now: datetime, oldest_left: datetime | None) -> bool:
        """After a poll of ``shard`` that read everything due up to ``now``: ``oldest_left`` is the earliest
        entry it left in place (not handled, or beyond the read's limit), None if it handled all. Returns
        whether the floor moved."""
        upto = now if oldest_left is None else min(now, oldest_left)
        floor = upto - self.slack
        current = self._floors.get(shard)
        if current is not None and floor <= current:
            return False
        self._floors[shard] = floor
        return True


class FloorStore:
    """``queue_floors`` rows of one queue: loaded at start, saved when a floor moved (at most every
    ``save_every`` seconds per shard)."""

    def __init__(self, session: Session, queue: str, *, save_every_s: float = 5.0) -> None:
        self.s = session
        self.queue = queue
        self.save_every_s = save_every_s
        self._saved_at: dict[int, float] = {}
        self._get = session.prepare("SELECT shard, floor FROM queue_floors WHERE queue = ?")
        self._put = session.prepare("INSERT INTO queue_floors (queue, shard, floor) VALUES (?, ?, ?)")

    async def load(self, floors: ReadFloors) -> None:
        for row in await execute(self.s, self._get, (self.queue,)):
            floors.seed(row["shard"], row["floor"].replace(tzinfo=UTC))

    async def maybe_save(self, shard: int, floors: ReadFloors) -> None:
        floor = floors.floor(shard)
        now = time.monotonic()
        if floor is None or now - self._saved_at.get(shard, float("-inf")) < self.save_every_s:
            return
        self._saved_at[shard] = now
        try:
            await execute(self.s, self._put, (self.queue, shard, floor))
        except Exception as exc:  # an older saved floor is safe: the next start only reads more
            log.warning("saving the read floor of %s/%s failed: %s", self.queue, shard, exc)
