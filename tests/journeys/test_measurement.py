"""Measurement and backtests, pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from services.journeys.domain.backtest import HistoricalFact, backtest
from services.journeys.domain.definition import parse_definition
from services.journeys.domain.engine import EventTrigger, SegmentTrigger, decide, decide_entry
from services.journeys.domain.stats import ConversionTally, summarize
from services.journeys.domain.templates import build_template

T0 = datetime(2024, 3, 1, 10, tzinfo=UTC)


def fact(pid: str, name: str, at: datetime, **props: object) -> HistoricalFact:
    return HistoricalFact(pid, at, EventTrigger(name, f"{pid}-{name}-{at.isoformat()}", props, timestamp=at))


def test_uplift_interval_narrows_with_more_customers_and_is_none_without_holdout() -> None:
    small, large = ConversionTally(), ConversionTally()
    for tally, n in ((small, 50), (large, 5000)):
        for i in range(n):
            tally.update("treated", i % 10 < 3)
            tally.update("holdout", i % 10 < 2)
    s, big = small.uplift(), large.uplift()
    assert round(s["uplift"], 6) == round(big["uplift"], 6) == 0.1
    assert big["ci95"][1] - big["ci95"][0] < s["ci95"][1] - s["ci95"][0]
    assert big["ci95"][0] > 0 > s["ci95"][0]  # significant only with many customers
    assert ConversionTally().update("treated", True).uplift()["uplift"] is None


def test_summarize_counts_per_node_and_revenue() -> None:
    d = parse_definition(build_template("abandoned_checkout", {"first_reminder_after": "PT1H"}))
    a = decide_entry(d, "j", 1, "a", EventTrigger("Checkout Started", "m1", {"checkout_id": "1"}), [], T0, None)
    b = decide_entry(d, "j", 1, "b", EventTrigger("Checkout Started", "m2", {"checkout_id": "2"}), [], T0, None)
    assert a is not None and b is not None
    won = decide(d, b.instance, EventTrigger("Order Completed", "o", {"checkout_id": "2", "revenue": 30}), T0)
    s = summarize([a.instance, won.instance])
    assert s["entered"] == 2 and s["waiting"] == 1 and s["converted"] == 1 and s["attributed_revenue"] == 30.0
    assert s["nodes"]["wait_order"] == {"entered": 2, "waiting": 1, "exited": 0, "converted": 1}
    assert s["nodes"]["done"] == {"entered": 1, "waiting": 0, "exited": 1, "converted": 1}
    assert s["exits"] == {"completed": 1}


def test_backtest_counts_entries_messages_exits_and_goals_on_a_virtual_clock() -> None:
    d = parse_definition(build_template("abandoned_checkout", {"first_reminder_after": "PT1H",
                                                               "second_reminder_after": "P1D"}))
    facts = [
        fact("a", "Checkout Started", T0, checkout_id="1"),                      # reminded twice (high CLV)
        fact("b", "Checkout Started", T0, checkout_id="2"),                      # buys in time
        fact("b", "Order Completed", T0 + timedelta(minutes=30), checkout_id="2", revenue=50),
        fact("c", "Checkout Started", T0, checkout_id="3"),                      # reminded, buys later
        fact("c", "Order Completed", T0 + timedelta(hours=3), checkout_id="3", revenue=20),
        fact("d", "Checkout Started", T0, checkout_id="4"),                      # unsubscribes
        fact("d", "Unsubscribed", T0 + timedelta(minutes=10)),
        fact("e", "Checkout Started", T0 - timedelta(days=1), checkout_id="5"),  # before the period
    ]
    r = backtest(d, facts, T0, T0 + timedelta(days=7), {"a": {"predictions": {"predicted_clv_365d": 999}}})
    assert r["entered"] == 4 and r["customers_entered"] == 4
    assert r["messages"] == {"reminder_1": 2, "reminder_2": 1}
    assert r["exits"] == {"completed": 3, "unsubscribed": 1}
    assert r["goal_reached"] == 2 and r["attributed_revenue"] == 70.0
    assert r["still_waiting_at_end"] == 0
    # a shorter period leaves instances waiting at its end, and sends only what was due by then
    short = backtest(d, facts, T0, T0 + timedelta(minutes=45))
    assert short["messages"] == {} and short["still_waiting_at_end"] == 2


def test_backtest_segment_and_date_trait_entries() -> None:
    seg = parse_definition(build_template("vip_early_access", {}))
    facts = [HistoricalFact("a", T0, SegmentTrigger("vip", "entered", T0)),
             HistoricalFact("b", T0, SegmentTrigger("vip", "exited", T0))]
    r = backtest(seg, facts, T0, T0 + timedelta(days=1))
    assert r["entered"] == 1 and r["messages"] == {"invite": 1} and r["other_effects"] == {"tag": 1}
    bday = parse_definition(build_template("birthday", {}))
    profiles: dict[str, dict[str, Any]] = {"a": {"traits": {"birthday": "1990-03-05"}, "timezone": "Europe/Paris"},
                "b": {"traits": {"birthday": "1990-07-01"}}, "c": {"traits": {}}}
    r = backtest(bday, [], T0, T0 + timedelta(days=30), profiles)
    assert r["entered"] == 1 and r["messages"] == {"greet": 1}
    yearly = backtest(bday, [], T0, T0 + timedelta(days=800), profiles)
    assert yearly["messages"] == {"greet": 5}  # a: March 5 of 2024, 2025, 2026; b: July 1 of 2024, 2025


def test_example_files_are_valid_definitions() -> None:
    paths = sorted(Path("journeys/examples").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            parse_definition({k: v for k, v in doc.items() if k not in ("id", "status")})
