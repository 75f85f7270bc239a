"""Cassandra access for the segmenter (tables in loyalist/migrations/0300_segmenter.cql and
0303_segmenter_outbox_by_time.cql).

Two tables are queues whose handled entries are deleted: ``seg_schedule`` (clustered by due time) and
``seg_outbox_by_time`` (clustered by creation time). Their polls read from a floor (:mod:`loyalist.queues`), past
the tombstones of the entries already handled; for that, no writer stores a time before its own clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType, SimpleStatement

from loyalist.cassandra import Row, execute, execute_writes, select_in
from loyalist.queues import FloorStore, not_before
from services.segmenter.domain.rules import EventRecord

SCHEDULE_SHARDS = 16
OUTBOX_SHARD = 0
# Keys per multi-partition IN read.
IN_CHUNK = 100


# A logged batch stays below Cassandra's default batch_size_fail_threshold (50 KiB).
LOGGED_BATCH_MAX_BYTES = 40 * 1024


def _row_size(params: Sequence[Any]) -> int:
    return 16 + sum(len(v) + 4 if isinstance(v, bytes | str) else 12 for v in params)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass
class StoredProfile:
    profile_id: str
    document: dict[str, Any]
    source_partition: int | None
    source_offset: int | None
    won_back_at: datetime | None
    next_evaluation_at: datetime | None
    predictions: dict[str, Any]
    deleted: bool


@dataclass
class Decided:
    """Rows of one customer's decision: ``first`` written before ``rows`` (which go together)."""

    first: list[Row]
    rows: list[Row]
    # The next evaluation as stored (see stored_due): what a later decision passes as the previous one.
    next_evaluation_at: datetime | None


@dataclass
class StoredSegment:
    segment_id: str
    name: str
    description: str
    definition: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime
    backfill_status: str
    backfill_done: int
    backfill_total: int


def stored_due(due: datetime | None, now: datetime) -> datetime | None:
    """The next evaluation time stored for one decided at ``now`` to be due at ``due``, in the schedule entry and
    on the profile row alike (the scheduler tells the current entry from a superseded one by their equality):
    never before the writer's clock, so a poll that already read up to ``now`` cannot miss it."""
    return None if due is None else not_before(due, now)


@dataclass(frozen=True)
class OutboxEntry:
    """A membership change written with its state and not yet known to be acknowledged by Kafka. ``legacy``:
    a row of ``seg_outbox``, the table before ``seg_outbox_by_time``."""

    transition_id: str
    payload: str
    created_at: datetime
    legacy: bool = False


def schedule_shard(profile_id: str) -> int:
    # A stable hash (Python's str hash is salted per process).
    return int.from_bytes(profile_id.encode()[-4:].rjust(4, b"\0"), "big") % SCHEDULE_SHARDS


class SegmenterStore:
    def __init__(self, session: Session) -> None:
        self.s = session
        p = session.prepare
        self._get_profile = p("SELECT * FROM seg_profiles WHERE profile_id = ?")
        self._put_profile = p(
            "UPDATE seg_profiles SET document = ?, source_partition = ?, source_offset = ?, deleted = ?, "
            "updated_at = ?, won_back_at = ? WHERE profile_id = ?")
        self._set_won_back = p("UPDATE seg_profiles SET won_back_at = ? WHERE profile_id = ?")
        self._set_next = p("UPDATE seg_profiles SET next_evaluation_at = ? WHERE profile_id = ?")
        self._set_predictions = p("UPDATE seg_profiles SET predictions = ? WHERE profile_id = ?")
        self._put_event = p("INSERT INTO seg_events (profile_id, ts, message_id, name, properties) VALUES (?,?,?,?,?)"
                            " USING TTL ?")
        self._get_events = p("SELECT ts, message_id, name, properties FROM seg_events WHERE profile_id = ? LIMIT ?")
        self._delete_events = p("DELETE FROM seg_events WHERE profile_id = ?")
        self._put_order = p("INSERT INTO seg_orders (profile_id, ts, message_id, amount, products) VALUES (?,?,?,?,?)")
        self._get_orders = p("SELECT ts, message_id, amount, products FROM seg_orders WHERE profile_id = ?")
        self._add_observation = p("INSERT INTO seg_churn_pending (profile_id, observed_at, features, prediction) "
                                  "VALUES (?, ?, ?, ?)")
        self._get_observations = p("SELECT * FROM seg_churn_pending WHERE profile_id = ?")
        self._get_memberships = p("SELECT segment_id, member, seq FROM seg_memberships WHERE profile_id = ?")
        self._put_membership = p(
            "INSERT INTO seg_memberships (profile_id, segment_id, member, changed_at, seq) VALUES (?,?,?,?,?)")
        self._put_member = p("INSERT INTO seg_members (segment_id, profile_id, since) VALUES (?,?,?)")
        self._del_member = p("DELETE FROM seg_members WHERE segment_id = ? AND profile_id = ?")
        self._put_outbox = p("INSERT INTO seg_outbox_by_time (shard, created_at, transition_id, payload) "
                             "VALUES (?,?,?,?)")
        self._del_outbox = p("DELETE FROM seg_outbox_by_time WHERE shard = ? AND created_at = ? AND transition_id = ?")
        outbox_read = "SELECT created_at, transition_id, payload FROM seg_outbox_by_time WHERE shard = ?"
        # By (from a floor, up to a cutoff): a read without a floor is from the partition's start.
        self._get_outbox = {
            (False, False): p(outbox_read),
            (True, False): p(outbox_read + " AND created_at >= ?"),
            (False, True): p(outbox_read + " AND created_at < ?"),
            (True, True): p(outbox_read + " AND created_at >= ? AND created_at < ?"),
        }
        # seg_outbox (by transition id), written before seg_outbox_by_time existed: only drained at start.
        self._get_legacy_outbox = p("SELECT transition_id, payload, created_at FROM seg_outbox WHERE shard = ?")
        self._del_legacy_outbox = p("DELETE FROM seg_outbox WHERE shard = ? AND transition_id = ?")
        self._put_schedule = p("INSERT INTO seg_schedule (shard, due_at, profile_id) VALUES (?,?,?)")
        self._del_schedule = p("DELETE FROM seg_schedule WHERE shard = ? AND due_at = ? AND profile_id = ?")
        self._due = p("SELECT due_at, profile_id FROM seg_schedule WHERE shard = ? AND due_at <= ? LIMIT ?")
        self._due_since = p("SELECT due_at, profile_id FROM seg_schedule WHERE shard = ? AND due_at >= ? "
                            "AND due_at <= ? LIMIT ?")
        # Where the polls of the two queues start reading, kept across restarts.
        self.schedule_floors = FloorStore(session, "seg_schedule")
        self.outbox_floors = FloorStore(session, "seg_outbox")
        self._get_segment = p("SELECT * FROM seg_segments WHERE segment_id = ?")
        self._members_page = p("SELECT profile_id, since FROM seg_members WHERE segment_id = ? AND profile_id > ? "
                               "LIMIT ?")
        self._count_members = p("SELECT count(*) AS n FROM seg_members WHERE segment_id = ?")
        self._backfill = p("UPDATE seg_segments SET backfill_status = ?, backfill_done = ?, backfill_total = ?, "
                           "backfill_finished_at = ? WHERE segment_id = ?")
        self._put_model = p("INSERT INTO seg_models (name, version, created_at, data, meta) VALUES (?,?,?,?,?)")
        self._latest_model = p("SELECT version, created_at, data, meta FROM seg_models WHERE name = ? LIMIT 1")
        # Batched stream path: many customers per request.
        self._get_profiles = p("SELECT * FROM seg_profiles WHERE profile_id IN ?")
        self._get_memberships_many = p(
            "SELECT profile_id, segment_id, member, seq FROM seg_memberships WHERE profile_id IN ?")
        self._get_observations_many = p("SELECT * FROM seg_churn_pending WHERE profile_id IN ?")
        self._put_decided = p(
            "UPDATE seg_profiles SET document = ?, source_partition = ?, source_offset = ?, deleted = false, "
            "updated_at = ?, won_back_at = ?, next_evaluation_at = ? WHERE profile_id = ?")
        self._put_document = p("UPDATE seg_profiles SET document = ?, updated_at = ?, won_back_at = ? "
                               "WHERE profile_id = ?")
        self._put_position = p("UPDATE seg_profiles SET source_partition = ?, source_offset = ?, deleted = false, "
                               "next_evaluation_at = ? WHERE profile_id = ?")

    # ---- profiles --------------------------------------------------------------------------------
    async def profile(self, profile_id: str) -> StoredProfile | None:
        rows = await execute(self.s, self._get_profile, (profile_id,))
        return self._profile_row(rows[0]) if rows else None

    async def _in_chunks(self, statement: Any, keys: Sequence[str]) -> list[dict[str, Any]]:
        return await select_in(self.s, statement, keys, chunk=IN_CHUNK)

    async def profiles(self, profile_ids: Sequence[str]) -> dict[str, StoredProfile]:
        """The stored rows of many customers (absent ones are missing from the answer)."""
        return {r["profile_id"]: self._profile_row(r) for r in await self._in_chunks(self._get_profiles, profile_ids)}

    async def memberships_many(self, profile_ids: Sequence[str]) -> dict[str, dict[str, tuple[bool, int]]]:
        out: dict[str, dict[str, tuple[bool, int]]] = {pid: {} for pid in profile_ids}
        for r in await self._in_chunks(self._get_memberships_many, profile_ids):
            out[r["profile_id"]][r["segment_id"]] = (bool(r["member"]), int(r["seq"] or 0))
        return out

    async def observations_many(self, profile_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {pid: [] for pid in profile_ids}
        for r in await self._in_chunks(self._get_observations_many, profile_ids):
            out[r["profile_id"]].append(self._observation_row(r))
        return out

    def decided_rows(self, profile_id: str, document: dict[str, Any], partition: int, offset: int,
                     won_back_at: datetime | None, next_evaluation_at: datetime | None,
                     previous_next: datetime | None,
                     changes: Sequence[tuple[str, bool, int, str, str]], at: datetime) -> Decided:
        """One customer's decided state as rows to write together (atomically when there is more than one):
        the profile row with its Kafka position and next evaluation, the new schedule entry, and the
        membership rows plus outbox rows of ``changes`` (as :meth:`record_transitions`). ``at`` is the
        writer's clock: the outbox rows' creation time, and the earliest next evaluation stored."""
        next_evaluation_at = stored_due(next_evaluation_at, at)
        rows: list[Row] = []
        for segment_id, member, seq, transition_id, payload in changes:
            rows.append((self._put_membership, (profile_id, segment_id, member, at, seq)))
            if member:
                rows.append((self._put_member, (segment_id, profile_id, at)))
            else:
                rows.append((self._del_member, (segment_id, profile_id)))
            rows.append((self._put_outbox, (OUTBOX_SHARD, at, transition_id, payload)))
        if next_evaluation_at is not None and next_evaluation_at != previous_next:
            rows.append((self._put_schedule, (schedule_shard(profile_id), next_evaluation_at, profile_id)))
        text = orjson.dumps(document).decode()
        size = sum(_row_size(params) for _, params in rows) + len(text)
        if rows and size > LOGGED_BATCH_MAX_BYTES // 2:
            # A large document is written first, on its own (a logged batch has a size limit); the position
            # that marks the input as done is written with the rest. A crash in between only means the input
            # is decided again, against the state that is unchanged.
            rows.append((self._put_position, (partition, offset, next_evaluation_at, profile_id)))
            return Decided([(self._put_document, (text, at, won_back_at, profile_id))], rows, next_evaluation_at)
        rows.append((self._put_decided, (text, partition, offset, at, won_back_at, next_evaluation_at, profile_id)))
        return Decided([], rows, next_evaluation_at)

    async def write_decided(self, decided: Sequence[Decided]) -> None:
        """Write customers' decided state: each customer's rows in one batch (logged when several, so state,
        position, schedule and outbox land together or not at all); customers with a single row share
        unlogged batches. Every row is an idempotent upsert; all requests are sent at once."""
        first = [row for d in decided for row in d.first]
        if first:
            await execute_writes(self.s, first)
        singles: list[Row] = []
        logged: list[BatchStatement] = []
        for d in decided:
            if len(d.rows) == 1:
                singles.append(d.rows[0])
                continue
            # One logged batch per customer, all at once: measured several times faster than logged batches
            # holding several customers.
            batch = BatchStatement(batch_type=BatchType.LOGGED)
            for statement, params in d.rows:
                batch.add(statement, params)
            logged.append(batch)
        await asyncio.gather(execute_writes(self.s, singles), *(execute(self.s, b) for b in logged))

    def unschedule_row(self, profile_id: str, due: datetime) -> Row:
        return (self._del_schedule, (schedule_shard(profile_id), due, profile_id))

    def outbox_done_row(self, transition_id: str, created_at: datetime) -> Row:
        """The delete of an acknowledged outbox row (``created_at``: the ``at`` it was written with)."""
        return (self._del_outbox, (OUTBOX_SHARD, created_at, transition_id))

    def observation_row(self, profile_id: str, observed_at: datetime, features: dict[str, float],
                        prediction: float) -> Row:
        return (self._add_observation, (profile_id, observed_at, orjson.dumps(features).decode(), prediction))

    def predictions_row(self, profile_id: str, predictions: dict[str, Any]) -> Row:
        return (self._set_predictions, (orjson.dumps(predictions).decode(), profile_id))

    async def write(self, rows: Sequence[Row]) -> None:
        """Idempotent rows in few unlogged batches."""
        await execute_writes(self.s, rows)

    @staticmethod
    def _profile_row(r: dict[str, Any]) -> StoredProfile:
        return StoredProfile(
            r["profile_id"], orjson.loads(r["document"]) if r["document"] else {},
            r["source_partition"], r["source_offset"], _utc(r["won_back_at"]), _utc(r["next_evaluation_at"]),
            orjson.loads(r["predictions"]) if r["predictions"] else {}, bool(r["deleted"]),
        )

    async def put_profile(self, profile_id: str, document: dict[str, Any], partition: int | None,
                          offset: int | None, *, deleted: bool = False, won_back_at: datetime | None = None) -> None:
        await execute(self.s, self._put_profile, (
            orjson.dumps(document).decode(), partition, offset, deleted, datetime.now(UTC), won_back_at, profile_id))

    async def set_won_back(self, profile_id: str, when: datetime | None) -> None:
        await execute(self.s, self._set_won_back, (when, profile_id))

    async def set_predictions(self, profile_id: str, predictions: dict[str, Any]) -> None:
        await execute(self.s, self._set_predictions, (orjson.dumps(predictions).decode(), profile_id))

    async def all_profiles(self, page_size: int = 500) -> AsyncIterator[StoredProfile]:
        """Every stored profile, paged (a full scan: backfills, RFM rebuild at start, model refits)."""
        statement = SimpleStatement("SELECT * FROM seg_profiles", fetch_size=page_size)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, lambda: self.s.execute(statement))
        while True:
            rows = list(result.current_rows)
            for row in rows:
                if row["document"] is not None and not row["deleted"]:
                    yield self._profile_row(row)
            if not result.has_more_pages:
                return
            await loop.run_in_executor(None, result.fetch_next_page)

    # ---- events and orders -----------------------------------------------------------------------
    async def add_event(self, profile_id: str, event: EventRecord, ttl_s: int) -> None:
        await execute(self.s, self._put_event, (
            profile_id, event.timestamp, event.message_id, event.name,
            orjson.dumps(event.properties).decode(), ttl_s))

    async def add_many(self, events: Sequence[tuple[str, EventRecord]], ttl_s: int,
                       orders: Sequence[tuple[str, datetime, str, float, Sequence[str]]]) -> None:
        """The events (and orders) of a whole input batch in few requests: idempotent upserts."""
        rows: list[Row] = [
            (self._put_event, (pid, e.timestamp, e.message_id, e.name, orjson.dumps(e.properties).decode(), ttl_s))
            for pid, e in events]
        rows += [(self._put_order, (pid, ts, mid, amount, list(products))) for pid, ts, mid, amount, products in orders]
        await execute_writes(self.s, rows)

    async def events(self, profile_id: str, limit: int = 5000) -> list[EventRecord]:
        rows = await execute(self.s, self._get_events, (profile_id, limit))
        return [EventRecord(r["name"], _utc(r["ts"]) or datetime.now(UTC),
                            orjson.loads(r["properties"]) if r["properties"] else {}, r["message_id"]) for r in rows]

    async def delete_events(self, profile_id: str) -> None:
        await execute(self.s, self._delete_events, (profile_id,))

    async def add_order(self, profile_id: str, ts: datetime, message_id: str, amount: float,
                        products: Sequence[str]) -> None:
        await execute(self.s, self._put_order, (profile_id, ts, message_id, amount, list(products)))

    async def all_orders(self) -> AsyncIterator[dict[str, Any]]:
        """Every stored order, one paged scan (backtests and refits)."""
        statement = SimpleStatement("SELECT profile_id, ts, message_id, amount, products FROM seg_orders",
                                    fetch_size=5000)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, lambda: self.s.execute(statement))
        while True:
            for row in list(result.current_rows):
                row["ts"] = _utc(row["ts"])
                yield row
            if not result.has_more_pages:
                return
            await loop.run_in_executor(None, result.fetch_next_page)

    async def delete_orders(self, profile_id: str) -> None:
        await execute(self.s, "DELETE FROM seg_orders WHERE profile_id = %s", (profile_id,))

    async def orders(self, profile_id: str) -> list[dict[str, Any]]:
        rows = await execute(self.s, self._get_orders, (profile_id,))
        for r in rows:
            r["ts"] = _utc(r["ts"])
        return rows

    # ---- memberships and the outbox --------------------------------------------------------------
    async def memberships(self, profile_id: str) -> dict[str, tuple[bool, int]]:
        rows = await execute(self.s, self._get_memberships, (profile_id,))
        return {r["segment_id"]: (bool(r["member"]), int(r["seq"] or 0)) for r in rows}

    async def record_transitions(self, profile_id: str, changes: Sequence[tuple[str, bool, int, str, str]],
                                 at: datetime) -> None:
        """Atomically (logged batch): the new membership state and the outbox rows of its messages, created
        ``at`` (the writer's clock). ``changes`` items: (segment_id, member, seq, transition_id, payload)."""
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        for segment_id, member, seq, transition_id, payload in changes:
            batch.add(self._put_membership, (profile_id, segment_id, member, at, seq))
            if member:
                batch.add(self._put_member, (segment_id, profile_id, at))
            else:
                batch.add(self._del_member, (segment_id, profile_id))
            batch.add(self._put_outbox, (OUTBOX_SHARD, at, transition_id, payload))
        await execute(self.s, batch)

    async def outbox(self, *, since: datetime | None = None, before: datetime | None = None) -> list[OutboxEntry]:
        """Outbox rows created at or after ``since`` (None: from the partition's start) and before ``before``
        (None: all), oldest first."""
        params: list[Any] = [OUTBOX_SHARD]
        params += [bound for bound in (since, before) if bound is not None]
        rows = await execute(self.s, self._get_outbox[since is not None, before is not None], params)
        return [OutboxEntry(r["transition_id"], r["payload"], _utc(r["created_at"]) or _EPOCH) for r in rows]

    async def legacy_outbox(self) -> list[OutboxEntry]:
        """Rows left in ``seg_outbox`` by a version before ``seg_outbox_by_time``."""
        rows = await execute(self.s, self._get_legacy_outbox, (OUTBOX_SHARD,))
        # A row without a creation time is taken as the oldest possible (its recovery looks at all of Kafka).
        return [OutboxEntry(r["transition_id"], r["payload"], _utc(r["created_at"]) or _EPOCH, legacy=True)
                for r in rows]

    async def outbox_done(self, entry: OutboxEntry) -> None:
        if entry.legacy:
            await execute(self.s, self._del_legacy_outbox, (OUTBOX_SHARD, entry.transition_id))
        else:
            await execute(self.s, self._del_outbox, (OUTBOX_SHARD, entry.created_at, entry.transition_id))

    async def outbox_done_many(self, transition_ids: Sequence[str], created_at: datetime) -> None:
        """Delete acknowledged outbox rows written together, ``created_at``."""
        await execute_writes(self.s, [self.outbox_done_row(t, created_at) for t in transition_ids])

    async def members(self, segment_id: str, after: str, limit: int) -> list[dict[str, Any]]:
        return await execute(self.s, self._members_page, (segment_id, after, limit))

    async def member_count(self, segment_id: str) -> int:
        rows = await execute(self.s, self._count_members, (segment_id,))
        return int(rows[0]["n"]) if rows else 0

    # ---- the durable scheduler -------------------------------------------------------------------
    async def reschedule(self, profile_id: str, previous: datetime | None, due: datetime | None) -> None:
        """Move a customer's schedule entry from ``previous`` (as stored) to ``due`` (as decided; stored as
        :func:`stored_due` by this writer's clock)."""
        due = stored_due(due, datetime.now(UTC))
        if previous == due:
            return
        shard = schedule_shard(profile_id)
        if due is not None:
            await execute(self.s, self._put_schedule, (shard, due, profile_id))
        await execute(self.s, self._set_next, (due, profile_id))
        if previous is not None:
            await execute(self.s, self._del_schedule, (shard, previous, profile_id))

    async def due(self, shard: int, now: datetime, limit: int, *, since: datetime | None = None
                  ) -> list[tuple[datetime, str]]:
        """Up to ``limit`` entries of ``shard`` due at ``now`` or before, from ``since`` (the shard's read floor;
        None: from the partition's start, through the tombstones of every entry handled since the last
        compaction purged them), earliest first."""
        if since is None:
            rows = await execute(self.s, self._due, (shard, now, limit))
        else:
            rows = await execute(self.s, self._due_since, (shard, since, now, limit))
        return [(_utc(r["due_at"]) or now, r["profile_id"]) for r in rows]

    async def unschedule(self, profile_id: str, due: datetime) -> None:
        await execute(self.s, self._del_schedule, (schedule_shard(profile_id), due, profile_id))

    # ---- segments --------------------------------------------------------------------------------
    async def segments(self) -> list[StoredSegment]:
        rows = await execute(self.s, "SELECT * FROM seg_segments")
        return [self._segment_row(r) for r in rows if r["definition"]]

    async def segment(self, segment_id: str) -> StoredSegment | None:
        rows = await execute(self.s, self._get_segment, (segment_id,))
        return self._segment_row(rows[0]) if rows and rows[0]["definition"] else None

    @staticmethod
    def _segment_row(r: dict[str, Any]) -> StoredSegment:
        return StoredSegment(
            r["segment_id"], r["name"], r["description"] or "", orjson.loads(r["definition"]), int(r["version"] or 1),
            _utc(r["created_at"]) or datetime.now(UTC), _utc(r["updated_at"]) or datetime.now(UTC),
            r["backfill_status"] or "pending", int(r["backfill_done"] or 0), int(r["backfill_total"] or 0),
        )

    async def put_segment(self, seg: StoredSegment) -> None:
        await execute(self.s, (
            "INSERT INTO seg_segments (segment_id, name, description, definition, version, created_at, updated_at, "
            "backfill_status, backfill_done, backfill_total, backfill_started_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,"
            "%s,%s)"), (
            seg.segment_id, seg.name, seg.description, orjson.dumps(seg.definition).decode(), seg.version,
            seg.created_at, seg.updated_at, seg.backfill_status, seg.backfill_done, seg.backfill_total,
            datetime.now(UTC)))

    async def delete_segment(self, segment_id: str) -> None:
        await execute(self.s, "DELETE FROM seg_segments WHERE segment_id = %s", (segment_id,))

    async def backfill_progress(self, segment_id: str, status: str, done: int, total: int) -> None:
        finished = datetime.now(UTC) if status == "done" else None
        await execute(self.s, self._backfill, (status, done, total, finished, segment_id))

    # ---- model checkpoints -----------------------------------------------------------------------
    async def save_model(self, name: str, version: int, data: bytes, meta: dict[str, Any]) -> None:
        await execute(self.s, self._put_model, (name, version, datetime.now(UTC), data,
                                                orjson.dumps(meta).decode()))

    async def latest_model(self, name: str) -> tuple[int, bytes, dict[str, Any]] | None:
        rows = await execute(self.s, self._latest_model, (name,))
        if not rows:
            return None
        return int(rows[0]["version"]), bytes(rows[0]["data"]), orjson.loads(rows[0]["meta"] or "{}")

    # ---- churn observations awaiting labels ------------------------------------------------------
    async def add_observation(self, profile_id: str, observed_at: datetime, features: dict[str, float],
                              prediction: float) -> None:
        # Prepared: this runs for every profile update (an unprepared statement is parsed by the server and
        # encoded by the driver every time).
        await execute(self.s, self._add_observation,
                      (profile_id, observed_at, orjson.dumps(features).decode(), prediction))

    async def observations(self, profile_id: str) -> list[dict[str, Any]]:
        rows = await execute(self.s, self._get_observations, (profile_id,))
        return [self._observation_row(r) for r in rows]

    @staticmethod
    def _observation_row(r: dict[str, Any]) -> dict[str, Any]:
        return {"profile_id": r["profile_id"], "observed_at": _utc(r["observed_at"]),
                "features": orjson.loads(r["features"]), "prediction": float(r["prediction"])}

    async def all_observations(self) -> AsyncIterator[dict[str, Any]]:
        statement = SimpleStatement("SELECT * FROM seg_churn_pending", fetch_size=1000)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, lambda: self.s.execute(statement))
        while True:
            for row in list(result.current_rows):
                yield self._observation_row(row)
            if not result.has_more_pages:
                return
            await loop.run_in_executor(None, result.fetch_next_page)

    async def delete_observation(self, profile_id: str, observed_at: datetime) -> None:
        await execute(self.s, "DELETE FROM seg_churn_pending WHERE profile_id = %s AND observed_at = %s",
                      (profile_id, observed_at))
