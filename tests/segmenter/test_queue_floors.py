"""The segmenter's two queues (``seg_schedule``, the outbox) read from per-shard floors past the entries already
handled and deleted, on the real Cassandra and Kafka: a read from the partition's start scans every handled
entry's tombstone, until Cassandra fails it (``tombstone_failure_threshold``) and the queue stops.

The engines here run on a keyspace of this module's own (the scheduler and outbox sweep of a segmenter started
by another test would otherwise take their entries) and send to the session's ``segment.membership``."""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from cassandra.cluster import Session

import services.segmenter.store as store_module
from loyalist.cassandra import connect, drop_keyspace, execute, migrate
from loyalist.kafka import make_producer
from loyalist.queues import DEFAULT_SLACK
from loyalist.settings import Settings
from services.segmenter.config import SegmenterConfig
from services.segmenter.engine import OUTBOX_STUCK_S, SegmenterEngine
from services.segmenter.store import SCHEDULE_SHARDS, SegmenterStore, schedule_shard
from tests.cassandra_traces import traced_tombstones
from tests.segmenter.test_service import iso, membership_messages

pytestmark = pytest.mark.integration

STUCK = timedelta(seconds=OUTBOX_STUCK_S)


@pytest.fixture(scope="module")
def queue_session(stack_settings: Settings) -> Iterator[Session]:
    """A session on a fresh keyspace with every migration applied, dropped afterwards."""
    own = stack_settings.model_copy(update={"namespace": f"{stack_settings.namespace}_q{secrets.token_hex(2)}"})
    migrate(own)
    cluster, session = connect(own, keyspace=own.keyspace)
    try:
        yield session
    finally:
        cluster.shutdown()
        drop_keyspace(own)


@pytest.fixture
def session(queue_session: Session) -> Session:
    for table in ("seg_schedule", "seg_profiles", "seg_outbox", "seg_outbox_by_time", "queue_floors"):
        queue_session.execute(f"TRUNCATE {table}")
    return queue_session


@pytest.fixture
async def producer(stack_settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = make_producer(stack_settings, client_id="segmenter-floors-test")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


def new_engine(settings: Settings, session: Session, producer: AIOKafkaProducer, **config: Any) -> SegmenterEngine:
    """A fresh engine and store, as after a restart: nothing in memory."""
    return SegmenterEngine(settings, SegmenterConfig(**config), SegmenterStore(session), producer)


@dataclass
class Read:
    statement: Any
    params: tuple[Any, ...]

    @property
    def query(self) -> str:
        return str(self.statement.query_string)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Read]:
    """Every read of the two queue tables the segmenter's store sends, as sent."""
    seen: list[Read] = []

    async def recording(session: Session, statement: Any, params: Any = None) -> list[Any]:
        query = getattr(statement, "query_string", "")
        if query.startswith("SELECT") and re.search(r"FROM (seg_schedule|seg_outbox_by_time) ", query):
            seen.append(Read(statement, tuple(params or ())))
        return await execute(session, statement, params)

    monkeypatch.setattr(store_module, "execute", recording)
    return seen


def tombstones_scanned(session: Session, read: Read) -> int:
    """The tombstone cells Cassandra scans to answer ``read`` again (from the query's trace)."""
    return traced_tombstones(session, read.statement, read.params)


def schedule_reads(reads: Sequence[Read], shard: int) -> list[Read]:
    return [r for r in reads if "FROM seg_schedule" in r.query and r.params[0] == shard]


def ids_in_shard(shard: int, count: int, prefix: str) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        candidate = f"{prefix}-{uuid.uuid4().hex[:10]}"
        if schedule_shard(candidate) == shard:
            ids.append(candidate)
    return ids


def schedule_rows(session: Session, profile_id: str) -> list[datetime]:
    rows = session.execute("SELECT due_at FROM seg_schedule WHERE shard = %s AND profile_id = %s ALLOW FILTERING",
                           (schedule_shard(profile_id), profile_id))
    return [r["due_at"].replace(tzinfo=UTC) for r in rows]


def put_entry(session: Session, profile_id: str, due: datetime) -> None:
    """A schedule entry written directly: one a writer left behind (superseded), or one from before the floors."""
    session.execute("INSERT INTO seg_schedule (shard, due_at, profile_id) VALUES (%s, %s, %s)",
                    (schedule_shard(profile_id), due, profile_id))


def ms(when: datetime) -> datetime:
    """``when`` as Cassandra stores it (milliseconds)."""
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


# ---- seg_schedule --------------------------------------------------------------------------------


async def test_the_schedule_poll_reads_from_its_floor_and_finds_entries_written_after_it(
        stack_settings: Settings, session: Session, producer: AIOKafkaProducer, reads: list[Read]) -> None:
    engine = new_engine(stack_settings, session, producer)
    store = engine.store
    shard = 5
    first_poll = datetime.now(UTC)
    # Entries handled long ago would be purged tombstones; these are handled (superseded: no profile) by the poll.
    handled = ids_in_shard(shard, 40, "gone")
    for i, pid in enumerate(handled):
        put_entry(session, pid, first_poll - timedelta(minutes=10) + timedelta(seconds=i))

    assert await engine.run_due(first_poll) == 0
    assert all(schedule_rows(session, pid) == [] for pid in handled)
    [poll] = schedule_reads(reads, shard)
    assert len(poll.params) == 3  # no floor yet: from the partition's start...
    assert tombstones_scanned(session, poll) >= len(handled)  # ...through the deletes of that poll
    assert engine.schedule_floors.floor(shard) == first_poll - DEFAULT_SLACK

    # Written after the poll, due before it: each writer stores its own clock at the earliest, on the profile
    # too, so the entry is found above the floor and is the current one.
    overdue, batched, superseded = (ids_in_shard(shard, 1, name)[0] for name in ("overdue", "batched", "stale"))
    await store.put_profile(overdue, {}, None, None)
    await store.reschedule(overdue, None, first_poll - timedelta(hours=1))
    profile = await store.profile(overdue)
    assert profile is not None and profile.next_evaluation_at is not None
    assert profile.next_evaluation_at >= ms(first_poll)
    assert schedule_rows(session, overdue) == [profile.next_evaluation_at]

    written_at = datetime.now(UTC)
    decided = store.decided_rows(batched, {}, 0, 1, None, first_poll - timedelta(hours=1), None, [], written_at)
    assert decided.next_evaluation_at == written_at
    await store.write_decided([decided])
    profile = await store.profile(batched)
    assert profile is not None and profile.next_evaluation_at == ms(written_at)
    assert schedule_rows(session, batched) == [ms(written_at)]

    # An entry whose profile moved on meanwhile is dropped, not evaluated.
    later = ms(datetime.now(UTC) + timedelta(days=3))
    await store.put_profile(superseded, {}, None, None)
    await store.reschedule(superseded, None, later)
    put_entry(session, superseded, datetime.now(UTC))

    second_poll = datetime.now(UTC)
    assert await engine.run_due(second_poll) == 2  # overdue and batched evaluated (no segment: nothing next)
    assert schedule_rows(session, overdue) == [] and schedule_rows(session, batched) == []
    for pid in (overdue, batched):
        profile = await store.profile(pid)
        assert profile is not None and profile.next_evaluation_at is None
    assert schedule_rows(session, superseded) == [later]
    profile = await store.profile(superseded)
    assert profile is not None and profile.next_evaluation_at == later

    [_, poll] = schedule_reads(reads, shard)
    assert poll.params[1] == first_poll - DEFAULT_SLACK  # from the floor...
    assert tombstones_scanned(session, poll) <= 3  # ...past the first poll's deletes (only this poll's)
    assert engine.schedule_floors.floor(shard) == second_poll - DEFAULT_SLACK


async def test_entries_left_in_place_hold_the_floor_below_them(
        stack_settings: Settings, session: Session, producer: AIOKafkaProducer, reads: list[Read],
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = new_engine(stack_settings, session, producer, scheduler_batch=5)
    shard = 9
    now = datetime.now(UTC)
    dues = [ms(now - timedelta(minutes=10) + timedelta(seconds=i)) for i in range(8)]
    pids = ids_in_shard(shard, 8, "left")
    for pid, due in zip(pids, dues, strict=True):
        put_entry(session, pid, due)
    failing = pids[2]
    profile = engine.store.profile

    async def unavailable_for_one(profile_id: str) -> Any:
        if profile_id == failing:
            raise RuntimeError("read timed out")
        return await profile(profile_id)

    monkeypatch.setattr(engine.store, "profile", unavailable_for_one)
    await engine.run_due(now)
    # The read's limit was reached and one entry failed: the floor stays below the failed one.
    assert engine.schedule_floors.floor(shard) == dues[2] - DEFAULT_SLACK
    assert [pid for pid in pids if schedule_rows(session, pid)] == [failing, *pids[5:]]

    monkeypatch.setattr(engine.store, "profile", profile)
    await engine.run_due(now + timedelta(seconds=1))
    assert schedule_reads(reads, shard)[-1].params[1] == dues[2] - DEFAULT_SLACK
    assert [pid for pid in pids if schedule_rows(session, pid)] == []
    assert engine.schedule_floors.floor(shard) == now + timedelta(seconds=1) - DEFAULT_SLACK


async def test_a_restarted_engine_starts_reading_from_the_saved_floors(
        stack_settings: Settings, session: Session, producer: AIOKafkaProducer, reads: list[Read]) -> None:
    before = new_engine(stack_settings, session, producer)
    polled_at = datetime.now(UTC)
    await before.run_due(polled_at)
    await before.recover_outbox(older_than=STUCK)
    saved = {(r["queue"], r["shard"]): r["floor"].replace(tzinfo=UTC)
             for r in session.execute("SELECT queue, shard, floor FROM queue_floors")}
    outbox_floor = before.outbox_floors.floor(0)
    assert outbox_floor is not None and outbox_floor <= polled_at - STUCK - DEFAULT_SLACK + timedelta(seconds=5)
    assert saved == {**{("seg_schedule", shard): ms(polled_at - DEFAULT_SLACK) for shard in range(SCHEDULE_SHARDS)},
                     ("seg_outbox", 0): ms(outbox_floor)}

    reads.clear()
    after = new_engine(stack_settings, session, producer, scheduler_poll_s=3600)
    await after.start()  # recovers the outbox and polls the schedule once before waiting
    try:
        for _ in range(100):  # the scheduler's first pass runs in a task of its own
            if len([r for r in reads if "FROM seg_schedule" in r.query]) >= SCHEDULE_SHARDS:
                break
            await asyncio.sleep(0.1)
    finally:
        await after.stop()
    [outbox_read, *_] = [r for r in reads if "FROM seg_outbox_by_time" in r.query]
    assert outbox_read.params[1] == saved["seg_outbox", 0]
    for shard in range(SCHEDULE_SHARDS):
        assert schedule_reads(reads, shard)[0].params[1] == saved["seg_schedule", shard]


# ---- the outbox --------------------------------------------------------------------------------


def change(segment_id: str, profile_id: str, seq: int, at: datetime) -> tuple[str, bool, int, str, str]:
    """A membership change as the store takes it: (segment id, member, seq, transition id, payload)."""
    transition_id = f"{segment_id}:{profile_id}:{seq}"
    payload = {"profileId": profile_id, "segmentId": segment_id, "segmentName": "floors test", "change": "entered",
               "reason": "test", "at": iso(at), "transitionId": transition_id}
    return segment_id, True, seq, transition_id, orjson.dumps(payload).decode()


def profile_of(c: tuple[str, bool, int, str, str]) -> str:
    return c[3].split(":")[1]


async def sent_counts(settings: Settings, transition_ids: Sequence[str]) -> dict[str, int]:
    messages = await membership_messages(settings)
    return {tid: sum(1 for m in messages if m["transitionId"] == tid) for tid in transition_ids}


async def test_the_outbox_sweep_resends_a_stuck_row_once_and_reads_past_the_acknowledged_ones(
        stack_settings: Settings, session: Session, producer: AIOKafkaProducer, reads: list[Read]) -> None:
    engine = new_engine(stack_settings, session, producer)
    store = engine.store
    segment = f"floors-{uuid.uuid4().hex[:8]}"
    long_ago = datetime.now(UTC) - timedelta(minutes=10)
    # Changes sent and acknowledged minutes ago: their rows deleted after the ack, by the time they were written.
    acked = [change(segment, f"acked-{i}-{uuid.uuid4().hex[:6]}", 1, long_ago) for i in range(30)]
    for c in acked:
        await store.record_transitions(profile_of(c), [c], long_ago)
        await producer.send_and_wait(engine.membership_topic, c[4].encode(), key=profile_of(c).encode())
    await store.outbox_done_many([c[3] for c in acked], long_ago)
    # One whose produce failed (its row stayed), and one in flight right now.
    stuck = change(segment, f"stuck-{uuid.uuid4().hex[:6]}", 1, long_ago + timedelta(seconds=31))
    await store.record_transitions(profile_of(stuck), [stuck], long_ago + timedelta(seconds=31))
    now = datetime.now(UTC)
    in_flight = change(segment, f"flight-{uuid.uuid4().hex[:6]}", 1, now)
    await store.record_transitions(profile_of(in_flight), [in_flight], now)
    assert [e.transition_id for e in await store.outbox()] == [stuck[3], in_flight[3]]

    reads.clear()
    assert await engine.recover_outbox(older_than=STUCK) == 1
    [sweep] = reads
    assert [e.transition_id for e in await store.outbox()] == [in_flight[3]]
    assert len(sweep.params) == 2  # no floor yet: from the partition's start, through the acknowledged rows
    assert tombstones_scanned(session, sweep) >= len(acked)

    floor = engine.outbox_floors.floor(0)
    reads.clear()
    assert await engine.recover_outbox(older_than=STUCK) == 0
    [sweep] = reads
    assert len(sweep.params) == 3 and sweep.params[1] == floor  # from the floor the first sweep left
    assert sweep.params[1] > long_ago + timedelta(seconds=31)
    assert tombstones_scanned(session, sweep) == 0
    assert [e.transition_id for e in await store.outbox()] == [in_flight[3]]
    counts = await sent_counts(stack_settings, [stuck[3], in_flight[3], *(c[3] for c in acked)])
    assert counts == {stuck[3]: 1, in_flight[3]: 0, **{c[3]: 1 for c in acked}}


async def test_the_acknowledged_changes_of_a_decision_leave_no_outbox_row(
        stack_settings: Settings, session: Session, producer: AIOKafkaProducer) -> None:
    """The deletes after the ack find the rows by their creation time (the ``at`` they were written with)."""
    from services.segmenter.domain.membership import Transition

    engine = new_engine(stack_settings, session, producer)
    pid = f"decided-{uuid.uuid4().hex[:8]}"
    segment = f"floors-{uuid.uuid4().hex[:8]}"
    await engine._apply(pid, [Transition(segment, "floors test", "entered", "test"),
                              Transition(f"{segment}-b", "floors test b", "entered", "test")], {}, None)
    assert await engine.store.outbox() == []
    assert await sent_counts(stack_settings, [f"{segment}:{pid}:1", f"{segment}-b:{pid}:1"]) == {
        f"{segment}:{pid}:1": 1, f"{segment}-b:{pid}:1": 1}


async def test_rows_left_in_the_old_outbox_table_are_recovered_at_start(
        stack_settings: Settings, session: Session, producer: AIOKafkaProducer) -> None:
    engine = new_engine(stack_settings, session, producer)
    segment = f"legacy-{uuid.uuid4().hex[:8]}"
    written_at = datetime.now(UTC) - timedelta(seconds=5)
    delivered, missing = (change(segment, f"{name}-{uuid.uuid4().hex[:6]}", 1, written_at)
                          for name in ("delivered", "missing"))
    await producer.send_and_wait(engine.membership_topic, delivered[4].encode(), key=profile_of(delivered).encode())
    insert = "INSERT INTO seg_outbox (shard, transition_id, payload, created_at) VALUES (0, %s, %s, %s)"
    for c in (delivered, missing):
        session.execute(insert, (c[3], c[4], written_at))
    # And one of the new table, left by a crash of this version.
    crashed = change(segment, f"crashed-{uuid.uuid4().hex[:6]}", 1, written_at)
    await engine.store.record_transitions(profile_of(crashed), [crashed], written_at)

    assert await engine.recover_outbox() == 2
    assert list(session.execute("SELECT transition_id FROM seg_outbox WHERE shard = 0")) == []
    assert await engine.store.outbox() == []
    assert await sent_counts(stack_settings, [delivered[3], missing[3], crashed[3]]) == {
        delivered[3]: 1, missing[3]: 1, crashed[3]: 1}
