"""Cassandra storage of the loyalty ledger, the schedule index, program versions and reward codes.

Concurrency control: each customer's partition of ``loyalty_ledger`` has a static ``version``. A change
is one conditional batch (the new lines + the new snapshot ``IF version = <the version read>``), applied
atomically by Paxos on that partition. Two writers that read the same version cannot both win: the loser
re-reads and decides again, which is what keeps a balance from going negative under concurrent
redemptions from several API replicas.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType

from loyalist.cassandra import Row, execute, execute_writes, select_in
from loyalist.queues import not_before
from services.profile.loyalty.domain import Ledger, LedgerEvent, Program, ProgramDefinition
from services.profile.loyalty.domain.ledger import event_from_dict, event_to_dict, ledger_from_dict, ledger_to_dict

PROGRAM_ID = "default"
# The name of the schedule's read floors in ``queue_floors`` (loyalist/queues.py).
DUE_QUEUE = "loyalty_due"


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """One stored ledger event with the track-event properties computed when it was committed."""

    seq: int
    event: LedgerEvent
    properties: dict[str, Any]
    balance_after: int


def _line_from_row(row: dict[str, Any]) -> LedgerLine:
    return LedgerLine(
        seq=int(row["seq"]), event=event_from_dict(orjson.loads(row["line"])),
        properties=orjson.loads(row["properties"]), balance_after=int(row["balance_after"]),
    )


class LedgerStore:
    def __init__(self, session: Session, *, due_shards: int = 16) -> None:
        self.session = session
        self.due_shards = due_shards
        p = session.prepare
        self._load = p("SELECT version, state FROM loyalty_ledger WHERE profile_id = ? LIMIT 1")
        self._cas = p(
            "UPDATE loyalty_ledger SET version = ?, state = ?, balance = ?, lifetime_points = ?, tier = ?, "
            "updated_at = ? WHERE profile_id = ? IF version = ?"
        )
        self._insert_line = p(
            "INSERT INTO loyalty_ledger (profile_id, seq, event_id, kind, at, points, balance_after, reason, actor, "
            "note, line, properties) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        line_cols = "seq, balance_after, line, properties"
        self._lines_after = p(
            f"SELECT {line_cols} FROM loyalty_ledger WHERE profile_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
        )
        self._lines_before = p(
            f"SELECT {line_cols} FROM loyalty_ledger WHERE profile_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
        )
        self._load_many = p("SELECT profile_id, version, state FROM loyalty_ledger WHERE profile_id IN ? "
                            "PER PARTITION LIMIT 1")
        self._published = p("SELECT seq FROM loyalty_published WHERE profile_id = ?")
        self._published_many = p("SELECT profile_id, seq FROM loyalty_published WHERE profile_id IN ?")
        self._mark_published = p("UPDATE loyalty_published SET seq = ? WHERE profile_id = ?")
        self._schedule = p("INSERT INTO loyalty_due (shard, due_at, profile_id) VALUES (?, ?, ?)")
        self._due = p("SELECT due_at, profile_id FROM loyalty_due WHERE shard = ? AND due_at <= ? LIMIT ?")
        # From a read floor: past the tombstones of the entries handled before it (loyalist/queues.py).
        self._due_since = p(
            "SELECT due_at, profile_id FROM loyalty_due WHERE shard = ? AND due_at >= ? AND due_at <= ? LIMIT ?")
        self._unschedule = p("DELETE FROM loyalty_due WHERE shard = ? AND due_at = ? AND profile_id = ?")
        self._put_code = p(
            "INSERT INTO loyalty_codes (code, profile_id, event_id, reward_id, points, issued_at) "
            "VALUES (?, ?, ?, ?, ?, ?)"
        )
        self._get_code = p("SELECT code, profile_id, event_id, reward_id, points, issued_at FROM loyalty_codes "
                           "WHERE code = ?")
        self._set_birthday = p(
            "INSERT INTO loyalty_birthdays (profile_id, month, day, updated_at) VALUES (?, ?, ?, ?)"
        )
        self._get_birthday = p("SELECT month, day FROM loyalty_birthdays WHERE profile_id = ?")
        self._get_birthdays = p("SELECT profile_id, month, day FROM loyalty_birthdays WHERE profile_id IN ?")
        self._codes_of = p("SELECT line FROM loyalty_ledger WHERE profile_id = ? AND kind = ? ALLOW FILTERING")
        self._delete_code = p("DELETE FROM loyalty_codes WHERE code = ?")
        self._delete_ledger = p("DELETE FROM loyalty_ledger WHERE profile_id = ?")
        self._delete_published = p("DELETE FROM loyalty_published WHERE profile_id = ?")
        self._delete_birthday = p("DELETE FROM loyalty_birthdays WHERE profile_id = ?")
        self._accounts = p(
            "SELECT profile_id, balance, lifetime_points, tier FROM loyalty_ledger PER PARTITION LIMIT 1"
        )

    async def load(self, profile_id: str) -> tuple[Ledger, int]:
        """The account snapshot and its version (0: no ledger yet)."""
        rows = await execute(self.session, self._load, (profile_id,))
        if not rows or rows[0]["version"] is None:
            return Ledger(profile_id), 0
        return ledger_from_dict(orjson.loads(rows[0]["state"])), int(rows[0]["version"])

    async def load_many(self, profile_ids: Sequence[str]) -> dict[str, tuple[Ledger, int]]:
        """``load`` for many customers, with multi-partition reads (``select_in``)."""
        found: dict[str, tuple[Ledger, int]] = {}
        for row in await select_in(self.session, self._load_many, profile_ids):
            if row["version"] is not None:
                found[row["profile_id"]] = (ledger_from_dict(orjson.loads(row["state"])), int(row["version"]))
        return {pid: found.get(pid) or (Ledger(pid), 0) for pid in profile_ids}

    async def published_many(self, profile_ids: Sequence[str]) -> dict[str, int]:
        seqs: dict[str, int] = {}
        for row in await select_in(self.session, self._published_many, profile_ids):
            if row["seq"] is not None:
                seqs[row["profile_id"]] = int(row["seq"])
        return {pid: seqs.get(pid, 0) for pid in profile_ids}

    def schedule_row(self, profile_id: str, due_at: datetime, now: datetime) -> Row:
        """The schedule entry of ``profile_id`` at ``due_at``, no earlier than the writer's ``now`` (a poll that
        already read up to ``now`` would never find an earlier entry)."""
        return self._schedule, (self.shard(profile_id), not_before(due_at, now), profile_id)

    def published_row(self, profile_id: str, seq: int) -> Row:
        return self._mark_published, (seq, profile_id)

    async def write_rows(self, rows: Sequence[Row]) -> None:
        """Idempotent rows (schedule entries, published marks) in few unlogged batches."""
        await execute_writes(self.session, rows)

    async def commit(
        self, profile_id: str, version: int, state: Ledger, lines: list[LedgerLine], now: datetime
    ) -> bool:
        """Append ``lines`` and store ``state`` if nobody changed the ledger since ``version`` was read."""
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        batch.add(self._cas, (
            version + 1, orjson.dumps(ledger_to_dict(state)).decode(), state.balance, state.lifetime_points,
            state.tier, now, profile_id, version if version else None,
        ))
        for line in lines:
            e = line.event
            batch.add(self._insert_line, (
                profile_id, line.seq, e.event_id, e.kind, e.at, e.points, line.balance_after, e.reason, e.actor,
                e.note, orjson.dumps(event_to_dict(e)).decode(), orjson.dumps(line.properties).decode(),
            ))
        rows = await execute(self.session, batch)
        return bool(rows and rows[0].get("[applied]"))

    async def lines_after(self, profile_id: str, after_seq: int, limit: int) -> list[LedgerLine]:
        rows = await execute(self.session, self._lines_after, (profile_id, after_seq, limit))
        return [_line_from_row(r) for r in rows if r["seq"] is not None]

    async def lines_before(self, profile_id: str, before_seq: int, limit: int) -> list[LedgerLine]:
        rows = await execute(self.session, self._lines_before, (profile_id, before_seq, limit))
        return [_line_from_row(r) for r in rows if r["seq"] is not None]

    async def all_events(self, profile_id: str, page: int = 1000) -> list[LedgerEvent]:
        events: list[LedgerEvent] = []
        after = 0
        while True:
            lines = await self.lines_after(profile_id, after, page)
            events.extend(line.event for line in lines)
            if len(lines) < page:
                return events
            after = lines[-1].seq

    async def published_seq(self, profile_id: str) -> int:
        rows = await execute(self.session, self._published, (profile_id,))
        return int(rows[0]["seq"]) if rows and rows[0]["seq"] is not None else 0

    async def mark_published(self, profile_id: str, seq: int) -> None:
        await execute(self.session, self._mark_published, (seq, profile_id))

    def shard(self, profile_id: str) -> int:
        return zlib.crc32(profile_id.encode()) % self.due_shards

    async def schedule(self, profile_id: str, due_at: datetime, now: datetime) -> None:
        statement, params = self.schedule_row(profile_id, due_at, now)
        await execute(self.session, statement, params)

    async def due(self, shard: int, until: datetime, limit: int, *,
                  since: datetime | None = None) -> list[tuple[datetime, str]]:
        """Entries of ``shard`` due by ``until``, in due order; from ``since`` on (a read floor), else from the
        start."""
        if since is None:
            rows = await execute(self.session, self._due, (shard, until, limit))
        else:
            rows = await execute(self.session, self._due_since, (shard, since, until, limit))
        # The driver reads timestamps back naive (UTC).
        return [(r["due_at"].replace(tzinfo=UTC), r["profile_id"]) for r in rows]

    async def unschedule(self, shard: int, due_at: datetime, profile_id: str) -> None:
        # ``due_at`` as read from the schedule: the exact key of the stored entry.
        await execute(self.session, self._unschedule, (shard, due_at, profile_id))

    async def put_code(self, code: str, profile_id: str, event_id: str, reward_id: str, points: int,
                       issued_at: datetime) -> None:
        await execute(self.session, self._put_code, (code, profile_id, event_id, reward_id, points, issued_at))

    async def get_code(self, code: str) -> dict[str, Any] | None:
        rows = await execute(self.session, self._get_code, (code,))
        return rows[0] if rows else None

    async def set_birthday(self, profile_id: str, birthday: tuple[int, int], now: datetime) -> None:
        await execute(self.session, self._set_birthday, (profile_id, birthday[0], birthday[1], now))

    async def birthday(self, profile_id: str) -> tuple[int, int] | None:
        rows = await execute(self.session, self._get_birthday, (profile_id,))
        return (int(rows[0]["month"]), int(rows[0]["day"])) if rows else None

    async def birthdays_many(self, profile_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """The known birthdays among ``profile_ids`` (absent: none known)."""
        found: dict[str, tuple[int, int]] = {}
        for row in await select_in(self.session, self._get_birthdays, profile_ids):
            found[row["profile_id"]] = (int(row["month"]), int(row["day"]))
        return found

    def unschedule_row(self, shard: int, due_at: datetime, profile_id: str) -> Row:
        return self._unschedule, (shard, due_at, profile_id)

    async def erase(self, profile_id: str) -> int:
        """Delete everything loyalty holds about a customer (right to erasure). Returns codes deleted."""
        rows = await execute(self.session, self._codes_of, (profile_id, "Points Redeemed"))
        codes = [
            line["redemption"]["code"] for line in (orjson.loads(r["line"]) for r in rows if r["line"])
            if line.get("redemption")
        ]
        for code in codes:
            await execute(self.session, self._delete_code, (code,))
        await execute(self.session, self._delete_ledger, (profile_id,))
        await execute(self.session, self._delete_published, (profile_id,))
        await execute(self.session, self._delete_birthday, (profile_id,))
        return len(codes)

    async def accounts(self) -> AsyncIterator[dict[str, Any]]:
        """Every account's headline numbers (a full scan: reports, not the request path)."""
        for row in await execute(self.session, self._accounts):
            if row["balance"] is not None:
                yield row


class ProgramStore:
    """Program versions, cached briefly so the stream path does not read them for every event."""

    def __init__(self, session: Session, *, cache_ttl_s: float = 5.0) -> None:
        self.session = session
        self._ttl = cache_ttl_s
        self._cached: tuple[float, list[Program]] | None = None
        self._select = session.prepare(
            "SELECT version, effective_from, definition, created_at, created_by FROM loyalty_programs "
            "WHERE program_id = ?"
        )
        self._insert = session.prepare(
            "INSERT INTO loyalty_programs (program_id, version, effective_from, definition, created_at, created_by) "
            "VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        )

    async def versions(self, *, fresh: bool = False) -> list[Program]:
        now = time.monotonic()
        if not fresh and self._cached is not None and self._cached[0] > now:
            return self._cached[1]
        rows = await execute(self.session, self._select, (PROGRAM_ID,))
        versions = sorted((self._from_row(r) for r in rows), key=lambda p: p.version)
        self._cached = (now + self._ttl, versions)
        return versions

    @staticmethod
    def _from_row(row: dict[str, Any]) -> Program:
        definition = orjson.loads(row["definition"])
        return Program.model_validate({
            **definition, "version": row["version"], "effective_from": row["effective_from"],
            "created_at": row["created_at"], "created_by": row["created_by"] or "",
        })

    async def create(self, definition: ProgramDefinition, *, effective_from: datetime, actor: str,
                     now: datetime) -> Program:
        """Store the next version (a conditional insert, so two concurrent writers get distinct versions)."""
        body = orjson.dumps(definition.model_dump(mode="json")).decode()
        for _ in range(20):
            versions = await self.versions(fresh=True)
            version = (versions[-1].version + 1) if versions else 1
            rows = await execute(self.session, self._insert,
                                 (PROGRAM_ID, version, effective_from, body, now, actor))
            if rows and rows[0].get("[applied]"):
                self._cached = None
                return Program.model_validate({**definition.model_dump(), "version": version,
                                               "effective_from": effective_from, "created_at": now,
                                               "created_by": actor})
        raise RuntimeError("could not store a program version under contention")

    async def create_first(self, definition: ProgramDefinition, *, effective_from: datetime, actor: str,
                           now: datetime) -> Program | None:
        """Store version 1 unless any replica already did (bootstrap). None when it existed."""
        body = orjson.dumps(definition.model_dump(mode="json")).decode()
        rows = await execute(self.session, self._insert, (PROGRAM_ID, 1, effective_from, body, now, actor))
        self._cached = None
        if not (rows and rows[0].get("[applied]")):
            return None
        return Program.model_validate({**definition.model_dump(), "version": 1, "effective_from": effective_from,
                                       "created_at": now, "created_by": actor})
