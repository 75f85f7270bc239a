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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from loyalist.events import Event, decode_event, encode_event
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
    ScheduleTimer,
    SegmentTrigger,
    SendMessage,
    TimerTrigger,
    decide,
    decide_entry,
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

    # ---- decoding -------------------------------------------------------------------------------------------

    def decode(self, record: Record) -> Work | None:
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
                if "event" not in doc:
                    return None  # a merge notice: instances stay with the profile that owns them
                event = decode_event(doc["event"])
                return Work(pid, _event_trigger(event), topic="resolved")
            if record.topic == self.t_membership:
                at = _time(doc.get("at")) or self.clock()
                change = doc.get("change")
                if change not in ("entered", "exited"):
                    return None
                return Work(pid, SegmentTrigger(str(doc.get("segmentId")), change, at,
                                                _time(doc.get("eventAcceptedAt"))), topic="membership")
            if record.topic == self.t_timers:
                due = _time(doc.get("due")) or self.clock()
                if doc.get("kind") == "entry":
                    return Work(pid, TimerTrigger("", due), journey_id=str(doc.get("journeyId")),
                                topic="entry_timer")
                return Work(pid, TimerTrigger(str(doc.get("nodeId")), due), instance_id=str(doc.get("instanceId")),
                            journey_id=str(doc.get("journeyId")), topic="timer")
            if record.topic == self.t_changed:
                if doc.get("deleted"):
                    return None
                return Work(pid, None, profile_doc=doc.get("profile") or {}, topic="changed")
        except (ValueError, TypeError) as exc:
            metrics.TRIGGERS.labels(record.topic, "invalid").inc()
            log.warning("invalid record on %s skipped: %s", record.topic, exc)
            return None
        return None

    # ---- processing -----------------------------------------------------------------------------------------

    async def handle(self, records: Sequence[Record]) -> None:
        """Process a batch: customers concurrently, each customer's records in order. Retries until done."""
        await self.registry.maybe_refresh()
        per_profile: dict[str, list[Work]] = defaultdict(list)
        for record in records:
            work = self.decode(record)
            if work is not None:
                per_profile[work.profile_id].append(work)
        attempt = 0
        while True:
            try:
                # The instances of every profile of the batch, read together (a request per 100 profiles).
                instances = await self.instances.for_profiles(list(per_profile)) if per_profile else {}
                await asyncio.gather(*(self._profile(pid, items, instances[pid])
                                       for pid, items in per_profile.items()))
                return
            except Exception as exc:  # the batch is retried: every effect is idempotent
                attempt += 1
                metrics.BATCH_ERRORS.labels(type(exc).__name__).inc()
                log.exception("journey batch failed (attempt %d); retrying", attempt)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))

    async def _profile_doc(self, profile_id: str) -> dict[str, Any] | None:
        if self.redis is None:
            return None
        raw = await self.redis.get(self.settings.redis_key("profile", profile_id))
        if not raw:
            return None
        doc = orjson.loads(raw)
        return doc if isinstance(doc, dict) else None

    async def _profile(self, profile_id: str, items: list[Work], instances: list[Instance]) -> None:
        async with self._limit:
            profile: list[dict[str, Any] | None] = []  # read from Redis once, and only when a step needs it

            async def load_profile() -> dict[str, Any] | None:
                if not profile:
                    profile.append(await self._profile_doc(profile_id))
                return profile[0]

            for work in items:
                if work.topic == "changed":
                    await self._schedule_date_entries(profile_id, work.profile_doc or {})
                    metrics.TRIGGERS.labels("profile.changed", "ok").inc()
                    continue
                instances = await self._step(profile_id, work, instances, load_profile)

    async def _step(self, profile_id: str, work: Work, instances: list[Instance],
                    load_profile: Callable[[], Awaitable[dict[str, Any] | None]]) -> list[Instance]:
        now = self.clock()
        trigger = work.trigger
        if not await self._concerns(trigger, instances, now):
            metrics.TRIGGERS.labels(work.topic, "no_effect").inc()
            return instances
        profile = await load_profile()
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
                for row, definition in await self.registry.active():
                    if definition.entry.type == "date_trait":
                        continue
                    existing = [i for i in _latest(instances, decisions) if i.journey_id == row.journey_id]
                    entered = decide_entry(definition, row.journey_id, row.current_version, profile_id, trigger,
                                           existing, now, profile)
                    if entered is not None:
                        decisions.append((None, entered))
        changed = [(old, d) for old, d in decisions if d.changed]
        metrics.TRIGGERS.labels(work.topic, "applied" if changed else "no_effect").inc()
        if not changed:
            return instances
        await self._carry_out(changed, now)
        return _latest(instances, changed)

    async def _concerns(self, trigger: Any, instances: list[Instance], now: datetime) -> bool:
        """Cheap pre-check (no profile read): could this trigger change anything for this customer?"""
        if isinstance(trigger, TimerTrigger):
            return True
        if any(i.running or (i.goal_deadline is not None and i.converted_at is None and now <= i.goal_deadline)
               for i in instances):
            return True
        for _, definition in await self.registry.active():
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
        sends: list[Awaitable[Any]] = []
        timer_writes: list[Awaitable[None]] = []
        latencies: list[tuple[str, datetime]] = []
        for old, decision in changed:
            inst = decision.instance
            for action in decision.actions:
                if isinstance(action, SendMessage):
                    body = orjson.dumps(action.request(now))
                    sends.append(self.producer.send_and_wait(self.t_requests, body, key=action.profile_id.encode()))
                    metrics.MESSAGES.labels(action.journey_id, action.node_id, action.channel).inc()
                    if action.event_accepted_at is not None:
                        latencies.append((action.journey_id, action.event_accepted_at))
                elif isinstance(action, EmitEvent):
                    event = Event.model_validate(action.envelope())
                    sends.append(self.producer.send_and_wait(self.t_raw, encode_event(event),
                                                             key=action.profile_id.encode()))
                elif isinstance(action, ScheduleTimer):
                    timer_writes.append(self.timers.schedule(
                        profile_id=inst.profile_id, journey_id=inst.journey_id, instance_id=action.instance_id,
                        node_id=action.node_id, due=action.due))
            _count_transition(old, inst)
        await asyncio.gather(*sends, *timer_writes)
        acked = self.clock()
        for journey_id, accepted in latencies:
            metrics.TRIGGER_LATENCY.labels(journey_id).observe(max(0.0, (acked - accepted).total_seconds()))
        await asyncio.gather(*(self.instances.save(d.instance, now) for _, d in changed))


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
