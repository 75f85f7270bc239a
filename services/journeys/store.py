"""Cassandra adapters of the journeys service: definitions, instance state, timers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType

from loyalist.cassandra import execute, execute_writes
from services.journeys.domain.codec import instance_from_doc, instance_to_doc
from services.journeys.domain.engine import Instance, stable_bucket

INSTANCE_BUCKETS = 16




def shard_of(profile_id: str, partitions: int) -> int:
    """The Kafka partition the default partitioner gives this key: timers live with the profile's events."""
    return (murmur2(profile_id.encode()) & 0x7FFFFFFF) % partitions


def minute_of(at: datetime) -> int:
    return int(at.timestamp() // 60)


@dataclass(frozen=True, slots=True)
class JourneyRow:
    journey_id: str
    name: str
    status: str  # draft | active | paused | archived
    current_version: int
    template_id: str | None
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.journey_id, "name": self.name, "status": self.status, "version": self.current_version,
                "template_id": self.template_id, "created_at": self.created_at.isoformat(),
                "updated_at": self.updated_at.isoformat()}


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return datetime.fromtimestamp(0, UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _journey_row(r: dict[str, Any]) -> JourneyRow:
    return JourneyRow(r["journey_id"], r["name"] or "", r["status"] or "draft", int(r["current_version"] or 1),
                      r.get("template_id"), _aware(r["created_at"]), _aware(r["updated_at"]))


class JourneyStore:
    def __init__(self, session: Session) -> None:
        self.s = session
        self._get = session.prepare("SELECT * FROM journeys WHERE journey_id = ?")
        self._insert_new = session.prepare(
            "INSERT INTO journeys (journey_id, name, status, current_version, template_id, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS")
        self._set_version = session.prepare(
            "UPDATE journeys SET name = ?, current_version = ?, updated_at = ? WHERE journey_id = ? "
            "IF current_version = ?")
        self._set_status = session.prepare("UPDATE journeys SET status = ?, updated_at = ? WHERE journey_id = ? IF "
                                           "EXISTS")
        self._put_version = session.prepare(
            "INSERT INTO journey_versions (journey_id, version, definition, created_at) VALUES (?, ?, ?, ?) "
            "IF NOT EXISTS")
        self._get_version = session.prepare(
            "SELECT definition, created_at FROM journey_versions WHERE journey_id = ? AND version = ?")
        self._versions = session.prepare(
            "SELECT version, created_at FROM journey_versions WHERE journey_id = ?")

    async def get(self, journey_id: str) -> JourneyRow | None:
        rows = await execute(self.s, self._get, (journey_id,))
        return _journey_row(rows[0]) if rows else None

    async def all(self) -> list[JourneyRow]:
        rows = await execute(self.s, "SELECT * FROM journeys")
        return sorted((_journey_row(r) for r in rows), key=lambda j: j.created_at)

    async def create(self, journey_id: str, name: str, definition: dict[str, Any], template_id: str | None,
                     now: datetime) -> bool:
        """False when the id is taken."""
        await execute(self.s, self._put_version, (journey_id, 1, orjson.dumps(definition).decode(), now))
        applied = await execute(self.s, self._insert_new, (journey_id, name, "draft", 1, template_id, now, now))
        return bool(applied[0]["[applied]"])

    async def add_version(self, row: JourneyRow, name: str, definition: dict[str, Any], now: datetime) -> int | None:
        """The new version number, or None when another writer changed the journey first."""
        version = row.current_version + 1
        await execute(self.s, self._put_version, (row.journey_id, version, orjson.dumps(definition).decode(), now))
        applied = await execute(self.s, self._set_version, (name, version, now, row.journey_id,
                                                            row.current_version))
        return version if applied[0]["[applied]"] else None

    async def set_status(self, journey_id: str, status: str, now: datetime) -> bool:
        applied = await execute(self.s, self._set_status, (status, now, journey_id))
        return bool(applied[0]["[applied]"])

    async def definition(self, journey_id: str, version: int) -> dict[str, Any] | None:
        rows = await execute(self.s, self._get_version, (journey_id, version))
        return orjson.loads(rows[0]["definition"]) if rows else None

    async def versions(self, journey_id: str) -> list[dict[str, Any]]:
        rows = await execute(self.s, self._versions, (journey_id,))
        return [{"version": r["version"], "created_at": _aware(r["created_at"]).isoformat()} for r in rows]

    async def delete(self, journey_id: str) -> None:
        await execute(self.s, "DELETE FROM journey_versions WHERE journey_id = %s", (journey_id,))
        await execute(self.s, "DELETE FROM journeys WHERE journey_id = %s", (journey_id,))


class InstanceStore:
    def __init__(self, session: Session) -> None:
        self.s = session
        self._by_profile = session.prepare("SELECT state FROM journey_instances WHERE profile_id = ?")
        self._by_profiles = session.prepare(
            "SELECT profile_id, state FROM journey_instances WHERE profile_id IN ?")
        self._by_profile_journey = session.prepare(
            "SELECT state FROM journey_instances WHERE profile_id = ? AND journey_id = ?")
        self._upsert = session.prepare(
            "INSERT INTO journey_instances (profile_id, journey_id, instance_id, version, status, state, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)")
        self._upsert_by_journey = session.prepare(
            "INSERT INTO journey_instances_by_journey (journey_id, bucket, instance_id, profile_id, status, state, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
        self._scan_bucket = session.prepare(
            "SELECT state FROM journey_instances_by_journey WHERE journey_id = ? AND bucket = ?")

    async def for_profiles(self, profile_ids: Sequence[str]) -> dict[str, list[Instance]]:
        """The instances of many profiles with one request per 100 profiles (IN on the partition key)."""
        out: dict[str, list[Instance]] = {pid: [] for pid in profile_ids}
        ids = list(out)
        chunks = [ids[i:i + 100] for i in range(0, len(ids), 100)]
        results = await asyncio.gather(*(execute(self.s, self._by_profiles, (chunk,)) for chunk in chunks))
        for rows in results:
            for r in rows:
                out[r["profile_id"]].append(instance_from_doc(orjson.loads(r["state"])))
        return out

    async def for_profile(self, profile_id: str, journey_id: str | None = None) -> list[Instance]:
        if journey_id is None:
            rows = await execute(self.s, self._by_profile, (profile_id,))
        else:
            rows = await execute(self.s, self._by_profile_journey, (profile_id, journey_id))
        return [instance_from_doc(orjson.loads(r["state"])) for r in rows]

    async def save(self, instance: Instance, now: datetime) -> None:
        state = orjson.dumps(instance_to_doc(instance)).decode()
        bucket = int(stable_bucket(instance.instance_id) * INSTANCE_BUCKETS)
        # One round trip for both copies (an unlogged batch: each write is idempotent on its own).
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        batch.add(self._upsert, (instance.profile_id, instance.journey_id, instance.instance_id,
                                 instance.version, instance.status, state, now))
        batch.add(self._upsert_by_journey, (instance.journey_id, bucket, instance.instance_id,
                                            instance.profile_id, instance.status, state, now))
        await execute(self.s, batch)

    async def save_many(self, instances: Sequence[Instance], now: datetime) -> None:
        """Save the last state of each instance (both copies) with a few unlogged batches."""
        last = {i.instance_id: i for i in instances}
        rows: list[tuple[Any, tuple[Any, ...]]] = []
        for instance in last.values():
            state = orjson.dumps(instance_to_doc(instance)).decode()
            bucket = int(stable_bucket(instance.instance_id) * INSTANCE_BUCKETS)
            rows.append((self._upsert, (instance.profile_id, instance.journey_id, instance.instance_id,
                                        instance.version, instance.status, state, now)))
            rows.append((self._upsert_by_journey, (instance.journey_id, bucket, instance.instance_id,
                                                   instance.profile_id, instance.status, state, now)))
        await execute_writes(self.s, rows)

    async def for_journey(self, journey_id: str) -> list[Instance]:
        return [instance_from_doc(orjson.loads(state)) for state in await self.states_for_journey(journey_id)]

    async def states_for_journey(self, journey_id: str) -> list[str]:
        """Every instance of a journey as its stored JSON state, undecoded (decoding many is CPU work a caller
        may want off the event loop)."""
        pages = await asyncio.gather(*(execute(self.s, self._scan_bucket, (journey_id, b))
                                       for b in range(INSTANCE_BUCKETS)))
        return [r["state"] for rows in pages for r in rows]


@dataclass(frozen=True, slots=True)
class TimerRow:
    shard: int
    minute: int
    due: datetime
    instance_id: str
    node_id: str
    profile_id: str
    journey_id: str
    kind: str  # "node" (a delay or wait of an instance) | "entry" (a date-trait occurrence)

    def wakeup(self) -> dict[str, Any]:
        return {"kind": self.kind, "instanceId": self.instance_id, "nodeId": self.node_id,
                "profileId": self.profile_id, "journeyId": self.journey_id, "due": self.due.isoformat()}


class TimerStore:
    def __init__(self, session: Session, partitions: int) -> None:
        self.s = session
        self.partitions = partitions
        self._insert = session.prepare(
            "INSERT INTO journey_timers (shard, minute, due, instance_id, node_id, profile_id, journey_id, kind) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        self._due = session.prepare(
            "SELECT * FROM journey_timers WHERE shard = ? AND minute = ? AND due <= ?")
        self._due_many = session.prepare(
            "SELECT * FROM journey_timers WHERE shard IN ? AND minute IN ? AND due <= ?")
        self._delete = session.prepare(
            "DELETE FROM journey_timers WHERE shard = ? AND minute = ? AND due = ? AND instance_id = ? AND node_id = ?")
        self._cursor = session.prepare("SELECT minute FROM journey_timer_cursors WHERE shard = ?")
        # Told the due time of every timer written here (the poller scans then instead of polling constantly).
        self.on_written: Callable[[datetime], None] | None = None
        self._set_cursor = session.prepare("INSERT INTO journey_timer_cursors (shard, minute) VALUES (?, ?)")

    async def schedule(self, *, profile_id: str, journey_id: str, instance_id: str, node_id: str, due: datetime,
                       kind: str = "node") -> None:
        await self.write([self.row(profile_id=profile_id, journey_id=journey_id, instance_id=instance_id,
                                   node_id=node_id, due=due, kind=kind)])

    def row(self, *, profile_id: str, journey_id: str, instance_id: str, node_id: str, due: datetime,
            kind: str = "node") -> tuple[Any, tuple[Any, ...]]:
        """The write of a timer, for :meth:`write` (many timers with a few requests)."""
        shard = shard_of(profile_id, self.partitions)
        return self._insert, (shard, minute_of(due), due, instance_id, node_id, profile_id, journey_id, kind)

    async def write(self, rows: Sequence[tuple[Any, tuple[Any, ...]]]) -> None:
        await execute_writes(self.s, rows)
        if self.on_written is not None:
            for due in {params[2] for _, params in rows}:
                self.on_written(due)

    async def due(self, shard: int, minute: int, upto: datetime) -> list[TimerRow]:
        rows = await execute(self.s, self._due, (shard, minute, upto))
        return [TimerRow(shard, minute, _aware(r["due"]), r["instance_id"], r["node_id"], r["profile_id"],
                         r["journey_id"], r["kind"]) for r in rows]

    async def due_many(self, shards: Sequence[int], minutes: Sequence[int], upto: datetime) -> list[TimerRow]:
        """The due timers of several shards and minutes with one request."""
        rows = await execute(self.s, self._due_many, (list(shards), list(minutes), upto))
        return [TimerRow(r["shard"], r["minute"], _aware(r["due"]), r["instance_id"], r["node_id"],
                         r["profile_id"], r["journey_id"], r["kind"]) for r in rows]

    async def delete(self, rows: Sequence[TimerRow]) -> None:
        await execute_writes(self.s, [(self._delete, (r.shard, r.minute, r.due, r.instance_id, r.node_id))
                                      for r in rows])

    async def cursor(self, shard: int) -> int | None:
        rows = await execute(self.s, self._cursor, (shard,))
        return int(rows[0]["minute"]) if rows else None

    async def set_cursor(self, shard: int, minute: int) -> None:
        await execute(self.s, self._set_cursor, (shard, minute))
