"""The engine adapter: turns consumed records into triggers, runs the pure step function per customer and
carries out its effects (message requests, events, timers), then persists instance state.

Order per trigger: effects first (each carries a deterministic idempotency key or primary key), instance
state second, the Kafka offset last (faust acks after the batch). A crash anywhere replays the trigger
against the state persisted so far, which either repeats an idempotent effect or finds nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from loyalist.events import Event, decode_event, encode_event
from loyalist.kafka import produce_many
from loyalist.settings import Settings
from loyalist.topics import (
    EVENTS_RAW,
    EVENTS_RESOLVED,
    JOURNEY_TIMERS,
    MESSAGE_REQUESTS,
    PROFILE_CHANGED,
    SEGMENT_MEMBERSHIP,
)
from services.journeys import metrics
from services.journeys.domain.conditions import resolve
from services.journeys.domain.definition import InvalidDefinition, JourneyDefinition, parse_definition
from services.journeys.domain.engine import (
    DateTrigger,
    Decision,
    EmitEvent,
    EventTrigger,
    Instance,
    Interest,
    ScheduleTimer,
    SegmentTrigger,
    SendMessage,
    TimerTrigger,
    decide,
    decide_entry,
    interest_of,
    next_date_occurrence,
)
from services.journeys.store import InstanceStore, JourneyRow, JourneyStore, TimerStore

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class Registry:
    """Journeys and their definitions, cached in process and refreshed from Cassandra every second (so every
    worker sees activations made through any worker's API)."""

    def __init__(self, store: JourneyStore, refresh_s: float = 1.0) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.journeys: dict[str, JourneyRow] = {}
        self._definitions: dict[tuple[str, int], JourneyDefinition | None] = {}
        self._loaded_at = 0.0

    async def refresh(self) -> None:
        self.journeys = {j.journey_id: j for j in await self.store.all()}
        self._loaded_at = time.monotonic()

    async def maybe_refresh(self) -> None:
        if time.monotonic() - self._loaded_at >= self.refresh_s:
            await self.refresh()

    async def definition(self, journey_id: str, version: int) -> JourneyDefinition | None:
        key = (journey_id, version)
        if key not in self._definitions:
            raw = await self.store.definition(journey_id, version)
            try:
                self._definitions[key] = parse_definition(raw) if raw is not None else None
            except InvalidDefinition:
                log.error("stored definition %s v%s is invalid", journey_id, version)
                self._definitions[key] = None
        return self._definitions[key]

    def forget(self, journey_id: str) -> None:
        for key in [k for k in self._definitions if k[0] == journey_id]:
            del self._definitions[key]

    async def active(self) -> list[tuple[JourneyRow, JourneyDefinition]]:
        out = []
        for row in self.journeys.values():
            if row.status == "active":
                d = await self.definition(row.journey_id, row.current_version)
                if d is not None:
                    out.append((row, d))
        return out


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Work:
    """One decoded record for one customer."""

    profile_id: str
    trigger: EventTrigger | SegmentTrigger | TimerTrigger | DateTrigger | None
    instance_id: str | None = None  # timers: the instance to wake
    journey_id: str | None = None  # date-trait entry timers, and instance timers
    profile_doc: Mapping[str, Any] | None = None  # profile.changed carries the document
    topic: str = ""


class JourneyRunner:
    def __init__(self, settings: Settings, *, producer: AIOKafkaProducer, redis: Redis | None,
                 registry: Registry, instances: InstanceStore, timers: TimerStore, clock: Clock = utcnow,
                 concurrency: int = 64) -> None:
        self.settings = settings
        self.producer = producer
        self.redis = redis
        self.registry = registry
        self.instances = instances
        self.timers = timers
        self.clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self.t_resolved = settings.topic(EVENTS_RESOLVED.name)
        self.t_membership = settings.topic(SEGMENT_MEMBERSHIP.name)
        self.t_timers = settings.topic(JOURNEY_TIMERS.name)
        self.t_changed = settings.topic(PROFILE_CHANGED.name)
        self.t_requests = settings.topic(MESSAGE_REQUESTS.name)
        self.t_raw = settings.topic(EVENTS_RAW.name)
        self._interest: Interest | None = None
        self._interest_key: tuple[tuple[str, int], ...] = ()

    # ---- decoding -------------------------------------------------------------------------------------------

    def decode(self, record: Record, interest: Interest | None = None) -> Work | None:
        """The record as work for its customer; None when it is invalid or, given ``interest`` (what the
        journeys react to at all), cannot concern any journey: those cost a JSON parse and nothing else."""
        try:
            doc = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            metrics.TRIGGERS.labels(record.topic, "undecodable").inc()
            log.warning("undecodable record on %s skipped", record.topic)
            return None
        if not isinstance(doc, dict) or not doc.get("profileId"):
            metrics.TRIGGERS.labels(record.topic, "ignored").inc()
            return None
        pid = str(doc["profileId"])
        try:
            if record.topic == self.t_resolved:
                raw = doc.get("event")
                if raw is None:
                    return None  # a merge notice: instances stay with the profile that owns them
                if interest is not None and isinstance(raw, dict):
                    name = raw.get("event") if raw.get("type") == "track" and raw.get("event") else raw.get("type")
                    if name not in interest.events:
                        return None
                event = decode_event(raw)
                return Work(pid, _event_trigger(event), topic="resolved")
            if record.topic == self.t_membership:
                change = doc.get("change")
                if change not in ("entered", "exited"):
                    return None
                segment_id = str(doc.get("segmentId"))
                if interest is not None and segment_id not in interest.segments:
                    return None
                at = _time(doc.get("at")) or self.clock()
                return Work(pid, SegmentTrigger(segment_id, change, at,
                                                _time(doc.get("eventAcceptedAt"))), topic="membership")
            if record.topic == self.t_timers:
                due = _time(doc.get("due")) or self.clock()
                if doc.get("kind") == "entry":
                    return Work(pid, TimerTrigger("", due), journey_id=str(doc.get("journeyId")),
                                topic="entry_timer")
                return Work(pid, TimerTrigger(str(doc.get("nodeId")), due), instance_id=str(doc.get("instanceId")),
                            journey_id=str(doc.get("journeyId")), topic="timer")
            if record.topic == self.t_changed:
                if doc.get("deleted") or (interest is not None and not interest.date_trait):
                    return None
                return Work(pid, None, profile_doc=doc.get("profile") or {}, topic="changed")
        except (ValueError, TypeError) as exc:
            metrics.TRIGGERS.labels(record.topic, "invalid").inc()
            log.warning("invalid record on %s skipped: %s", record.topic, exc)
            return None
        return None

    async def interest(self) -> Interest:
        """What every known journey (any status, every version instances may still run) reacts to; computed
        again only when a journey changed."""
        key = tuple(sorted((j.journey_id, j.current_version) for j in self.registry.journeys.values()))
        if self._interest is None or key != self._interest_key:
            total = Interest()
            for journey_id, current in key:
                for version in range(1, current + 1):
                    d = await self.registry.definition(journey_id, version)
                    if d is not None:
                        total = total | interest_of(d)
            self._interest, self._interest_key = total, key
        return self._interest

    # ---- processing -----------------------------------------------------------------------------------------

    async def handle(self, records: Sequence[Record]) -> None:
        """Process a batch: customers concurrently, each customer's records in order. Retries until done.

        Records no journey can react to are dropped before any read. The rest: the instances of their
        customers are read together, every step is decided in memory, then the effects of the whole batch are
        carried out together (message requests and events produced in batches, timers written in batches), and
        the instance states are saved last, together. A crash anywhere replays the batch against the state
        saved so far: every effect carries a deterministic key, so a replay repeats it harmlessly.
        """
        await self.registry.maybe_refresh()
        interest = await self.interest()
        per_profile: dict[str, list[Work]] = defaultdict(list)
        for record in records:
            work = self.decode(record, interest)
            if work is not None:
                per_profile[work.profile_id].append(work)
        skipped = len(records) - sum(len(w) for w in per_profile.values())
        if skipped:
            metrics.SKIPPED.inc(skipped)
        if not per_profile:
            return
        attempt = 0
        while True:
            try:
                # The instances of every profile of the batch (a request per 100 profiles) and, at the same
                # time, the hot profiles their steps may need (one MGET): the records left are those some
                # journey reacts to, so most of them do need it.
                instances, profiles = await asyncio.gather(
                    self.instances.for_profiles(list(per_profile)),
                    self._profile_docs([pid for pid, items in per_profile.items()
                                        if any(w.topic != "changed" for w in items)]))
                active = await self.registry.active()
                effects: list[tuple[Instance | None, Decision]] = []
                await asyncio.gather(*(self._profile(pid, items, instances[pid], profiles.get(pid), active, effects)
                                       for pid, items in per_profile.items()))
                await self._carry_out(effects, self.clock())
                return
            except Exception as exc:  # the batch is retried: every effect is idempotent
                attempt += 1
                metrics.BATCH_ERRORS.labels(type(exc).__name__).inc()
                log.exception("journey batch failed (attempt %d); retrying", attempt)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))

    async def _profile_docs(self, profile_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The hot profiles of the customers whose steps may need one, with one Redis request."""
        if self.redis is None or not profile_ids:
            return {}
        raws = await self.redis.mget([self.settings.redis_key("profile", pid) for pid in profile_ids])
        out: dict[str, dict[str, Any]] = {}
        for pid, raw in zip(profile_ids, raws, strict=True):
            if raw:
                doc = orjson.loads(raw)
                if isinstance(doc, dict):
                    out[pid] = doc
        return out

    async def _profile(self, profile_id: str, items: list[Work], instances: list[Instance],
                       profile: dict[str, Any] | None, active: list[tuple[JourneyRow, JourneyDefinition]],
                       effects: list[tuple[Instance | None, Decision]]) -> None:
        async with self._limit:
            for work in items:
                if work.topic == "changed":
                    await self._schedule_date_entries(profile_id, work.profile_doc or {})
                    metrics.TRIGGERS.labels("profile.changed", "ok").inc()
                    continue
                changed = await self._step(profile_id, work, instances, profile, active)
                if changed:
                    effects += changed
                    instances = _latest(instances, changed)

    async def _step(self, profile_id: str, work: Work, instances: list[Instance], profile: dict[str, Any] | None,
                    active: list[tuple[JourneyRow, JourneyDefinition]]) -> list[tuple[Instance | None, Decision]]:
        """The decisions that change something (nothing is carried out here)."""
        now = self.clock()
        trigger = work.trigger
        if not self._concerns(trigger, instances, active, now):
            metrics.TRIGGERS.labels(work.topic, "no_effect").inc()
            return []
        decisions: list[tuple[Instance | None, Decision]] = []
        if work.topic == "entry_timer":
            assert isinstance(trigger, TimerTrigger) and work.journey_id
            metrics.TIMERS_FIRED.labels("entry").inc()
            metrics.TIMER_LATENESS.observe(max(0.0, (now - trigger.due).total_seconds()))
            decisions += await self._date_entry(profile_id, work.journey_id, trigger.due, instances, profile, now)
        elif isinstance(trigger, TimerTrigger):
            metrics.TIMERS_FIRED.labels("node").inc()
            metrics.TIMER_LATENESS.observe(max(0.0, (now - trigger.due).total_seconds()))
            for inst in instances:
                if inst.instance_id == work.instance_id:
                    d = await self.registry.definition(inst.journey_id, inst.version)
                    if d is not None:
                        decisions.append((inst, decide(d, inst, trigger, now, profile)))
        elif trigger is not None:
            for inst in instances:
                if not inst.running and (inst.goal_deadline is None or inst.converted_at is not None
                                         or now > inst.goal_deadline):
                    continue  # finished and no goal to watch: nothing can change
                d = await self.registry.definition(inst.journey_id, inst.version)
                if d is not None:
                    decisions.append((inst, decide(d, inst, trigger, now, profile)))
            if not isinstance(trigger, DateTrigger):
                for row, definition in active:
                    if definition.entry.type == "date_trait":
                        continue
                    existing = [i for i in _latest(instances, decisions) if i.journey_id == row.journey_id]
                    entered = decide_entry(definition, row.journey_id, row.current_version, profile_id, trigger,
                                           existing, now, profile)
                    if entered is not None:
                        decisions.append((None, entered))
        changed = [(old, d) for old, d in decisions if d.changed]
        metrics.TRIGGERS.labels(work.topic, "applied" if changed else "no_effect").inc()
        return changed

    @staticmethod
    def _concerns(trigger: Any, instances: list[Instance], active: list[tuple[JourneyRow, JourneyDefinition]],
                  now: datetime | None = None) -> bool:
        """Cheap pre-check (no profile read): could this trigger change anything for this customer?"""
        if isinstance(trigger, TimerTrigger):
            return True
        if trigger is None:
            return False
        now = now or utcnow()
        if any(i.running or (i.goal_deadline is not None and i.converted_at is None and now <= i.goal_deadline)
               for i in instances):
            return True
        for _, definition in active:
            entry = definition.entry
            if isinstance(trigger, EventTrigger) and entry.type == "event" and entry.event == trigger.name:
                return True
            if isinstance(trigger, SegmentTrigger) and entry.type == "segment" and \
                    entry.segment_id == trigger.segment_id:
                return True
        return False

    async def _date_entry(self, profile_id: str, journey_id: str, due: datetime, instances: list[Instance],
                          profile: dict[str, Any] | None, now: datetime) -> list[tuple[Instance | None, Decision]]:
        row = self.registry.journeys.get(journey_id)
        if row is None or row.status != "active":
            return []
        definition = await self.registry.definition(journey_id, row.current_version)
        if definition is None or definition.entry.type != "date_trait" or profile is None:
            return []
        await self._schedule_date_entries(profile_id, profile, only=journey_id, after=now)
        tz_date = _local_date(due, profile)
        existing = [i for i in instances if i.journey_id == journey_id]
        entered = decide_entry(definition, journey_id, row.current_version, profile_id, DateTrigger(tz_date),
                               existing, now, profile)
        return [(None, entered)] if entered is not None else []

    async def _schedule_date_entries(self, profile_id: str, profile: Mapping[str, Any], *, only: str | None = None,
                                     after: datetime | None = None) -> None:
        """Date-trait journeys: keep a timer at the customer's next occurrence (same row when unchanged)."""
        for row, definition in await self.registry.active():
            if definition.entry.type != "date_trait" or not definition.entry.trait:
                continue
            if only is not None and row.journey_id != only:
                continue
            due = next_date_occurrence(resolve(definition.entry.trait, profile), definition.entry.at_local_time,
                                       profile, after or self.clock())
            if due is not None:
                await self.timers.schedule(profile_id=profile_id, journey_id=row.journey_id,
                                           instance_id=f"date:{row.journey_id}:{profile_id}", node_id="", due=due,
                                           kind="entry")

    async def _carry_out(self, changed: list[tuple[Instance | None, Decision]], now: datetime) -> None:
        """Effects of a batch's decisions first (produced and written together), instance states second."""
        if not changed:
            return
        requests: list[tuple[bytes, bytes]] = []
        events: list[tuple[bytes, bytes]] = []
        timer_rows: list[tuple[Any, tuple[Any, ...]]] = []
        latencies: list[tuple[str, datetime]] = []
        for old, decision in changed:
            inst = decision.instance
            for action in decision.actions:
                if isinstance(action, SendMessage):
                    requests.append((action.profile_id.encode(), orjson.dumps(action.request(now))))
                    metrics.MESSAGES.labels(action.journey_id, action.node_id, action.channel).inc()
                    if action.event_accepted_at is not None:
                        latencies.append((action.journey_id, action.event_accepted_at))
                elif isinstance(action, EmitEvent):
                    event = Event.model_validate(action.envelope())
                    events.append((action.profile_id.encode(), encode_event(event)))
                elif isinstance(action, ScheduleTimer):
                    timer_rows.append(self.timers.row(
                        profile_id=inst.profile_id, journey_id=inst.journey_id, instance_id=action.instance_id,
                        node_id=action.node_id, due=action.due))
            _count_transition(old, inst)
        futures = [*await produce_many(self.producer, self.t_requests, requests),
                   *await produce_many(self.producer, self.t_raw, events)]
        await asyncio.gather(*futures, self.timers.write(timer_rows))
        acked = self.clock()
        for journey_id, accepted in latencies:
            metrics.TRIGGER_LATENCY.labels(journey_id).observe(max(0.0, (acked - accepted).total_seconds()))
        await self.instances.save_many([d.instance for _, d in changed], now)


def _count_transition(old: Instance | None, new: Instance) -> None:
    if old is None:
        metrics.ENTERED.labels(new.journey_id).inc()
    was_running = old is None or old.running
    if was_running and not new.running:
        metrics.EXITS.labels(new.journey_id, new.exit_reason or "completed").inc()
    if new.converted_at is not None and (old is None or old.converted_at is None):
        metrics.CONVERSIONS.labels(new.journey_id, new.group).inc()
        metrics.REVENUE.labels(new.journey_id).inc(new.revenue)


def _latest(instances: list[Instance], decisions: Sequence[tuple[Instance | None, Decision]]) -> list[Instance]:
    """The customer's instances with the decisions applied (new ones appended)."""
    by_id = {i.instance_id: i for i in instances}
    for _, d in decisions:
        by_id[d.instance.instance_id] = d.instance
    return list(by_id.values())


def _event_trigger(event: Event) -> EventTrigger:
    properties = dict(event.properties) if event.type != "identify" else dict(event.traits)
    return EventTrigger(name=event.label, message_id=event.message_id, properties=properties,
                        timestamp=event.timestamp, received_at=event.received_at, type=event.type)


def _local_date(at: datetime, profile: Mapping[str, Any] | None) -> date:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        zone = ZoneInfo(str((profile or {}).get("timezone") or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    return at.astimezone(zone).date()
