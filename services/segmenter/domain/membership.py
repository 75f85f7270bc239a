"""Deciding segment membership for one customer: evaluate every live segment (in dependency order, so
``in_segment`` sees this same evaluation), compare with the stored membership and return the transitions to
emit plus the next moment time alone may change an answer.

``decide(segments, customer, current, trigger, now) -> Decision`` is pure: the same inputs always give the
same transitions, so replaying an input after a crash finds the stored state already equal to the answer
and emits nothing twice.

>>> seg = SegmentDefinition.create("s1", "Buyers", {"field": "orders_count", "op": "gte", "value": 1})
>>> cust = CustomerFacts(profile={"orders_count": 1, "last_order_at": "2024-05-01T00:00:00Z"})
>>> d = decide([seg], cust, {}, "profile.changed (Order Completed)", datetime(2024, 5, 2, tzinfo=UTC))
>>> [(t.segment_id, t.change) for t in d.transitions]
[('s1', 'entered')]
>>> decide([seg], cust, d.memberships, "replay", datetime(2024, 5, 2, tzinfo=UTC)).transitions
[]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime  # noqa: F401  (UTC: doctests)
from typing import Any

from services.segmenter.domain.lifecycle import LifecycleFacts, LifecycleThresholds, lifecycle_stage
from services.segmenter.domain.rfm import RfmScorer, rfm_values
from services.segmenter.domain.rules import (
    Context,
    EventRecord,
    Rule,
    describe,
    evaluate,
    evaluation_order,
    event_names,
    parse_datetime,
    parse_rule,
    referenced_segments,
)


@dataclass(frozen=True)
class SegmentDefinition:
    segment_id: str
    name: str
    definition: Mapping[str, Any]
    rule: Rule
    version: int = 1
    description: str = ""

    @staticmethod
    def create(segment_id: str, name: str, definition: Mapping[str, Any], *, version: int = 1,
               description: str = "") -> SegmentDefinition:
        return SegmentDefinition(segment_id, name, definition, parse_rule(definition), version, description)


def order_segments(segments: Sequence[SegmentDefinition]) -> list[SegmentDefinition]:
    """Dependency order; a reference to a segment that does not exist is an error for the caller to report."""
    by_id = {s.segment_id: s for s in segments}
    order = evaluation_order({s.segment_id: referenced_segments(s.rule) for s in segments})
    return [by_id[sid] for sid in order]


def validate_references(candidate: SegmentDefinition, existing: Sequence[SegmentDefinition]) -> str | None:
    """Why ``candidate`` cannot live next to ``existing`` (unknown or cyclic ``in_segment``), else None."""
    known = {s.segment_id: s for s in existing if s.segment_id != candidate.segment_id}
    missing = sorted(referenced_segments(candidate.rule) - set(known) - {candidate.segment_id})
    if missing:
        return f"in_segment references unknown segment {missing[0]!r}"
    graph = {sid: referenced_segments(s.rule) for sid, s in known.items()}
    graph[candidate.segment_id] = referenced_segments(candidate.rule)
    try:
        evaluation_order(graph)
    except ValueError as exc:
        return str(exc)
    return None


def needed_event_names(segments: Sequence[SegmentDefinition]) -> set[str]:
    return set().union(*(event_names(s.rule) for s in segments)) if segments else set()


@dataclass
class CustomerFacts:
    """What the segmenter knows about one customer."""

    profile: Mapping[str, Any]
    events: Sequence[EventRecord] = ()
    won_back_at: datetime | None = None
    # Predictions computed here may be fresher than the copy on the profile document.
    predictions: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transition:
    segment_id: str
    segment_name: str
    change: str  # "entered" | "exited"
    reason: str


@dataclass
class Decision:
    memberships: dict[str, bool]
    transitions: list[Transition]
    next_evaluation_at: datetime | None
    lifecycle_stage: str
    rfm_segment: str | None


def build_context(customer: CustomerFacts, scorer: RfmScorer | None, thresholds: LifecycleThresholds,
                  now: datetime) -> Context:
    profile = customer.profile
    values = rfm_values(dict(profile))
    rfm_name = scorer.scores(values).segment if values is not None and scorer is not None and scorer.n else None
    orders = profile.get("orders_count") or 0
    revenue = profile.get("revenue_total") or 0.0
    stage = lifecycle_stage(
        LifecycleFacts(int(orders) if isinstance(orders, int | float) else 0,
                       float(revenue) if isinstance(revenue, int | float) else 0.0,
                       parse_datetime(profile.get("last_order_at")), customer.won_back_at),
        thresholds, now,
    )
    predictions = dict(profile.get("predictions") or {})
    predictions.update({k: v for k, v in customer.predictions.items() if v is not None})
    return Context(profile=profile, events=customer.events, rfm_segment=rfm_name, lifecycle_stage=stage.stage,
                   lifecycle_changes_at=stage.changes_at, predictions=predictions)


def decide(segments: Sequence[SegmentDefinition], customer: CustomerFacts, current: Mapping[str, bool],
           trigger: str, now: datetime, *, scorer: RfmScorer | None = None,
           thresholds: LifecycleThresholds | None = None) -> Decision:
    """Evaluate ``segments`` (already in dependency order) and diff with ``current`` memberships."""
    ctx = build_context(customer, scorer, thresholds or LifecycleThresholds(), now)
    memberships: dict[str, bool] = {}
    ctx.memberships = memberships
    transitions: list[Transition] = []
    next_times: list[datetime] = []
    for segment in segments:
        outcome = evaluate(segment.rule, ctx, now)
        memberships[segment.segment_id] = outcome.matched
        if outcome.next_change_at is not None:
            next_times.append(outcome.next_change_at)
        was = bool(current.get(segment.segment_id, False))
        if outcome.matched != was:
            summary = describe(segment.rule)
            reason = f"{trigger}: {'matches' if outcome.matched else 'no longer matches'} {summary}"
            transitions.append(Transition(segment.segment_id, segment.name,
                                          "entered" if outcome.matched else "exited", reason[:1000]))
    return Decision(memberships, transitions, min(next_times) if next_times else None,
                    ctx.lifecycle_stage or "prospect", ctx.rfm_segment)


def exit_all(segments: Mapping[str, str], current: Mapping[str, bool], reason: str) -> list[Transition]:
    """Transitions for a customer leaving every segment (erased, merged away, segment deleted)."""
    return [Transition(sid, segments.get(sid, sid), "exited", reason)
            for sid, member in sorted(current.items()) if member]
