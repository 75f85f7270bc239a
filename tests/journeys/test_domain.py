"""The pure journey domain: validation, entry and re-entry, every node type, exits, goals, holdout, versions."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from services.journeys.domain.definition import InvalidDefinition, JourneyDefinition, SplitNode, parse_definition
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
    choose_branch,
    decide,
    decide_entry,
)
from services.journeys.domain.templates import TEMPLATES, TemplateParamError, build_template

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def definition(nodes: list[Any], **extra: Any) -> JourneyDefinition:
    raw: dict[str, Any] = {"name": "test", "entry": {"type": "event", "event": "Checkout Started",
                                                     "key": "checkout_id"}, "nodes": nodes}
    raw.update(extra)
    return parse_definition(raw)


def checkout(message_id: str = "m1", checkout_id: str = "c1", **props: Any) -> EventTrigger:
    return EventTrigger("Checkout Started", message_id, {"checkout_id": checkout_id, **props},
                        timestamp=T0, received_at=T0)


def event(name: str, message_id: str, **props: Any) -> EventTrigger:
    return EventTrigger(name, message_id, props, timestamp=T0, received_at=T0)


def enter(d: JourneyDefinition, trigger: Any = None, existing: list[Instance] | None = None, now: datetime = T0,
          profile: dict[str, Any] | None = None, profile_id: str = "p1", version: int = 1) -> Decision:
    decision = decide_entry(d, "j1", version, profile_id, trigger or checkout(), existing or [], now, profile)
    assert decision is not None
    return decision


def sends(decision: Decision) -> list[SendMessage]:
    return [a for a in decision.actions if isinstance(a, SendMessage)]


ABANDONED: list[dict[str, Any]] = [
    {"id": "wait", "type": "wait_for_event", "event": "Order Completed", "match_key": "checkout_id",
     "timeout": "PT1H", "next": "done", "timeout_next": "remind"},
    {"id": "remind", "type": "send", "channel": "email", "template": "abandoned_checkout",
     "data": {"items": "$entry.properties.products", "url": "$entry.properties.recovery_url"}, "next": "done"},
    {"id": "done", "type": "exit"},
]


# ---- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("nodes", "node", "fragment"), [
    ([{"id": "a", "type": "send", "template": "t", "next": "nowhere"}], "a", "does not exist"),
    ([{"id": "a", "type": "teleport"}], "a", "unknown node type"),
    ([{"id": "a", "type": "delay", "duration": "5 minutes"}], "a", "ISO 8601"),
    ([{"id": "a", "type": "delay"}], "a", "exactly one of"),
    ([{"id": "a", "type": "send", "template": "t", "next": "b"}, {"id": "b", "type": "delay", "duration": "PT1S",
                                                                   "next": "a"}], "b", "cycle"),
    ([{"id": "a", "type": "exit"}, {"id": "b", "type": "exit"}], "b", "not reachable"),
    ([{"id": "a", "type": "split", "branches": [{"weight": 1, "next": None}]}], "a", "two branches"),
    ([{"id": "a", "type": "split", "branches": [{"weight": 1, "holdout": True}, {"weight": -1}]}], "a", "positive"),
    ([{"id": "a", "type": "condition", "if": {"field": "profile.x", "op": "like", "value": 1}}], "a",
     "unknown operator"),
    ([{"id": "a", "type": "send", "channel": "pigeon", "template": "t"}], "a", "channel"),
    ([{"id": "a", "type": "wait_for_event", "event": "X", "timeout": "PT0S"}], "a", "positive"),
    ([{"id": "a", "type": "webhook", "url": "ftp://x"}], "a", "http"),
    ([{"id": "a", "type": "update_trait", "traits": {}}], "a", "non-empty"),
    ([{"id": "a", "type": "exit"}, {"id": "a", "type": "exit"}], "a", "duplicate"),
])
def test_invalid_definitions_point_at_the_node(nodes: list[dict[str, Any]], node: str, fragment: str) -> None:
    with pytest.raises(InvalidDefinition) as info:
        definition(nodes)
    assert any(p.where == node and fragment in p.message for p in info.value.problems), info.value.problems


def test_invalid_entry_reentry_goal_and_exit_rules_are_all_reported() -> None:
    with pytest.raises(InvalidDefinition) as info:
        parse_definition({"name": "", "entry": {"type": "segment"}, "reentry": {"policy": "cooldown"},
                          "nodes": [{"id": "a", "type": "exit"}],
                          "exit_rules": [{"type": "segment_exited"}, {"type": "goal_reached"}]})
    where = {p.where for p in info.value.problems}
    assert {"journey", "entry", "reentry", "exit_rules[0]", "exit_rules"} <= where


def test_match_key_needs_an_event_entry() -> None:
    with pytest.raises(InvalidDefinition) as info:
        parse_definition({"name": "x", "entry": {"type": "segment", "segment_id": "s"}, "nodes": [
            {"id": "w", "type": "wait_for_event", "event": "X", "timeout": "PT1H", "match_key": "k"}]})
    assert info.value.problems[0].where == "w"


def test_every_shipped_template_is_valid_and_takes_parameters() -> None:
    for template_id in TEMPLATES:
        parse_definition(build_template(template_id, {}))
    d = parse_definition(build_template("abandoned_checkout", {"first_reminder_after": "PT5S",
                                                               "holdout_percent": 10}))
    assert d.start == "holdout_split"
    with pytest.raises(TemplateParamError):
        build_template("abandoned_checkout", {"first_reminder_afterr": "PT5S"})
    with pytest.raises(TemplateParamError):
        build_template("win_back", {"holdout_percent": 80})


# ---- entry and re-entry ---------------------------------------------------------------------------------------


def test_event_entry_with_property_filter() -> None:
    d = definition([{"id": "a", "type": "exit"}],
                   entry={"type": "event", "event": "Checkout Started",
                          "where": {"field": "event.properties.value", "op": "gte", "value": 50}})
    assert decide_entry(d, "j1", 1, "p1", checkout(value=10), [], T0, None) is None
    assert decide_entry(d, "j1", 1, "p1", checkout(value=60), [], T0, None) is not None
    assert decide_entry(d, "j1", 1, "p1", event("Order Completed", "m9", value=60), [], T0, None) is None


def test_keyed_entry_runs_one_instance_per_key_and_needs_the_key() -> None:
    d = definition(ABANDONED)
    first = enter(d).instance
    assert first.key == "c1" and first.status == "waiting"
    # same checkout again while running: no second instance; another checkout: a second one
    assert decide_entry(d, "j1", 1, "p1", checkout("m2", "c1"), [first], T0, None) is None
    second = decide_entry(d, "j1", 1, "p1", checkout("m3", "c2"), [first], T0, None)
    assert second is not None and second.instance.key == "c2"
    assert decide_entry(d, "j1", 1, "p1", EventTrigger("Checkout Started", "m4", {}), [], T0, None) is None


def test_replayed_entry_event_does_not_duplicate_even_after_completion() -> None:
    d = definition([{"id": "a", "type": "exit"}], reentry="always")
    done = enter(d).instance
    assert done.status == "completed"
    assert decide_entry(d, "j1", 1, "p1", checkout(), [done], T0, None) is None  # same message id
    assert decide_entry(d, "j1", 1, "p1", checkout("m2"), [done], T0, None) is not None


@pytest.mark.parametrize(("policy", "after", "allowed"), [
    ("never", timedelta(days=400), False),
    ({"policy": "cooldown", "cooldown": "P7D"}, timedelta(days=6), False),
    ({"policy": "cooldown", "cooldown": "P7D"}, timedelta(days=7), True),
    ("always", timedelta(seconds=1), True),
])
def test_reentry_policies(policy: Any, after: timedelta, allowed: bool) -> None:
    d = parse_definition({"name": "x", "entry": {"type": "event", "event": "A"}, "reentry": policy,
                          "nodes": [{"id": "a", "type": "exit"}]})
    first = enter(d, event("A", "m1")).instance
    again = decide_entry(d, "j1", 1, "p1", event("A", "m2"), [first], T0 + after, None)
    assert (again is not None) is allowed


def test_unkeyed_entry_blocks_while_running_whatever_the_policy() -> None:
    d = parse_definition({"name": "x", "entry": {"type": "event", "event": "A"}, "reentry": "always",
                          "nodes": [{"id": "w", "type": "delay", "duration": "P1D"}]})
    first = enter(d, event("A", "m1")).instance
    assert decide_entry(d, "j1", 1, "p1", event("A", "m2"), [first], T0, None) is None


def test_segment_entry_entered_and_exited() -> None:
    for change in ("entered", "exited"):
        d = parse_definition({"name": "x", "entry": {"type": "segment", "segment_id": "vip", "change": change},
                              "nodes": [{"id": "s", "type": "send", "template": "vip_early_access"}]})
        hit = SegmentTrigger("vip", change, T0, received_at=T0)  # type: ignore[arg-type]
        other = SegmentTrigger("vip", "exited" if change == "entered" else "entered", T0)
        assert decide_entry(d, "j1", 1, "p1", other, [], T0, None) is None
        decision = enter(d, hit)
        assert sends(decision)[0].event_accepted_at == T0


def test_date_trait_entry_once_per_year() -> None:
    d = parse_definition(build_template("birthday", {}))
    first = enter(d, DateTrigger(date(2024, 5, 4)), profile={"traits": {"birthday": "1990-05-04"}}).instance
    assert first.key == "2024" and sends(enter(d, DateTrigger(date(2024, 5, 4))))[0].template_id == "birthday"
    assert decide_entry(d, "j1", 1, "p1", DateTrigger(date(2024, 5, 4)), [first], T0, None) is None
    assert decide_entry(d, "j1", 1, "p1", DateTrigger(date(2025, 5, 4)), [first], T0, None) is not None


# ---- nodes ----------------------------------------------------------------------------------------------------


def test_wait_for_event_times_out_into_a_reminder_with_cart_data() -> None:
    d = definition(ABANDONED)
    started = enter(d, checkout(products=[{"sku": "A"}], recovery_url="https://shop/c1"))
    assert started.actions == (ScheduleTimer(started.instance.instance_id, "wait", T0 + timedelta(hours=1)),)
    # a timer fired too early (another worker's clock) is rescheduled, not acted on
    early = decide(d, started.instance, TimerTrigger("wait", T0 + timedelta(hours=1)), T0 + timedelta(minutes=59))
    assert not sends(early) and isinstance(early.actions[0], ScheduleTimer)
    fired = decide(d, started.instance, TimerTrigger("wait", T0 + timedelta(hours=1)), T0 + timedelta(hours=1))
    [message] = sends(fired)
    assert message.template_id == "abandoned_checkout"
    assert message.data == {"items": [{"sku": "A"}], "url": "https://shop/c1"}
    assert message.idempotency_key == f"journey:j1:v1:{started.instance.instance_id}:remind"
    assert message.event_accepted_at is None  # a timer, not an event, caused it
    assert fired.instance.status == "completed"
    # the same timer delivered again (at-least-once) changes nothing and sends nothing
    again = decide(d, fired.instance, TimerTrigger("wait", T0 + timedelta(hours=1)), T0 + timedelta(hours=2))
    assert not again.changed and not again.actions


def test_wait_for_event_matches_only_the_same_key() -> None:
    d = definition(ABANDONED)
    waiting = enter(d).instance
    other = decide(d, waiting, event("Order Completed", "o1", checkout_id="c2"), T0)
    assert not other.changed
    matched = decide(d, waiting, event("Order Completed", "o2", checkout_id="c1"), T0)
    assert matched.instance.status == "completed" and not sends(matched)
    late_timer = decide(d, matched.instance, TimerTrigger("wait", T0 + timedelta(hours=1)), T0 + timedelta(hours=1))
    assert not sends(late_timer)


def test_delay_by_duration_and_until_local_time_and_until_date() -> None:
    nodes: list[dict[str, Any]] = [{"id": "d", "type": "delay", "duration": "PT30M", "next": "s"},
             {"id": "s", "type": "send", "template": "welcome_1"}]
    decision = enter(definition(nodes))
    assert decision.instance.waiting is not None and decision.instance.waiting.until == T0 + timedelta(minutes=30)
    assert not sends(decision)
    fired = decide(definition(nodes), decision.instance, TimerTrigger("d", T0), T0 + timedelta(minutes=30))
    assert len(sends(fired)) == 1

    local = [{"id": "d", "type": "delay", "until_local_time": "09:00", "next": "s"},
             {"id": "s", "type": "send", "template": "welcome_1"}]
    # 12:00 UTC is 21:00 in Tokyo: next 09:00 Tokyo is 00:00 UTC next day
    tokyo = enter(definition(local), profile={"timezone": "Asia/Tokyo"}).instance
    assert tokyo.waiting is not None and tokyo.waiting.until == datetime(2024, 6, 2, 0, 0, tzinfo=UTC)
    unknown_zone = enter(definition(local), profile={"timezone": "Mars/Olympus"}).instance
    assert unknown_zone.waiting is not None and unknown_zone.waiting.until == datetime(2024, 6, 2, 9, tzinfo=UTC)

    until = [{"id": "d", "type": "delay", "until_date": "profile.traits.renewal_at", "offset": "-P3D", "next": "s"},
             {"id": "s", "type": "send", "template": "welcome_1"}]
    inst = enter(definition(until), profile={"traits": {"renewal_at": "2024-06-10T12:00:00Z"}}).instance
    assert inst.waiting is not None and inst.waiting.until == datetime(2024, 6, 7, 12, tzinfo=UTC)
    past = enter(definition(until), profile={"traits": {"renewal_at": "2024-01-01"}})
    assert len(sends(past)) == 1 and past.instance.status == "completed"


def test_condition_split_on_traits_segments_and_predictions() -> None:
    nodes: list[dict[str, Any]] = [{"id": "c", "type": "condition", "if": {"all": [
        {"in_segment": "vip"}, {"field": "profile.predictions.predicted_clv_365d", "op": "gte", "value": 300},
        {"field": "profile.traits.plan", "op": "in", "value": ["gold", "pro"]}]},
        "next": "yes", "else_next": "no"},
        {"id": "yes", "type": "send", "template": "vip_early_access"},
        {"id": "no", "type": "send", "template": "win_back"}]
    d = definition(nodes)
    rich = {"segments": ["vip"], "predictions": {"predicted_clv_365d": 500}, "traits": {"plan": "pro"}}
    assert sends(enter(d, profile=rich))[0].template_id == "vip_early_access"
    assert sends(enter(d, profile={**rich, "segments": []}))[0].template_id == "win_back"
    assert sends(enter(d, profile=None))[0].template_id == "win_back"


def test_high_clv_gets_the_incentive_reminder_others_do_not() -> None:
    d = parse_definition(build_template("abandoned_checkout", {"first_reminder_after": "PT5S",
                                                               "second_reminder_after": "PT10S"}))

    def run(profile: dict[str, Any]) -> list[str]:
        inst = decide_entry(d, "j1", 1, "p1", checkout(), [], T0, profile)
        assert inst is not None
        out: list[str] = []
        now = T0
        current = inst.instance
        while current.waiting is not None:
            now = current.waiting.until
            step = decide(d, current, TimerTrigger(current.waiting.node_id, now), now, profile)
            out += [s.template_id for s in sends(step)]
            current = step.instance
        return out

    assert run({"predictions": {"predicted_clv_365d": 900}}) == ["abandoned_checkout", "abandoned_checkout_incentive"]
    assert run({"predictions": {"predicted_clv_365d": 20}}) == ["abandoned_checkout"]


def test_random_split_holdout_is_stable_per_customer_and_close_to_its_weight() -> None:
    nodes: list[dict[str, Any]] = [{"id": "split", "type": "split", "branches": [
        {"id": "treated", "weight": 80, "next": "s"}, {"id": "control", "weight": 20, "holdout": True}]},
        {"id": "s", "type": "send", "template": "win_back"}]
    d = definition(nodes)
    v2 = definition([*nodes, {"id": "extra", "type": "exit"}][:2])
    groups = {}
    for i in range(2000):
        first = enter(d, checkout(f"m{i}"), profile_id=f"p{i}")
        again = enter(v2, checkout(f"other{i}", "c9"), profile_id=f"p{i}", version=2)
        assert first.instance.group == again.instance.group  # stable across instances and versions
        assert (first.instance.group == "holdout") == (not sends(first))
        groups[f"p{i}"] = first.instance.group
    share = sum(g == "holdout" for g in groups.values()) / len(groups)
    assert 0.17 < share < 0.23
    split = d.nodes["split"]
    assert isinstance(split, SplitNode)
    assert choose_branch("j1", split, "p1") == choose_branch("j1", split, "p1")


def test_update_trait_emits_an_identify_for_the_profile() -> None:
    d = definition([{"id": "u", "type": "update_trait", "traits": {"last_checkout": "$entry.properties.checkout_id",
                                                                   "touched_at": "$now"}}])
    decision = enter(d)
    [emit] = [a for a in decision.actions if isinstance(a, EmitEvent)]
    envelope = emit.envelope()
    assert envelope["type"] == "identify" and envelope["traits"] == {"last_checkout": "c1",
                                                                     "touched_at": T0.isoformat()}
    assert envelope["context"]["loyalist"]["profileId"] == "p1"
    assert envelope["messageId"] == f"journey:j1:v1:{decision.instance.instance_id}:u"


def test_webhook_becomes_a_webhook_channel_request() -> None:
    d = definition([{"id": "w", "type": "webhook", "url": "https://hooks.example/x",
                     "body": {"checkout": "$entry.properties.checkout_id"}}])
    [request] = sends(enter(d))
    assert request.channel == "webhook"
    assert request.data == {"url": "https://hooks.example/x", "method": "POST", "body": {"checkout": "c1"}}
    body = request.request(T0)
    assert body["eventAcceptedAt"] == T0.isoformat() and body["idempotencyKey"] == request.idempotency_key


def test_message_request_matches_the_contract() -> None:
    [message] = sends(enter(definition([{"id": "s", "type": "send", "template": "welcome_1"}])))
    body = message.request(T0)
    assert set(body) == {"idempotencyKey", "profileId", "channel", "category", "templateId", "data", "journeyId",
                         "journeyVersion", "nodeId", "instanceId", "requestedAt", "eventAcceptedAt"}
    assert body["category"] == "marketing" and body["journeyVersion"] == 1


# ---- exits and goals ------------------------------------------------------------------------------------------


def test_exit_rules_segment_unsubscribed_event() -> None:
    d = definition(ABANDONED, exit_rules=[{"type": "segment_exited", "segment_id": "buyers"},
                                          {"type": "unsubscribed"},
                                          {"type": "event", "event": "Order Refunded"}])
    waiting = enter(d).instance
    left = decide(d, waiting, SegmentTrigger("buyers", "exited", T0), T0)
    assert left.instance.status == "exited" and left.instance.exit_reason == "segment_exited:buyers"
    assert not decide(d, waiting, SegmentTrigger("other", "exited", T0), T0).changed
    unsub = decide(d, waiting, event("Unsubscribed", "u1"), T0)
    assert unsub.instance.exit_reason == "unsubscribed"
    refund = decide(d, waiting, event("Order Refunded", "r1"), T0)
    assert refund.instance.exit_reason == "event:Order Refunded"
    # after an exit, the pending timer sends nothing
    timer = decide(d, unsub.instance, TimerTrigger("wait", T0), T0 + timedelta(hours=2))
    assert not sends(timer)


def test_goal_with_attribution_window_and_goal_exit() -> None:
    nodes: list[dict[str, Any]] = [{"id": "d", "type": "delay", "duration": "P3D", "next": "s"},
             {"id": "s", "type": "send", "template": "win_back"}]
    d = definition(nodes, goal={"event": "Order Completed", "within": "P2D"},
                   exit_rules=[{"type": "goal_reached"}])
    waiting = enter(d).instance
    won = decide(d, waiting, event("Order Completed", "o1", revenue=42.5), T0 + timedelta(days=1))
    assert won.instance.converted_at == T0 + timedelta(days=1) and won.instance.revenue == 42.5
    assert won.instance.status == "exited" and won.instance.exit_reason == "goal_reached"
    late = decide(d, waiting, event("Order Completed", "o2", revenue=10), T0 + timedelta(days=2, seconds=1))
    assert late.instance.converted_at is None


def test_goal_is_still_attributed_after_the_instance_finished() -> None:
    d = definition([{"id": "s", "type": "send", "template": "welcome_1"}],
                   goal={"event": "Order Completed", "within": "P7D", "match_key": "checkout_id"})
    done = enter(d).instance
    assert done.status == "completed"
    assert not decide(d, done, event("Order Completed", "o0", checkout_id="zz"), T0).changed
    won = decide(d, done, event("Order Completed", "o1", checkout_id="c1", total=20), T0 + timedelta(days=6))
    assert won.instance.converted_at is not None and won.instance.revenue == 20.0
    assert not decide(d, won.instance, event("Order Completed", "o2", checkout_id="c1"), T0).changed


# ---- versions -------------------------------------------------------------------------------------------------


def test_running_instances_keep_their_version() -> None:
    v1 = definition(ABANDONED)
    v2 = definition([{**ABANDONED[0], "timeout": "PT2H"},
                     {**ABANDONED[1], "template": "abandoned_checkout_incentive"}, ABANDONED[2]])
    old = enter(v1, version=1).instance
    new = enter(v2, checkout("m2", "c2"), [old], version=2).instance
    # the engine steps each instance with its own version's definition
    fired_old = decide(v1, old, TimerTrigger("wait", T0), T0 + timedelta(hours=1))
    fired_new = decide(v2, new, TimerTrigger("wait", T0), T0 + timedelta(hours=2))
    assert sends(fired_old)[0].template_id == "abandoned_checkout"
    assert sends(fired_old)[0].idempotency_key.startswith("journey:j1:v1:")
    assert sends(fired_new)[0].template_id == "abandoned_checkout_incentive"
    assert sends(fired_new)[0].idempotency_key.startswith("journey:j1:v2:")


def test_history_says_what_happened_and_why() -> None:
    d = definition(ABANDONED)
    started = enter(d).instance
    fired = decide(d, started, TimerTrigger("wait", T0), T0 + timedelta(hours=1)).instance
    whats = [(s.node_id, s.what) for s in fired.history]
    assert whats == [("wait", "entered"), ("wait", "waiting"), ("wait", "timed_out"),
                     ("remind", "message_requested"), ("done", "completed")]
    assert "Checkout Started" in fired.history[0].why


def test_points_expiring_reads_the_profiles_expiring_list() -> None:
    from services.journeys.domain.conditions import resolve
    from services.journeys.domain.templates import build_template

    body = build_template("points_expiring", None)
    nodes = {n["id"]: n for n in body["nodes"]}
    # loyalty.expiring as the profile service writes it: points by expiry instant, soonest first.
    context = {"profile": {"loyalty": {"balance": 120, "expiring": [
        {"points": 80, "expires_at": "2027-01-31T00:00:00Z"}, {"points": 40, "expires_at": "2027-03-31T00:00:00Z"}]}}}
    assert resolve(nodes["has_expiry"]["if"]["field"], context) == "2027-01-31T00:00:00Z"
    assert resolve(nodes["wait"]["until_date"], context) == "2027-01-31T00:00:00Z"
    points, expires = nodes["remind"]["data"]["points"], nodes["remind"]["data"]["expires_at"]
    assert resolve(points[1:].split("|")[0], context) == 80
    assert resolve(expires[1:], context) == "2027-01-31T00:00:00Z"


def test_interest_lists_every_event_and_segment_a_journey_reacts_to() -> None:
    from services.journeys.domain.engine import interest_of

    d = definition(
        [{"id": "w", "type": "wait_for_event", "event": "Order Completed", "timeout": "P1D", "next": "end",
          "timeout_next": "end"}, {"id": "end", "type": "exit"}],
        exit_rules=[{"type": "unsubscribed"}, {"type": "segment_exited", "segment_id": "buyers"},
                    {"type": "event", "event": "Account Closed"}],
        goal={"event": "Refund Issued", "within": "P7D"})
    interest = interest_of(d)
    assert interest.events == {"Checkout Started", "Order Completed", "Unsubscribed", "Account Closed",
                               "Refund Issued"}
    assert interest.segments == {"buyers"} and not interest.date_trait
    assert "Product Viewed" not in (interest | interest_of(definition([{"id": "end", "type": "exit"}]))).events
