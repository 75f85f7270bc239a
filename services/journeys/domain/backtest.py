"""Backtest: replay a period of stored history through a journey definition, sending nothing.

The same ``decide_entry``/``decide`` functions run on a virtual clock: events are applied in time order, and
timers fire when the clock passes their due time, so delays and wait timeouts behave as they would have.
The profile used for conditions is the one given per customer (the current profile: history does not keep
past profile versions), which the report states.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from services.journeys.domain.conditions import resolve
from services.journeys.domain.definition import JourneyDefinition
from services.journeys.domain.engine import (
    DateTrigger,
    Decision,
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
from services.journeys.domain.stats import summarize


@dataclass(frozen=True, slots=True)
class HistoricalFact:
    profile_id: str
    at: datetime
    trigger: EventTrigger | SegmentTrigger


def backtest(
    definition: JourneyDefinition,
    facts: Iterable[HistoricalFact],
    start: datetime,
    end: datetime,
    profiles: Mapping[str, Mapping[str, Any]] | None = None,
    journey_id: str = "backtest",
) -> dict[str, Any]:
    """What the journey would have done between ``start`` and ``end``.

    >>> from services.journeys.domain.definition import parse_definition
    >>> from datetime import UTC
    >>> d = parse_definition({"name": "t", "entry": {"type": "event", "event": "A"}, "nodes": [
    ...     {"id": "s", "type": "send", "template": "welcome_1"}]})
    >>> t0 = datetime(2024, 1, 1, tzinfo=UTC)
    >>> r = backtest(d, [HistoricalFact("p1", t0, EventTrigger("A", "m1", timestamp=t0))], t0, t0 + timedelta(1))
    >>> r["entered"], r["messages"]
    (1, {'s': 1})
    """
    profiles = profiles or {}
    instances: dict[str, list[Instance]] = defaultdict(list)
    timers: list[tuple[datetime, int, str, str, str]] = []  # (due, seq, profile, instance, node)
    messages: Counter[str] = Counter()
    webhooks_and_traits: Counter[str] = Counter()
    seq = 0

    def apply(profile_id: str, decision: Decision, old: Instance | None) -> None:
        nonlocal seq
        bucket = instances[profile_id]
        if old is not None:
            bucket[bucket.index(old)] = decision.instance
        else:
            bucket.append(decision.instance)
        for action in decision.actions:
            if isinstance(action, SendMessage):
                (messages if action.channel != "webhook" else webhooks_and_traits)[action.node_id] += 1
            elif isinstance(action, ScheduleTimer):
                seq += 1
                heapq.heappush(timers, (action.due, seq, profile_id, action.instance_id, action.node_id))
            else:
                webhooks_and_traits[action.node_id] += 1

    def fire_until(clock: datetime) -> None:
        while timers and timers[0][0] <= clock:
            due, _, profile_id, instance_id, node_id = heapq.heappop(timers)
            for inst in list(instances[profile_id]):
                if inst.instance_id == instance_id:
                    decision = decide(definition, inst, TimerTrigger(node_id, due), due, profiles.get(profile_id))
                    if decision.changed:
                        apply(profile_id, decision, inst)

    def handle(profile_id: str, at: datetime, trigger: EventTrigger | SegmentTrigger | DateTrigger) -> None:
        profile = profiles.get(profile_id)
        if not isinstance(trigger, DateTrigger):
            for inst in list(instances[profile_id]):
                decision = decide(definition, inst, trigger, at, profile)
                if decision.changed:
                    apply(profile_id, decision, inst)
        entered = decide_entry(definition, journey_id, 1, profile_id, trigger, instances[profile_id], at, profile)
        if entered is not None:
            apply(profile_id, entered, None)

    ordered: list[tuple[datetime, int, str, EventTrigger | SegmentTrigger | DateTrigger]] = [
        (f.at, i, f.profile_id, f.trigger) for i, f in enumerate(facts) if start <= f.at < end]
    if definition.entry.type == "date_trait" and definition.entry.trait:
        for profile_id, profile in profiles.items():
            clock = start - timedelta(seconds=1)
            while True:
                due = next_date_occurrence(resolve(definition.entry.trait, profile), definition.entry.at_local_time,
                                           profile, clock)
                if due is None or due >= end:
                    break
                ordered.append((due, len(ordered), profile_id, DateTrigger(date(due.year, due.month, due.day))))
                clock = due
    ordered.sort(key=lambda item: (item[0], item[1]))
    for at, _, profile_id, trigger in ordered:
        fire_until(at)
        handle(profile_id, at, trigger)
    fire_until(end)
    all_instances = [i for bucket in instances.values() for i in bucket]
    summary = summarize(all_instances)
    return {
        "period": {"from": start.isoformat(), "to": end.isoformat()},
        "facts": len(ordered),
        "customers_entered": sum(1 for bucket in instances.values() if bucket),
        "entered": summary["entered"],
        "messages": dict(messages),
        "other_effects": dict(webhooks_and_traits),
        "exits": summary["exits"],
        "still_waiting_at_end": summary["waiting"],
        "goal_reached": summary["converted"],
        "attributed_revenue": summary["attributed_revenue"],
        "nodes": summary["nodes"],
        "holdout": summary["holdout"],
        "note": "conditions were evaluated against the current profile of each customer",
    }
