"""The profile fold: deterministic, order independent, and true to each computed attribute."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from loyalist.events import Event
from services.profile.domain.identity import Identifier, identifiers_of, plan_resolution, profile_id_for
from services.profile.domain.profile import fold_all, render

T0 = datetime(2024, 1, 1, 9, tzinfo=UTC)
NOW = datetime(2024, 6, 1, tzinfo=UTC)


def ev(i: int, kind: str = "track", name: str | None = None, minutes: float = 0, **fields: Any) -> Event:
    body: dict[str, Any] = {"type": kind, "messageId": f"m{i}", "timestamp": T0 + timedelta(minutes=minutes),
                            "receivedAt": T0, "userId": "u1", "source": "web", **fields}
    if name:
        body["event"] = name
    return Event.model_validate(body)


def history() -> list[Event]:
    return [
        ev(1, "identify", minutes=0, traits={"email": "A@x.io", "plan": "free"}, context={"timezone": "Europe/Paris"}),
        ev(2, "page", minutes=1, properties={"url": "https://s/x", "title": "X"}),
        ev(3, name="Product Viewed", minutes=2, properties={"product_id": "p1", "category": "Books", "brand": "B"}),
        ev(4, name="Product Added", minutes=3, properties={"product_id": "p1", "price": 10, "quantity": 2}),
        ev(5, name="Checkout Started", minutes=4, properties={"checkout_id": "c1", "total": 20, "currency": "EUR",
                                                               "products": [{"product_id": "p1", "price": 10,
                                                                             "quantity": 2}],
                                                               "recovery_url": "https://s/r/c1"}),
        ev(6, name="Order Completed", minutes=60 * 24, properties={
            "order_id": "o1", "total": 20, "currency": "EUR",
            "products": [{"product_id": "p1", "category": "Books", "brand": "B", "quantity": 2}]}),
        ev(7, name="Order Completed", minutes=60 * 24 * 3, properties={"order_id": "o2", "total": 5,
                                                                        "currency": "EUR"}),
        ev(8, name="Order Completed", minutes=60 * 24 * 3 + 5, properties={"order_id": "o2", "total": 5,
                                                                            "currency": "EUR"}),  # re-sent
        ev(9, name="Order Completed", minutes=60 * 24 * 10, properties={"order_id": "o3", "total": 7,
                                                                         "currency": "EUR"}),
        ev(10, name="Order Cancelled", minutes=60 * 24 * 11, properties={"order_id": "o3"}),
        ev(11, name="Order Refunded", minutes=60 * 24 * 12, properties={"order_id": "o1", "total": 4,
                                                                         "currency": "EUR"}),
        ev(12, "identify", minutes=60 * 24 * 20, traits={"plan": "gold"}),
        ev(13, name="Ticket Opened", minutes=60 * 24 * 21, properties={"ticket_id": "t1"}),
        ev(14, name="Ticket Opened", minutes=60 * 24 * 21, properties={"ticket_id": "t2"}),
        ev(15, name="Ticket Solved", minutes=60 * 24 * 22, properties={"ticket_id": "t1"}),
        ev(16, name="Satisfaction Rated", minutes=60 * 24 * 22, properties={"ticket_id": "t1", "rating": 5}),
        ev(17, name="NPS Responded", minutes=60 * 24 * 23, properties={"score": 9}),
        ev(18, name="Email Sent", minutes=60 * 24 * 24, context={"loyalist": {"profileId": "p"}}),
        ev(19, name="Email Opened", minutes=60 * 24 * 24 + 5, context={"loyalist": {"profileId": "p"}}),
        ev(20, name="Unsubscribed", minutes=60 * 24 * 25, properties={"channel": "email", "reason": "too many"}),
        ev(21, name="Predictions Updated", minutes=60 * 24 * 26,
           properties={"churn_probability": 0.2, "p_alive": 0.8, "expected_orders_90d": 1.5,
                       "predicted_clv_365d": 80.0, "expected_next_order_at": "2024-03-01T00:00:00Z"}),
        ev(22, name="Points Earned", minutes=60 * 24 * 27, properties={"balance_after": 120, "lifetime_points": 120,
                                                                        "tier": "silver"}),
        ev(23, name="Points Redeemed", minutes=60 * 24 * 28, properties={"balance_after": 20,
                                                                          "lifetime_points": 120}),
    ]


def test_every_attribute() -> None:
    doc = render(fold_all("p0x", history()), now=NOW)
    assert doc["email"] == "a@x.io" and doc["timezone"] == "Europe/Paris"
    assert doc["traits"] == {"email": "A@x.io", "plan": "gold"}
    # o2 counted once; o3 cancelled
    assert (doc["orders_count"], doc["revenue_total"], doc["currency"]) == (2, 25.0, "EUR")
    assert doc["average_order_value"] == 12.5
    assert doc["first_order_at"] == "2024-01-02T09:00:00.000Z" and doc["last_order_at"] == "2024-01-04T09:00:00.000Z"
    assert doc["rfm"] == {"frequency": 1, "recency_days": 2, "T_days": (NOW.date() - T0.date()).days - 1,
                          "monetary_value": 5.0}
    assert (doc["refunds_count"], doc["refunded_by_currency"], doc["cancellations_count"]) == (1, {"EUR": 4.0}, 1)
    assert doc["cart"] is None  # closed by the order
    assert doc["products_bought"][0]["product_id"] == "p1" and doc["products_bought"][0]["quantity"] == 2
    assert doc["category_affinity"] == {"Books": 1 + 5} and doc["brand_affinity"] == {"B": 6}
    assert doc["page_views_count"] == 1 and doc["last_page"]["url"] == "https://s/x"
    assert doc["support"]["tickets_open"] == 1 and doc["support"]["open_ticket_ids"] == ["t2"]
    assert doc["support"]["last_satisfaction"]["rating"] == 5 and doc["support"]["nps"]["score"] == 9
    assert doc["engagement"]["email"]["sent"] == 1 and doc["engagement"]["email"]["opened"] == 1
    assert doc["consent"]["email"]["subscribed"] is False
    assert doc["predictions"]["p_alive"] == 0.8
    assert doc["loyalty"]["balance"] == 20 and doc["loyalty"]["tier"] == "silver"
    assert doc["loyalty"]["lifetime_points"] == 120
    # System events (email sent/opened) do not make the person "seen".
    assert doc["last_seen_at"] == "2024-01-26T09:00:00.000Z"


def test_open_cart_keeps_items_value_and_recovery_url() -> None:
    doc = render(fold_all("p0x", history()[:5]), now=NOW)
    assert doc["cart"]["checkout_id"] == "c1" and doc["cart"]["value"] == 20
    assert doc["cart"]["recovery_url"] == "https://s/r/c1" and doc["cart"]["items"][0]["quantity"] == 2


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(min_value=0, max_value=5))
def test_any_arrival_order_and_duplicates_give_the_same_profile(rnd: random.Random, dups: int) -> None:
    events = history()
    shuffled = events + [rnd.choice(events) for _ in range(dups)]
    rnd.shuffle(shuffled)
    assert render(fold_all("p0x", shuffled), now=NOW) == render(fold_all("p0x", events), now=NOW)


def test_unknown_products_and_bad_values_do_not_corrupt() -> None:
    events = [ev(1, name="Order Completed", properties={"order_id": "a", "total": "not a number",
                                                        "products": [{"price": None}, "junk"]}),
              ev(2, name="Product Removed", properties={"product_id": "never-added"}),
              ev(3, name="Order Completed", minutes=1, properties={"order_id": "b", "total": "12.5"})]
    doc = render(fold_all("p0x", events), now=NOW)
    assert doc["orders_count"] == 2 and doc["revenue_total"] == 12.5 and doc["cart"] is None


def test_merge_survivor_is_the_same_whatever_order_identifiers_meet() -> None:
    ids = [Identifier("anonymous_id", "a1"), Identifier("user_id", "u1"), Identifier("email", "e@x.io"),
           Identifier("user_id", "u2")]
    # Link them pairwise in every order: the final target is always the smallest candidate id.
    expected = min(profile_id_for(i) for i in ids)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        owner: dict[Identifier, str] = {}
        for a, b in itertools.pairwise(order):
            pair = [ids[a], ids[b]]
            plan = plan_resolution(pair, {i: owner.get(i) for i in pair})
            for i, pid in list(owner.items()):
                if pid in plan.merge_from:
                    owner[i] = plan.target
            for i in pair:
                owner[i] = plan.target
        assert set(owner.values()) == {expected}


def test_identifiers_include_order_emails_and_external_ids() -> None:
    e = Event.model_validate({"type": "track", "event": "Order Completed", "userId": "u9", "messageId": "m",
                              "timestamp": T0, "receivedAt": T0, "properties": {"email": "Buyer@Shop.com"},
                              "context": {"externalIds": [{"id": "123", "type": "shopify_customer_id"}]}})
    assert [i.as_text() for i in identifiers_of(e)] == [
        "email:buyer@shop.com", "external:shopify_customer_id:123", "user_id:u9"]


def test_loyalty_section_follows_the_ledger_sequence_not_the_event_order() -> None:
    # One command writes two ledger events at the same instant; their message ids sort against their sequence.
    earned = ev(9, name="Points Earned", minutes=5, source="loyalty",
                properties={"points": 50, "balance_after": 50, "lifetime_points": 50, "tier": "Bronze",
                            "ledger_seq": 1})
    upgraded = ev(1, name="Tier Changed", minutes=5, source="loyalty",
                  properties={"points": 0, "balance_after": 50, "lifetime_points": 50, "tier": "Silver",
                              "ledger_seq": 2})
    for order in ([earned, upgraded], [upgraded, earned]):
        loyalty = render(fold_all("p1", order), now=NOW)["loyalty"]
        assert loyalty["tier"] == "Silver" and loyalty["ledger_seq"] == 2 and loyalty["balance"] == 50


@given(st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_late_ledger_events_folded_on_top_equal_a_replay(rnd: random.Random) -> None:
    """Ledger events are stamped with their order's time but arrive after later facts; the processor folds them
    on top (no history refold) when ``Folder._in_order`` allows it, and the result must equal a replay."""
    from services.profile.domain.profile import event_key, fold, new_state
    from services.profile.processor import Folder

    facts = [ev(100 + i, name="Order Completed", minutes=60 * i,
                properties={"order_id": f"o{i}", "total": 10 + i, "currency": "USD"}) for i in range(8)]
    ledger = [Event.model_validate({
        "type": "track", "event": "Points Earned", "messageId": f"l{i}", "timestamp": T0 + timedelta(minutes=60 * i),
        "receivedAt": T0, "source": "loyalty", "context": {"loyalist": {"profileId": "p1"}},
        "properties": {"points": 10 + i, "balance_after": sum(10 + k for k in range(i + 1)), "ledger_seq": i + 1,
                       "tier": "member", "lifetime_points": sum(10 + k for k in range(i + 1))}})
        for i in range(8)]
    # Arrival: facts in order, each ledger event some facts after its own (in the ledger's order), in batches.
    arrival: list[Event] = []
    pending = list(ledger)
    for i, fact in enumerate(facts):
        arrival.append(fact)
        while pending and int(pending[0].message_id[1:]) <= i and rnd.random() < 0.4:
            arrival.append(pending.pop(0))
    arrival.extend(pending)
    state = new_state("p1")
    seen: list[Event] = []
    refolds = 0
    while arrival:
        size = rnd.randint(1, 4)
        batch, arrival = arrival[:size], arrival[size:]
        seen.extend(batch)
        if Folder._in_order(state, batch):
            for event in sorted(batch, key=event_key):
                fold(state, event)
        else:  # what the processor does for a late fact: refold everything seen
            refolds += 1
            state = fold_all("p1", seen)
    assert refolds == 0
    assert render(state, now=NOW) == render(fold_all("p1", [*facts, *ledger]), now=NOW)
