"""The segment rule language: JSON documents parsed into typed nodes, validated with the JSON path of the
offending part, and evaluated against one customer's context at an injected ``now``.

Evaluation returns the answer *and* the earliest later moment at which the answer may change by time alone
(an event leaving a "within the last D days" window, a date trait ageing past "more than D days ago", the
lifecycle stage moving on). The durable scheduler re-evaluates the customer at that moment.

Rule shapes (every key is documented in docs/segmenter.md):

- ``{"and": [rule, ...]}``, ``{"or": [rule, ...]}``, ``{"not": rule}``
- ``{"trait": "plan", "op": "eq", "value": "pro"}`` — a key of ``profile.traits`` (dotted paths allowed)
- ``{"field": "orders_count", "op": "gte", "value": 3}`` — a stable profile field (dotted paths allowed)
- ``{"performed": {"event": "Order Completed", "at_least": 2, "within_days": 30,
  "where": [{"property": "total", "op": "gt", "value": 50}]}}`` (``at_most`` instead of ``at_least``)
- ``{"not_performed": {"event": "Order Completed", "for_days": 60, "where": [...]}}``
- ``{"prediction": "churn_probability", "op": "gte", "value": 0.7}``
- ``{"rfm_segment": ["Champions", "Loyal"]}``, ``{"lifecycle_stage": ["at_risk", "lapsed"]}``
- ``{"in_segment": "<segment id>"}``

>>> rule = parse_rule({"and": [{"field": "orders_count", "op": "gte", "value": 2},
...                            {"trait": "plan", "op": "in", "value": ["pro", "team"]}]})
>>> ctx = Context(profile={"orders_count": 3, "traits": {"plan": "pro"}})
>>> evaluate(rule, ctx, datetime(2024, 1, 1, tzinfo=UTC)).matched
True
>>> parse_rule({"or": [{"field": "orders_count", "op": "gte", "value": "two"}]})
Traceback (most recent call last):
...
services.segmenter.domain.rules.RuleError: $.or[0].value: operator 'gte' needs a number
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.segmenter.domain.lifecycle import LIFECYCLE_STAGES
from services.segmenter.domain.rfm import RFM_SEGMENTS

MAX_DEPTH = 12
MAX_CHILDREN = 100

NUMBER_OPS = frozenset({"gt", "gte", "lt", "lte", "between"})
STRING_OPS = frozenset({"contains", "starts_with", "ends_with"})
EQUALITY_OPS = frozenset({"eq", "neq"})
SET_OPS = frozenset({"in", "not_in"})
DATE_OPS = frozenset({"before", "after"})
AGE_OPS = frozenset({"within_last_days", "more_than_days_ago"})
PRESENCE_OPS = frozenset({"exists", "not_exists"})
ALL_OPS = NUMBER_OPS | STRING_OPS | EQUALITY_OPS | SET_OPS | DATE_OPS | AGE_OPS | PRESENCE_OPS

PREDICTIONS = ("churn_probability", "p_alive", "expected_orders_90d", "predicted_clv_365d")
# Stable profile fields a rule may read (docs/architecture.md); nested ones through dotted paths.
PROFILE_FIELDS = (
    "profile_id", "user_id", "email", "phone", "timezone", "locale", "first_seen_at", "last_seen_at",
    "orders_count", "revenue_total", "currency", "average_order_value", "first_order_at", "last_order_at",
    "refunds_count", "cancellations_count", "rfm", "cart", "consent", "engagement", "loyalty",
    "revenue_by_currency",
)


class RuleError(ValueError):
    """An invalid rule; ``path`` is the JSON path of the offending part (``$.and[1].performed.at_least``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


# ---- typed nodes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """``op`` applied to a value read from a path, against ``value`` (typed by the operator)."""

    op: str
    value: Any = None

    def describe(self, subject: str) -> str:
        if self.op in PRESENCE_OPS:
            return f"{subject} {self.op}"
        return f"{subject} {self.op} {self.value!r}"


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Rule


@dataclass(frozen=True, slots=True)
class TraitRule:
    path: tuple[str, ...]
    comparison: Comparison


@dataclass(frozen=True, slots=True)
class FieldRule:
    path: tuple[str, ...]
    comparison: Comparison


@dataclass(frozen=True, slots=True)
class PropertyFilter:
    path: tuple[str, ...]
    comparison: Comparison


@dataclass(frozen=True, slots=True)
class PerformedRule:
    """The count of matching events within the window compared with a bound.

    ``at_least`` N: count >= N. ``at_most`` N: count <= N (``not_performed`` is ``at_most`` 0).
    ``within_days`` None means all retained history.
    """

    event: str
    bound: str  # "at_least" | "at_most"
    count: int
    within_days: float | None
    where: tuple[PropertyFilter, ...] = ()


@dataclass(frozen=True, slots=True)
class PredictionRule:
    name: str
    comparison: Comparison


@dataclass(frozen=True, slots=True)
class RfmRule:
    segments: frozenset[str]


@dataclass(frozen=True, slots=True)
class LifecycleRule:
    stages: frozenset[str]


@dataclass(frozen=True, slots=True)
class SegmentRule:
    segment_id: str


Rule = (
    And | Or | Not | TraitRule | FieldRule | PerformedRule | PredictionRule | RfmRule | LifecycleRule | SegmentRule
)


# ---- parsing and validation ------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_datetime(value: Any) -> datetime | None:
    """An ISO 8601 string (or datetime) as an aware UTC datetime; None when it is not one.

    >>> parse_datetime("2024-03-01")
    datetime.datetime(2024, 3, 1, 0, 0, tzinfo=datetime.timezone.utc)
    >>> parse_datetime("2024-03-01T10:00:00Z").hour, parse_datetime("soon")
    (10, None)
    """
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


_PATH = re.compile(r"^[A-Za-z0-9_$\- ]+(\.[A-Za-z0-9_$\- ]+)*$")


def _parse_path(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, str) or not raw or not _PATH.match(raw):
        raise RuleError(where, "must be a non-empty name (dots separate nested keys)")
    return tuple(raw.split("."))


def _parse_comparison(node: Mapping[str, Any], path: str) -> Comparison:
    op = node.get("op")
    if op not in ALL_OPS:
        raise RuleError(f"{path}.op", f"unknown operator {op!r}; use one of {', '.join(sorted(ALL_OPS))}")
    value: Any = node.get("value")
    vpath = f"{path}.value"
    if op in PRESENCE_OPS:
        if "value" in node:
            raise RuleError(vpath, f"operator '{op}' takes no value")
        return Comparison(op)
    if "value" not in node:
        raise RuleError(vpath, f"operator '{op}' needs a value")
    if op == "between":
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
            raise RuleError(vpath, "operator 'between' needs [low, high] numbers")
        if value[0] > value[1]:
            raise RuleError(vpath, "'between' needs low <= high")
        return Comparison(op, (float(value[0]), float(value[1])))
    if op in NUMBER_OPS:
        if not _is_number(value):
            raise RuleError(vpath, f"operator '{op}' needs a number")
        return Comparison(op, value)
    if op in STRING_OPS:
        if not isinstance(value, str):
            raise RuleError(vpath, f"operator '{op}' needs a string")
        return Comparison(op, value)
    if op in EQUALITY_OPS:
        if not (isinstance(value, str | bool) or _is_number(value) or value is None):
            raise RuleError(vpath, f"operator '{op}' needs a string, number, boolean or null")
        return Comparison(op, value)
    if op in SET_OPS:
        if not (isinstance(value, list) and value and all(isinstance(v, str) or _is_number(v) for v in value)):
            raise RuleError(vpath, f"operator '{op}' needs a non-empty list of strings or numbers")
        return Comparison(op, tuple(value))
    if op in DATE_OPS:
        when = parse_datetime(value)
        if when is None:
            raise RuleError(vpath, f"operator '{op}' needs an ISO 8601 date")
        return Comparison(op, when)
    # AGE_OPS
    if not _is_number(value) or value < 0:
        raise RuleError(vpath, f"operator '{op}' needs a non-negative number of days")
    return Comparison(op, float(value))


def _only_keys(node: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    extra = sorted(set(node) - set(allowed))
    if extra:
        raise RuleError(f"{path}.{extra[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _parse_filters(raw: Any, path: str) -> tuple[PropertyFilter, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RuleError(path, "must be a list of property filters")
    out = []
    for i, item in enumerate(raw):
        ipath = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise RuleError(ipath, "must be an object {property, op, value}")
        _only_keys(item, ("property", "op", "value"), ipath)
        out.append(PropertyFilter(_parse_path(item.get("property"), f"{ipath}.property"),
                                  _parse_comparison(item, ipath)))
    return tuple(out)


def _positive_days(node: Mapping[str, Any], key: str, path: str, *, required: bool) -> float | None:
    if key not in node:
        if required:
            raise RuleError(f"{path}.{key}", "is required (a positive number of days)")
        return None
    value: Any = node[key]
    if not _is_number(value) or value <= 0:
        raise RuleError(f"{path}.{key}", "must be a positive number of days")
    return float(value)


def _parse_event_name(node: Mapping[str, Any], path: str) -> str:
    name = node.get("event")
    if not isinstance(name, str) or not name.strip():
        raise RuleError(f"{path}.event", "must be an event name")
    return name


def _parse(node: Any, path: str, depth: int) -> Rule:
    if depth > MAX_DEPTH:
        raise RuleError(path, f"rules nest at most {MAX_DEPTH} levels deep")
    if not isinstance(node, dict):
        raise RuleError(path, "a rule must be a JSON object")
    for combinator in ("and", "or"):
        if combinator in node:
            _only_keys(node, (combinator,), path)
            children = node[combinator]
            cpath = f"{path}.{combinator}"
            if not isinstance(children, list) or not children:
                raise RuleError(cpath, "must be a non-empty list of rules")
            if len(children) > MAX_CHILDREN:
                raise RuleError(cpath, f"at most {MAX_CHILDREN} rules")
            parsed = tuple(_parse(child, f"{cpath}[{i}]", depth + 1) for i, child in enumerate(children))
            return And(parsed) if combinator == "and" else Or(parsed)
    if "not" in node:
        _only_keys(node, ("not",), path)
        return Not(_parse(node["not"], f"{path}.not", depth + 1))
    if "trait" in node:
        _only_keys(node, ("trait", "op", "value"), path)
        return TraitRule(_parse_path(node["trait"], f"{path}.trait"), _parse_comparison(node, path))
    if "field" in node:
        _only_keys(node, ("field", "op", "value"), path)
        field_path = _parse_path(node["field"], f"{path}.field")
        if field_path[0] not in PROFILE_FIELDS:
            raise RuleError(f"{path}.field", f"unknown profile field {field_path[0]!r}; use 'trait' for traits")
        return FieldRule(field_path, _parse_comparison(node, path))
    if "performed" in node:
        _only_keys(node, ("performed",), path)
        body = node["performed"]
        bpath = f"{path}.performed"
        if not isinstance(body, dict):
            raise RuleError(bpath, "must be an object {event, at_least|at_most, within_days?, where?}")
        _only_keys(body, ("event", "at_least", "at_most", "within_days", "where"), bpath)
        event = _parse_event_name(body, bpath)
        bounds = [b for b in ("at_least", "at_most") if b in body]
        if len(bounds) != 1:
            raise RuleError(bpath, "give exactly one of 'at_least' or 'at_most'")
        count = body[bounds[0]]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise RuleError(f"{bpath}.{bounds[0]}", "must be a non-negative integer")
        within = _positive_days(body, "within_days", bpath, required=False)
        return PerformedRule(event, bounds[0], count, within, _parse_filters(body.get("where"), f"{bpath}.where"))
    if "not_performed" in node:
        _only_keys(node, ("not_performed",), path)
        body = node["not_performed"]
        bpath = f"{path}.not_performed"
        if not isinstance(body, dict):
            raise RuleError(bpath, "must be an object {event, for_days, where?}")
        _only_keys(body, ("event", "for_days", "where"), bpath)
        event = _parse_event_name(body, bpath)
        days = _positive_days(body, "for_days", bpath, required=True)
        return PerformedRule(event, "at_most", 0, days, _parse_filters(body.get("where"), f"{bpath}.where"))
    if "prediction" in node:
        _only_keys(node, ("prediction", "op", "value"), path)
        name = node["prediction"]
        if name not in PREDICTIONS:
            raise RuleError(f"{path}.prediction", f"unknown prediction; use one of {', '.join(PREDICTIONS)}")
        comparison = _parse_comparison(node, path)
        if comparison.op not in NUMBER_OPS | PRESENCE_OPS:
            raise RuleError(f"{path}.op", "predictions are numbers: use gt, gte, lt, lte, between, exists")
        return PredictionRule(name, comparison)
    if "rfm_segment" in node:
        _only_keys(node, ("rfm_segment",), path)
        names = _string_set(node["rfm_segment"], f"{path}.rfm_segment")
        unknown = sorted(names - set(RFM_SEGMENTS))
        if unknown:
            raise RuleError(f"{path}.rfm_segment", f"unknown RFM segment {unknown[0]!r}; use {', '.join(RFM_SEGMENTS)}")
        return RfmRule(frozenset(names))
    if "lifecycle_stage" in node:
        _only_keys(node, ("lifecycle_stage",), path)
        stages = _string_set(node["lifecycle_stage"], f"{path}.lifecycle_stage")
        unknown = sorted(stages - set(LIFECYCLE_STAGES))
        if unknown:
            raise RuleError(f"{path}.lifecycle_stage",
                            f"unknown stage {unknown[0]!r}; use {', '.join(LIFECYCLE_STAGES)}")
        return LifecycleRule(frozenset(stages))
    if "in_segment" in node:
        _only_keys(node, ("in_segment",), path)
        sid = node["in_segment"]
        if not isinstance(sid, str) or not sid:
            raise RuleError(f"{path}.in_segment", "must be a segment id")
        return SegmentRule(sid)
    kinds = "and, or, not, trait, field, performed, not_performed, prediction, rfm_segment, lifecycle_stage, in_segment"
    raise RuleError(path, f"unknown rule; a rule has one of: {kinds}")


def _string_set(raw: Any, path: str) -> set[str]:
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise RuleError(path, "must be a name or a non-empty list of names")
    return set(values)


def parse_rule(document: Any) -> Rule:
    """Parse and validate a rule document; raises :class:`RuleError` naming the offending JSON path."""
    return _parse(document, "$", 0)


def referenced_segments(rule: Rule) -> set[str]:
    """Segment ids a rule depends on through ``in_segment``."""
    if isinstance(rule, And | Or):
        return set().union(*(referenced_segments(c) for c in rule.children))
    if isinstance(rule, Not):
        return referenced_segments(rule.child)
    return {rule.segment_id} if isinstance(rule, SegmentRule) else set()


def event_names(rule: Rule) -> set[str]:
    """Event names a rule counts (so only those events need to be kept)."""
    if isinstance(rule, And | Or):
        return set().union(*(event_names(c) for c in rule.children))
    if isinstance(rule, Not):
        return event_names(rule.child)
    return {rule.event} if isinstance(rule, PerformedRule) else set()


def evaluation_order(dependencies: Mapping[str, set[str]]) -> list[str]:
    """Segment ids ordered so each comes after the segments it references; raises on a cycle.

    >>> evaluation_order({"a": {"b"}, "b": set(), "c": {"a"}})
    ['b', 'a', 'c']
    >>> evaluation_order({"a": {"b"}, "b": {"a"}})
    Traceback (most recent call last):
    ...
    ValueError: segments reference each other in a cycle: a -> b -> a
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(sid: str, trail: list[str]) -> None:
        if state.get(sid) == 2:
            return
        if state.get(sid) == 1:
            cycle = [*trail[trail.index(sid):], sid]
            raise ValueError("segments reference each other in a cycle: " + " -> ".join(cycle))
        state[sid] = 1
        for dep in sorted(dependencies.get(sid, ())):
            if dep in dependencies:
                visit(dep, [*trail, sid])
        state[sid] = 2
        order.append(sid)

    for sid in sorted(dependencies):
        visit(sid, [])
    return order


# ---- evaluation ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event of the customer as the segmenter keeps it for event-count rules."""

    name: str
    timestamp: datetime
    properties: Mapping[str, Any] = field(default_factory=dict)
    message_id: str = ""


@dataclass
class Context:
    """Everything a rule may read about one customer."""

    profile: Mapping[str, Any]
    events: Sequence[EventRecord] = ()
    rfm_segment: str | None = None
    lifecycle_stage: str | None = None
    lifecycle_changes_at: datetime | None = None
    predictions: Mapping[str, Any] = field(default_factory=dict)
    memberships: Mapping[str, bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    matched: bool
    # The earliest later moment at which the answer may change with no new input; None: never by time.
    next_change_at: datetime | None = None


def _earliest(times: Iterable[datetime | None]) -> datetime | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


def read_path(document: Any, path: Sequence[str]) -> Any:
    current = document
    for key in path:
        if not isinstance(current, Mapping) or key not in current:
            return _MISSING
        current = current[key]
    return current


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def compare(comparison: Comparison, actual: Any, now: datetime) -> Outcome:
    """Apply a typed comparison. Values of the wrong type never match (a string never is ``gt`` 3).

    >>> now = datetime(2024, 6, 1, tzinfo=UTC)
    >>> compare(Comparison("gte", 3), 3, now).matched, compare(Comparison("gte", 3), "3", now).matched
    (True, False)
    >>> o = compare(Comparison("more_than_days_ago", 30), "2024-05-10T00:00:00Z", now)
    >>> o.matched, o.next_change_at
    (False, datetime.datetime(2024, 6, 9, 0, 0, tzinfo=datetime.timezone.utc))
    """
    op, expected = comparison.op, comparison.value
    if op == "exists":
        return Outcome(actual is not _MISSING and actual is not None)
    if op == "not_exists":
        return Outcome(actual is _MISSING or actual is None)
    if actual is _MISSING or actual is None:
        # A missing value matches only "neq"/"not_in" (it is not equal to anything).
        return Outcome(op in ("neq", "not_in"))
    if op in ("eq", "neq"):
        equal = _equal(actual, expected)
        return Outcome(equal if op == "eq" else not equal)
    if op in SET_OPS:
        inside = any(_equal(actual, v) for v in expected)
        return Outcome(inside if op == "in" else not inside)
    if op in NUMBER_OPS:
        if not _is_number(actual):
            return Outcome(False)
        return Outcome(_NUMBER_TESTS[op](float(actual), expected))
    if op in STRING_OPS:
        if not isinstance(actual, str):
            return Outcome(False)
        a, e = actual.lower(), str(expected).lower()
        return Outcome(e in a if op == "contains" else a.startswith(e) if op == "starts_with" else a.endswith(e))
    when = parse_datetime(actual)
    if when is None:
        return Outcome(False)
    if op == "before":
        return Outcome(when < expected)
    if op == "after":
        return Outcome(when > expected)
    boundary = when + timedelta(days=expected)
    if op == "within_last_days":
        # true while now < when + days (and the date is not in the future... it still counts as recent)
        return Outcome(now < boundary, boundary if now < boundary else None)
    # more_than_days_ago: true from when + days on
    return Outcome(now >= boundary, None if now >= boundary else boundary)


_NUMBER_TESTS: dict[str, Callable[[float, Any], bool]] = {
    "gt": lambda a, e: a > e,
    "gte": lambda a, e: a >= e,
    "lt": lambda a, e: a < e,
    "lte": lambda a, e: a <= e,
    "between": lambda a, e: e[0] <= a <= e[1],
}


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(actual, bool) or isinstance(expected, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    if _is_number(actual) and _is_number(expected):
        return float(actual) == float(expected)
    if isinstance(actual, str) and isinstance(expected, str):
        return actual.casefold() == expected.casefold()
    return bool(actual == expected)


def _event_matches(rule: PerformedRule, event: EventRecord, now: datetime) -> bool:
    if event.name != rule.event:
        return False
    return all(compare(f.comparison, read_path(event.properties, f.path), now).matched for f in rule.where)


def count_outcome(rule: PerformedRule, times: Sequence[datetime], now: datetime) -> Outcome:
    """Whether the count of events at ``times`` inside ``(now - within_days, now]`` satisfies the bound, and
    the next moment an event entering or leaving the window flips that answer.

    >>> now = datetime(2024, 6, 10, tzinfo=UTC)
    >>> r = PerformedRule("Order Completed", "at_least", 2, 7.0)
    >>> ts = [datetime(2024, 6, 5, tzinfo=UTC), datetime(2024, 6, 8, tzinfo=UTC)]
    >>> count_outcome(r, ts, now)
    Outcome(matched=True, next_change_at=datetime.datetime(2024, 6, 12, 0, 0, tzinfo=datetime.timezone.utc))
    >>> count_outcome(PerformedRule("Order Completed", "at_most", 0, 30.0), ts, now).next_change_at
    datetime.datetime(2024, 7, 8, 0, 0, tzinfo=datetime.timezone.utc)
    """
    window = None if rule.within_days is None else timedelta(days=rule.within_days)

    def count_at(t: datetime) -> int:
        return sum(1 for ts in times if ts <= t and (window is None or ts > t - window))

    def holds(n: int) -> bool:
        return n >= rule.count if rule.bound == "at_least" else n <= rule.count

    current = holds(count_at(now))
    # The count only changes when an event enters (its timestamp, if in the future) or leaves the window.
    change_points = sorted({t for t in times if t > now} | ({t + window for t in times if t + window > now}
                                                              if window is not None else set()))
    for point in change_points:
        if holds(count_at(point)) != current:
            return Outcome(current, point)
    return Outcome(current, None)


def evaluate(rule: Rule, ctx: Context, now: datetime) -> Outcome:
    """The answer of ``rule`` for ``ctx`` at ``now`` and the earliest moment it may change by time alone."""
    if isinstance(rule, And | Or):
        outcomes = [evaluate(child, ctx, now) for child in rule.children]
        want = isinstance(rule, And)
        matched = all(o.matched for o in outcomes) if want else any(o.matched for o in outcomes)
        if matched == want:
            # AND true / OR false: any child flipping flips the whole.
            return Outcome(matched, _earliest(o.next_change_at for o in outcomes))
        # AND false / OR true: only the children holding the answer can change it.
        deciding = [o for o in outcomes if o.matched != want]
        return Outcome(matched, _earliest(o.next_change_at for o in deciding))
    if isinstance(rule, Not):
        inner = evaluate(rule.child, ctx, now)
        return Outcome(not inner.matched, inner.next_change_at)
    if isinstance(rule, TraitRule):
        return compare(rule.comparison, read_path(ctx.profile.get("traits") or {}, rule.path), now)
    if isinstance(rule, FieldRule):
        return compare(rule.comparison, read_path(ctx.profile, rule.path), now)
    if isinstance(rule, PerformedRule):
        times = [e.timestamp for e in ctx.events if _event_matches(rule, e, now)]
        return count_outcome(rule, times, now)
    if isinstance(rule, PredictionRule):
        return compare(rule.comparison, ctx.predictions.get(rule.name, _MISSING), now)
    if isinstance(rule, RfmRule):
        return Outcome(ctx.rfm_segment in rule.segments)
    if isinstance(rule, LifecycleRule):
        return Outcome(ctx.lifecycle_stage in rule.stages, ctx.lifecycle_changes_at)
    if isinstance(rule, SegmentRule):
        return Outcome(bool(ctx.memberships.get(rule.segment_id, False)))
    raise TypeError(f"not a rule: {rule!r}")


def describe(rule: Rule) -> str:
    """A short human description, used in membership reasons and the API.

    >>> describe(parse_rule({"not_performed": {"event": "Order Completed", "for_days": 60}}))
    "performed 'Order Completed' at_most 0 times within 60 days"
    """
    if isinstance(rule, And | Or):
        joiner = " and " if isinstance(rule, And) else " or "
        return "(" + joiner.join(describe(c) for c in rule.children) + ")"
    if isinstance(rule, Not):
        return f"not {describe(rule.child)}"
    if isinstance(rule, TraitRule):
        return rule.comparison.describe("trait " + ".".join(rule.path))
    if isinstance(rule, FieldRule):
        return rule.comparison.describe(".".join(rule.path))
    if isinstance(rule, PerformedRule):
        window = "" if rule.within_days is None else f" within {rule.within_days:g} days"
        where = "".join(f" where {f.comparison.describe('.'.join(f.path))}" for f in rule.where)
        return f"performed {rule.event!r} {rule.bound} {rule.count} times{window}{where}"
    if isinstance(rule, PredictionRule):
        return rule.comparison.describe(rule.name)
    if isinstance(rule, RfmRule):
        return "RFM segment in " + ", ".join(sorted(rule.segments))
    if isinstance(rule, LifecycleRule):
        return "lifecycle stage in " + ", ".join(sorted(rule.stages))
    return f"member of segment {rule.segment_id}"
