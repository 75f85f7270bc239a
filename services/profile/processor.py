"""The profile pipeline, in two stages connected by the internal ``profile.fold`` topic.

1. :class:`Resolver` reads ``events.raw`` (keyed by userId/anonymousId), resolves each event's identifiers
   against the identity graph (new identifiers are claimed with lightweight transactions, so two workers
   never give one identifier to two profiles) and sends ``event`` and ``merge_out`` operations keyed by
   the *profile id*.
2. :class:`Folder` reads ``profile.fold``: every profile is owned by exactly one worker at a time (its
   partition), so its state can be cached and written without races. It stores events, folds them,
   emits ``events.resolved`` and ``profile.changed``, updates Redis and writes the snapshot.

A merge travels as ``merge_out`` to the merged profile's owner (which marks it merged and forwards
anything later sent to it) and then ``absorb`` to the survivor's owner (which moves the events and
identities over and refolds). Both steps are idempotent, so a crash anywhere is repaired by redelivery.

The replay CLI wires the two stages directly (no internal topic) with the same classes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from loyalist.consumer import TimeSlice
from loyalist.events import Event, decode_event, encode_event
from loyalist.kafka import produce_many
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RESOLVED, PROFILE_CHANGED, Topic
from services.profile import metrics
from services.profile.domain.identity import (
    Identifier,
    direct_profile_id,
    identifiers_of,
    merge_reason,
    plan_resolution,
    subject_hash,
)
from services.profile.domain.profile import (
    ProfileState,
    changed_fields,
    event_key,
    fold,
    fold_all,
    folds_in_any_order,
    iso,
    new_state,
    render,
    to_ms,
)
from services.profile.store import HotProfiles, ProfileStore, StoredEvent, gather_limited

log = logging.getLogger(__name__)


Clock = Callable[[], datetime]
Op = dict[str, Any]
Dispatch = Callable[[list[tuple[str, bytes]]], Awaitable[None]]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Emitter:
    """Collects messages for Kafka and sends them in :meth:`flush`, which returns once every one was
    acknowledged (or does nothing, for replays)."""

    def __init__(self, producer: Any | None, settings: Settings) -> None:
        self.producer = producer
        self.settings = settings
        self._queued: dict[str, list[tuple[bytes, bytes]]] = {}
        self._counters = {t.name: metrics.EMITTED.labels(t.name) for t in (EVENTS_RESOLVED, PROFILE_CHANGED)}

    async def send(self, topic: Topic, key: str, value: bytes) -> None:
        if self.producer is None:
            return
        self._queued.setdefault(topic.name, []).append((key.encode(), value))

    async def flush(self) -> None:
        queued, self._queued = self._queued, {}
        if self.producer is None or not queued:
            return
        futures = []
        for name, records in queued.items():
            futures += await produce_many(self.producer, self.settings.topic(name), records)
            counter = self._counters.get(name) or metrics.EMITTED.labels(name)
            counter.inc(len(records))
        await asyncio.gather(*futures)


class Tombstones:
    """Erased subjects (hashed identifiers and profile ids) with their erasure time, refreshed from
    Cassandra so every worker honours an erasure made through any of them."""

    def __init__(self, store: ProfileStore) -> None:
        self.store = store
        self.erased: dict[str, int] = {}

    async def refresh(self) -> None:
        self.erased = await self.store.tombstones()

    def add(self, subjects: Sequence[str], erased_ms: int) -> None:
        for s in subjects:
            self.erased[s] = max(erased_ms, self.erased.get(s, 0))

    def erased_before(self, kind: str, value: str, received_ms: int) -> bool:
        if not self.erased:
            return False
        at = self.erased.get(subject_hash(kind, value))
        return at is not None and received_ms <= at


class LRU(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


def fold_message(op: str, profile_id: str, *, body: bytes | None = None, **fields: Any) -> tuple[str, bytes]:
    """A ``profile.fold`` message: a one-line JSON header, then (events only) a newline and the event's bytes as
    ingest wrote them. The folder validates those bytes once, without parsing them as part of the header and
    serialising them again (which cost it ~10% of its CPU). orjson never writes a raw newline, so the first one
    ends the header.

    >>> key, value = fold_message("event", "p1", body=b'{"type":"track"}')
    >>> value
    b'{"op":"event","profileId":"p1"}\\n{"type":"track"}'
    >>> parse_fold_message(value)["raw"]
    b'{"type":"track"}'
    """
    header = orjson.dumps({"op": op, "profileId": profile_id, **fields})
    return profile_id, header if body is None else header + b"\n" + body


def parse_fold_message(value: bytes) -> Op:
    header, newline, body = value.partition(b"\n")
    op: Op = orjson.loads(header)
    if newline:
        op["raw"] = body
    elif op.get("op") == "event" and "event" in op:
        op["raw"] = orjson.dumps(op.pop("event"))  # the older form, the event inside the header
    return op


# ---------------------------------------------------------------------------------------------------------
class Resolver:
    def __init__(self, store: ProfileStore, hot: HotProfiles | None, tombstones: Tombstones, dispatch: Dispatch,
                 *, clock: Clock = utc_now, cache_size: int = 500_000) -> None:
        self.store = store
        self.hot = hot
        self.tombstones = tombstones
        self.dispatch = dispatch
        self.clock = clock
        self.cache: LRU = LRU(cache_size)

    async def resolve_batch(self, raws: Sequence[bytes]) -> None:
        parsed: list[tuple[Event, bytes, list[Identifier]]] = []
        turns = TimeSlice()
        for raw in raws:
            await turns.pause()
            try:
                event = decode_event(raw)
            except (ValidationError, ValueError):
                metrics.PROCESSED.labels("resolve", "invalid").inc()
                log.warning("skipping an undecodable event on events.raw")
                continue
            received_ms = to_ms(event.received_at)
            direct = direct_profile_id(event)
            ids = [] if direct else identifiers_of(event)
            if direct and self.tombstones.erased_before("profile_id", direct, received_ms):
                metrics.PROCESSED.labels("resolve", "erased").inc()
                continue
            if any(self.tombstones.erased_before(i.kind, i.value, received_ms) for i in ids):
                metrics.PROCESSED.labels("resolve", "erased").inc()
                continue
            if not direct and not ids:
                metrics.PROCESSED.labels("resolve", "unidentified").inc()
                continue
            parsed.append((event, raw, ids))
        if not parsed:
            return
        # A tombstoned identifier seen again (after its erasure) is looked up afresh: the cache may still
        # point at the erased profile.
        misses = {i for _, _, ids in parsed for i in ids
                  if i not in self.cache or (self.tombstones.erased
                                             and subject_hash(i.kind, i.value) in self.tombstones.erased)}
        known: dict[Identifier, str] = {i: self.cache[i] for _, _, ids in parsed for i in ids
                                        if i in self.cache and i not in misses}
        if misses:
            known.update(await self.store.lookup_identities(misses))
        # Claims race with other workers: a lost claim adds what the winner wrote and the batch is planned
        # again, until every claim holds. Only identifiers other workers may claim too need a lightweight
        # transaction; the rest are written with the dispatch below.
        for _attempt in range(10):
            out, claims, relinks, keyed = self._plan(parsed, known)
            now = self.clock()
            exclusive = [(i, pid) for i, pid in claims.items() if i not in keyed]
            owners = await gather_limited((self.store.claim_identity(i, pid, now) for i, pid in exclusive), limit=32)
            lost = {i: owner for (i, pid), owner in zip(exclusive, owners, strict=True) if owner != pid}
            if not lost:
                break
            known.update(lost)
            metrics.CLAIM_CONFLICTS.inc(len(lost))
        else:  # pragma: no cover - would need ten concurrent conflicting claimers in a row
            raise RuntimeError("identity claims did not settle")
        # Plain links (the partition's own user ids, relinks after merges) are idempotent and their profile ids
        # deterministic (a retry plans the same), so they go together with the hand-over to the folder.
        plain = [(i, pid) for i, pid in claims.items() if i in keyed] + list(relinks.items())
        await asyncio.gather(
            self.store.link_many(plain, now),
            self.dispatch(out),
            self.hot.write({}, {(i.kind, i.value): pid for i, pid in {**claims, **relinks}.items()})
            if self.hot is not None else asyncio.sleep(0))
        metrics.PROCESSED.labels("resolve", "ok").inc(len(parsed))

    def _plan(self, parsed: Sequence[tuple[Event, bytes, list[Identifier]]], known_in: dict[Identifier, str]
              ) -> tuple[list[tuple[str, bytes]], dict[Identifier, str], dict[Identifier, str], set[Identifier]]:
        """Plan a batch in order. Also returns the user ids the batch's events are keyed by: only the owner
        of that events.raw partition ever claims them, so they need no lightweight transaction (any other
        identifier can show up on several partitions at once and is claimed exclusively)."""
        known = dict(known_in)
        out: list[tuple[str, bytes]] = []
        claims: dict[Identifier, str] = {}
        relinks: dict[Identifier, str] = {}
        keyed: set[Identifier] = set()
        for event, raw, ids in parsed:
            if event.user_id and event.type != "alias":
                keyed.add(Identifier("user_id", event.user_id.strip()))
            direct = direct_profile_id(event)
            if direct:
                out.append(fold_message("event", direct, body=raw))
                continue
            plan = plan_resolution(ids, known)
            for ident in plan.claims:
                claims.setdefault(ident, plan.target)
            matched = [i for i in ids if known.get(i) and known[i] != plan.target]
            for ident in matched:
                relinks[ident] = plan.target
            linking = [i for i in ids if known.get(i)]
            for loser in plan.merge_from:
                out.append(fold_message("merge_out", loser, into=plan.target, reason=merge_reason(event, linking),
                                        cause=event.dedup_key, at=iso(to_ms(event.timestamp))))
            for ident in ids:
                known[ident] = plan.target
                self.cache.put(ident, plan.target)
            out.append(fold_message("event", plan.target, body=raw))
        return out, claims, relinks, keyed


# ---------------------------------------------------------------------------------------------------------
RECENT_KEYS = 32


@dataclass
class Loaded:
    """What the owner of a profile knows about it."""

    state: ProfileState | None
    document: dict[str, Any] | None
    merged_into: str | None
    segments: dict[str, tuple[bool, int]] = field(default_factory=dict)  # id -> (member, changed ms)
    # Dedup keys folded lately (seeded from the latest stored events when loaded): a resent message whose
    # timestamp moved past the last folded event (derived from receivedAt) is still sent to the dedup index.
    recent: dict[str, None] = field(default_factory=dict)

    def remember(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.recent[key] = None
        while len(self.recent) > RECENT_KEYS:
            del self.recent[next(iter(self.recent))]

    def segment_ids(self) -> list[str]:
        return sorted(s for s, (member, _) in self.segments.items() if member)


@dataclass
class _Pending:
    """Effects of one batch, applied in order: events, Kafka, Redis, snapshots, dedup index."""

    stored: list[StoredEvent] = field(default_factory=list)
    raw: dict[str, bytes] = field(default_factory=dict)
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: set[str] = field(default_factory=set)


class Folder:
    def __init__(self, store: ProfileStore, hot: HotProfiles | None, emitter: Emitter, tombstones: Tombstones,
                 dispatch: Dispatch, *, clock: Clock = utc_now, cache_size: int = 200_000) -> None:
        self.store = store
        self.hot = hot
        self.emitter = emitter
        self.tombstones = tombstones
        self.dispatch = dispatch
        self.clock = clock
        self.cache: LRU = LRU(cache_size)

    def forget_all(self) -> None:
        """Partitions moved: another worker may own some of these profiles now."""
        self.cache.clear()

    async def _load(self, profile_ids: Sequence[str]) -> None:
        """Bring profiles into the cache with two bulk reads (snapshots, then segment memberships).

        The snapshot is written with every batch before its events are marked processed, so a batch cut short
        by a crash is delivered again and folded onto the snapshot (a refold from the event store when the
        snapshot already holds some of its events): loading needs nothing but the snapshot."""
        missing = [p for p in dict.fromkeys(profile_ids) if p not in self.cache]
        if not missing:
            return
        snapshots = await self.store.load_many(missing)
        live = [p for p in missing if snapshots[p].state is not None and snapshots[p].merged_into is None]
        segment_rows: dict[str, list[dict[str, Any]]] = {}
        latest: dict[str, list[str]] = {}
        if live:
            # The dedup keys of the latest stored events stand in for what the profile's previous owner (or this
            # worker, before a restart or a rebalance) remembered: a resend of one of them whose timestamp was
            # derived from its own receivedAt (no client timestamp, or clock-skew correction) can sort after the
            # last folded event, and only `recent` sends it to the dedup index.
            segment_rows, latest = await asyncio.gather(self.store.segment_rows_many(live),
                                                        self.store.latest_event_keys_many(live, RECENT_KEYS))
        for pid in missing:
            snap = snapshots[pid]
            if snap.merged_into is not None:
                self.cache.put(pid, Loaded(None, None, snap.merged_into))
                continue
            segments = {r["segment_id"]: (bool(r["member"]), int(r["changed_at"].timestamp() * 1000))
                        for r in segment_rows.get(pid, ())}
            loaded = Loaded(snap.state, snap.document, None, segments)
            loaded.remember(latest.get(pid, ()))
            if loaded.document is not None and loaded.document.get("segments") != loaded.segment_ids():
                # Membership changes are not written to the snapshot (their own rows are): the document is
                # brought up to date here, as it was in Redis.
                loaded.document = {**loaded.document, "segments": loaded.segment_ids()}
            self.cache.put(pid, loaded)

    # ---- batch entry point -------------------------------------------------------------------------
    async def fold_batch(self, raws: Sequence[bytes]) -> None:
        ops: list[Op] = []
        for raw in raws:
            try:
                ops.append(parse_fold_message(raw))
            except orjson.JSONDecodeError:
                log.warning("skipping an undecodable fold message")
        groups: dict[str, list[Op]] = {}
        turns = TimeSlice()  # long loops give the event loop back: the API of this process stays responsive
        for op in ops:
            groups.setdefault(op["profileId"], []).append(op)
            if op["op"] == "event":
                op["parsed"] = self._decode(op)
            await turns.pause()
        # Profiles not cached yet are loaded first: only events at or before a profile's last folded event can
        # have been processed already, so only those are looked up in the dedup index.
        await self._load(list(groups))
        # Segment memberships touch only the profile's segment list: all of the batch's at once, first.
        # (Profiles with a merge or erasure in the batch keep every operation in order on the slow path.)
        plain = {pid for pid, group in groups.items() if all(o["op"] in ("event", "segment") for o in group)}
        memberships = [(pid, op) for pid in plain for op in groups[pid] if op["op"] == "segment"]
        if memberships:
            await self._apply_segments(memberships)
            groups = {pid: rest for pid, group in groups.items()
                      if (rest := [op for op in group if pid not in plain or op["op"] != "segment"])}
        candidates = {pid: [o["parsed"] for o in group if o.get("parsed") is not None]
                      for pid, group in groups.items() if self.cache[pid].merged_into is None}
        done = await self.store.existing_event_keys(self._maybe_done(candidates))
        forwards: list[tuple[str, bytes]] = []
        fast: dict[str, list[Op]] = {}
        slow: dict[str, list[Op]] = {}
        for pid, group in groups.items():
            simple = all(o["op"] == "event" for o in group) and self.cache[pid].merged_into is None
            (fast if simple else slow)[pid] = group
        if fast:
            await self._apply_events(fast, forwards, done)
        for pid, group in slow.items():
            for op in group:
                await self._apply_op(pid, op, forwards)
        if forwards:
            await self.dispatch(forwards)

    @staticmethod
    def _decode(op: Op) -> tuple[Event, bytes] | None:
        parsed = op.get("parsed")
        if parsed is not None:
            return parsed  # type: ignore[no-any-return]
        raw = op.get("raw")
        if not isinstance(raw, bytes):
            metrics.PROCESSED.labels("fold", "invalid").inc()
            return None
        try:
            return decode_event(raw), raw
        except (ValidationError, ValueError):
            metrics.PROCESSED.labels("fold", "invalid").inc()
            return None

    async def _apply_op(self, pid: str, op: Op, forwards: list[tuple[str, bytes]]) -> None:
        kind = op["op"]
        item = self.cache.get(pid)
        if item is None:
            await self._load([pid])
            item = self.cache[pid]
        if kind == "event":
            if item.merged_into:
                forwards.append(fold_message("event", item.merged_into, body=op["raw"]))
                metrics.FORWARDED.inc()
            else:
                await self._apply_events({pid: [op]}, forwards)
        elif kind == "merge_out":
            await self._merge_out(pid, item, op, forwards)
        elif kind == "absorb":
            await self._absorb(pid, item, op, forwards)
        elif kind == "erase":
            await self._erase(pid, item, op, forwards)
        elif kind == "segment":
            await self._segment(pid, item, op)
        else:
            log.warning("unknown fold operation %r", kind)

    # ---- events ------------------------------------------------------------------------------------
    async def _apply_events(self, groups: dict[str, list[Op]], forwards: list[tuple[str, bytes]],
                            done: set[str] | None = None) -> None:
        """Fold new events into their (cached) profiles with four rounds of writes whatever the batch size:
        events and downstream messages, then snapshots and the hot copies, then the dedup index."""
        candidates: dict[str, list[tuple[Event, bytes]]] = {}
        for pid, ops in groups.items():
            seen: set[str] = set()
            erased_at = self.tombstones.erased.get(subject_hash("profile_id", pid)) if self.tombstones.erased else None
            for op in ops:
                parsed = self._decode(op)
                if parsed is None:
                    continue
                event = parsed[0]
                if erased_at is not None and to_ms(event.received_at) <= erased_at:
                    metrics.PROCESSED.labels("fold", "erased").inc()
                    continue
                if event.dedup_key in seen:
                    metrics.PROCESSED.labels("fold", "duplicate").inc()
                    continue
                seen.add(event.dedup_key)
                candidates.setdefault(pid, []).append(parsed)
        if done is None:
            done = await self.store.existing_event_keys(self._maybe_done(candidates))
        pending = _Pending()
        fresh: dict[str, list[tuple[Event, bytes]]] = {}
        for pid, evs in candidates.items():
            for event, raw in evs:
                if event.dedup_key in done:
                    metrics.PROCESSED.labels("fold", "duplicate").inc()
                    continue
                ts_ms, key = event_key(event)
                pending.stored.append(StoredEvent(pid, ts_ms, key, event))
                pending.raw[key] = raw
                fresh.setdefault(pid, []).append((event, raw))
        if not fresh:
            return
        # A late event (before the last one folded) means a refold of the profile's whole history: the stored
        # events (read before this batch's are written) plus the new ones.
        refold = [pid for pid, new_events in fresh.items()
                  if not self._in_order(self.cache[pid].state, [e for e, _ in new_events])]
        history = dict(zip(refold, await gather_limited(self.store.events(p) for p in refold), strict=True))
        turns = TimeSlice()
        for pid, new_events in fresh.items():
            await turns.pause()
            item = self.cache[pid]
            events = [e for e, _ in new_events]
            item.remember([e.dedup_key for e in events])
            if pid in history:
                item.state = fold_all(pid, [r.event for r in history[pid]] + events)
                metrics.REFOLDS.inc()
            else:
                state = item.state or new_state(pid)
                for event in sorted(events, key=event_key):
                    fold(state, event)
                item.state = state
            await self._publish(pid, item, events, [], pending=pending, raws=[r for _, r in new_events])
        await self._commit(pending)
        metrics.PROCESSED.labels("fold", "ok").inc(len(pending.stored))
        now_s = self.clock().timestamp()
        for row in pending.stored:
            metrics.FRESHNESS.observe(max(0.0, now_s - row.event.received_at.timestamp()))

    def _maybe_done(self, candidates: dict[str, list[tuple[Event, bytes]]]) -> dict[str, list[str]]:
        """Dedup keys of the events that may have been processed before: those not after the profile's last
        folded event. The last folded key is the greatest ever folded into the (snapshotted) state, and the
        dedup index is written only after the snapshot, so a later event cannot be in the index."""
        keys: dict[str, list[str]] = {}
        for pid, evs in candidates.items():
            item = self.cache.get(pid)
            state = item.state if item is not None else None
            last = tuple(state.last_key) if state is not None and state.last_key else None
            if last is None:
                continue
            recent = item.recent if item is not None else {}
            maybe = [e.dedup_key for e, _ in evs if e.dedup_key in recent or event_key(e) <= last]
            if maybe:
                keys[pid] = maybe
        return keys

    @staticmethod
    def _in_order(state: ProfileState | None, events: list[Event]) -> bool:
        """Whether ``events`` can be folded on top of ``state``: each is after the last folded one, or folds the
        same in any order (loyalty ledger events with distinct sequence numbers, none the one held)."""
        if state is None or state.last_key is None:
            return True
        last = (state.last_key[0], state.last_key[1])
        held = (state.loyalty or {}).get("ledger_seq")
        seqs: set[int] = set()
        for event in events:
            if event_key(event) > last:
                continue
            if not folds_in_any_order(event):
                return False
            seq = event.properties["ledger_seq"]
            if seq == held or seq in seqs:
                return False
            seqs.add(seq)
        return True

    async def _publish(self, pid: str, item: Loaded, events: Sequence[Event], merges: Sequence[Op],
                       pending: _Pending | None = None, raws: Sequence[bytes] | None = None) -> None:
        """Emit what one profile's update means downstream; with ``pending`` the Redis/snapshot writes join
        the batch, otherwise they happen now."""
        assert item.state is not None
        now = self.clock()
        document = render(item.state, now=now, segments=item.segment_ids())
        changed = changed_fields(item.document, document)
        resolved_at = iso(to_ms(now))
        for index, event in enumerate(events):
            body = raws[index] if raws is not None else encode_event(event)
            await self.emitter.send(EVENTS_RESOLVED, pid, orjson.dumps(
                {"profileId": pid, "event": orjson.Fragment(body), "resolvedAt": resolved_at}))
        for merge in merges:
            await self.emitter.send(EVENTS_RESOLVED, pid, orjson.dumps(
                {"profileId": pid, "merge": merge, "resolvedAt": resolved_at, "at": resolved_at}))
        if changed:
            cause_event = max(events, key=lambda e: e.received_at) if events else None
            cause: dict[str, Any] | None = None if cause_event is None else {
                "messageId": cause_event.message_id, "type": cause_event.type, "event": cause_event.event,
                "timestamp": iso(to_ms(cause_event.timestamp)), "receivedAt": iso(to_ms(cause_event.received_at)),
                "source": cause_event.source,
                # An update can fold several new events: how many, and when ingest accepted the oldest of them.
                "events": len(events), "firstReceivedAt": iso(to_ms(min(e.received_at for e in events)))}
            if merges:
                cause = {"merge": merges[0], **(cause or {})}
            await self.emitter.send(PROFILE_CHANGED, pid, orjson.dumps(
                {"profileId": pid, "changed": changed, "profile": document, "cause": cause, "at": resolved_at}))
        item.document = document
        if pending is not None:
            pending.documents[pid] = document
            pending.snapshots.add(pid)
        else:
            await self.emitter.flush()
            if self.hot is not None:
                await self.hot.write({pid: document}, {})
            await self.store.save(pid, item.state, document, None, now)

    async def _commit(self, pending: _Pending) -> None:
        """Every effect of a batch in two rounds: events, downstream messages, snapshots and hot copies together,
        then the dedup index. An event is only marked processed once its profile snapshot and the event store
        hold it: a batch cut short before the index is delivered again, and its events, at or before the
        snapshot's last one, are then refolded from the store plus the redelivered copies."""
        now = self.clock()
        await asyncio.gather(
            self.store.write_events(pending.stored, pending.raw),
            self.emitter.flush(),
            self.hot.write(pending.documents, {}) if self.hot is not None else asyncio.sleep(0),
            self.store.save_many([(pid, self.cache[pid].state, self.cache[pid].document)
                                  for pid in pending.snapshots], now))
        await self.store.write_index(pending.stored)

    # ---- merges ------------------------------------------------------------------------------------
    async def _merge_out(self, pid: str, item: Loaded, op: Op, forwards: list[tuple[str, bytes]]) -> None:
        into = op["into"]
        if into == pid:
            return
        if item.merged_into and item.merged_into != into:
            # Already merged elsewhere: the two survivors belong together; the larger id merges into the smaller.
            low, high = sorted((item.merged_into, into))
            forwards.append(fold_message("merge_out", high, into=low, reason=op["reason"], cause=op["cause"],
                                         at=op.get("at")))
            return
        now = self.clock()
        if item.merged_into is None:
            await self.store.save(pid, None, None, into, now)
            if self.hot is not None:
                await self.hot.write({}, {("profile_id", pid): into}, deleted=[pid])
            await self.emitter.send(PROFILE_CHANGED, pid, orjson.dumps(
                {"profileId": pid, "deleted": True, "mergedInto": into, "at": iso(to_ms(now))}))
            await self.emitter.flush()
            item.merged_into, item.state, item.document = into, None, None
        forwards.append(fold_message("absorb", into, merged=pid, reason=op["reason"], cause=op["cause"],
                                     at=op.get("at")))

    async def _absorb(self, pid: str, item: Loaded, op: Op, forwards: list[tuple[str, bytes]]) -> None:
        merged = op["merged"]
        if item.merged_into:
            forwards.append(fold_message("absorb", item.merged_into, merged=merged, reason=op["reason"],
                                         cause=op["cause"], at=op.get("at")))
            return
        now = self.clock()
        moved = await self.store.events(merged)
        moved_rows = [StoredEvent(pid, r.ts_ms, r.event_key, r.event) for r in moved]
        if moved_rows:
            await self.store.write_events(moved_rows, {r.event_key: encode_event(r.event) for r in moved_rows})
        identity_rows = await self.store.profile_identities(merged)
        identifiers = [Identifier(r["kind"], r["value"]) for r in identity_rows]
        await self.store.link_identities(identifiers, pid, now)
        if self.hot is not None:
            await self.hot.write({}, {(i.kind, i.value): pid for i in identifiers})
        segments = item.segments
        all_events = await self.store.events(pid)
        item.state = fold_all(pid, [r.event for r in all_events])
        item.segments = segments
        merge = {"survivor": pid, "merged": [merged], "reason": op["reason"], "cause": op["cause"]}
        await self.store.record_merge(pid, merged, op["reason"], op["cause"], len(moved_rows), len(identifiers), now)
        await self._publish(pid, item, [], [merge])
        await self.store.repoint_index(moved_rows)
        await self.store.forget_identities(merged, identifiers, delete_links=False)
        await self.store.delete_events(merged, [])
        metrics.MERGES.labels(op["reason"]).inc()

    # ---- erasure -----------------------------------------------------------------------------------
    async def _erase(self, pid: str, item: Loaded, op: Op, forwards: list[tuple[str, bytes]]) -> None:
        if item.merged_into:
            forwards.append(fold_message("erase", item.merged_into, requestId=op["requestId"],
                                         erasedAt=op["erasedAt"]))
            return
        erased_ms = int(op["erasedAt"])
        erased_at = datetime.fromtimestamp(erased_ms / 1000, UTC)
        identity_rows = await self.store.profile_identities(pid)
        identifiers = [Identifier(r["kind"], r["value"]) for r in identity_rows]
        merged_from = [r["merged"] for r in await self.store.merges(pid)]
        subjects = [subject_hash(i.kind, i.value) for i in identifiers]
        subjects += [subject_hash("profile_id", p) for p in [pid, *merged_from]]
        await self.store.add_tombstones(subjects, erased_at)
        self.tombstones.add(subjects, erased_ms)
        events = await self.store.events(pid)
        await self.store.delete_events(pid, [r.event_key for r in events])
        await self.store.forget_identities(pid, identifiers, delete_links=True)
        for other in merged_from:
            await self.store.delete_profile(other)
        await self.store.delete_merges(pid)
        await self.store.delete_segments(pid)
        await self.store.delete_profile(pid)
        if self.hot is not None:
            await self.hot.write({}, {}, deleted=[pid, *merged_from],
                                 deleted_idents=[(i.kind, i.value) for i in identifiers]
                                 + [("profile_id", p) for p in merged_from])
        await self.emitter.send(PROFILE_CHANGED, pid, orjson.dumps(
            {"profileId": pid, "deleted": True, "at": iso(to_ms(self.clock()))}))
        await self.emitter.flush()
        await self.store.complete_erasure_request(op["requestId"], len(events), self.clock())
        self.cache.put(pid, Loaded(None, None, None))
        metrics.ERASURES.inc()

    # ---- segment membership ------------------------------------------------------------------------
    async def _apply_segments(self, memberships: Sequence[tuple[str, Op]]) -> None:
        """Membership changes of many profiles: the newest change per segment wins (older messages are ignored),
        written in one round: the membership rows and the hot documents. The snapshot is not rewritten for a
        membership change (it was a second snapshot write per customer entering a segment): loading a profile
        reads its membership rows and brings the snapshot's document up to date, and so does the API when it
        reads a document from Cassandra."""
        rows: list[tuple[str, str, str | None, bool, int]] = []
        changed: dict[str, Loaded] = {}
        for pid, op in memberships:
            item = self.cache[pid]
            if item.merged_into or item.state is None:
                continue  # merged or erased profiles have no segments; the segmenter learns it from profile.changed
            at_ms = int(op["atMs"])
            segment_id = str(op["segmentId"])
            member = op["change"] == "entered"
            previous = item.segments.get(segment_id)
            if previous is not None and previous[1] > at_ms:
                continue  # an older message than what we hold
            item.segments[segment_id] = (member, at_ms)
            rows.append((pid, segment_id, op.get("segmentName"), member, at_ms))
            changed[pid] = item
        if not rows:
            return
        documents: dict[str, dict[str, Any]] = {}
        for pid, item in changed.items():
            if item.document is not None:
                item.document = {**item.document, "segments": item.segment_ids()}
                documents[pid] = item.document
        await asyncio.gather(
            self.store.upsert_segments(rows),
            self.hot.write(documents, {}) if self.hot is not None and documents else asyncio.sleep(0))

    async def _segment(self, pid: str, item: Loaded, op: Op) -> None:
        # A membership change among a merge or erasure of the same batch: in order, on its own.
        await self._apply_segments([(pid, op)])


def segment_message(raw: bytes) -> tuple[str, bytes] | None:
    """A ``segment.membership`` message as a fold operation for its profile's owner."""
    try:
        msg = orjson.loads(raw)
        at = datetime.fromisoformat(str(msg["at"]).replace("Z", "+00:00"))
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return fold_message("segment", str(msg["profileId"]), segmentId=str(msg["segmentId"]),
                            segmentName=msg.get("segmentName"), change=msg["change"], atMs=to_ms(at))
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
        log.warning("skipping an invalid segment.membership message")
        return None


async def retry_forever(what: str, action: Callable[[], Awaitable[None]]) -> None:
    """Run a batch until it succeeds: a failed batch must not be acknowledged (faust acks after the loop
    body), and every effect is idempotent so a retry is safe."""
    delay = 0.2
    while True:
        try:
            await action()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.BATCH_FAILURES.labels(what).inc()
            log.exception("%s batch failed; retrying in %.1fs", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)
