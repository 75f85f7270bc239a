"""Every rule operator, validation paths, and the time at which answers change (pure, no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.segmenter.domain.membership import CustomerFacts, SegmentDefinition, decide, order_segments
from services.segmenter.domain.rfm import RfmScorer, RfmValues
from services.segmenter.domain.rules import Context, EventRecord, RuleError, evaluate, parse_rule

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
PROFILE: dict[str, Any] = {
    "orders_count": 3, "revenue_total": 250.0, "email": "Ann@Example.com", "last_order_at": "2024-05-20T12:00:00Z",
    "consent": {"email": {"subscribed": True}},
    "traits": {"plan": "pro", "age": 41, "vip": True, "signup": "2023-01-15T00:00:00Z", "company": {"size": 50},
               "nickname": None},
}


def check(rule: dict[str, Any], ctx: Context | None = None, now: datetime = NOW) -> bool:
    return evaluate(parse_rule(rule), ctx or Context(profile=PROFILE), now).matched


@pytest.mark.parametrize(("op", "value", "expected"), [
    ("eq", "PRO", True), ("eq", "free", False), ("neq", "free", True), ("neq", "pro", False),
    ("in", ["team", "pro"], True), ("in", ["team"], False), ("not_in", ["team"], True), ("not_in", ["pro"], False),
    ("contains", "r", True), ("contains", "x", False), ("starts_with", "p", True), ("ends_with", "ro", True),
    ("ends_with", "p", False),
])
def test_string_operators(op: str, value: Any, expected: bool) -> None:
    assert check({"trait": "plan", "op": op, "value": value}) is expected


@pytest.mark.parametrize(("op", "value", "expected"), [
    ("gt", 40, True), ("gt", 41, False), ("gte", 41, True), ("lt", 42, True), ("lt", 41, False), ("lte", 41, True),
    ("between", [40, 41], True), ("between", [42, 50], False), ("eq", 41, True), ("eq", 41.0, True),
])
def test_number_operators(op: str, value: Any, expected: bool) -> None:
    assert check({"trait": "age", "op": op, "value": value}) is expected


def test_types_are_strict_and_missing_values_only_match_negations() -> None:
    assert not check({"trait": "plan", "op": "gt", "value": 1})  # a string is never > 1
    assert not check({"trait": "age", "op": "contains", "value": "4"})
    assert check({"trait": "vip", "op": "eq", "value": True}) and not check({"trait": "vip", "op": "eq", "value": 1})
    assert check({"trait": "missing", "op": "neq", "value": "x"}) and check({"trait": "missing", "op": "not_in",
                                                                            "value": ["x"]})
    assert not check({"trait": "missing", "op": "eq", "value": "x"})
    assert check({"trait": "missing", "op": "not_exists"}) and check({"trait": "nickname", "op": "not_exists"})
    assert check({"trait": "plan", "op": "exists"}) and not check({"trait": "plan", "op": "not_exists"})
    assert check({"trait": "company.size", "op": "gte", "value": 50})  # dotted paths
    assert check({"field": "consent.email.subscribed", "op": "eq", "value": True})
    assert check({"field": "email", "op": "ends_with", "value": "@example.com"})  # case-insensitive


def test_date_operators_and_their_time_triggers() -> None:
    assert check({"trait": "signup", "op": "before", "value": "2023-06-01"})
    assert check({"trait": "signup", "op": "after", "value": "2022-12-31T23:59:59Z"})
    recent = evaluate(parse_rule({"field": "last_order_at", "op": "within_last_days", "value": 30}),
                      Context(profile=PROFILE), NOW)
    assert recent.matched and recent.next_change_at == datetime(2024, 6, 19, 12, 0, tzinfo=UTC)
    old = evaluate(parse_rule({"field": "last_order_at", "op": "more_than_days_ago", "value": 30}),
                   Context(profile=PROFILE), NOW)
    assert not old.matched and old.next_change_at == datetime(2024, 6, 19, 12, 0, tzinfo=UTC)
    assert evaluate(parse_rule({"field": "last_order_at", "op": "more_than_days_ago", "value": 30}),
                    Context(profile=PROFILE), datetime(2024, 6, 19, 12, 0, tzinfo=UTC)).matched


def test_and_or_not() -> None:
    yes, no = {"trait": "plan", "op": "eq", "value": "pro"}, {"trait": "plan", "op": "eq", "value": "free"}
    assert check({"and": [yes, yes]}) and not check({"and": [yes, no]})
    assert check({"or": [no, yes]}) and not check({"or": [no, no]})
    assert check({"not": no}) and not check({"not": yes})
    assert check({"and": [{"or": [no, {"not": no}]}, {"not": {"and": [yes, no]}}]})


def test_combinators_report_the_earliest_relevant_change() -> None:
    soon = {"field": "last_order_at", "op": "within_last_days", "value": 15}  # true until 2024-06-04T12:00
    later = {"field": "last_order_at", "op": "within_last_days", "value": 30}
    never = {"trait": "plan", "op": "eq", "value": "free"}
    both = evaluate(parse_rule({"and": [soon, later]}), Context(profile=PROFILE), NOW)
    assert both.matched and both.next_change_at == datetime(2024, 6, 4, 12, 0, tzinfo=UTC)
    # AND decided by a false child that time never changes: no wake-up needed
    blocked = evaluate(parse_rule({"and": [never, later]}), Context(profile=PROFILE), NOW)
    assert not blocked.matched and blocked.next_change_at is None


def events(*specs: tuple[str, float, dict[str, Any]]) -> list[EventRecord]:
    return [EventRecord(name, NOW - timedelta(days=days_ago), props, f"m{i}")
            for i, (name, days_ago, props) in enumerate(specs)]


def test_performed_at_least_at_most_with_filters_and_windows() -> None:
    history = events(("Order Completed", 1, {"total": 80, "channel": "web"}),
                     ("Order Completed", 5, {"total": 20, "channel": "web"}),
                     ("Order Completed", 40, {"total": 90, "channel": "app"}),
                     ("Product Viewed", 2, {}))
    ctx = Context(profile=PROFILE, events=history)

    def performed(**body: Any) -> bool:
        return check({"performed": {"event": "Order Completed", **body}}, ctx)

    assert performed(at_least=3) and not performed(at_least=4)
    assert performed(at_least=2, within_days=30) and not performed(at_least=3, within_days=30)
    assert performed(at_most=2, within_days=30) and not performed(at_most=1, within_days=30)
    assert performed(at_least=2, where=[{"property": "total", "op": "gt", "value": 50}])
    assert not performed(at_least=2, within_days=30, where=[{"property": "total", "op": "gt", "value": 50}])
    assert performed(at_least=1, where=[{"property": "channel", "op": "eq", "value": "app"}])
    assert performed(at_least=0, where=[{"property": "missing", "op": "exists"}])
    # the two orders in the last 30 days: the one 5 days ago leaves the window in 25 days
    outcome = evaluate(parse_rule({"performed": {"event": "Order Completed", "at_least": 2, "within_days": 30}}),
                       ctx, NOW)
    assert outcome.next_change_at == NOW + timedelta(days=25)


def test_not_performed_becomes_true_by_time_alone() -> None:
    ctx = Context(profile=PROFILE, events=events(("Order Completed", 10, {})))
    rule = parse_rule({"not_performed": {"event": "Order Completed", "for_days": 60}})
    now = evaluate(rule, ctx, NOW)
    assert not now.matched and now.next_change_at == NOW + timedelta(days=50)
    assert evaluate(rule, ctx, NOW + timedelta(days=50)).matched
    assert check({"not_performed": {"event": "Order Completed", "for_days": 60}}, Context(profile=PROFILE))


def test_predictions_rfm_lifecycle_and_segment_membership() -> None:
    ctx = Context(profile=PROFILE, predictions={"churn_probability": 0.8, "predicted_clv_365d": 120.0},
                  rfm_segment="At Risk", lifecycle_stage="vip", memberships={"s1": True, "s2": False})
    assert check({"prediction": "churn_probability", "op": "gte", "value": 0.7}, ctx)
    assert not check({"prediction": "predicted_clv_365d", "op": "gt", "value": 200}, ctx)
    assert check({"prediction": "p_alive", "op": "not_exists"}, ctx)
    assert check({"rfm_segment": ["At Risk", "Can't Lose Them"]}, ctx) and not check({"rfm_segment": "Lost"}, ctx)
    assert check({"lifecycle_stage": "vip"}, ctx) and not check({"lifecycle_stage": ["lapsed"]}, ctx)
    assert check({"in_segment": "s1"}, ctx) and not check({"in_segment": "s2"}, ctx)
    assert not check({"in_segment": "unknown"}, ctx)


@pytest.mark.parametrize(("rule", "path"), [
    ("plan", "$"),
    ({}, "$"),
    ({"and": []}, "$.and"),
    ({"and": [{"or": [{"trait": "a", "op": "eq", "value": 1}, {"trait": "", "op": "eq", "value": 1}]}]},
     "$.and[0].or[1].trait"),
    ({"trait": "a", "op": "eq"}, "$.value"),
    ({"trait": "a", "op": "exists", "value": 1}, "$.value"),
    ({"trait": "a", "op": "between", "value": [5, 1]}, "$.value"),
    ({"trait": "a", "op": "in", "value": []}, "$.value"),
    ({"trait": "a", "op": "before", "value": "yesterday"}, "$.value"),
    ({"trait": "a", "op": "within_last_days", "value": -1}, "$.value"),
    ({"trait": "a", "op": "eq", "value": 1, "extra": 2}, "$.extra"),
    ({"field": "favourite_colour", "op": "eq", "value": "red"}, "$.field"),
    ({"performed": {"event": "", "at_least": 1}}, "$.performed.event"),
    ({"performed": {"event": "X", "at_least": 1, "at_most": 2}}, "$.performed"),
    ({"performed": {"event": "X", "at_least": 1.5}}, "$.performed.at_least"),
    ({"performed": {"event": "X", "at_least": 1, "within_days": 0}}, "$.performed.within_days"),
    ({"performed": {"event": "X", "at_least": 1, "where": [{"property": "p", "op": "gt", "value": "a"}]}},
     "$.performed.where[0].value"),
    ({"not_performed": {"event": "X", "for_days": 3, "where": {"p": 1}}}, "$.not_performed.where"),
    ({"prediction": "lifetime", "op": "gt", "value": 1}, "$.prediction"),
    ({"rfm_segment": []}, "$.rfm_segment"),
    ({"in_segment": 5}, "$.in_segment"),
    ({"not": {"not": {"not": {"trait": "a", "op": "gt", "value": True}}}}, "$.not.not.not.value"),
])
def test_invalid_rules_name_the_offending_path(rule: Any, path: str) -> None:
    with pytest.raises(RuleError) as err:
        parse_rule(rule)
    assert err.value.path == path


def test_nesting_depth_is_bounded() -> None:
    rule: dict[str, Any] = {"trait": "a", "op": "exists"}
    for _ in range(20):
        rule = {"not": rule}
    with pytest.raises(RuleError, match="levels deep"):
        parse_rule(rule)


def test_decide_is_deterministic_and_orders_dependencies() -> None:
    base = SegmentDefinition.create("base", "Spenders", {"field": "revenue_total", "op": "gte", "value": 100})
    derived = SegmentDefinition.create("derived", "Spending pros", {"and": [
        {"in_segment": "base"}, {"trait": "plan", "op": "eq", "value": "pro"}]})
    ordered = order_segments([derived, base])
    assert [s.segment_id for s in ordered] == ["base", "derived"]
    facts = CustomerFacts(profile=PROFILE)
    first = decide(ordered, facts, {}, "test", NOW)
    assert [(t.segment_id, t.change) for t in first.transitions] == [("base", "entered"), ("derived", "entered")]
    assert decide(ordered, facts, first.memberships, "replay", NOW).transitions == []
    poorer = CustomerFacts(profile={**PROFILE, "revenue_total": 10.0})
    after = decide(ordered, poorer, first.memberships, "refund", NOW)
    assert [(t.segment_id, t.change) for t in after.transitions] == [("base", "exited"), ("derived", "exited")]
    assert after.transitions[0].reason.startswith("refund: no longer matches")


def test_decide_uses_live_rfm_and_lifecycle() -> None:
    scorer = RfmScorer()
    for day, orders, revenue in [(19800, 1, 10.0), (19810, 1, 20.0), (19820, 2, 40.0), (19830, 3, 90.0)]:
        scorer.add(RfmValues(day, orders, revenue))
    champions = SegmentDefinition.create("c", "Champions", {"rfm_segment": "Champions"})
    at_risk = SegmentDefinition.create("r", "At risk", {"lifecycle_stage": "at_risk"})
    profile = {**PROFILE, "orders_count": 9, "revenue_total": 900.0, "last_order_at": "2024-05-31T00:00:00Z"}
    scorer.add(RfmValues(19874, 9, 900.0))
    decision = decide([champions, at_risk], CustomerFacts(profile=profile), {}, "t", NOW, scorer=scorer)
    assert decision.rfm_segment == "Champions" and decision.memberships == {"c": True, "r": False}
    # the lifecycle stage turns at_risk 90 days after the last order: that is the next wake-up
    assert decision.next_evaluation_at == datetime(2024, 8, 29, tzinfo=UTC)
    later = decide([champions, at_risk], CustomerFacts(profile=profile), decision.memberships, "time elapsed",
                   datetime(2024, 8, 29, tzinfo=UTC), scorer=scorer)
    assert [(t.segment_id, t.change) for t in later.transitions] == [("r", "entered")]
