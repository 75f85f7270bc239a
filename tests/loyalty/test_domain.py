"""Unit tests of the pure loyalty domain: earning, clawback, expiry, tiers, idempotency, replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from loyalist.events import Event
from services.profile.loyalty.domain import (
    POINTS_ADJUSTED,
    POINTS_EARNED,
    POINTS_EXPIRED,
    POINTS_REDEEMED,
    TIER_CHANGED,
    AbsorbLedger,
    Adjust,
    CancelOrder,
    CloseLedger,
    Command,
    CompleteOrder,
    IdempotencyConflict,
    InsufficientPoints,
    Ledger,
    LedgerEvent,
    Program,
    ProgramDefinition,
    RecordAction,
    Redeem,
    RefundOrder,
    Tick,
    UnknownReward,
    command_for,
    decide,
    fold_all,
    replay,
)
from services.profile.loyalty.domain.ledger import event_from_dict, event_to_dict, ledger_from_dict, ledger_to_dict

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def program(**overrides: Any) -> Program:
    body: dict[str, Any] = {
        "version": 1, "effective_from": datetime(2020, 1, 1, tzinfo=UTC),
        "created_at": datetime(2020, 1, 1, tzinfo=UTC),
        "base_currency": "USD", "points_per_unit": 1,
        "currency_rates": {"EUR": "1.10", "GBP": "1.25", "JPY": "0.0068"},
        "tiers": [{"name": "member", "threshold": 0}, {"name": "silver", "threshold": 500, "multiplier": "1.25"},
                  {"name": "gold", "threshold": 1000, "multiplier": 2}],
        "tier_window_days": 365, "tier_review_months": 12, "expiry_months": 12,
        "action_bonuses": [{"event": "Product Reviewed", "points": 50, "once_per": "lifetime",
                            "key_property": "product_id"},
                           {"event": "Signed Up", "points": 100, "once_per": "lifetime"},
                           {"event": "Product Shared", "points": 5, "once_per": "day"}],
        "rewards": [{"reward_id": "off5", "name": "$5 off", "kind": "discount_code", "points_price": 100, "value": 5,
                     "currency": "USD"},
                    {"reward_id": "ship", "name": "Free shipping", "kind": "free_shipping", "points_price": 60}],
    }
    body.update(overrides)
    return Program.model_validate(body)


def run(commands: list[tuple[Command, datetime]], prog: Program | None = None,
        ledger: Ledger | None = None) -> tuple[Ledger, list[LedgerEvent]]:
    prog = prog or program()
    ledger = ledger or Ledger("p1")
    events: list[LedgerEvent] = []
    for command, now in commands:
        new = decide(command, ledger, prog, now)
        ledger = fold_all(ledger, new)
        events.extend(new)
    return ledger, events


def order(order_id: str, net: str, currency: str | None = "USD", at: datetime = T0, gross: str | None = None
          ) -> tuple[CompleteOrder, datetime]:
    return CompleteOrder(f"m-{order_id}", order_id, Decimal(net), Decimal(gross or net), currency, at), at


# ---- earning ---------------------------------------------------------------------------------------


def test_earning_in_several_currencies_converts_to_the_base_currency() -> None:
    ledger, events = run([order("o1", "100", "USD"), order("o2", "100", "EUR"), order("o3", "40.80", "GBP"),
                          order("o4", "10000", "JPY")])
    assert [e.points for e in events if e.kind == POINTS_EARNED] == [100, 110, 51, 68]
    assert ledger.balance == ledger.lifetime_points == 329
    assert events[1].details["currency"] == "EUR" and events[1].details["net_revenue_base"] == "110.00"


def test_unknown_currency_earns_nothing_and_is_not_remembered() -> None:
    ledger, events = run([order("o1", "100", "CHF")])
    assert events == [] and ledger.balance == 0 and "o1" not in ledger.orders


def test_points_are_floored_never_rounded_up() -> None:
    _, events = run([order("o1", "19.99")])
    assert events[0].points == 19


def test_tier_multiplier_applies_to_purchase_points_after_upgrade() -> None:
    ledger, events = run([order("o1", "600"), order("o2", "100", at=T0 + timedelta(days=1))])
    earned = [e.points for e in events if e.kind == POINTS_EARNED]
    assert earned == [600, 125]  # the second order is earned at silver's 1.25
    assert ledger.tier == "silver"


def test_action_bonuses_respect_their_once_per_rule() -> None:
    day2 = T0 + timedelta(days=1)
    ledger, events = run([
        (RecordAction("r1", "Product Reviewed", "sku1", T0), T0),
        (RecordAction("r2", "Product Reviewed", "sku1", day2), day2),  # same product: no second bonus
        (RecordAction("r3", "Product Reviewed", "sku2", day2), day2),
        (RecordAction("s1", "Signed Up", None, T0), T0),
        (RecordAction("s2", "Signed Up", None, day2), day2),
        (RecordAction("h1", "Product Shared", None, T0), T0),
        (RecordAction("h2", "Product Shared", None, T0 + timedelta(hours=1)), T0),
        (RecordAction("h3", "Product Shared", None, day2), day2),
    ])
    assert [e.points for e in events] == [50, 50, 100, 5, 5]
    assert ledger.balance == 210


def test_caps_limit_points_per_calendar_period() -> None:
    prog = program(caps=[{"period": "month", "max_points": 150, "applies_to": "all"}])
    next_month = datetime(2024, 4, 2, tzinfo=UTC)
    ledger, events = run([order("o1", "100"), order("o2", "100"), order("o3", "100"),
                          order("o4", "100", at=next_month)], prog)
    assert [e.points for e in events if e.kind == POINTS_EARNED] == [100, 50, 0, 100]
    assert events[1].details["capped_points"] == 50
    assert ledger.balance == 250


# ---- clawback --------------------------------------------------------------------------------------


def test_full_refund_claws_back_exactly_the_orders_points() -> None:
    ledger, events = run([order("o1", "100"), order("o2", "50"),
                          (RefundOrder("rf1", "o1", None, None, T0 + timedelta(days=3)), T0)])
    claw = events[-1]
    assert claw.kind == POINTS_ADJUSTED and claw.reason == "refund" and claw.points == -100
    assert ledger.balance == ledger.lifetime_points == 50
    assert all(lot.lot_id != "earn:o1" for lot in ledger.lots)  # taken from the order's own lot first


def test_partial_refunds_claw_back_proportionally_and_cancellation_the_rest() -> None:
    later = T0 + timedelta(days=2)
    ledger, events = run([
        order("o1", "80", gross="100"),
        (RefundOrder("rf1", "o1", Decimal("25"), "USD", later), later),  # a quarter of the order
        (RefundOrder("rf1", "o1", Decimal("25"), "USD", later), later),  # the same refund again: nothing
        (CancelOrder("c1", "o1", later), later),
    ])
    assert [e.points for e in events] == [80, -20, -60]
    assert ledger.balance == 0 and ledger.orders["o1"].cancelled


def test_clawback_after_spending_takes_what_is_left_and_reports_the_rest() -> None:
    ledger, events = run([order("o1", "150"), (Redeem("off5", "k1", "CODE1"), T0),
                          (RefundOrder("rf1", "o1", None, None, T0), T0)])
    claw = events[-1]
    assert claw.points == -50 and claw.unrecovered == 100 and claw.lifetime_delta == -150
    assert ledger.balance == 0 and ledger.lifetime_points == 0


def test_refund_of_an_unknown_order_does_nothing() -> None:
    assert run([(RefundOrder("rf", "nope", None, None, T0), T0)])[1] == []


def test_refund_lowers_qualifying_spend_so_a_tier_is_not_kept_at_review() -> None:
    review = datetime(2025, 3, 1, 12, tzinfo=UTC)
    _, events = run([order("o1", "600"), (RefundOrder("rf", "o1", None, None, T0 + timedelta(days=5)), T0),
                     (Tick(), review)])
    assert [(e.kind, e.tier_to) for e in events if e.kind == TIER_CHANGED] == [
        (TIER_CHANGED, "silver"), (TIER_CHANGED, "member")]


# ---- expiry with a controllable clock -------------------------------------------------------------------


def test_points_expire_exactly_twelve_months_after_earning() -> None:
    ledger, _ = run([order("o1", "100")])
    just_before = datetime(2025, 3, 1, 11, 59, 59, tzinfo=UTC)
    assert decide(Tick(), ledger, program(), just_before) == []
    expired = decide(Tick(), ledger, program(), datetime(2025, 3, 1, 12, 0, tzinfo=UTC))
    assert [(e.kind, e.points, e.at) for e in expired] == [(POINTS_EXPIRED, -100, datetime(2025, 3, 1, 12, tzinfo=UTC))]
    # Catching up late records the expiry at its due instant, not when the schedule noticed.
    late = decide(Tick(), ledger, program(), datetime(2025, 6, 1, tzinfo=UTC))
    assert late[0].at == datetime(2025, 3, 1, 12, tzinfo=UTC) and late[0].event_id == expired[0].event_id


def test_expiry_is_fifo_after_a_redemption() -> None:
    later = T0 + timedelta(days=60)
    ledger, _ = run([order("o1", "80"), order("o2", "100", at=later), (Redeem("off5", "k1", "C"), later)])
    # The redemption took the 80 of the oldest lot and 20 of the second.
    assert [(lot.lot_id, lot.remaining) for lot in ledger.lots] == [("earn:o2", 80)]
    assert decide(Tick(), ledger, program(), datetime(2025, 3, 1, 12, tzinfo=UTC)) == []
    expired = decide(Tick(), ledger, program(), later + timedelta(days=366))
    assert [e.points for e in expired] == [-80]


def test_expiry_happens_before_a_later_command_on_the_same_ledger() -> None:
    ledger, _ = run([order("o1", "100")])
    with pytest.raises(InsufficientPoints):
        decide(Redeem("off5", "k1", "C"), ledger, program(), datetime(2025, 3, 2, tzinfo=UTC))


def test_a_late_order_whose_points_are_already_past_expiry_expires_at_once() -> None:
    ledger, _ = run([order("o2", "10", at=datetime(2025, 6, 1, tzinfo=UTC))])
    events = decide(order("o1", "100")[0], ledger, program(), datetime(2025, 6, 2, tzinfo=UTC))
    assert [(e.kind, e.points) for e in events] == [(POINTS_EARNED, 100), (POINTS_EXPIRED, -100)]


def test_no_expiry_when_the_program_says_never() -> None:
    ledger, _ = run([order("o1", "100")], program(expiry_months=None))
    assert decide(Tick(), ledger, program(expiry_months=None), datetime(2030, 1, 1, tzinfo=UTC)) == []


# ---- tiers ---------------------------------------------------------------------------------------------


def test_upgrade_is_immediate_and_can_skip_a_tier() -> None:
    _, events = run([order("o1", "1200")])
    tier = [e for e in events if e.kind == TIER_CHANGED]
    assert [(e.tier_from, e.tier_to, e.at) for e in tier] == [("member", "gold", T0)]


def test_downgrade_waits_for_the_review_date() -> None:
    ledger, _ = run([order("o1", "600")])  # silver since T0; the spend leaves the window a year later
    prog = program()
    # Long after the spend left the 365-day window but before the 12-month review: still silver.
    assert decide(Tick(), ledger, prog, datetime(2025, 2, 28, tzinfo=UTC)) == []
    events = decide(Tick(), ledger, prog, datetime(2025, 3, 1, 12, tzinfo=UTC))
    downgrades = [e for e in events if e.kind == TIER_CHANGED]
    assert [(e.tier_from, e.tier_to, e.reason) for e in downgrades] == [("silver", "member", "downgrade")]
    assert downgrades[0].at == datetime(2025, 3, 1, 12, tzinfo=UTC)


def test_tier_is_kept_at_review_when_the_window_still_qualifies() -> None:
    prog = program(tier_window_days=180)
    ledger, _ = run([order("o1", "600"), order("o2", "550", at=datetime(2025, 1, 1, tzinfo=UTC))], prog)
    assert ledger.tier == "silver"  # the 180-day window never held both orders: no gold
    # Review 2025-03-01 12:00: the window still holds 550 → silver is kept, nothing happens.
    assert [e for e in decide(Tick(), ledger, prog, datetime(2025, 3, 2, tzinfo=UTC)) if e.kind == TIER_CHANGED] == []
    # Next review a year later: the window is empty → member, dated at the review instant.
    events = decide(Tick(), ledger, prog, datetime(2026, 3, 2, tzinfo=UTC))
    assert [(e.tier_from, e.tier_to, e.at) for e in events if e.kind == TIER_CHANGED] == [
        ("silver", "member", datetime(2026, 3, 1, 12, tzinfo=UTC))]


def test_points_metric_tiers() -> None:
    prog = program(tier_metric="points", tiers=[{"name": "member", "threshold": 0},
                                                {"name": "vip", "threshold": 150}])
    ledger, events = run([order("o1", "100"), (RecordAction("r", "Product Reviewed", "a", T0), T0)], prog)
    assert ledger.tier == "vip" and events[-1].kind == TIER_CHANGED


# ---- redemption, adjustment, idempotency -------------------------------------------------------------


def test_redemption_spends_points_and_returns_the_reward() -> None:
    ledger, events = run([order("o1", "150"), (Redeem("off5", "key-1", "LOY-1"), T0)])
    redeemed = events[-1]
    assert redeemed.kind == POINTS_REDEEMED and redeemed.points == -100
    assert redeemed.redemption is not None and redeemed.redemption.code == "LOY-1"
    assert ledger.balance == 50 and ledger.lifetime_points == 150


def test_redemption_refusals() -> None:
    ledger, _ = run([order("o1", "150"), (Redeem("off5", "key-1", "LOY-1"), T0)])
    with pytest.raises(InsufficientPoints):
        decide(Redeem("off5", "key-2", "LOY-2"), ledger, program(), T0)
    with pytest.raises(UnknownReward):
        decide(Redeem("nope", "key-3", "LOY-3"), ledger, program(), T0)
    with pytest.raises(IdempotencyConflict):
        decide(Redeem("ship", "key-1", "LOY-1"), ledger, program(), T0)


def test_idempotent_retries_change_nothing() -> None:
    commands: list[tuple[Command, datetime]] = [
                order("o1", "300"), (RecordAction("r1", "Product Reviewed", "sku", T0), T0),
                (Redeem("off5", "k1", "C1"), T0), (Adjust(25, "goodwill", "agent", "a1"), T0),
                (RefundOrder("rf", "o1", Decimal("30"), "USD", T0), T0)]
    once, _ = run(commands)
    twice, events = run(commands, ledger=once)
    assert events == [] and twice == once


def test_manual_adjustment_cannot_make_the_balance_negative() -> None:
    ledger, _ = run([order("o1", "20")])
    with pytest.raises(InsufficientPoints):
        decide(Adjust(-21, "correction", "agent", "a1"), ledger, program(), T0)
    events = decide(Adjust(-20, "correction", "agent", "a2"), ledger, program(), T0)
    assert events[0].note == "correction" and events[0].actor == "agent"


# ---- replay ---------------------------------------------------------------------------------------


_day = st.integers(min_value=0, max_value=900)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[Command, datetime]]:
    commands: list[tuple[Command, datetime]] = []
    for i in range(draw(st.integers(min_value=1, max_value=30))):
        at = T0 + timedelta(days=draw(_day), hours=draw(st.integers(0, 23)))
        kind = draw(st.sampled_from(["order", "order", "refund", "cancel", "action", "redeem", "adjust", "tick"]))
        oid = f"o{draw(st.integers(0, 8))}"
        if kind == "order":
            cmd: Command = CompleteOrder(f"m{i}", oid, Decimal(draw(st.integers(1, 900))), Decimal(1000),
                                         draw(st.sampled_from(["USD", "EUR", "GBP"])), at)
        elif kind == "refund":
            cmd = RefundOrder(f"m{i}", oid, Decimal(draw(st.integers(1, 500))), "USD", at)
        elif kind == "cancel":
            cmd = CancelOrder(f"m{i}", oid, at)
        elif kind == "action":
            cmd = RecordAction(f"m{i}", "Product Reviewed", f"p{draw(st.integers(0, 3))}", at)
        elif kind == "redeem":
            cmd = Redeem(draw(st.sampled_from(["off5", "ship"])), f"k{i}", f"C{i}")
        elif kind == "adjust":
            cmd = Adjust(draw(st.integers(-50, 200)) or 1, "test", "agent", f"a{i}")
        else:
            cmd = Tick()
        commands.append((cmd, at))
    return commands


def run_allowing_refusals(commands: list[tuple[Command, datetime]]) -> tuple[Ledger, list[LedgerEvent]]:
    ledger, events = Ledger("p1"), []
    for command, now in commands:
        try:
            new = decide(command, ledger, program(), now)
        except (InsufficientPoints, IdempotencyConflict):
            continue
        ledger = fold_all(ledger, new)
        events.extend(new)
    return ledger, events


@settings(max_examples=150, deadline=None)
@given(histories())
def test_replay_rebuilds_identical_balances(commands: list[tuple[Command, datetime]]) -> None:
    ledger, events = run_allowing_refusals(commands)
    # Folding the stored events (after a JSON round trip, as Cassandra keeps them) rebuilds the account.
    stored = [event_from_dict(event_to_dict(e)) for e in events]
    assert replay(stored, "p1") == ledger
    assert ledger_from_dict(ledger_to_dict(ledger)) == ledger
    # Re-processing the same facts from scratch gives the very same events (ids, points, times).
    again, events_again = run_allowing_refusals(commands)
    assert events_again == events and again == ledger
    # Invariants: the balance never goes negative and equals the sum of the lots.
    running = 0
    for e in events:
        running += e.points
        assert running >= 0
    assert ledger.balance == sum(lot.remaining for lot in ledger.lots)
    assert len({e.event_id for e in events}) == len(events)


# ---- events → commands, program validation --------------------------------------------------------------


def _event(name: str, props: dict[str, Any], source: str = "web") -> Event:
    return Event(type="track", event=name, message_id="m1", timestamp=T0, received_at=T0, user_id="u1",
                 properties=props, source=source)


def test_commands_from_canonical_events() -> None:
    prog = program()
    assert isinstance(command_for(_event("Order Completed", {"order_id": "o1", "revenue": 10}), prog), CompleteOrder)
    refund = command_for(_event("Order Refunded", {"order_id": "o1", "total": "5"}), prog)
    assert isinstance(refund, RefundOrder) and refund.amount == Decimal("5")
    assert isinstance(command_for(_event("Order Cancelled", {"order_id": "o1"}), prog), CancelOrder)
    review = command_for(_event("Product Reviewed", {"product_id": "sku9"}), prog)
    assert isinstance(review, RecordAction) and review.key_value == "sku9"
    assert command_for(_event("Product Viewed", {}), prog) is None
    assert command_for(_event("Order Completed", {"revenue": 10}), prog) is None  # no order id
    order = command_for(_event("Order Completed", {"order_id": "o2", "total": "27.5", "tax": 2.5, "shipping": 5,
                                                   "currency": "eur"}), prog)
    assert isinstance(order, CompleteOrder)
    assert (order.order_id, order.net_revenue, order.gross_total, order.currency) == (
        "o2", Decimal("20.0"), Decimal("27.5"), "EUR")
    # No program in effect: an order earns nothing (decide would return no events), so it is no command and the
    # stream path reads no ledger for it. A refund or cancellation still claws back what an earlier program gave.
    assert command_for(_event("Order Completed", {"order_id": "o1", "revenue": 10}), None) is None
    assert isinstance(command_for(_event("Order Refunded", {"order_id": "o1", "total": "5"}), None), RefundOrder)
    # Loyalty's own events coming back through events.resolved never become commands.
    assert command_for(_event("Points Earned", {"points": 5}, source="loyalty"), prog) is None
    assert command_for(_event("Order Completed", {"order_id": "o1", "revenue": 1}, source="loyalty"), prog) is None


@pytest.mark.parametrize("patch, message", [
    ({"tiers": [{"name": "a", "threshold": 10}]}, "threshold 0"),
    ({"tiers": [{"name": "a", "threshold": 0}, {"name": "b", "threshold": 0}]}, "increasing"),
    ({"currency_rates": {"EURO": 1}}, "ISO 4217"),
    ({"rewards": [{"reward_id": "x", "name": "x", "kind": "gift", "points_price": 0}]}, "greater than 0"),
    ({"unknown_rule": 1}, "Extra inputs"),
])
def test_invalid_programs_are_refused_with_a_reason(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ProgramDefinition.model_validate(patch)


# ---- merges ------------------------------------------------------------------------------------------


def test_merge_moves_points_with_their_expiry_orders_and_tier() -> None:
    prog = program()
    later = T0 + timedelta(days=30)
    other, _ = run([order("oa", "1200"), (RecordAction("r1", "Product Reviewed", "sku", T0), T0)],
                   ledger=Ledger("anon"))
    assert other.tier == "gold" and other.balance == 1250
    survivor, _ = run([order("ob", "100", at=later)])
    merge_at = later + timedelta(days=1)
    absorbed = decide(AbsorbLedger(other, merge_at), survivor, prog, merge_at)
    assert [(e.kind, e.points, e.reason) for e in absorbed] == [
        (POINTS_ADJUSTED, 1250, "merge"), (TIER_CHANGED, 0, "merge")]
    survivor = fold_all(survivor, absorbed)
    assert survivor.balance == 1350 and survivor.tier == "gold" and survivor.lifetime_points == 1350
    # The moved lots keep their own expiry instants.
    assert min(lot.expires_at for lot in survivor.lots if lot.expires_at) == datetime(2025, 3, 1, 12, tzinfo=UTC)
    # Processing the merge again changes nothing; a refund of the other profile's order claws back here;
    # the other profile's review does not earn twice.
    assert decide(AbsorbLedger(other, merge_at), survivor, prog, merge_at) == []
    assert decide(RecordAction("r1b", "Product Reviewed", "sku", merge_at), survivor, prog, merge_at) == []
    claw = decide(RefundOrder("rf", "oa", None, None, merge_at), survivor, prog, merge_at)
    assert claw[0].points == -1200

    closed = decide(CloseLedger("p1", other, merge_at), other, prog, merge_at)
    other = fold_all(other, closed)
    assert other.balance == 0 and other.tier == "member" and other.lifetime_points == 0
    assert decide(CloseLedger("p1", other, merge_at), other, prog, merge_at) == []


# ---- birthday bonus ------------------------------------------------------------------------------------


def test_birthday_bonus_once_a_year_within_the_grace_period() -> None:
    prog = program(action_bonuses=[{"event": "Birthday", "points": 200, "once_per": "year"}])
    on_the_day = datetime(2024, 7, 14, 0, 5, tzinfo=UTC)
    events = decide(Tick(birthday=(7, 14)), Ledger("p1"), prog, on_the_day)
    assert [(e.points, e.at, e.reason) for e in events] == [(200, datetime(2024, 7, 14, tzinfo=UTC), "action")]
    ledger = fold_all(Ledger("p1"), events)
    assert decide(Tick(birthday=(7, 14)), ledger, prog, on_the_day + timedelta(days=2)) == []
    # A shop's own "Birthday" event the same year does not pay twice.
    assert decide(RecordAction("b", "Birthday", None, on_the_day), ledger, prog, on_the_day) == []
    # Too late (past the grace period) or no bonus in the program: nothing.
    assert decide(Tick(birthday=(7, 14)), Ledger("p1"), prog, on_the_day + timedelta(days=8)) == []
    assert decide(Tick(birthday=(7, 14)), Ledger("p1"), program(), on_the_day) == []
    # 29 February counts on the 28th in other years.
    leap = decide(Tick(birthday=(2, 29)), Ledger("p1"), prog, datetime(2025, 2, 28, 1, tzinfo=UTC))
    assert leap[0].at == datetime(2025, 2, 28, tzinfo=UTC)
