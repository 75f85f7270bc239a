"""Cassandra and Redis adapters of the profile service: event store, identity graph, snapshots, merge
audit, erasure tombstones, segment memberships, and the Redis hot copies.

Every write is idempotent (same primary key, same value) so a batch retried after a crash converges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from cassandra.cluster import Session
from cassandra.query import UNSET_VALUE
from redis.asyncio import Redis

from loyalist.cassandra import Row, execute, execute_writes, partition_chunks
from loyalist.consumer import TimeSlice
from loyalist.events import Event, decode_event
from loyalist.metrics import STORE_CALLS, STORE_ERRORS
from loyalist.settings import Settings
from services.profile.domain.identity import Identifier
from services.profile.domain.profile import ProfileState

T = TypeVar("T")
IN_CHUNK = 100


def ms_to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def dt_to_ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)




async def gather_limited(coros: Iterable[Awaitable[T]], limit: int = 256) -> list[T]:
    """Run awaitables concurrently, at most ``limit`` at a time, keeping their order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with semaphore:
            return await aw

    return list(await asyncio.gather(*(one(c) for c in coros)))


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass
class Snapshot:
    state: ProfileState | None
    document: dict[str, Any] | None
    merged_into: str | None


@dataclass(frozen=True)
class StoredEvent:
    profile_id: str
    ts_ms: int
    event_key: str
    event: Event


class ProfileStore:
    """Cassandra access of the profile service (prepared statements, async execution)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        p = session.prepare
        self._insert_event = p(
            "INSERT INTO profile_events (profile_id, ts, event_key, received_at, type, name, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)")
        self._insert_processed = p("INSERT INTO profile_processed (profile_id, event_key, ts) VALUES (?, ?, ?)")
        self._select_processed = p(
            "SELECT event_key FROM profile_processed WHERE profile_id = ? AND event_key IN ?")
        self._delete_processed = p("DELETE FROM profile_processed WHERE profile_id = ?")
        # The older dedup index (one partition per event): read, never written, while it holds rows.
        self._select_legacy_index = p("SELECT event_key, profile_id FROM profile_event_index WHERE event_key IN ?")
        self._any_legacy_index = p("SELECT event_key FROM profile_event_index LIMIT 1")
        self._delete_legacy_index = p("DELETE FROM profile_event_index WHERE event_key = ?")
        self._legacy_index: bool | None = None  # unknown until first needed
        self._events_all = p("SELECT ts, event_key, body FROM profile_events WHERE profile_id = ?")
        self._latest_event_keys = p(
            "SELECT event_key FROM profile_events WHERE profile_id = ? ORDER BY ts DESC LIMIT ?")
        self._events_after = p(
            "SELECT ts, event_key, body FROM profile_events WHERE profile_id = ? AND (ts, event_key) > (?, ?)")
        self._events_until = p("SELECT ts, event_key, body FROM profile_events WHERE profile_id = ? AND ts <= ?")
        self._events_before = p(
            "SELECT ts, event_key, body FROM profile_events WHERE profile_id = ? AND (ts, event_key) < (?, ?) "
            "ORDER BY ts DESC, event_key DESC LIMIT ?")
        self._delete_events = p("DELETE FROM profile_events WHERE profile_id = ?")
        self._select_identity = p("SELECT value, profile_id FROM identities WHERE kind = ? AND value IN ?")
        self._claim_identity = p(
            "INSERT INTO identities (kind, value, profile_id, linked_at) VALUES (?, ?, ?, ?) IF NOT EXISTS")
        self._link_identity = p("INSERT INTO identities (kind, value, profile_id, linked_at) VALUES (?, ?, ?, ?)")
        self._delete_identity = p("DELETE FROM identities WHERE kind = ? AND value = ?")
        self._insert_profile_identity = p(
            "INSERT INTO profile_identities (profile_id, kind, value, linked_at) VALUES (?, ?, ?, ?)")
        self._select_profile_identities = p(
            "SELECT kind, value, linked_at FROM profile_identities WHERE profile_id = ?")
        self._delete_profile_identities = p("DELETE FROM profile_identities WHERE profile_id = ?")
        self._select_profile = p("SELECT state, document, merged_into FROM profiles WHERE profile_id = ?")
        self._select_profiles = p(
            "SELECT profile_id, state, document, merged_into FROM profiles WHERE profile_id IN ?")
        self._select_documents = p("SELECT profile_id, document, merged_into FROM profiles WHERE profile_id IN ?")
        self._write_profile = p(
            "INSERT INTO profiles (profile_id, state, document, merged_into, updated_at) VALUES (?, ?, ?, ?, ?)")
        self._delete_profile = p("DELETE FROM profiles WHERE profile_id = ?")
        self._insert_merge = p(
            "INSERT INTO profile_merges (profile_id, merged, reason, cause, events_moved, identifiers_moved, "
            "merged_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
        self._select_merges = p(
            "SELECT merged, reason, cause, events_moved, identifiers_moved, merged_at FROM profile_merges "
            "WHERE profile_id = ?")
        self._delete_merges = p("DELETE FROM profile_merges WHERE profile_id = ?")
        self._insert_erasure = p("INSERT INTO erasures (subject, erased_at) VALUES (?, ?)")
        self._insert_erasure_request = p(
            "INSERT INTO erasure_requests (request_id, subject, requested_at) VALUES (?, ?, ?)")
        self._complete_erasure = p(
            "UPDATE erasure_requests SET completed_at = ?, events_deleted = ? WHERE request_id = ?")
        self._select_erasure_request = p(
            "SELECT completed_at, events_deleted FROM erasure_requests WHERE request_id = ?")
        self._upsert_segment = p(
            "INSERT INTO profile_segments (profile_id, segment_id, segment_name, member, changed_at) "
            "VALUES (?, ?, ?, ?, ?)")
        self._select_segments = p(
            "SELECT segment_id, segment_name, member, changed_at FROM profile_segments WHERE profile_id = ?")
        self._select_segments_in = p(
            "SELECT profile_id, segment_id, segment_name, member, changed_at FROM profile_segments "
            "WHERE profile_id IN ?")
        self._delete_segments = p("DELETE FROM profile_segments WHERE profile_id = ?")

    async def _run(self, operation: str, statement: Any, params: Any = None) -> list[Any]:
        started = time.perf_counter()
        try:
            return await execute(self.session, statement, params)
        except Exception:
            STORE_ERRORS.labels("profile", "cassandra", operation).inc()
            raise
        finally:
            STORE_CALLS.labels("profile", "cassandra", operation).observe(time.perf_counter() - started)

    async def _write(self, operation: str, rows: Sequence[Row]) -> None:
        """Many idempotent writes in few requests (unlogged batches)."""
        if not rows:
            return
        started = time.perf_counter()
        try:
            await execute_writes(self.session, rows)
        except Exception:
            STORE_ERRORS.labels("profile", "cassandra", operation).inc()
            raise
        finally:
            STORE_CALLS.labels("profile", "cassandra", operation).observe(time.perf_counter() - started)

    # ---- event store -------------------------------------------------------------------------------
    async def existing_event_keys(self, keys: Mapping[str, Sequence[str]]) -> set[str]:
        """Which of these events (dedup keys by profile) were fully processed already."""
        wanted = [(pid, list(dict.fromkeys(ks))) for pid, ks in keys.items() if ks]
        if not wanted:
            return set()
        lookups = [(pid, chunk) for pid, ks in wanted for chunk in _chunks(ks, IN_CHUNK)]
        found: set[str] = set()
        for rows in await gather_limited(self._run("index_lookup", self._select_processed, (pid, list(chunk)))
                                         for pid, chunk in lookups):
            found.update(row["event_key"] for row in rows)
        rest = [k for _pid, ks in wanted for k in ks if k not in found]
        if rest and await self._has_legacy_index():
            for rows in await gather_limited(self._run("index_lookup", self._select_legacy_index, (list(c),))
                                             for c in _chunks(rest, IN_CHUNK)):
                found.update(row["event_key"] for row in rows)
        return found

    async def _has_legacy_index(self) -> bool:
        if self._legacy_index is None:
            self._legacy_index = bool(await self._run("index_lookup", self._any_legacy_index))
        return self._legacy_index

    async def write_events(self, rows: Sequence[StoredEvent], raw: dict[str, bytes]) -> None:
        """The events of a batch, in few requests (each row is an idempotent upsert)."""
        await self._write("write_events", [
            (self._insert_event, (r.profile_id, r.ts_ms, r.event_key, r.event.received_at, r.event.type,
                                  r.event.label, raw[r.event_key]))
            for r in sorted(rows, key=lambda r: r.profile_id)])

    async def write_index(self, rows: Sequence[StoredEvent]) -> None:
        """Marks events as processed: written last, after every other effect of the batch. Sorted by profile, so
        each profile's rows of a batch request are one partition update."""
        await self._write("write_index", [
            (self._insert_processed, (r.profile_id, r.event_key, r.ts_ms))
            for r in sorted(rows, key=lambda r: r.profile_id)])

    def _decode_rows(self, profile_id: str, rows: list[Any]) -> list[StoredEvent]:
        return [StoredEvent(profile_id, dt_to_ms(r["ts"]), r["event_key"], decode_event(r["body"])) for r in rows]

    async def events(self, profile_id: str, *, after: tuple[int, str] | None = None,
                     until_ms: int | None = None) -> list[StoredEvent]:
        if after is not None:
            rows = await self._run("events_after", self._events_after, (profile_id, ms_to_dt(after[0]), after[1]))
        elif until_ms is not None:
            rows = await self._run("events_until", self._events_until, (profile_id, ms_to_dt(until_ms)))
        else:
            rows = await self._run("events_all", self._events_all, (profile_id,))
        return self._decode_rows(profile_id, rows)

    async def latest_event_keys_many(self, profile_ids: Sequence[str], limit: int) -> dict[str, list[str]]:
        """The keys of each profile's ``limit`` latest stored events, oldest first (one small read per profile:
        Cassandra refuses ORDER BY with IN on the partition key)."""
        results = await gather_limited(self._run("latest_keys", self._latest_event_keys, (pid, limit))
                                       for pid in profile_ids)
        return {pid: [r["event_key"] for r in reversed(rows)]
                for pid, rows in zip(profile_ids, results, strict=True)}

    async def events_before(self, profile_id: str, end: tuple[int, str], limit: int) -> list[StoredEvent]:
        """Newest first, strictly before ``end`` = (timestamp ms, event key)."""
        rows = await self._run("events_before", self._events_before,
                               (profile_id, ms_to_dt(end[0]), end[1], limit))
        return self._decode_rows(profile_id, rows)

    async def delete_events(self, profile_id: str, keys: Sequence[str]) -> None:
        """A profile's events and their dedup entries (``keys``: those of the older index, if it has rows)."""
        await self._run("delete_events", self._delete_events, (profile_id,))
        await self._run("delete_index", self._delete_processed, (profile_id,))
        if keys and await self._has_legacy_index():
            await gather_limited(self._run("delete_index", self._delete_legacy_index, (k,)) for k in keys)

    async def repoint_index(self, rows: Sequence[StoredEvent]) -> None:
        await self.write_index(rows)

    # ---- identity graph ----------------------------------------------------------------------------
    async def lookup_identities(self, identifiers: Iterable[Identifier]) -> dict[Identifier, str]:
        by_kind: dict[str, list[str]] = {}
        for ident in set(identifiers):
            by_kind.setdefault(ident.kind, []).append(ident.value)
        queries = [(kind, chunk) for kind, values in by_kind.items() for chunk in partition_chunks(values)]
        results = await gather_limited(
            self._run("identity_lookup", self._select_identity, (kind, list(chunk))) for kind, chunk in queries)
        found: dict[Identifier, str] = {}
        for (kind, _chunk), rows in zip(queries, results, strict=True):
            for row in rows:
                found[Identifier(kind, row["value"])] = row["profile_id"]
        return found

    async def claim_identity(self, identifier: Identifier, profile_id: str, now: datetime, *,
                             exclusive: bool = True) -> str:
        """Link a new identifier to a profile unless another worker linked it first; returns the owner.

        ``exclusive=False`` skips the lightweight transaction, for identifiers only ever claimed by the
        owner of one events.raw partition (the user id an event is keyed by)."""
        if not exclusive:
            await self.link_identities([identifier], profile_id, now)
            return profile_id
        rows = await self._run("identity_claim", self._claim_identity,
                               (identifier.kind, identifier.value, profile_id, now))
        row = rows[0]
        if row["[applied]"]:
            await self._run("profile_identity", self._insert_profile_identity,
                            (profile_id, identifier.kind, identifier.value, now))
            return profile_id
        return str(row["profile_id"])

    async def link_identities(self, identifiers: Sequence[Identifier], profile_id: str, now: datetime) -> None:
        await self.link_many([(i, profile_id) for i in identifiers], now)

    async def link_many(self, links: Sequence[tuple[Identifier, str]], now: datetime) -> None:
        """Identifier -> profile links (and the reverse listing), without lightweight transactions."""
        await self._write("identity_link", [
            *((self._link_identity, (i.kind, i.value, pid, now)) for i, pid in links),
            *((self._insert_profile_identity, (pid, i.kind, i.value, now)) for i, pid in links)])

    async def profile_identities(self, profile_id: str) -> list[dict[str, Any]]:
        return await self._run("profile_identities", self._select_profile_identities, (profile_id,))

    async def forget_identities(self, profile_id: str, identifiers: Sequence[Identifier], *,
                                delete_links: bool) -> None:
        await self._run("profile_identities_delete", self._delete_profile_identities, (profile_id,))
        if delete_links:
            await gather_limited(self._run("identity_delete", self._delete_identity, (i.kind, i.value))
                                 for i in identifiers)

    # ---- snapshots ---------------------------------------------------------------------------------
    async def load(self, profile_id: str) -> Snapshot:
        rows = await self._run("snapshot_load", self._select_profile, (profile_id,))
        if not rows:
            return Snapshot(None, None, None)
        row = rows[0]
        state = ProfileState.from_json(orjson.loads(row["state"])) if row["state"] else None
        document = orjson.loads(row["document"]) if row["document"] else None
        return Snapshot(state, document, row["merged_into"])

    async def load_many(self, profile_ids: Sequence[str]) -> dict[str, Snapshot]:
        """Snapshots of many profiles in few requests (absent profiles get an empty snapshot)."""
        out = {pid: Snapshot(None, None, None) for pid in profile_ids}
        chunks = partition_chunks(list(profile_ids))
        for rows in await gather_limited(self._run("snapshot_load", self._select_profiles, (list(c),)) for c in chunks):
            for row in rows:
                state = ProfileState.from_json(orjson.loads(row["state"])) if row["state"] else None
                document = orjson.loads(row["document"]) if row["document"] else None
                out[row["profile_id"]] = Snapshot(state, document, row["merged_into"])
        return out

    async def segment_rows_many(self, profile_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {pid: [] for pid in profile_ids}
        chunks = partition_chunks(list(profile_ids))
        for rows in await gather_limited(self._run("segments", self._select_segments_in, (list(c),)) for c in chunks):
            for row in rows:
                out[row["profile_id"]].append(row)
        return out

    async def documents(self, profile_ids: Sequence[str]) -> dict[str, tuple[dict[str, Any] | None, str | None]]:
        out: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
        for chunk in _chunks(list(profile_ids), IN_CHUNK):
            for row in await self._run("snapshot_documents", self._select_documents, (list(chunk),)):
                doc = orjson.loads(row["document"]) if row["document"] else None
                out[row["profile_id"]] = (doc, row["merged_into"])
        return out

    def _snapshot_row(self, profile_id: str, state: ProfileState | None, document: dict[str, Any] | None,
                      merged_into: str | object | None, now: datetime) -> Row:
        return (self._write_profile, (
            profile_id, orjson.dumps(state) if state else None,
            orjson.dumps(document) if document is not None else None, merged_into, now))

    async def save(self, profile_id: str, state: ProfileState | None, document: dict[str, Any] | None,
                   merged_into: str | None, now: datetime) -> None:
        await self._run("snapshot_save", *self._snapshot_row(profile_id, state, document, merged_into, now))

    async def save_many(self, snapshots: Sequence[tuple[str, ProfileState | None, dict[str, Any] | None]],
                        now: datetime) -> None:
        """Snapshots of many (unmerged) profiles in few requests. ``merged_into`` is left unset rather than
        written as null: a null is a tombstone, one more on every snapshot write, that every read of the row (and
        every full scan) goes through until compaction purges it."""
        await self._write("snapshot_save", [self._snapshot_row(pid, state, doc, UNSET_VALUE, now)
                                            for pid, state, doc in snapshots])

    async def delete_profile(self, profile_id: str) -> None:
        await self._run("snapshot_delete", self._delete_profile, (profile_id,))

    # ---- merges ------------------------------------------------------------------------------------
    async def record_merge(self, survivor: str, merged: str, reason: str, cause: str, events_moved: int,
                           identifiers_moved: int, at: datetime) -> None:
        await self._run("merge_audit", self._insert_merge,
                        (survivor, merged, reason, cause, events_moved, identifiers_moved, at))

    async def merges(self, profile_id: str) -> list[dict[str, Any]]:
        return await self._run("merges", self._select_merges, (profile_id,))

    async def delete_merges(self, profile_id: str) -> None:
        await self._run("merges_delete", self._delete_merges, (profile_id,))

    # ---- erasure -----------------------------------------------------------------------------------
    async def add_tombstones(self, subjects: Iterable[str], erased_at: datetime) -> None:
        await gather_limited(self._run("tombstone", self._insert_erasure, (s, erased_at)) for s in set(subjects))

    async def tombstones(self) -> dict[str, int]:
        rows = await self._run("tombstones", "SELECT subject, erased_at FROM erasures")
        return {r["subject"]: dt_to_ms(r["erased_at"]) for r in rows}

    async def create_erasure_request(self, request_id: str, subject: str, at: datetime) -> None:
        await self._run("erasure_request", self._insert_erasure_request, (request_id, subject, at))

    async def complete_erasure_request(self, request_id: str, events_deleted: int, at: datetime) -> None:
        await self._run("erasure_request", self._complete_erasure, (at, events_deleted, request_id))

    async def erasure_request(self, request_id: str) -> dict[str, Any] | None:
        rows = await self._run("erasure_request", self._select_erasure_request, (request_id,))
        return rows[0] if rows else None

    # ---- segments ----------------------------------------------------------------------------------
    async def segment_rows(self, profile_id: str) -> list[dict[str, Any]]:
        return await self._run("segments", self._select_segments, (profile_id,))

    async def upsert_segments(self, rows: Sequence[tuple[str, str, str | None, bool, int]]) -> None:
        """(profile id, segment id, segment name, member, changed at ms) rows, in few requests."""
        await self._write("segment_upsert", [(self._upsert_segment, row) for row in rows])

    async def delete_segments(self, profile_id: str) -> None:
        await self._run("segments_delete", self._delete_segments, (profile_id,))


# An identifier (or a profile id) to the live profile id and its document in one Redis round trip, following
# merge redirects (``ident:profile_id:<merged>`` -> survivor) server-side. Keys are built in the script, so it
# needs a single Redis instance (not Redis Cluster), which is what Loyalist deploys.
_RESOLVE = """
local pid = ARGV[1]
if #KEYS == 1 then
  pid = redis.call('GET', KEYS[1])
  if not pid then return {false, false} end
end
for _ = 1, tonumber(ARGV[4]) do
  local doc = redis.call('GET', ARGV[2] .. pid)
  if doc then return {pid, doc} end
  local survivor = redis.call('GET', ARGV[3] .. pid)
  if not survivor then return {pid, false} end
  pid = survivor
end
return {pid, false}
"""


class HotProfiles:
    """Redis: the hot profile document and identifier -> profile id lookups, under the namespace."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._resolve = redis.register_script(_RESOLVE)

    def profile_key(self, profile_id: str) -> str:
        return self.settings.redis_key("profile", profile_id)

    def ident_key(self, kind: str, value: str) -> str:
        return self.settings.redis_key("ident", kind, value)

    async def write(self, documents: dict[str, dict[str, Any]], idents: dict[tuple[str, str], str],
                    deleted: Iterable[str] = (), deleted_idents: Iterable[tuple[str, str]] = ()) -> None:
        started = time.perf_counter()
        pipe = self.redis.pipeline(transaction=False)
        # One MSET for all the values of a batch: per-command overhead dominates for thousands of keys. Thousands
        # of documents take tens of milliseconds to encode: the event loop (the API) gets turns meanwhile.
        values: dict[str, bytes | str] = {}
        turns = TimeSlice()
        for pid, doc in documents.items():
            values[self.profile_key(pid)] = orjson.dumps(doc)
            await turns.pause()
        values.update({self.ident_key(kind, value): pid for (kind, value), pid in idents.items()})
        if values:
            pipe.mset(values)
        for pid in deleted:
            pipe.delete(self.profile_key(pid))
        for kind, value in deleted_idents:
            pipe.delete(self.ident_key(kind, value))
        if len(pipe):
            await pipe.execute()
        STORE_CALLS.labels("profile", "redis", "write").observe(time.perf_counter() - started)

    async def resolve(self, *, ident: tuple[str, str] | None = None, profile_id: str | None = None,
                      max_redirects: int = 8) -> tuple[str | None, bytes | None]:
        """(live profile id, its document) for an identifier or a profile id, in one round trip: (None, None)
        when the identifier is not in Redis, (id, None) when the profile's document is not (the caller asks
        Cassandra)."""
        keys = [self.ident_key(*ident)] if ident is not None else []
        pid, doc = await self._resolve(keys=keys, args=[
            profile_id or "", self.profile_key(""), self.ident_key("profile_id", ""), max_redirects])
        if isinstance(pid, bytes):
            pid = pid.decode()
        if isinstance(doc, str):
            doc = doc.encode()
        return pid, doc
