"""The segmenter's application service: turns stream inputs, scheduler wake-ups and API calls into domain
decisions, persists them and emits membership changes exactly once.

Exactly-once emission across restarts:

1. A decision's new membership state and its outgoing messages are written in one logged batch (state +
   outbox rows, each message with a ``transitionId`` = segment:profile:sequence).
2. Messages are produced (acks=all, idempotent producer) and their outbox rows deleted after the ack.
3. Only then is the input's Kafka position stored with the profile (and faust commits the offset).

A crash before (1) replays the input, which decides the same transitions. A crash between (1) and (3)
replays an input whose decision now equals the stored state, so nothing new is decided; the outbox rows
left behind are resolved at start by reading the tail of ``segment.membership``: a transition already
there is dropped, a missing one is sent. Older replays of ``profile.changed`` are skipped by their
(partition, offset), so an intermediate state is never re-entered.

The outbox and the schedule are queues whose handled entries are deleted; their polls read from per-shard
floors (:mod:`loyalist.queues`) past the tombstones those deletes leave, which a read from the partition's
start would scan on every poll until Cassandra fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from loyalist.events import Event, decode_event, encode_event
from loyalist.queues import ReadFloors
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW, SEGMENT_MEMBERSHIP
from services.segmenter import metrics
from services.segmenter.config import SegmenterConfig
from services.segmenter.domain.lifecycle import note_order
from services.segmenter.domain.membership import (
    CustomerFacts,
    Decision,
    SegmentDefinition,
    Transition,
    build_context,
    decide,
    exit_all,
    needed_event_names,
    order_segments,
    validate_references,
)
from services.segmenter.domain.predictions import materially_changed
from services.segmenter.domain.recommendations import CoPurchases, order_products
from services.segmenter.domain.rfm import RfmScorer, RfmValues, rfm_values
from services.segmenter.domain.rules import EventRecord, Rule, RuleError, evaluate, parse_datetime, parse_rule
from services.segmenter.store import (
    OUTBOX_SHARD,
    SCHEDULE_SHARDS,
    Decided,
    OutboxEntry,
    SegmenterStore,
    StoredProfile,
    StoredSegment,
)

log = logging.getLogger(__name__)
# A customer's RFM values moved in the sketches: (profile id, old, new).
Rescored = tuple[str, RfmValues | None, RfmValues | None]
T = TypeVar("T")
_CHANGED_PROCESSED = metrics.INPUTS.labels("profile.changed", "processed")
_CHANGED_REPLAYED = metrics.INPUTS.labels("profile.changed", "replay_skipped")

ORDER_EVENT = "Order Completed"
# Outbox rows still present this long after their state write had their produce fail; swept this often.
OUTBOX_STUCK_S = 120.0
OUTBOX_SWEEP_S = 30.0


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def order_amount(properties: dict[str, Any]) -> float:
    for key in ("revenue", "total", "value", "subtotal"):
        value = properties.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 0.0


@dataclass(frozen=True, slots=True)
class Track:
    """What the segmenter keeps of a resolved track event."""

    event: str
    timestamp: datetime
    properties: dict[str, Any]
    message_id: str
    received_at: datetime


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def fast_track(raw: dict[str, Any]) -> Track | None:
    """A well-formed track event read without the full model (most of the input); None for anything else,
    which the full decoder then classifies (another type, invalid, unusual timestamps)."""
    name, message_id, properties = raw.get("event"), raw.get("messageId"), raw.get("properties", {})
    if (raw.get("type") != "track" or not isinstance(name, str) or not name or not isinstance(message_id, str)
            or not 0 < len(message_id) <= 200 or not isinstance(properties, dict)):
        return None
    timestamp, received_at = _instant(raw.get("timestamp")), _instant(raw.get("receivedAt"))
    if timestamp is None or received_at is None:
        return None
    return Track(name, timestamp, properties, message_id, received_at)


@dataclass
class PreviewResult:
    size: int
    scanned: int
    sample: list[str]


class SegmenterEngine:
    def __init__(self, settings: Settings, config: SegmenterConfig, store: SegmenterStore,
                 producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.config = config
        self.store = store
        self.producer = producer
        self.thresholds = config.lifecycle()
        self.scorer = RfmScorer()
        self._held: dict[str, RfmValues | None] = {}  # see _resync
        self.copurchases = CoPurchases()
        self.segments: list[SegmentDefinition] = []
        self.segment_rows: dict[str, StoredSegment] = {}
        self.event_names: set[str] = set()
        self._locks = [asyncio.Lock() for _ in range(256)]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._backfills: dict[str, asyncio.Task[Any]] = {}
        self._backfill_generation: dict[str, int] = {}
        self._stopping = asyncio.Event()
        self.membership_topic = settings.topic(SEGMENT_MEMBERSHIP.name)
        self.raw_topic = settings.topic(EVENTS_RAW.name)
        self.churn: Any = None  # services.segmenter.models.ModelRuntime, set by the app
        self.member_counts: dict[str, int] = {}
        self._tail: asyncio.Future[None] | None = None
        self._published_sizes: dict[str, tuple[str, str]] = {}
        # Where the scheduler's polls (per schedule shard) and the outbox sweeps start reading.
        self.schedule_floors = ReadFloors()
        self.outbox_floors = ReadFloors()

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.load_floors()
        await self.reload_segments()
        started = time.monotonic()
        count = 0
        async for stored in self.store.all_profiles():
            values = rfm_values(stored.document)
            if values is not None:
                self.scorer.add(values)
            count += 1
        for profile_id, customer_orders in await self._all_orders():
            self.copurchases.add_customer(profile_id, customer_orders)
        log.info("rebuilt RFM sketches and co-purchases over %d profiles in %.1fs", count, time.monotonic() - started)
        await self.recover_outbox()
        await self.recount_members()
        self._spawn(self._scheduler_loop(), "scheduler")
        for seg in self.segment_rows.values():
            if seg.backfill_status != "done":
                self.start_backfill(seg.segment_id, "backfill")

    async def load_floors(self) -> None:
        """The read floors saved by the previous run (or another instance): the first polls start there."""
        await self.store.schedule_floors.load(self.schedule_floors)
        await self.store.outbox_floors.load(self.outbox_floors)

    async def stop(self) -> None:
        self._stopping.set()
        await self.finish_pending()
        # Backfills stop at their next customer; the scheduler at its next pass. Anything cut short by the
        # timeout is covered by the outbox recovery at the next start.
        tasks = [*self._tasks, *self._backfills.values()]
        _, pending = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _stripe(self, profile_id: str) -> int:
        return hash(profile_id) % len(self._locks)

    def lock(self, profile_id: str) -> asyncio.Lock:
        # Striped locks: one customer's inputs (stream, scheduler, backfill) are decided one at a time.
        return self._locks[self._stripe(profile_id)]

    # ---- segment sizes -----------------------------------------------------------------------------
    def _count_members(self, changes: Sequence[tuple[str, str]]) -> None:
        """Apply acknowledged membership changes (segment id, "entered"/"exited") to the size gauges."""
        for segment_id, change in changes:
            if segment_id in self.member_counts:
                self.member_counts[segment_id] = max(0, self.member_counts[segment_id]
                                                     + (1 if change == "entered" else -1))
        self._publish_sizes()

    async def recount_members(self) -> None:
        """Segment sizes from the store (at start and every ``member_count_interval_s``): corrects what
        other instances changed and anything a failure left uncounted."""
        ids = list(self.segment_rows)
        counts = await asyncio.gather(*(self.store.member_count(sid) for sid in ids))
        self.member_counts = dict(zip(ids, counts, strict=True))
        self._publish_sizes()

    def _publish_sizes(self) -> None:
        labels = {}
        for segment_id, row in self.segment_rows.items():
            labels[segment_id] = (segment_id, row.name)
            metrics.SEGMENT_MEMBERS.labels(segment_id, row.name).set(self.member_counts.get(segment_id, 0))
        for segment_id, old in list(self._published_sizes.items()):
            if labels.get(segment_id) != old:
                with contextlib.suppress(KeyError):
                    metrics.SEGMENT_MEMBERS.remove(*old)
        self._published_sizes = labels

    async def reload_segments(self) -> None:
        rows = await self.store.segments()
        definitions = []
        for row in rows:
            try:
                definitions.append(SegmentDefinition.create(row.segment_id, row.name, row.definition,
                                                            version=row.version, description=row.description))
            except RuleError:
                log.exception("stored segment %s has an invalid rule; skipped", row.segment_id)
        self.segment_rows = {r.segment_id: r for r in rows}
        self.member_counts = {sid: self.member_counts.get(sid, 0) for sid in self.segment_rows}
        self._publish_sizes()
        self.segments = order_segments(definitions)
        self.event_names = needed_event_names(self.segments)
        metrics.SEGMENTS.set(len(self.segments))

    # ---- stream inputs ---------------------------------------------------------------------------
    async def on_profile_changed(self, message: dict[str, Any], partition: int, offset: int) -> None:
        """One ``profile.changed`` on its own (the stream takes batches: :meth:`on_profile_changed_batch`)."""
        await self.on_profile_changed_batch([(message, partition, offset)])

    async def on_profile_changed_batch(self, items: Sequence[tuple[dict[str, Any], int, int]]) -> None:
        """A batch of ``profile.changed`` (message, partition, offset), in partition order.

        The same effects as one message at a time — each message is decided in order against the state the
        previous one left — with the I/O of the whole batch together: the stored rows of every customer in
        the batch read with a few multi-key requests, every customer's decided state (profile row with its
        Kafka position, memberships, outbox rows, schedule entry) written with one batch per customer (a
        logged one when it holds several rows), the membership changes produced together, and only then the
        outbox rows cleared, churn observations recorded and predictions published."""
        started = time.perf_counter()
        by_profile: dict[str, list[tuple[dict[str, Any], int, int]]] = {}
        for message, partition, offset in items:
            profile_id = message.get("profileId")
            if not isinstance(profile_id, str) or not profile_id:
                metrics.INPUTS.labels("profile.changed", "invalid").inc()
                continue
            by_profile.setdefault(profile_id, []).append((message, partition, offset))
        if not by_profile:
            return
        churn_inputs: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        async with contextlib.AsyncExitStack() as held:
            # Every customer of the batch at once; stripes taken in one order (everyone else holds at most one).
            for stripe in sorted({self._stripe(pid) for pid in by_profile}):
                await held.enter_async_context(self._locks[stripe])
            profile_ids = list(by_profile)
            stored_rows, stored_memberships = await asyncio.gather(
                self.store.profiles(profile_ids), self.store.memberships_many(profile_ids))
            events: dict[str, list[EventRecord]] = {}
            if self.event_names:
                fetched = await asyncio.gather(*(self._events(pid) for pid in profile_ids))
                events = dict(zip(profile_ids, fetched, strict=True))
            groups: list[Decided] = []
            outgoing: list[tuple[str, str, str, bytes]] = []  # profile id, transition id, change, payload
            after: list[Any] = []
            rescored: list[Rescored] = []
            now = datetime.now(UTC)
            try:
                for profile_id, messages in by_profile.items():
                    stored = stored_rows.get(profile_id)
                    self._resync(profile_id, stored.document if stored is not None else {})
                    if any(m.get("deleted") for m, _, _ in messages):
                        # Rare (erasure, merges): the one-message path, in order, under the lock already held.
                        for message, partition, offset in messages:
                            churn_input = await self._profile_changed_locked(profile_id, message, partition, offset)
                            if churn_input is not None:
                                churn_inputs.append(churn_input)
                        continue
                    decided = self._decide_messages(profile_id, messages, stored, stored_memberships[profile_id],
                                                    events.get(profile_id, []), now, churn_inputs, rescored)
                    if decided is None:
                        continue
                    rows, sent, previous_next = decided
                    next_at = rows.next_evaluation_at
                    groups.append(rows)
                    outgoing.extend(sent)
                    if previous_next is not None and previous_next != next_at:
                        # The superseded schedule entry: dropped afterwards (the scheduler ignores and drops one
                        # that no longer matches the profile row, should this delete be lost).
                        after.append(self.store.unschedule_row(profile_id, previous_next))
                metrics.EVALUATIONS.inc(len(self.segments) * sum(len(m) for m in by_profile.values()))
                await self.store.write_decided(groups)
            except BaseException:
                # The batch is retried from the stored profiles, which still hold the old values: the sketches
                # go back to them, or the retry would take each old value out a second time.
                self._unscore(rescored)
                raise
            if outgoing:
                # Each customer's changes in order on its partition; all acknowledged before the outbox rows go.
                futures = [await self.producer.send(self.membership_topic, raw, key=pid.encode())
                           for pid, _, _, raw in outgoing]
                await asyncio.gather(*futures)
                for change in ("entered", "exited"):
                    count = sum(1 for _, _, c, _ in outgoing if c == change)
                    if count:
                        metrics.MEMBERSHIP_CHANGES.labels(change).inc(count)
                self._count_members([(tid.split(":", 1)[0], change) for _, tid, change, _ in outgoing])
                after.extend(self.store.outbox_done_row(tid, now) for _, tid, _, _ in outgoing)
            metrics.DECISION_DURATION.observe(time.perf_counter() - started)
        new_profiles = frozenset(pid for pid in by_profile if pid not in stored_rows)
        # The rest (outbox rows cleared, churn observations, predictions) runs while the next batch is decided;
        # that batch returns — and its offsets and this batch's are committed — only after it finished.
        previous = self._tail
        self._tail = asyncio.ensure_future(self._finish_batch(previous, after, churn_inputs, new_profiles))
        if previous is not None:
            await asyncio.shield(previous)  # a stop cancels the batch, not what is left of the previous one

    async def finish_pending(self, timeout_s: float = 5.0) -> None:
        """Wait for the unfinished part of the latest batch (at stop); what a timeout cuts short is recovered
        at the next start (outbox rows) or taken again at the customer's next update (churn observations)."""
        if self._tail is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._tail), timeout_s)
            if not self._tail.done():
                self._tail.cancel()

    async def _finish_batch(self, previous: asyncio.Future[None] | None, after: list[Any],
                            churn_inputs: list[tuple[str, dict[str, Any], dict[str, Any]]],
                            new_profiles: frozenset[str]) -> None:
        # Idempotent rows and observations; retried until done (a stop cancels).
        cleared = asyncio.ensure_future(_retry_until_done(lambda: self.store.write(after), "clearing outbox rows"))
        try:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous  # one batch's churn observations after the other's
            await self._observe_churn(churn_inputs, new_profiles)
        finally:
            await cleared

    async def _observe_churn(self, churn_inputs: list[tuple[str, dict[str, Any], dict[str, Any]]],
                             new_profiles: frozenset[str]) -> None:
        if self.churn is None or not churn_inputs:
            return
        probabilities = await _retry_until_done(lambda: self.churn.observe_many(churn_inputs, new_profiles),
                                                "churn observations")
        if self.churn.churn.updates < self.config.churn_min_updates_to_publish:
            return
        new = {pid: {"churn_probability": round(p, 4)} for pid, p in probabilities.items()}
        version = f"churn-v{self.churn.churn_version}"

        async def publish() -> None:
            async with contextlib.AsyncExitStack() as held:
                for stripe in sorted({self._stripe(pid) for pid in new}):
                    await held.enter_async_context(self._locks[stripe])
                # Read again under the locks: a CLV refit may have written predictions meanwhile.
                await self._write_predictions_locked(new, version)

        await _retry_until_done(publish, "publishing churn predictions")

    def _decide_messages(self, profile_id: str, messages: Sequence[tuple[dict[str, Any], int, int]],
                         stored: StoredProfile | None, memberships: dict[str, tuple[bool, int]],
                         events: list[EventRecord], now: datetime,
                         churn_inputs: list[tuple[str, dict[str, Any], dict[str, Any]]],
                         rescored: list[Rescored],
                         ) -> tuple[Decided, list[tuple[str, str, str, bytes]], datetime | None] | None:
        """Decide one customer's messages in order (pure apart from the RFM sketches and metrics). Returns the
        rows to write (with the next evaluation as stored), the membership messages to send and the previously
        stored next evaluation, or None when every message was a replay or invalid."""
        position = (stored.source_partition, stored.source_offset) if stored is not None else (None, None)
        document = stored.document if stored is not None else {}
        won_back_at = stored.won_back_at if stored is not None else None
        previous_next = stored.next_evaluation_at if stored is not None else None
        next_at = previous_next
        predictions = stored.predictions if stored is not None else {}
        state = dict(memberships)
        changes: list[tuple[str, bool, int, str, str]] = []
        sent: list[tuple[str, str, str, bytes]] = []
        last: tuple[int, int] | None = None
        for message, partition, offset in messages:
            if position[0] == partition and position[1] is not None and offset <= position[1]:
                _CHANGED_REPLAYED.inc()
                continue
            new_document = message.get("profile")
            if not isinstance(new_document, dict):
                metrics.INPUTS.labels("profile.changed", "invalid").inc()
                continue
            won_back_at = note_order(won_back_at, parse_datetime(document.get("last_order_at")),
                                     parse_datetime(new_document.get("last_order_at")), self.thresholds)
            cause = message.get("cause") or {}
            label = cause.get("event") or cause.get("type") or ",".join(message.get("changed") or []) or "update"
            accepted_at = cause.get("receivedAt") if isinstance(cause.get("receivedAt"), str) else None
            rescored.append(self._rescore(profile_id, document, new_document))
            facts = CustomerFacts(new_document, events, won_back_at, predictions)
            decision = decide(self.segments, facts, {sid: m for sid, (m, _) in state.items()},
                              f"profile.changed ({label})", now, scorer=self.scorer, thresholds=self.thresholds)
            for t in decision.transitions:
                seq = state.get(t.segment_id, (False, 0))[1] + 1
                state[t.segment_id] = (t.change == "entered", seq)
                transition_id, raw = self._payload(profile_id, t, seq, now, accepted_at)
                changes.append((t.segment_id, t.change == "entered", seq, transition_id, raw.decode()))
                sent.append((profile_id, transition_id, t.change, raw))
            next_at = decision.next_evaluation_at
            churn_inputs.append((profile_id, new_document, document))
            document = new_document
            position = last = (partition, offset)
            _CHANGED_PROCESSED.inc()
        if last is None:
            return None
        rows = self.store.decided_rows(profile_id, document, last[0], last[1], won_back_at, next_at, previous_next,
                                       changes, now)
        return rows, sent, previous_next

    def _payload(self, profile_id: str, t: Transition, seq: int, at: datetime,
                 accepted_at: str | None) -> tuple[str, bytes]:
        transition_id = f"{t.segment_id}:{profile_id}:{seq}"
        payload: dict[str, Any] = {
            "profileId": profile_id, "segmentId": t.segment_id, "segmentName": t.segment_name,
            "change": t.change, "reason": t.reason, "at": iso(at), "transitionId": transition_id,
        }
        row = self.segment_rows.get(t.segment_id)
        if row is not None:
            payload["segmentVersion"] = row.version
        if accepted_at:
            payload["eventAcceptedAt"] = accepted_at
        return transition_id, orjson.dumps(payload)

    async def _profile_changed_locked(self, profile_id: str, message: dict[str, Any], partition: int, offset: int
                                      ) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
        """One message, the customer's lock held. Returns what the churn model should observe, if anything."""
        stored = await self.store.profile(profile_id)
        self._resync(profile_id, stored.document if stored is not None else {})
        if (stored is not None and stored.source_partition == partition and stored.source_offset is not None
                and offset <= stored.source_offset):
            metrics.INPUTS.labels("profile.changed", "replay_skipped").inc()
            return None
        if message.get("deleted"):
            merged_into = message.get("mergedInto")
            reason = f"merged into {merged_into}" if isinstance(merged_into, str) else "profile deleted"
            await self._remove_profile(profile_id, stored, reason, partition, offset)
            metrics.INPUTS.labels("profile.changed", "deleted").inc()
            return None
        document = message.get("profile")
        if not isinstance(document, dict):
            metrics.INPUTS.labels("profile.changed", "invalid").inc()
            return None
        old_document = stored.document if stored else {}
        won_back_at = note_order(
            stored.won_back_at if stored else None, parse_datetime(old_document.get("last_order_at")),
            parse_datetime(document.get("last_order_at")), self.thresholds)
        cause = message.get("cause") or {}
        label = cause.get("event") or cause.get("type") or ",".join(message.get("changed") or []) or "update"
        accepted_at = cause.get("receivedAt") if isinstance(cause.get("receivedAt"), str) else None
        rescored = [self._rescore(profile_id, old_document, document)]
        predictions = stored.predictions if stored else {}
        try:
            facts = CustomerFacts(document, await self._events(profile_id), won_back_at, predictions)
            await self._decide_and_apply(profile_id, facts, f"profile.changed ({label})", accepted_at,
                                         stored.next_evaluation_at if stored else None)
            await self.store.put_profile(profile_id, document, partition, offset, won_back_at=won_back_at)
        except BaseException:
            self._unscore(rescored)  # not stored: the retry starts from the old values again
            raise
        metrics.INPUTS.labels("profile.changed", "processed").inc()
        return profile_id, document, old_document

    async def on_events_resolved(self, messages: Sequence[dict[str, Any]]) -> None:
        """A batch of ``events.resolved``: the events and orders of every run of messages between merges are
        stored with one round of writes, then the profiles whose event-based rules may change are decided
        (one customer's in order, customers concurrently). The same effects as one message at a time."""
        run: list[tuple[str, Track]] = []
        invalid = ignored = 0
        for message in messages:
            if isinstance(message.get("merge"), dict):
                await self._store_and_decide(run)
                run = []
                await self.on_event_resolved(message)
                continue
            profile_id = message.get("profileId")
            raw_event = message.get("event")
            if not isinstance(profile_id, str) or not isinstance(raw_event, dict):
                invalid += 1
                continue
            event = fast_track(raw_event)
            if event is None:
                try:
                    full = decode_event(raw_event)
                except ValueError:
                    invalid += 1
                    continue
                if full.type != "track" or not full.event:
                    ignored += 1
                    continue
                event = Track(full.event, full.timestamp, full.properties, full.message_id, full.received_at)
            run.append((profile_id, event))
        await self._store_and_decide(run)
        if invalid:
            metrics.INPUTS.labels("events.resolved", "invalid").inc(invalid)
        if ignored:
            metrics.INPUTS.labels("events.resolved", "ignored").inc(ignored)

    async def _store_and_decide(self, run: Sequence[tuple[str, Track]]) -> None:
        if not run:
            return
        records = [(pid, EventRecord(e.event, e.timestamp, e.properties, e.message_id)) for pid, e in run]
        orders = []
        for pid, e in run:
            if e.event == ORDER_EVENT:
                products = order_products(e.properties)
                orders.append((pid, e.timestamp, e.message_id, order_amount(e.properties), products))
        await self.store.add_many(records, self.config.event_retention_days * 86400, orders)
        for pid, _ts, message_id, _amount, products in orders:
            self.copurchases.add_order(pid, message_id, products)
        # The latest event of each profile that an event-based rule looks at decides (its facts hold every
        # event of the run, which is stored by now).
        deciding: dict[str, Track] = {pid: e for pid, e in run if e.event in self.event_names}

        async def decide(profile_id: str, event: Track) -> None:
            async with self.lock(profile_id):
                stored = await self.store.profile(profile_id)
                if stored is not None and not stored.deleted:
                    facts = CustomerFacts(stored.document, await self._events(profile_id), stored.won_back_at,
                                          stored.predictions)
                    await self._decide_and_apply(profile_id, facts, f"event ({event.event})",
                                                 iso(event.received_at), stored.next_evaluation_at)

        await asyncio.gather(*(decide(pid, e) for pid, e in deciding.items()))
        metrics.INPUTS.labels("events.resolved", "processed").inc(len(run))

    async def on_event_resolved(self, message: dict[str, Any]) -> None:
        merge = message.get("merge")
        if isinstance(merge, dict):
            survivor = merge.get("survivor")
            for merged in merge.get("merged") or []:
                if isinstance(merged, str) and merged != survivor:
                    async with self.lock(merged):
                        stored = await self.store.profile(merged)
                        await self._remove_profile(merged, stored, f"merged into {survivor}", None, None)
            metrics.INPUTS.labels("events.resolved", "merge").inc()
            return
        profile_id = message.get("profileId")
        raw_event = message.get("event")
        if not isinstance(profile_id, str) or not isinstance(raw_event, dict):
            metrics.INPUTS.labels("events.resolved", "invalid").inc()
            return
        try:
            event = decode_event(raw_event)
        except ValueError:
            metrics.INPUTS.labels("events.resolved", "invalid").inc()
            return
        if event.type != "track" or not event.event:
            metrics.INPUTS.labels("events.resolved", "ignored").inc()
            return
        record = EventRecord(event.event, event.timestamp, event.properties, event.message_id)
        await self.store.add_event(profile_id, record, self.config.event_retention_days * 86400)
        if event.event == ORDER_EVENT:
            products = order_products(event.properties)
            await self.store.add_order(profile_id, event.timestamp, event.message_id,
                                       order_amount(event.properties), products)
            self.copurchases.add_order(profile_id, event.message_id, products)
        if event.event in self.event_names:
            async with self.lock(profile_id):
                stored = await self.store.profile(profile_id)
                if stored is not None and not stored.deleted:
                    facts = CustomerFacts(stored.document, await self._events(profile_id), stored.won_back_at,
                                          stored.predictions)
                    await self._decide_and_apply(profile_id, facts, f"event ({event.event})",
                                                 iso(event.received_at), stored.next_evaluation_at)
        metrics.INPUTS.labels("events.resolved", "processed").inc()

    async def _events(self, profile_id: str) -> list[EventRecord]:
        if not self.event_names:
            return []
        return [e for e in await self.store.events(profile_id) if e.name in self.event_names]

    async def _remove_profile(self, profile_id: str, stored: StoredProfile | None, reason: str,
                              partition: int | None, offset: int | None) -> None:
        current = {sid: member for sid, (member, _) in (await self.store.memberships(profile_id)).items()}
        names = {s.segment_id: s.name for s in self.segments}
        await self._apply(profile_id, exit_all(names, current, reason), await self.store.memberships(profile_id),
                          None)
        rescored = [self._rescore(profile_id, stored.document, {})] if stored is not None else []
        try:
            if stored is not None:
                await self.store.reschedule(profile_id, stored.next_evaluation_at, None)
            await self.store.delete_events(profile_id)
            await self.store.delete_orders(profile_id)
            await self.store.put_profile(profile_id, {}, partition, offset, deleted=True)
        except BaseException:
            self._unscore(rescored)
            raise

    # ---- RFM sketches: the population of the stored profiles ---------------------------------------
    # The sketches count each customer's values as stored. A change is counted when it is decided, before it
    # is written; when the write fails the change is undone and the customer noted in ``_held`` with the values
    # the sketches hold, since the write may have landed in part: the retry first moves the customer to what
    # the store holds then (its messages may all be replays by now).
    def _resync(self, profile_id: str, stored_document: dict[str, Any]) -> None:
        if profile_id in self._held:
            self._rescore(profile_id, None, stored_document, held=self._held.pop(profile_id))

    def _rescore(self, profile_id: str, old_document: dict[str, Any] | None, new_document: dict[str, Any], *,
                 held: RfmValues | None = None) -> Rescored:
        """Move a customer's RFM values in the sketches; returns the change, for :meth:`_unscore`."""
        old = rfm_values(old_document) if old_document is not None else held
        new = rfm_values(new_document)
        if not self.scorer.replace(old, new):
            metrics.RFM_DRIFT.inc()
            log.warning("RFM sketches did not hold the previous values of a profile; they are rebuilt at restart")
        return profile_id, old, new

    def _unscore(self, rescored: Sequence[Rescored]) -> None:
        """Undo changes of :meth:`_rescore` that may not have been stored (newest first)."""
        for profile_id, old, new in reversed(rescored):
            self.scorer.replace(new, old)
            self._held[profile_id] = old

    # ---- deciding and applying -------------------------------------------------------------------
    async def _decide_and_apply(self, profile_id: str, facts: CustomerFacts, trigger: str, accepted_at: str | None,
                                previous_next: datetime | None, now: datetime | None = None) -> Decision:
        started = time.perf_counter()
        now = now or datetime.now(UTC)
        stored_memberships = await self.store.memberships(profile_id)
        current = {sid: member for sid, (member, _) in stored_memberships.items()}
        decision = decide(self.segments, facts, current, trigger, now, scorer=self.scorer,
                          thresholds=self.thresholds)
        metrics.EVALUATIONS.inc(len(self.segments))
        await self._apply(profile_id, decision.transitions, stored_memberships, accepted_at)
        await self.store.reschedule(profile_id, previous_next, decision.next_evaluation_at)
        metrics.DECISION_DURATION.observe(time.perf_counter() - started)
        return decision

    async def _apply(self, profile_id: str, transitions: Sequence[Transition],
                     stored: dict[str, tuple[bool, int]], accepted_at: str | None) -> None:
        if not transitions:
            return
        at = datetime.now(UTC)
        changes = []
        payloads = []
        for t in transitions:
            seq = stored.get(t.segment_id, (False, 0))[1] + 1
            transition_id, raw = self._payload(profile_id, t, seq, at, accepted_at)
            changes.append((t.segment_id, t.change == "entered", seq, transition_id, raw.decode()))
            payloads.append((transition_id, raw))
        await self.store.record_transitions(profile_id, changes, at)
        # All of the profile's changes on the wire together (one partition: their order holds), then their
        # outbox rows cleared in one request.
        futures = [await self.producer.send(self.membership_topic, raw, key=profile_id.encode())
                   for _, raw in payloads]
        await asyncio.gather(*futures)
        for t in transitions:
            metrics.MEMBERSHIP_CHANGES.labels(t.change).inc()
        self._count_members([(t.segment_id, t.change) for t in transitions])
        await self.store.outbox_done_many([transition_id for transition_id, _ in payloads], at)

    async def _send_membership(self, entry: OutboxEntry) -> None:
        raw = entry.payload.encode()
        profile_id = entry.transition_id.split(":")[1]
        await self.producer.send_and_wait(self.membership_topic, raw, key=profile_id.encode())
        change = orjson.loads(raw)["change"]
        metrics.MEMBERSHIP_CHANGES.labels(change).inc()
        await self.store.outbox_done(entry)

    async def recover_outbox(self, older_than: timedelta | None = None) -> int:
        """Send the membership changes a crash (or a failed produce) left between the state write and the
        Kafka ack — only those not already in the topic. At start (``older_than`` None) every row is such a
        leftover, the rows an earlier version left in ``seg_outbox`` too; while running only rows older than
        ``older_than`` are (younger ones may still be in flight). Either reads from the outbox's floor, past
        the rows already sent and deleted. Returns how many were sent."""
        now = datetime.now(UTC)
        cutoff = None if older_than is None else now - older_than
        since = self.outbox_floors.floor(OUTBOX_SHARD)
        entries: list[OutboxEntry] = []
        if cutoff is None or since is None or since < cutoff:
            entries = await self.store.outbox(since=since, before=cutoff)
        if older_than is None:
            entries += await self.store.legacy_outbox()
        sent = await self._resend(entries) if entries else 0
        # Everything created before the cutoff was read and is in Kafka now (an exception above leaves the floor).
        if self.outbox_floors.advance(OUTBOX_SHARD, cutoff or now, None):
            await self.store.outbox_floors.maybe_save(OUTBOX_SHARD, self.outbox_floors)
        return sent

    async def _resend(self, entries: list[OutboxEntry]) -> int:
        """Send the outbox ``entries`` not already in Kafka and delete them all. Returns how many were sent."""
        # In the order they were decided: a customer's changes of one segment by their sequence number.
        entries = sorted(entries, key=lambda e: (e.created_at, _seq(e.transition_id)))
        seen = await self._transition_ids_since(entries[0].created_at - timedelta(seconds=30))
        sent = 0
        for entry in entries:
            if entry.transition_id in seen:
                await self.store.outbox_done(entry)
                continue
            await self._send_membership(entry)
            sent += 1
        log.info("outbox recovery: %d pending, %d already in Kafka, %d sent", len(entries), len(entries) - sent, sent)
        return sent

    async def _transition_ids_since(self, since: datetime) -> set[str]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False,
                                    client_id=f"{self.settings.namespace}-segmenter-outbox",
                                    isolation_level="read_committed")
        await consumer.start()
        seen: set[str] = set()
        try:
            cluster = await consumer._client.fetch_all_metadata()
            partitions = cluster.partitions_for_topic(self.membership_topic) or set()
            tps = [TopicPartition(self.membership_topic, p) for p in partitions]
            if not tps:
                return seen
            consumer.assign(tps)
            starts = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
            ends = await consumer.end_offsets(tps)
            active = []
            for tp in tps:
                start = starts.get(tp)
                if start is None or start.offset >= ends[tp]:
                    continue
                consumer.seek(tp, start.offset)
                active.append(tp)
            remaining = {tp: ends[tp] for tp in active}
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=2000)
                if not batch:
                    break
                for tp, records in batch.items():
                    for record in records:
                        with contextlib.suppress(Exception):
                            seen.add(orjson.loads(record.value)["transitionId"])
                        if record.offset + 1 >= remaining.get(tp, 0):
                            remaining.pop(tp, None)
        finally:
            await stop_consumer(consumer)
        return seen

    # ---- the durable scheduler -------------------------------------------------------------------
    async def _scheduler_loop(self) -> None:
        last_sweep = last_count = time.monotonic()
        while not self._stopping.is_set():
            try:
                await self.run_due()
                if time.monotonic() - last_sweep >= OUTBOX_SWEEP_S:
                    last_sweep = time.monotonic()
                    await self.recover_outbox(older_than=timedelta(seconds=OUTBOX_STUCK_S))
                if time.monotonic() - last_count >= self.config.member_count_interval_s:
                    last_count = time.monotonic()
                    await self.recount_members()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.scheduler_poll_s)

    async def run_due(self, now: datetime | None = None) -> int:
        """Re-evaluate every customer whose next time-triggered change is due. Returns how many.

        Each shard is read from its floor; the floor then moves up to ``now``, or to the earliest entry left
        in place (one whose handling failed, or the last one read when the read's limit was reached)."""
        now = now or datetime.now(UTC)
        limit = self.config.scheduler_batch
        handled = 0
        for shard in range(SCHEDULE_SHARDS):
            entries = await self.store.due(shard, now, limit, since=self.schedule_floors.floor(shard))
            # A full read may have left more entries due at its last due time (ones after it in profile id).
            oldest_left = entries[-1][0] if len(entries) >= limit else None
            failed: list[str] = []
            first_error: Exception | None = None
            for due_at, profile_id in entries:
                try:
                    if await self._run_scheduled(profile_id, due_at, now):
                        handled += 1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the entry stays for the next pass; the others go on
                    failed.append(profile_id)
                    first_error = first_error or exc
                    oldest_left = due_at if oldest_left is None else min(oldest_left, due_at)
            if failed:
                log.error("scheduled evaluation of %d customers (%s, ...) failed; retried at the next pass",
                          len(failed), failed[0], exc_info=first_error)
            if self.schedule_floors.advance(shard, now, oldest_left):
                await self.store.schedule_floors.maybe_save(shard, self.schedule_floors)
        return handled

    async def _run_scheduled(self, profile_id: str, due_at: datetime, now: datetime) -> bool:
        """Re-evaluate a customer for its schedule entry due at ``due_at``; an entry that no longer matches the
        profile's next evaluation (superseded, or the profile deleted) is only dropped. Returns whether the
        customer was evaluated."""
        async with self.lock(profile_id):
            stored = await self.store.profile(profile_id)
            # Both hold the same stored value (store.stored_due), so equality tells the current entry.
            if stored is None or stored.deleted or stored.next_evaluation_at != due_at:
                await self.store.unschedule(profile_id, due_at)  # superseded
                return False
            lag = (now - due_at).total_seconds()
            metrics.SCHEDULER_LAG.observe(max(lag, 0.0))
            facts = CustomerFacts(stored.document, await self._events(profile_id), stored.won_back_at,
                                  stored.predictions)
            await self._decide_and_apply(profile_id, facts, "time elapsed", None, due_at)
            return True

    # ---- segments (API side) ---------------------------------------------------------------------
    def parse_segment(self, segment_id: str, name: str, definition: Any, version: int) -> SegmentDefinition:
        """Parse and check references; raises RuleError with the JSON path of the offending part."""
        seg = SegmentDefinition.create(segment_id, name, definition, version=version)
        problem = validate_references(seg, self.segments)
        if problem:
            raise RuleError("$", problem)
        return seg

    async def save_segment(self, row: StoredSegment) -> None:
        await self.store.put_segment(row)
        await self.reload_segments()
        self.start_backfill(row.segment_id, "segment created" if row.version == 1 else "segment updated")

    async def delete_segment(self, segment_id: str) -> int:
        dependants = [s.segment_id for s in self.segments if segment_id in _references(s.rule)]
        if dependants:
            raise RuleError("$", f"segment {dependants[0]!r} references this segment; change it first")
        row = self.segment_rows.get(segment_id)
        name = row.name if row else segment_id
        await self.store.delete_segment(segment_id)
        self._stop_backfill(segment_id)
        await self.reload_segments()
        exited = 0
        after = ""
        while True:
            page = await self.store.members(segment_id, after, 500)
            if not page:
                break
            for member in page:
                profile_id = member["profile_id"]
                async with self.lock(profile_id):
                    stored = await self.store.memberships(profile_id)
                    if stored.get(segment_id, (False, 0))[0]:
                        await self._apply(profile_id, [Transition(segment_id, name, "exited", "segment deleted")],
                                          stored, None)
                        exited += 1
            after = page[-1]["profile_id"]
        return exited

    def start_backfill(self, segment_id: str, trigger: str) -> None:
        # A running backfill of the same segment stops at its next customer (never mid-decision, so no
        # outbox row is left unsent) once it sees that a newer generation exists.
        generation = self._backfill_generation.get(segment_id, 0) + 1
        self._backfill_generation[segment_id] = generation
        task = asyncio.create_task(self._backfill(segment_id, trigger, generation), name=f"backfill-{segment_id}")
        self._backfills[segment_id] = task

    def _stop_backfill(self, segment_id: str) -> None:
        self._backfill_generation[segment_id] = self._backfill_generation.get(segment_id, 0) + 1
        self._backfills.pop(segment_id, None)

    async def _backfill(self, segment_id: str, trigger: str, generation: int) -> None:
        """Evaluate every stored profile once, with progress in the segment row (idempotent: a restart
        starts over and decides nothing twice)."""
        try:
            total = 0
            async for _ in self.store.all_profiles():
                total += 1
            await self.store.backfill_progress(segment_id, "running", 0, total)
            done = 0
            async for stored in self.store.all_profiles(page_size=self.config.backfill_page):
                if self._backfill_generation.get(segment_id) != generation or self._stopping.is_set():
                    return  # superseded by a newer definition, deleted, or shutting down
                async with self.lock(stored.profile_id):
                    fresh = await self.store.profile(stored.profile_id)
                    if fresh is not None and not fresh.deleted:
                        facts = CustomerFacts(fresh.document, await self._events(fresh.profile_id),
                                              fresh.won_back_at, fresh.predictions)
                        await self._decide_and_apply(fresh.profile_id, facts, trigger, None,
                                                     fresh.next_evaluation_at)
                done += 1
                if done % 200 == 0:
                    await self.store.backfill_progress(segment_id, "running", done, max(total, done))
            await self.store.backfill_progress(segment_id, "done", done, max(total, done))
            if segment_id in self.segment_rows:
                self.segment_rows[segment_id].backfill_status = "done"
            await self.recount_members()
            log.info("backfill of %s finished over %d profiles", segment_id, done)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("backfill of %s failed", segment_id)
            await self.store.backfill_progress(segment_id, "failed", 0, 0)

    async def preview(self, rule: Rule, sample_size: int, now: datetime | None = None) -> PreviewResult:
        now = now or datetime.now(UTC)
        size = scanned = 0
        sample: list[str] = []
        names = needed_event_names([SegmentDefinition("preview", "preview", {}, rule)])
        async for stored in self.store.all_profiles():
            scanned += 1
            events = ([e for e in await self.store.events(stored.profile_id) if e.name in names] if names else [])
            facts = CustomerFacts(stored.document, events, stored.won_back_at, stored.predictions)
            ctx = build_context(facts, self.scorer, self.thresholds, now)
            memberships = await self.store.memberships(stored.profile_id)
            ctx.memberships = {sid: member for sid, (member, _) in memberships.items()}
            if evaluate(rule, ctx, now).matched:
                size += 1
                if len(sample) < sample_size:
                    sample.append(stored.profile_id)
        return PreviewResult(size, scanned, sample)

    # ---- predictions ----------------------------------------------------------------------------
    async def write_predictions(self, profile_id: str, new: dict[str, Any], model_version: str) -> bool:
        """Store and publish predictions (a ``Predictions Updated`` event to events.raw) only when they
        moved materially since the last write — so the profile update they cause cannot loop back."""
        async with self.lock(profile_id):
            return bool(await self._write_predictions_locked({profile_id: new}, model_version))

    async def write_predictions_many(self, new: dict[str, dict[str, Any]], model_version: str) -> int:
        """:meth:`write_predictions` for many customers at once (their locks taken in stripe order, the stored
        rows read with multi-key reads, the events produced together). Returns how many were written."""
        async with contextlib.AsyncExitStack() as held:
            for stripe in sorted({self._stripe(pid) for pid in new}):
                await held.enter_async_context(self._locks[stripe])
            return await self._write_predictions_locked(new, model_version)

    async def _write_predictions_locked(self, new: dict[str, dict[str, Any]], model_version: str) -> int:
        """:meth:`write_predictions` for many customers whose locks are held. Returns how many were written."""
        known = {pid: (stored.predictions, stored.document)
                 for pid, stored in (await self.store.profiles(list(new))).items() if not stored.deleted}
        now = datetime.now(UTC)
        futures = []
        rows = []
        for profile_id, values in new.items():
            if profile_id not in known:
                continue
            predictions, document = known[profile_id]
            if not materially_changed(predictions, values, self.config.prediction_min_probability_change,
                                      self.config.prediction_min_relative_change):
                continue
            merged = {**predictions, **values}
            digest = uuid.uuid5(uuid.NAMESPACE_URL, orjson.dumps(merged, option=orjson.OPT_SORT_KEYS).decode())
            user_id = document.get("user_id")
            event = Event(
                type="track", event="Predictions Updated", message_id=f"predictions-{profile_id}-{digest}",
                timestamp=now, received_at=now, source="segmenter",
                user_id=user_id if isinstance(user_id, str) and user_id else None,
                anonymous_id=None if isinstance(user_id, str) and user_id else profile_id,
                properties={**merged, "model_version": model_version},
                context={"loyalist": {"profileId": profile_id}},
            )
            futures.append(await self.producer.send(self.raw_topic, encode_event(event),
                                                    key=event.partition_key.encode()))
            rows.append(self.store.predictions_row(profile_id, merged))
        if not rows:
            return 0
        # The events acknowledged first: a crash before the store write publishes them again (same ids).
        await asyncio.gather(*futures)
        await self.store.write(rows)
        metrics.PREDICTIONS_WRITTEN.inc(len(rows))
        return len(rows)

    async def _all_orders(self) -> list[tuple[str, list[tuple[str, list[str]]]]]:
        by_profile: dict[str, list[tuple[str, list[str]]]] = {}
        async for order in self.store.all_orders():
            by_profile.setdefault(order["profile_id"], []).append((order["message_id"], list(order["products"] or [])))
        return list(by_profile.items())


async def _retry_until_done(work: Callable[[], Awaitable[T]], what: str) -> T:
    delay = 0.2
    while True:
        try:
            return await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; retrying in %.1fs", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _seq(transition_id: str) -> int:
    tail = transition_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _references(rule: Rule) -> set[str]:
    from services.segmenter.domain.rules import referenced_segments

    return referenced_segments(rule)


def validate_rule_document(document: Any) -> Rule:
    return parse_rule(document)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop a manually assigned consumer. aiokafka 0.14 can leak the cancellation of its internal
    committed-offsets task out of ``stop()`` when stopped right after ``assign``; that one is swallowed,
    a cancellation of the caller is not."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
