"""Simulated storefront traffic for the CDNOW customers, happening *now*: browsing, carts, checkouts that are
completed or abandoned, support tickets and unsubscribes — the events the journeys react to.

Sessions are a pure function of (customer, session number, seed, start time), so a run is reproducible and
its message ids are stable within a run id.

>>> from datetime import datetime, UTC
>>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
>>> events = session_events("00007", 0, SessionMix(abandon=1.0, add_to_cart=1.0, checkout=1.0), t0, "r1", seed=1)
>>> [e.get("event") or e["type"] for e in events][-3:]
['Product Viewed', 'Product Added', 'Checkout Started']
>>> events[-1]["properties"]["checkout_id"]
'r1-co-7-0'
>>> sum(1 for e in events if e.get("event") == "Order Completed")
0
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from demo.cdnow import user_id

JSON = dict[str, Any]

CATALOGUE = [
    ("cd-jazz-01", "Kind of Blue", "Jazz", 12.99), ("cd-rock-07", "Abbey Road", "Rock", 14.99),
    ("cd-pop-03", "Thriller", "Pop", 11.99), ("cd-clas-02", "Goldberg Variations", "Classical", 16.49),
    ("cd-rock-11", "Nevermind", "Rock", 13.49), ("cd-elec-04", "Homework", "Electronic", 12.49),
    ("cd-soul-05", "What's Going On", "Soul", 10.99), ("cd-hiph-06", "Illmatic", "Hip-Hop", 11.49),
]


@dataclass(frozen=True)
class SessionMix:
    """Share of sessions that go each step further (each conditional on the previous step)."""

    add_to_cart: float = 0.45
    checkout: float = 0.6
    abandon: float = 0.5  # of started checkouts
    ticket: float = 0.05
    unsubscribe: float = 0.03


def _product(rng: random.Random) -> JSON:
    pid, name, category, price = rng.choice(CATALOGUE)
    return {"product_id": pid, "sku": pid.upper(), "name": name, "category": category, "price": price,
            "quantity": 1, "url": f"https://shop.example/p/{pid}",
            "image_url": f"https://shop.example/img/{pid}.jpg"}


def session_events(customer: str, n: int, mix: SessionMix, start: datetime, run_id: str, *, seed: int = 0,
                   ) -> list[JSON]:
    """One storefront visit of a known customer (their userId is set: they are logged in)."""
    rng = random.Random(f"{seed}:{customer}:{n}")
    uid = user_id(customer)
    cid = int(customer)
    t = start + timedelta(seconds=rng.uniform(0, 5))
    seq = 0

    def ev(kind: str, name: str | None = None, **body: Any) -> JSON:
        nonlocal t, seq
        t += timedelta(seconds=rng.uniform(1, 20))
        seq += 1
        event: JSON = {"type": kind, "userId": uid, "messageId": f"{run_id}-{cid}-{n}-{seq}",
                       "timestamp": t.isoformat().replace("+00:00", "Z"),
                       "context": {"library": {"name": "loyalist-demo-storefront", "version": "1"},
                                   "page": {"url": "https://shop.example/"}}, **body}
        if name:
            event["event"] = name
        return event

    events = [ev("page", name="Home", properties={"path": "/", "title": "CD Shop"})]
    viewed = [_product(rng) for _ in range(rng.randint(1, 3))]
    for product in viewed:
        events.append(ev("track", "Product Viewed", properties=product))
    if rng.random() < mix.add_to_cart:
        cart = viewed[: rng.randint(1, len(viewed))]
        for product in cart:
            events.append(ev("track", "Product Added", properties={**product, "cart_id": f"{run_id}-cart-{cid}"}))
        if rng.random() < mix.checkout:
            checkout_id = f"{run_id}-co-{cid}-{n}"
            value = round(sum(p["price"] for p in cart), 2)
            checkout = {"checkout_id": checkout_id, "value": value, "currency": "USD", "products": cart,
                        "recovery_url": f"https://shop.example/checkout/{checkout_id}/recover"}
            events.append(ev("track", "Checkout Started", properties=checkout))
            if rng.random() >= mix.abandon:
                events.append(ev("track", "Order Completed", properties={
                    "order_id": f"{run_id}-order-{cid}-{n}", "checkout_id": checkout_id, "total": value,
                    "revenue": value, "currency": "USD", "products": cart}))
    if rng.random() < mix.ticket:
        ticket = f"{run_id}-t-{cid}-{n}"
        events.append(ev("track", "Ticket Opened", properties={"ticket_id": ticket, "subject": "Where is my order?",
                                                              "channel": "email", "priority": "normal"}))
        events.append(ev("track", "Ticket Solved", properties={"ticket_id": ticket}))
        events.append(ev("track", "Satisfaction Rated", properties={"ticket_id": ticket,
                                                                   "score": rng.choice([1, 4, 5, 5])}))
    if rng.random() < mix.unsubscribe:
        events.append(ev("track", "Unsubscribed", properties={"channel": "email", "category": "marketing",
                                                             "reason": "too many emails"}))
    return events


def storefront_events(customers: list[str], mix: SessionMix, start: datetime, run_id: str, *, seed: int = 0,
                      ) -> Iterator[JSON]:
    for n, customer in enumerate(customers):
        yield from session_events(customer, 0, mix, start, run_id, seed=seed + n)


def summarize(events: list[JSON]) -> Counter[str]:
    """What the simulation sent, by event name (the demo prints it as *input*, not as a result)."""
    return Counter(e.get("event") or e["type"] for e in events)
