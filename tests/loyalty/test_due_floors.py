"""The read floors of loyalty's schedule (``loyalty_due``) against the real Cassandra: each run reads each
shard from where the previous one found everything handled, not through the tombstones of every entry handled
in the last ``gc_grace_seconds`` (which fails every read for good at 100,000 of them); an overdue entry written
after a run is still found; an entry whose tick failed holds its shard's floor; a new service starts from the
saved floors.

The runs are on a controllable clock in 2018 (no other test's entries are due that early), with floors under a
queue name of each test's own (the ``queue_floors`` rows of ``loyalty_due`` are shared by every profile
service of the test session)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from cassandra.cluster import Session

from loyalist.cassandra import execute
from loyalist.queues import DEFAULT_SLACK, FloorStore
from loyalist.settings import Settings
from services.profile.loyalty.service import LoyaltyService
from services.profile.loyalty.settings import LoyaltySettings
from services.profile.loyalty.store import DUE_QUEUE, LedgerStore, ProgramStore
from tests.cassandra_traces import TracedReads, tombstones_read, traced_tombstones
from tests.clocks import SettableClock as Clock

pytestmark = pytest.mark.integration

POLL_PREFIX = "SELECT due_at, profile_id FROM loyalty_due"


@pytest.fixture(scope="module")
def session(cassandra_session: Session) -> Session:
    return cassandra_session


@pytest.fixture
def queue() -> str:
    """This test's own floors in ``queue_floors``."""
    return f"loyalty_due_test_{uuid.uuid4().hex[:8]}"


class Harness:
    """A loyalty service on ``clock`` whose schedule reads run traced and whose ``due`` calls are recorded."""

    def __init__(self, settings: Settings, session: Session, queue: str, clock: Clock) -> None:
        self.traced = TracedReads(session, POLL_PREFIX)
        self.store = LedgerStore(cast(Session, self.traced))
        self.service = LoyaltyService(settings, LoyaltySettings(), self.store, ProgramStore(session), None, clock,
                                      due_floor_store=FloorStore(session, queue))
        self.since: dict[int, list[datetime | None]] = {}
        due = self.store.due

        async def recording_due(shard: int, until: datetime, limit: int, *,
                                since: datetime | None = None) -> list[tuple[datetime, str]]:
            self.since.setdefault(shard, []).append(since)
            return await due(shard, until, limit, since=since)

        self.store.due = recording_due  # type: ignore[method-assign]

    def floors(self) -> dict[int, datetime | None]:
        return {shard: self.service.due_floors.floor(shard) for shard in range(self.store.due_shards)}

    def reset(self) -> None:
        self.since.clear()
        self.traced.take()


def new_profile(store: LedgerStore, shard: int | None = None) -> str:
    while True:
        profile_id = f"p-{uuid.uuid4().hex[:10]}"
        if shard is None or store.shard(profile_id) == shard:
            return profile_id


async def due_rows(session: Session, store: LedgerStore, profile_id: str) -> list[datetime]:
    rows = await execute(session, "SELECT due_at, profile_id FROM loyalty_due WHERE shard = %s",
                         (store.shard(profile_id),))
    return [r["due_at"].replace(tzinfo=UTC) for r in rows if r["profile_id"] == profile_id]


async def insert_raw(session: Session, store: LedgerStore, due_at: datetime, profile_id: str) -> None:
    """An entry written straight into the index, bypassing the writers' rule: the one thing that can lie below
    a floor, so it shows which rows a run reads."""
    await execute(session, "INSERT INTO loyalty_due (shard, due_at, profile_id) VALUES (%s, %s, %s)",
                  (store.shard(profile_id), due_at, profile_id))


async def delete_raw(session: Session, store: LedgerStore, due_at: datetime, profile_id: str) -> None:
    await execute(session, "DELETE FROM loyalty_due WHERE shard = %s AND due_at = %s AND profile_id = %s",
                  (store.shard(profile_id), due_at, profile_id))


def from_start_tombstones(session: Session, shards: int, until: datetime) -> int:
    return sum(traced_tombstones(session, "SELECT due_at, profile_id FROM loyalty_due WHERE shard = %s "
                                          "AND due_at <= %s", (shard, until)) for shard in range(shards))


async def test_the_default_queue_name(stack_settings: Settings, session: Session) -> None:
    store = LedgerStore(session)
    service = LoyaltyService(stack_settings, LoyaltySettings(), store, ProgramStore(session), None,
                             Clock(datetime.now(UTC)))
    assert service.due_floor_store.queue == DUE_QUEUE == "loyalty_due"


async def test_a_run_reads_each_shard_from_its_floor_past_the_tombstones_of_handled_entries(
        stack_settings: Settings, session: Session, queue: str) -> None:
    t0 = datetime(2018, 3, 1, 12, 0, tzinfo=UTC)
    clock = Clock(t0)
    h = Harness(stack_settings, session, queue, clock)
    profiles = [new_profile(h.store) for _ in range(40)]
    for i, profile_id in enumerate(profiles):
        await h.store.schedule(profile_id, t0 - timedelta(minutes=10, seconds=-i), t0 - timedelta(hours=1))

    assert set(h.floors().values()) == {None}
    assert await h.service.run_due(t0) >= len(profiles)
    for profile_id in profiles:
        assert await due_rows(session, h.store, profile_id) == []
    assert set(h.floors().values()) == {t0 - DEFAULT_SLACK}
    h.reset()

    # The run deleted 40 entries: reads from the shards' start go through their tombstones.
    assert from_start_tombstones(session, h.store.due_shards, t0 + timedelta(seconds=1)) >= len(profiles)

    below_floor = new_profile(h.store)
    below_at = t0 - timedelta(minutes=5)
    await insert_raw(session, h.store, below_at, below_floor)
    try:
        clock.now = t0 + timedelta(seconds=1)
        await h.service.run_due(clock.now)
        assert h.since == {shard: [t0 - DEFAULT_SLACK] for shard in range(h.store.due_shards)}
        # The next run read none of those tombstones, and nothing below the floors.
        assert await tombstones_read(h.traced.take()) == 0
        assert await due_rows(session, h.store, below_floor) == [below_at]
    finally:
        await delete_raw(session, h.store, below_at, below_floor)


async def test_an_overdue_entry_written_after_a_run_is_found_by_the_next(
        stack_settings: Settings, session: Session, queue: str) -> None:
    t1 = datetime(2018, 3, 2, 12, 0, tzinfo=UTC)
    clock = Clock(t1)
    h = Harness(stack_settings, session, queue, clock)
    await h.service.run_due(t1)
    assert set(h.floors().values()) == {t1 - DEFAULT_SLACK}

    # A writer whose clock is past the run schedules a review that was due yesterday: it is stored at the
    # writer's now, above the floor, not a day below it.
    profile_id = new_profile(h.store)
    writer_now = t1 + timedelta(seconds=2)
    await h.store.schedule(profile_id, t1 - timedelta(days=1), writer_now)
    assert await due_rows(session, h.store, profile_id) == [writer_now]

    await h.service.run_due(t1 + timedelta(seconds=3))
    assert await due_rows(session, h.store, profile_id) == []


async def test_an_entry_whose_tick_failed_holds_its_shards_floor(
        stack_settings: Settings, session: Session, queue: str) -> None:
    t2 = datetime(2018, 3, 3, 12, 0, tzinfo=UTC)
    clock = Clock(t2)
    h = Harness(stack_settings, session, queue, clock)
    profile_id = new_profile(h.store)
    shard = h.store.shard(profile_id)
    failed_due = t2 - timedelta(minutes=10)
    await h.store.schedule(profile_id, failed_due, t2 - timedelta(hours=1))

    async def failing(*_: Any, **__: Any) -> list[str]:
        raise RuntimeError("Cassandra is overloaded")

    h.service.commit_stream_batch = failing  # type: ignore[method-assign]
    for minutes in range(3):
        await h.service.run_due(t2 + timedelta(minutes=minutes))
    floors = h.floors()
    assert floors.pop(shard) == failed_due - DEFAULT_SLACK
    assert set(floors.values()) == {t2 + timedelta(minutes=2) - DEFAULT_SLACK}
    assert await due_rows(session, h.store, profile_id) == [failed_due]

    del h.service.commit_stream_batch  # the real one again
    await h.service.run_due(t2 + timedelta(minutes=3))
    assert await due_rows(session, h.store, profile_id) == []
    assert h.floors()[shard] == t2 + timedelta(minutes=3) - DEFAULT_SLACK


async def test_each_page_of_a_run_starts_where_the_last_one_ended(
        stack_settings: Settings, session: Session, queue: str) -> None:
    t3 = datetime(2018, 3, 4, 12, 0, tzinfo=UTC)
    h = Harness(stack_settings, session, queue, Clock(t3))
    await h.service.run_due(t3)
    h.reset()
    shard = 5
    profiles = [new_profile(h.store, shard) for _ in range(7)]
    dues = [t3 + timedelta(minutes=1, seconds=i) for i in range(len(profiles))]
    for profile_id, due in zip(profiles, dues, strict=True):
        await h.store.schedule(profile_id, due, t3)

    await h.service.run_due(t3 + timedelta(minutes=2), limit=3)
    for profile_id in profiles:
        assert await due_rows(session, h.store, profile_id) == []
    # From the floor, then from the last entry of each full page: not through the page's tombstones again.
    assert h.since[shard] == [t3 - DEFAULT_SLACK, dues[2], dues[5]]


async def test_a_new_service_starts_from_the_saved_floors(
        stack_settings: Settings, session: Session, queue: str) -> None:
    t4 = datetime(2018, 3, 5, 12, 0, tzinfo=UTC)
    clock = Clock(t4)
    first = Harness(stack_settings, session, queue, clock)
    await first.service.run_due(t4)
    saved = first.floors()
    assert set(saved.values()) == {t4 - DEFAULT_SLACK}

    below_floor = new_profile(first.store)
    below_at = t4 - timedelta(minutes=5)
    await insert_raw(session, first.store, below_at, below_floor)
    try:
        clock.now = t4 + timedelta(seconds=1)
        restarted = Harness(stack_settings, session, queue, clock)
        assert set(restarted.floors().values()) == {None}
        await restarted.service.run_due(clock.now)  # loads the saved floors before reading
        assert restarted.since == {shard: [t4 - DEFAULT_SLACK] for shard in range(restarted.store.due_shards)}
        assert await tombstones_read(restarted.traced.take()) == 0
        assert await due_rows(session, first.store, below_floor) == [below_at]
    finally:
        await delete_raw(session, first.store, below_at, below_floor)


async def test_a_run_before_the_floor_reads_from_the_start(
        stack_settings: Settings, session: Session, queue: str) -> None:
    """A floor later than the run's clock (a leader whose clock is ahead, or this clock set back) is not
    trusted: entries due by the run's now may lie below it."""
    t5 = datetime(2018, 3, 6, 12, 0, tzinfo=UTC)
    clock = Clock(t5)
    h = Harness(stack_settings, session, queue, clock)
    await h.service.run_due(t5)

    clock.now = t5 - timedelta(hours=1)
    profile_id = new_profile(h.store)
    await h.store.schedule(profile_id, t5 - timedelta(hours=2), clock.now)
    await h.service.run_due(clock.now)
    assert await due_rows(session, h.store, profile_id) == []
    assert set(h.floors().values()) == {t5 - DEFAULT_SLACK}  # a floor never moves back
