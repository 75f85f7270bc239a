"""The schedule's read floor against the real Cassandra: a poll reads from where the previous one found
everything handled, not through the tombstones of every entry handled in the last ``gc_grace_seconds``
(which fails every read for good at 100,000 of them); an overdue entry written after a poll is still found;
a restarted scheduler starts from the saved floor.

The scheduler runs in-process on a controllable clock in 2019 (no other test's entries are due that early),
with a notifier stand-in that records what it was handed, and floors under a queue name of its own (the
``queue_floors`` rows of ``notify_schedule`` are shared by every notify process of the test session)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from cassandra.cluster import Session

from loyalist.cassandra import execute
from loyalist.queues import DEFAULT_SLACK, FloorStore
from services.notify.config import NotifyConfig
from services.notify.delivery import Notifier
from services.notify.domain.messages import MessageRequest
from services.notify.store import SCHEDULE_QUEUE, SCHEDULE_SHARD, NotifyStore
from services.notify.streams import Scheduler
from tests.cassandra_traces import TracedReads, tombstones_read, traced_tombstones
from tests.clocks import SettableClock as Clock
from tests.notify.conftest import request_doc

pytestmark = pytest.mark.integration

POLL_PREFIX = "SELECT due_at, idempotency_key FROM notify_schedule"


class RecordingNotifier:
    """What the scheduler needs of a Notifier: its store, and ``handle`` (here: recorded, or failing for the
    keys in ``failing``)."""

    def __init__(self, store: NotifyStore) -> None:
        self.store = store
        self.handled: list[str] = []
        self.failing: set[str] = set()

    async def handle(self, req: MessageRequest, *, from_schedule: bool = False) -> str:
        assert from_schedule
        if req.idempotency_key in self.failing:
            raise RuntimeError("the provider is down")
        self.handled.append(req.idempotency_key)
        return "sent"


@pytest.fixture(scope="module")
def session(cassandra_session: Session) -> Session:
    return cassandra_session


@pytest.fixture
def queue() -> str:
    """This test's own floors in ``queue_floors``."""
    return f"notify_schedule_test_{uuid.uuid4().hex[:8]}"


def scheduler_for(session: Session, queue: str, clock: Clock) -> tuple[Scheduler, RecordingNotifier, TracedReads]:
    traced = TracedReads(session, POLL_PREFIX)
    notifier = RecordingNotifier(NotifyStore(cast(Session, traced)))
    scheduler = Scheduler(NotifyConfig(), cast(Notifier, notifier), clock,
                          floor_store=FloorStore(session, queue))
    return scheduler, notifier, traced


async def deferred_message(store: NotifyStore, due: datetime, writer_now: datetime) -> tuple[str, datetime]:
    """A message in the delivery log and its schedule entry; returns its key and the due time stored."""
    req = MessageRequest.from_wire(request_doc(f"p-{uuid.uuid4().hex[:8]}"))
    claimed, _ = await store.claim(req, "test-owner", writer_now + timedelta(seconds=60), writer_now)
    assert claimed
    return req.idempotency_key, await store.schedule(req.idempotency_key, due, writer_now)


async def scheduled(session: Session, due_at: datetime, key: str) -> bool:
    rows = await execute(session, "SELECT idempotency_key FROM notify_schedule WHERE shard = %s AND due_at = %s "
                                  "AND idempotency_key = %s", (SCHEDULE_SHARD, due_at, key))
    return bool(rows)


async def insert_raw(session: Session, due_at: datetime, key: str) -> None:
    """An entry written straight into the partition, bypassing the writers' rule: the one thing that can lie
    below a floor, so it shows which rows a poll reads."""
    await execute(session, "INSERT INTO notify_schedule (shard, due_at, idempotency_key) VALUES (%s, %s, %s)",
                  (SCHEDULE_SHARD, due_at, key))


async def delete_raw(session: Session, due_at: datetime, key: str) -> None:
    await execute(session, "DELETE FROM notify_schedule WHERE shard = %s AND due_at = %s AND idempotency_key = %s",
                  (SCHEDULE_SHARD, due_at, key))


async def test_the_default_queue_name(session: Session) -> None:
    notifier = RecordingNotifier(NotifyStore(session))
    scheduler = Scheduler(NotifyConfig(), cast(Notifier, notifier), Clock(datetime.now(UTC)))
    assert scheduler.floor_store.queue == SCHEDULE_QUEUE == "notify_schedule"


async def test_a_poll_reads_from_the_floor_past_the_tombstones_of_handled_entries(
        session: Session, queue: str) -> None:
    t0 = datetime(2019, 3, 1, 12, 0, tzinfo=UTC)
    clock = Clock(t0)
    scheduler, notifier, traced = scheduler_for(session, queue, clock)
    store = notifier.store
    keys = [(await deferred_message(store, t0 - timedelta(minutes=10, seconds=-i), t0 - timedelta(hours=1)))[0]
            for i in range(30)]

    assert scheduler.floors.floor(SCHEDULE_SHARD) is None
    await scheduler.tick()
    assert set(keys) <= set(notifier.handled)
    assert scheduler.floors.floor(SCHEDULE_SHARD) == t0 - DEFAULT_SLACK
    traced.take()

    # The first poll deleted 30 entries: a read from the partition's start goes through their tombstones.
    from_start = traced_tombstones(
        session, "SELECT due_at, idempotency_key FROM notify_schedule WHERE shard = %s AND due_at <= %s",
        (SCHEDULE_SHARD, t0 + timedelta(seconds=1)))
    assert from_start >= 30

    below_floor = f"below-floor-{uuid.uuid4()}"
    below_at = t0 - timedelta(minutes=5)
    await insert_raw(session, below_at, below_floor)
    try:
        clock.now = t0 + timedelta(seconds=1)
        due_calls: list[datetime | None] = []
        due = store.due

        async def recording_due(now: datetime, limit: int = 200, *,
                                since: datetime | None = None) -> list[tuple[datetime, str]]:
            due_calls.append(since)
            return await due(now, limit, since=since)

        store.due = recording_due  # type: ignore[method-assign]
        await scheduler.tick()
        assert due_calls == [t0 - DEFAULT_SLACK]
        # The next poll read none of those tombstones, and nothing below its floor.
        assert await tombstones_read(traced.take()) == 0
        assert await scheduled(session, below_at, below_floor)
    finally:
        await delete_raw(session, below_at, below_floor)


async def test_an_overdue_entry_written_after_a_poll_is_found_by_the_next(session: Session, queue: str) -> None:
    t1 = datetime(2019, 3, 2, 12, 0, tzinfo=UTC)
    clock = Clock(t1)
    scheduler, notifier, _ = scheduler_for(session, queue, clock)
    await scheduler.tick()
    assert scheduler.floors.floor(SCHEDULE_SHARD) == t1 - DEFAULT_SLACK

    # A writer whose clock is past the poll schedules a message that was due yesterday: it is stored at the
    # writer's now, above the floor, not a day below it.
    writer_now = t1 + timedelta(seconds=2)
    key, stored = await deferred_message(notifier.store, t1 - timedelta(days=1), writer_now)
    assert stored == writer_now

    clock.now = t1 + timedelta(seconds=3)
    await scheduler.tick()
    assert key in notifier.handled
    assert not await scheduled(session, stored, key)


async def test_an_entry_whose_handling_failed_holds_the_floor_until_it_is_handled(
        session: Session, queue: str) -> None:
    t2 = datetime(2019, 3, 3, 12, 0, tzinfo=UTC)
    clock = Clock(t2)
    scheduler, notifier, _ = scheduler_for(session, queue, clock)
    failed_due = t2 - timedelta(minutes=10)
    key, _ = await deferred_message(notifier.store, failed_due, t2 - timedelta(hours=1))
    notifier.failing.add(key)
    await scheduler.tick()
    assert key not in notifier.handled
    floor = scheduler.floors.floor(SCHEDULE_SHARD)
    assert floor == failed_due - DEFAULT_SLACK

    # Many polls later, the entry is still above the floor and is handled once its handling succeeds.
    for minutes in range(1, 4):
        clock.now = t2 + timedelta(minutes=minutes)
        await scheduler.tick()
    assert scheduler.floors.floor(SCHEDULE_SHARD) == floor
    notifier.failing.clear()
    await scheduler.tick()
    assert key in notifier.handled
    assert not await scheduled(session, failed_due, key)


async def test_a_restarted_scheduler_starts_from_the_saved_floor(session: Session, queue: str) -> None:
    t3 = datetime(2019, 3, 4, 12, 0, tzinfo=UTC)
    clock = Clock(t3)
    first, _, _ = scheduler_for(session, queue, clock)
    await first.tick()
    saved = first.floors.floor(SCHEDULE_SHARD)
    assert saved == t3 - DEFAULT_SLACK

    below_floor = f"below-floor-{uuid.uuid4()}"
    below_at = t3 - timedelta(minutes=5)
    await insert_raw(session, below_at, below_floor)
    try:
        clock.now = t3 + timedelta(seconds=1)
        restarted, _, traced = scheduler_for(session, queue, clock)
        assert restarted.floors.floor(SCHEDULE_SHARD) is None
        await restarted.start()  # loads the floors before its first poll
        await restarted.stop()
        assert restarted.floors.floor(SCHEDULE_SHARD) == saved
        await restarted.tick()
        assert await tombstones_read(traced.take()) == 0
        assert await scheduled(session, below_at, below_floor)
    finally:
        await delete_raw(session, below_at, below_floor)


async def test_a_poll_before_the_floor_reads_from_the_start(session: Session, queue: str) -> None:
    """A floor later than the poll's clock (another poller's clock ahead, or this one set back) is not
    trusted: entries due by the poll's now may lie below it."""
    t4 = datetime(2019, 3, 5, 12, 0, tzinfo=UTC)
    clock = Clock(t4)
    scheduler, notifier, _ = scheduler_for(session, queue, clock)
    await scheduler.tick()

    clock.now = t4 - timedelta(hours=1)
    key, stored = await deferred_message(notifier.store, t4 - timedelta(hours=2), clock.now)
    assert stored == clock.now
    await scheduler.tick()
    assert key in notifier.handled
    assert scheduler.floors.floor(SCHEDULE_SHARD) == t4 - DEFAULT_SLACK  # a floor never moves back

