"""The journey engine's step function: ``decide(definition, instance, trigger, now, profile) -> Decision``.

An instance is one customer's run through one version of a journey (per entry key when the entry is keyed).
Everything here is pure: time, the profile document and the triggering facts are passed in; ids are derived
from the inputs (uuid5), so replaying the same trigger on the same state gives the same decision, and every
effect carries a key naming its step, ``(journey, version, instance, node)``, that downstream deduplicates on.

Triggers: an ``EventTrigger`` (a resolved event), a ``SegmentTrigger`` (segment entered/exited), a
``TimerTrigger`` (a timer of a delay or wait node came due) and, for date-trait journeys, a ``DateTrigger``.
Actions: ``SendMessage`` (a ``message.requests`` record), ``EmitEvent`` (an identify event for ``events.raw``),
``ScheduleTimer``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.journeys.domain.conditions import evaluate, resolve
from services.journeys.domain.definition import (
    ConditionNode,
    DelayNode,
    ExitNode,
    JourneyDefinition,
    Node,
    SendNode,
    SplitNode,
    UpdateTraitNode,
    WaitForEventNode,
    WebhookNode,
)

_IDS = uuid.UUID("5b0f8a52-7a55-4e43-8f64-3c1c2b9c0a11")
MAX_STEPS = 1000  # graphs are acyclic; this only guards against a corrupted definition

Status = Literal["active", "waiting", "completed", "exited"]


# ---- triggers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventTrigger:
    name: str  # the track event name, or the call type ("identify")
    message_id: str
    properties: Mapping[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None
    received_at: datetime | None = None  # when ingest accepted it; carried to messages as eventAcceptedAt
    type: str = "track"

    @property
    def trigger_id(self) -> str:
        return f"event:{self.message_id}"

    def as_context(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "message_id": self.message_id,
                "properties": dict(self.properties),
                "timestamp": self.timestamp.isoformat() if self.timestamp else None}


@dataclass(frozen=True, slots=True)
class SegmentTrigger:
    segment_id: str
    change: Literal["entered", "exited"]
    at: datetime
    received_at: datetime | None = None

    @property
    def trigger_id(self) -> str:
        return f"segment:{self.segment_id}:{self.change}:{self.at.isoformat()}"


@dataclass(frozen=True, slots=True)
class TimerTrigger:
    node_id: str
    due: datetime


@dataclass(frozen=True, slots=True)
class DateTrigger:
    """A date-trait journey's yearly occurrence for one customer came due."""

    occurrence: date

    @property
    def trigger_id(self) -> str:
        return f"date:{self.occurrence.isoformat()}"


Trigger = EventTrigger | SegmentTrigger | TimerTrigger | DateTrigger


# ---- actions --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendMessage:
    idempotency_key: str
    profile_id: str
    channel: str
    category: str
    template_id: str
    data: Mapping[str, Any]
    journey_id: str
    journey_version: int
    node_id: str
    instance_id: str
    event_accepted_at: datetime | None

    def request(self, requested_at: datetime) -> dict[str, Any]:
        """The ``message.requests`` value (see docs/architecture.md)."""
        out: dict[str, Any] = {
            "idempotencyKey": self.idempotency_key, "profileId": self.profile_id, "channel": self.channel,
            "category": self.category, "templateId": self.template_id, "data": dict(self.data),
            "journeyId": self.journey_id, "journeyVersion": self.journey_version, "nodeId": self.node_id,
            "instanceId": self.instance_id, "requestedAt": requested_at.isoformat(),
        }
        if self.event_accepted_at is not None:
            out["eventAcceptedAt"] = self.event_accepted_at.isoformat()
        return out


@dataclass(frozen=True, slots=True)
class EmitEvent:
    """An event for ``events.raw`` (update-trait nodes emit identify calls)."""

    profile_id: str
    message_id: str
    type: str
    traits: Mapping[str, Any]
    node_id: str
    timestamp: datetime

    def envelope(self) -> dict[str, Any]:
        """The ``Event`` fields (wire names) of this identify call."""
        return {"type": self.type, "messageId": self.message_id, "timestamp": self.timestamp.isoformat(),
                "receivedAt": self.timestamp.isoformat(), "traits": dict(self.traits), "source": "journeys",
                "context": {"loyalist": {"profileId": self.profile_id}}}


@dataclass(frozen=True, slots=True)
class ScheduleTimer:
    instance_id: str
    node_id: str
    due: datetime


Action = SendMessage | EmitEvent | ScheduleTimer


# ---- instance state -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One line of an instance's history: where it went, when, and why."""

    at: datetime
    node_id: str | None
    what: str
    why: str


@dataclass(frozen=True, slots=True)
class Waiting:
    kind: Literal["timer", "event"]
    node_id: str
    until: datetime  # the delay's due time, or the wait's timeout


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    journey_id: str
    version: int
    profile_id: str
    key: str  # the entry key value ("" when the entry is not keyed)
    entered_at: datetime
    entry: Mapping[str, Any]  # the entry trigger as a context document (``entry.properties.checkout_id``)
    status: Status = "active"
    node_id: str | None = None
    waiting: Waiting | None = None
    group: Literal["treated", "holdout"] = "treated"
    visited: tuple[str, ...] = ()
    exit_reason: str | None = None
    goal_deadline: datetime | None = None
    converted_at: datetime | None = None
    revenue: float = 0.0
    history: tuple[Step, ...] = ()

    @property
    def running(self) -> bool:
        return self.status in ("active", "waiting")


@dataclass(frozen=True, slots=True)
class Decision:
    instance: Instance
    actions: tuple[Action, ...] = ()
    changed: bool = True  # False: the trigger did not concern this instance (nothing to persist)


# ---- helpers --------------------------------------------------------------------------------------------------


def instance_id_for(journey_id: str, profile_id: str, key: str, trigger_id: str) -> str:
    """Deterministic: the same entry trigger always names the same instance (replays cannot duplicate).

    >>> instance_id_for("j1", "p1", "c1", "event:m1") == instance_id_for("j1", "p1", "c1", "event:m1")
    True
    """
    return str(uuid.uuid5(_IDS, f"{journey_id}|{profile_id}|{key}|{trigger_id}"))


def step_key(instance: Instance, node_id: str) -> str:
    """The idempotency key of a node's effect for an instance.

    >>> i = Instance("i1", "j1", 3, "p1", "", datetime(2024, 1, 1, tzinfo=UTC), {})
    >>> step_key(i, "remind")
    'journey:j1:v3:i1:remind'
    """
    return f"journey:{instance.journey_id}:v{instance.version}:{instance.instance_id}:{node_id}"


def stable_bucket(*parts: str) -> float:
    """A uniform number in [0, 1) that depends only on ``parts`` (hash-based, stable across processes).

    >>> stable_bucket("j1", "split", "p1") == stable_bucket("j1", "split", "p1")
    True
    >>> 0 <= stable_bucket("x") < 1
    True
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_branch(journey_id: str, node: SplitNode, profile_id: str) -> int:
    """Index of the branch a customer takes: stable per (journey, node, customer), whatever the version or
    instance, so a customer in the holdout stays in the holdout."""
    total = sum(b.weight for b in node.branches)
    point = stable_bucket(journey_id, node.id, profile_id) * total
    cumulative = 0.0
    for i, branch in enumerate(node.branches):
        cumulative += branch.weight
        if point < cumulative:
            return i
    return len(node.branches) - 1


def _zone(profile: Mapping[str, Any] | None) -> ZoneInfo:
    name = (profile or {}).get("timezone") or "UTC"
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def next_local_time(now: datetime, at: time, zone: ZoneInfo) -> datetime:
    """The next moment (after ``now``) the customer's wall clock shows ``at``, in UTC.

    >>> next_local_time(datetime(2024, 3, 1, 7, 0, tzinfo=UTC), time(9, 0), ZoneInfo("Europe/Paris"))
    datetime.datetime(2024, 3, 1, 8, 0, tzinfo=datetime.timezone.utc)
    >>> next_local_time(datetime(2024, 3, 1, 9, 0, tzinfo=UTC), time(9, 0), ZoneInfo("Europe/Paris"))
    datetime.datetime(2024, 3, 2, 8, 0, tzinfo=datetime.timezone.utc)
    """
    local = now.astimezone(zone)
    candidate = datetime.combine(local.date(), at, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=zone)
    return candidate.astimezone(UTC)


def parse_date_value(value: Any) -> datetime | None:
    """A trait holding a date or datetime (ISO 8601 string), as an aware UTC datetime; None if unusable."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(0), tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def next_date_occurrence(value: Any, at: time, profile: Mapping[str, Any] | None, now: datetime) -> datetime | None:
    """The next yearly occurrence of a date trait (birthday, first-order anniversary) at local time ``at``,
    strictly after ``now``. February 29 falls on February 28 in other years.

    >>> next_date_occurrence("1990-05-04", time(9, 0), {"timezone": "UTC"}, datetime(2024, 5, 4, 10, tzinfo=UTC))
    datetime.datetime(2025, 5, 4, 9, 0, tzinfo=datetime.timezone.utc)
    >>> next_date_occurrence("2000-02-29", time(9, 0), None, datetime(2025, 1, 1, tzinfo=UTC)).date()
    datetime.date(2025, 2, 28)
    """
    base = parse_date_value(value)
    if base is None:
        return None
    zone = _zone(profile)
    local_now = now.astimezone(zone)
    for year in (local_now.year, local_now.year + 1, local_now.year + 2):
        day = base.day
        if base.month == 2 and day == 29 and not _leap(year):
            day = 28
        candidate = datetime.combine(date(year, base.month, day), at, tzinfo=zone).astimezone(UTC)
        if candidate > now:
            return candidate
    return None


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def resolve_template(value: Any, context: Mapping[str, Any]) -> Any:
    """Replace ``"$path"`` strings with values from the context, recursively; ``"$$x"`` is a literal ``$x``.

    ``"$a.b|c.d"`` takes the first of the paths that has a value.

    >>> resolve_template({"items": "$entry.properties.products", "n": 1, "x": "$$5", "u": "$entry.url|profile.url"},
    ...                  {"entry": {"properties": {"products": [1, 2]}}, "profile": {"url": "https://s/c"}})
    {'items': [1, 2], 'n': 1, 'x': '$5', 'u': 'https://s/c'}
    """
    if isinstance(value, str) and value.startswith("$"):
        if value.startswith("$$"):
            return value[1:]
        for path in value[1:].split("|"):  # alternatives: the first present value wins
            found = resolve(path.strip(), context)
            if found is not None:
                return found
        return None
    if isinstance(value, Mapping):
        return {k: resolve_template(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_template(v, context) for v in value]
    return value


def _context(instance: Instance, profile: Mapping[str, Any] | None, event: EventTrigger | None) -> dict[str, Any]:
    return {"profile": dict(profile or {}), "entry": dict(instance.entry),
            "event": event.as_context() if event else {}}


def _log(instance: Instance, at: datetime, node_id: str | None, what: str, why: str) -> Instance:
    return replace(instance, history=(*instance.history, Step(at, node_id, what, why)))


# ---- entry ----------------------------------------------------------------------------------------------------


def entry_matches(definition: JourneyDefinition, trigger: Trigger, profile: Mapping[str, Any] | None) -> bool:
    """Whether a trigger is this journey's entry (before re-entry rules)."""
    entry = definition.entry
    if entry.type == "event":
        if not isinstance(trigger, EventTrigger) or trigger.name != entry.event:
            return False
        if entry.key and trigger.properties.get(entry.key) in (None, ""):
            return False  # a keyed entry without its key cannot be tracked
        return evaluate(entry.where, {"profile": dict(profile or {}), "event": trigger.as_context(),
                                      "entry": trigger.as_context()})
    if entry.type == "segment":
        if not isinstance(trigger, SegmentTrigger):
            return False
        if trigger.segment_id != entry.segment_id or trigger.change != entry.change:
            return False
        return evaluate(entry.where, {"profile": dict(profile or {}), "event": {}, "entry": {}})
    if entry.type == "date_trait":
        return isinstance(trigger, DateTrigger) and evaluate(entry.where, {"profile": dict(profile or {}),
                                                                           "event": {}, "entry": {}})
    return False


def entry_key(definition: JourneyDefinition, trigger: Trigger) -> str:
    if definition.entry.key and isinstance(trigger, EventTrigger):
        return str(trigger.properties.get(definition.entry.key))
    if isinstance(trigger, DateTrigger):
        return str(trigger.occurrence.year)  # one birthday journey per year
    return ""


def reentry_blocker(definition: JourneyDefinition, key: str, existing: Sequence[Instance], now: datetime) -> str | None:
    """Why a customer may not enter now (None: they may). ``existing`` are their instances of this journey."""
    same_key = [i for i in existing if i.key == key] if definition.entry.key else list(existing)
    if any(i.running for i in same_key):
        return "already_running"
    if not same_key:
        return None
    policy = definition.reentry
    if policy.policy == "never":
        return "reentry_never"
    if policy.policy == "cooldown":
        assert policy.cooldown is not None
        last = max(i.entered_at for i in same_key)
        if now < last + policy.cooldown:
            return "reentry_cooldown"
    return None


def decide_entry(
    definition: JourneyDefinition,
    journey_id: str,
    version: int,
    profile_id: str,
    trigger: EventTrigger | SegmentTrigger | DateTrigger,
    existing: Sequence[Instance],
    now: datetime,
    profile: Mapping[str, Any] | None,
) -> Decision | None:
    """A new instance started by ``trigger`` and its first steps, or None when the trigger is not an entry or
    the re-entry policy forbids it. ``existing``: this customer's instances of this journey (any version)."""
    if not entry_matches(definition, trigger, profile):
        return None
    key = entry_key(definition, trigger)
    instance_id = instance_id_for(journey_id, profile_id, key, trigger.trigger_id)
    if any(i.instance_id == instance_id for i in existing):
        return None  # this very trigger was already processed (a replay)
    if reentry_blocker(definition, key, existing, now) is not None:
        return None
    entry_doc: dict[str, Any]
    if isinstance(trigger, EventTrigger):
        entry_doc = trigger.as_context()
    elif isinstance(trigger, SegmentTrigger):
        entry_doc = {"segment_id": trigger.segment_id, "change": trigger.change, "properties": {}}
    else:
        entry_doc = {"occurrence": trigger.occurrence.isoformat(), "properties": {}}
    goal_deadline = now + definition.goal.within if definition.goal else None
    instance = Instance(instance_id=instance_id, journey_id=journey_id, version=version, profile_id=profile_id,
                        key=key, entered_at=now, entry=entry_doc, goal_deadline=goal_deadline)
    instance = _log(instance, now, definition.start, "entered", _describe(trigger))
    accepted = trigger.received_at if isinstance(trigger, (EventTrigger, SegmentTrigger)) else None
    return _advance(definition, instance, definition.start, now, profile, accepted, [])


def _describe(trigger: Trigger) -> str:
    if isinstance(trigger, EventTrigger):
        return f"event '{trigger.name}' ({trigger.message_id})"
    if isinstance(trigger, SegmentTrigger):
        return f"segment {trigger.segment_id} {trigger.change}"
    if isinstance(trigger, DateTrigger):
        return f"date trait occurrence {trigger.occurrence.isoformat()}"
    return f"timer of {trigger.node_id} due {trigger.due.isoformat()}"


# ---- stepping -------------------------------------------------------------------------------------------------


def _delay_due(node: DelayNode, instance: Instance, now: datetime, profile: Mapping[str, Any] | None) -> datetime:
    if node.duration is not None:
        return now + node.duration
    if node.until_local_time is not None:
        return next_local_time(now, node.until_local_time, _zone(profile))
    assert node.until_date_field is not None
    value = resolve(node.until_date_field, _context(instance, profile, None))
    target = parse_date_value(value)
    return now if target is None else target + node.offset  # no date: nothing to wait for


def _advance(
    definition: JourneyDefinition,
    instance: Instance,
    node_id: str | None,
    now: datetime,
    profile: Mapping[str, Any] | None,
    accepted_at: datetime | None,
    actions: list[Action],
    event: EventTrigger | None = None,
) -> Decision:
    """Run nodes from ``node_id`` until the instance waits or ends."""
    for _ in range(MAX_STEPS):
        if node_id is None:
            instance = replace(instance, status="completed", node_id=None, waiting=None)
            instance = _log(instance, now, None, "completed", "reached the end of the journey")
            return Decision(instance, tuple(actions))
        node: Node = definition.node(node_id)
        instance = replace(instance, node_id=node_id, status="active", waiting=None,
                           visited=(*instance.visited, node_id) if node_id not in instance.visited
                           else instance.visited)
        ctx = _context(instance, profile, event)
        if isinstance(node, DelayNode):
            due = _delay_due(node, instance, now, profile)
            if due <= now:
                instance = _log(instance, now, node.id, "delay_skipped", "the delay's time has already passed")
                node_id = node.next
                continue
            instance = replace(instance, status="waiting", waiting=Waiting("timer", node.id, due))
            instance = _log(instance, now, node.id, "waiting", f"delay until {due.isoformat()}")
            actions.append(ScheduleTimer(instance.instance_id, node.id, due))
            return Decision(instance, tuple(actions))
        if isinstance(node, WaitForEventNode):
            due = now + node.timeout
            instance = replace(instance, status="waiting", waiting=Waiting("event", node.id, due))
            instance = _log(instance, now, node.id, "waiting", f"for '{node.event}' until {due.isoformat()}")
            actions.append(ScheduleTimer(instance.instance_id, node.id, due))
            return Decision(instance, tuple(actions))
        if isinstance(node, ConditionNode):
            result = evaluate(node.condition, ctx)
            instance = _log(instance, now, node.id, "condition", "true" if result else "false")
            node_id = node.next if result else node.else_next
            continue
        if isinstance(node, SplitNode):
            branch = node.branches[choose_branch(instance.journey_id, node, instance.profile_id)]
            if branch.holdout:
                instance = replace(instance, group="holdout")
            instance = _log(instance, now, node.id, "split", f"branch {branch.id}" + (" (holdout)" if branch.holdout
                                                                                          else ""))
            node_id = branch.next
            continue
        if isinstance(node, SendNode):
            # Fields that resolve to nothing are left out, so the template's own fallbacks apply.
            data = {k: v for k, v in resolve_template(dict(node.data), ctx).items() if v is not None}
            actions.append(SendMessage(
                idempotency_key=step_key(instance, node.id), profile_id=instance.profile_id, channel=node.channel,
                category=node.category, template_id=node.template, data=data,
                journey_id=instance.journey_id, journey_version=instance.version, node_id=node.id,
                instance_id=instance.instance_id, event_accepted_at=accepted_at))
            instance = _log(instance, now, node.id, "message_requested", f"{node.channel} template {node.template}")
            node_id = node.next
            continue
        if isinstance(node, WebhookNode):
            hook = {"url": node.url, "method": node.method, "body": resolve_template(dict(node.body), ctx)}
            actions.append(SendMessage(
                idempotency_key=step_key(instance, node.id), profile_id=instance.profile_id, channel="webhook",
                category="transactional", template_id="webhook", data=hook, journey_id=instance.journey_id,
                journey_version=instance.version, node_id=node.id, instance_id=instance.instance_id,
                event_accepted_at=accepted_at))
            instance = _log(instance, now, node.id, "webhook_requested", node.url)
            node_id = node.next
            continue
        if isinstance(node, UpdateTraitNode):
            traits = resolve_template(dict(node.traits), {**ctx, "now": now.isoformat()})
            actions.append(EmitEvent(instance.profile_id, step_key(instance, node.id), "identify", traits, node.id,
                                     now))
            instance = _log(instance, now, node.id, "traits_updated", ", ".join(sorted(traits)))
            node_id = node.next
            continue
        if isinstance(node, ExitNode):
            instance = replace(instance, status="completed", waiting=None)
            instance = _log(instance, now, node.id, "completed", "exit node")
            return Decision(instance, tuple(actions))
        raise ValueError(f"unknown node type {node.type}")
    raise ValueError("journey did not come to rest (cycle?)")


def _goal_hit(definition: JourneyDefinition, instance: Instance, event: EventTrigger, now: datetime,
              profile: Mapping[str, Any] | None) -> bool:
    goal = definition.goal
    if goal is None or instance.converted_at is not None or event.name != goal.event:
        return False
    if instance.goal_deadline is not None and now > instance.goal_deadline:
        return False
    if goal.match_key and event.properties.get(goal.match_key) != resolve(
            f"properties.{goal.match_key}", instance.entry):
        return False
    return evaluate(goal.where, _context(instance, profile, event))


def _revenue(properties: Mapping[str, Any], preferred: str) -> float:
    for name in (preferred, "revenue", "total", "value"):
        value = properties.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _exit_rule_hit(definition: JourneyDefinition, instance: Instance, trigger: Trigger,
                   profile: Mapping[str, Any] | None, converted_now: bool) -> str | None:
    for rule in definition.exit_rules:
        if rule.type == "goal_reached" and converted_now:
            return rule.name
        if isinstance(trigger, SegmentTrigger):
            if rule.type == "segment_exited" and trigger.change == "exited" and trigger.segment_id == rule.segment_id:
                return rule.name
            if rule.type == "segment_entered" and trigger.change == "entered" and \
                    trigger.segment_id == rule.segment_id:
                return rule.name
        if isinstance(trigger, EventTrigger):
            if rule.type == "unsubscribed" and trigger.name == "Unsubscribed":
                return rule.name
            if rule.type == "event" and trigger.name == rule.event and evaluate(
                    rule.where, _context(instance, profile, trigger)):
                return rule.name
    return None


def decide(
    definition: JourneyDefinition,
    instance: Instance,
    trigger: Trigger,
    now: datetime,
    profile: Mapping[str, Any] | None = None,
) -> Decision:
    """The next state of ``instance`` after ``trigger`` at ``now`` and the effects to carry out.

    ``definition`` must be the instance's own version. Finished instances still watch for the goal until the
    attribution window closes (holdout customers' conversions count too).
    """
    unchanged = Decision(instance, (), changed=False)
    converted_now = False
    if isinstance(trigger, EventTrigger) and _goal_hit(definition, instance, trigger, now, profile):
        goal = definition.goal
        assert goal is not None
        instance = replace(instance, converted_at=now,
                           revenue=_revenue(trigger.properties, goal.revenue_property))
        instance = _log(instance, now, instance.node_id, "converted", f"goal '{goal.event}' ({trigger.message_id})")
        converted_now = True
    if not instance.running:
        return Decision(instance, ()) if converted_now else unchanged
    rule = _exit_rule_hit(definition, instance, trigger, profile, converted_now)
    if rule is not None:
        instance = replace(instance, status="exited", exit_reason=rule, waiting=None)
        return Decision(_log(instance, now, instance.node_id, "exited", f"exit rule {rule}"))
    waiting = instance.waiting
    if waiting is None:
        return Decision(instance, ()) if converted_now else unchanged
    node = definition.node(waiting.node_id)
    if isinstance(trigger, TimerTrigger):
        if trigger.node_id != waiting.node_id:
            return unchanged  # a stale timer of a node the instance already left
        if now < waiting.until:
            # Early (clock skew between workers): wait for the stored due time.
            return Decision(instance, (ScheduleTimer(instance.instance_id, waiting.node_id, waiting.until),))
        if isinstance(node, WaitForEventNode):
            instance = _log(instance, now, node.id, "timed_out", f"no '{node.event}' by {waiting.until.isoformat()}")
            return _advance(definition, instance, node.timeout_next, now, profile, None, [])
        instance = _log(instance, now, node.id, "delay_elapsed", f"due {waiting.until.isoformat()}")
        return _advance(definition, instance, node.next, now, profile, None, [])
    if isinstance(trigger, EventTrigger) and isinstance(node, WaitForEventNode) and trigger.name == node.event:
        ctx = _context(instance, profile, trigger)
        key_ok = node.match_key is None or (
            trigger.properties.get(node.match_key) is not None
            and trigger.properties.get(node.match_key) == resolve(f"properties.{node.match_key}", instance.entry))
        if key_ok and evaluate(node.where, ctx):
            instance = _log(instance, now, node.id, "event_received", f"'{trigger.name}' ({trigger.message_id})")
            return _advance(definition, instance, node.next, now, profile, trigger.received_at, [], trigger)
    return Decision(instance, ()) if converted_now else unchanged


@dataclass(frozen=True, slots=True)
class Interest:
    """What can concern a journey at all: the event names and segment ids that its entry, exit rules, goal or
    wait-for-event nodes react to, and whether it enters on a date trait. An event or membership change outside
    of it can change no instance of the journey and start none (``decide`` and ``decide_entry`` ignore it), so
    the engine drops it before any read."""

    events: frozenset[str] = frozenset()
    segments: frozenset[str] = frozenset()
    date_trait: bool = False

    def __or__(self, other: Interest) -> Interest:
        return Interest(self.events | other.events, self.segments | other.segments,
                        self.date_trait or other.date_trait)


def interest_of(definition: JourneyDefinition) -> Interest:
    events: set[str] = set()
    segments: set[str] = set()
    entry = definition.entry
    if entry.type == "event" and entry.event:
        events.add(entry.event)
    if entry.type == "segment" and entry.segment_id:
        segments.add(entry.segment_id)
    for rule in definition.exit_rules:
        if rule.type == "unsubscribed":
            events.add("Unsubscribed")
        if rule.event:
            events.add(rule.event)
        if rule.segment_id:
            segments.add(rule.segment_id)
    if definition.goal is not None:
        events.add(definition.goal.event)
    for node in definition.nodes.values():
        if isinstance(node, WaitForEventNode) and node.event:
            events.add(node.event)
    return Interest(frozenset(events), frozenset(segments), entry.type == "date_trait")
