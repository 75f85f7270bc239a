"""The CDNOW order history (shipped in the ``lifetimes`` package) as Segment-style events.

CDNOW_master.txt: 69,659 purchases by 23,570 customers of an online CD store, January 1997 to June 1998,
one line per purchase: customer id, date (YYYYMMDD), number of CDs, dollar value.

Each purchase becomes an ``Order Completed`` event at its real date (history keeps its dates; only the
replay is compressed in time), and each customer one ``identify`` with an email and their acquisition
cohort, dated at their first purchase. Message ids are derived from the file, so a second replay is
deduplicated by ingest instead of doubling revenue.

>>> o = Order(line=7, customer="00004", date=date(1997, 1, 1), cds=2, value=29.33)
>>> e = order_event(o)
>>> (e["event"], e["userId"], e["messageId"], e["properties"]["total"], e["timestamp"])
('Order Completed', 'cdnow-4', 'cdnow-order-7', 29.33, '1997-01-01T12:00:00Z')
>>> identify_event("00004", date(1997, 1, 1))["traits"]["cohort"]
'1997-01'
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
EMAIL_DOMAIN = "demo.loyalist.test"
OBSERVATION_END = date(1998, 6, 30)


@dataclass(frozen=True, slots=True)
class Order:
    line: int
    customer: str
    date: date
    cds: int
    value: float


def master_file() -> Path:
    import lifetimes

    return Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"


def load_orders(path: Path | None = None) -> list[Order]:
    """Every purchase line of the file, in file order (which is by customer, then date)."""
    orders = []
    with (path or master_file()).open() as f:
        for n, raw in enumerate(f):
            parts = raw.split()
            if len(parts) != 4 or not parts[0].isdigit():
                continue
            customer, day, cds, value = parts
            orders.append(Order(n, customer, date(int(day[:4]), int(day[4:6]), int(day[6:])), int(cds), float(value)))
    return orders


def user_id(customer: str) -> str:
    return f"cdnow-{int(customer)}"


def email(customer: str) -> str:
    return f"customer{int(customer)}@{EMAIL_DOMAIN}"


def iso(day: date, hour: int = 12) -> str:
    return f"{day.isoformat()}T{hour:02d}:00:00Z"


def order_event(order: Order, shift_days: int = 0) -> JSON:
    day = order.date + timedelta(days=shift_days)
    unit = round(order.value / order.cds, 2) if order.cds else order.value
    return {
        "type": "track", "event": "Order Completed", "userId": user_id(order.customer),
        "messageId": f"cdnow-order-{order.line}", "timestamp": iso(day),
        "properties": {
            "order_id": f"cdnow-{order.line}", "total": order.value, "revenue": order.value, "currency": "USD",
            "products": [{"product_id": "cd", "sku": "CD", "name": "Compact disc", "category": "Music",
                          "price": unit, "quantity": order.cds}],
        },
        "context": {"library": {"name": "loyalist-demo", "version": "1"}},
    }


def identify_event(customer: str, first_order: date) -> JSON:
    return {
        "type": "identify", "userId": user_id(customer), "messageId": f"cdnow-identify-{int(customer)}",
        "timestamp": iso(first_order, 11),
        "traits": {"email": email(customer), "first_name": f"Customer {int(customer)}",
                   "cohort": f"{first_order:%Y-%m}", "source": "cdnow"},
        "context": {"library": {"name": "loyalist-demo", "version": "1"}, "timezone": "America/New_York"},
    }


def subscribed_event(customer: str, first_order: date) -> JSON | None:
    """Four customers in five opted in to marketing email with their first order (notify sends marketing only
    to customers who opted in)."""
    if int(customer) % 5 == 0:
        return None
    return {
        "type": "track", "event": "Subscribed", "userId": user_id(customer),
        "messageId": f"cdnow-subscribed-{int(customer)}", "timestamp": iso(first_order, 11),
        "properties": {"channel": "email", "category": "marketing", "source": "checkout"},
        "context": {"library": {"name": "loyalist-demo", "version": "1"}},
    }


def shift_to_end_today(today: date) -> int:
    """Days to add so the history's observation end (1998-06-30) falls on ``today``: a shop owner's data is
    recent, and recency, P(alive) and churn are measured against now.

    >>> shift_to_end_today(date(1998, 7, 2))
    2
    """
    return (today - OBSERVATION_END).days


def history_events(orders: list[Order], shift_days: int = 0) -> Iterator[JSON]:
    """Identify each customer (and record their marketing opt-in) just before their first order, then every
    order, all in time order (dates moved by ``shift_days``; intervals between purchases are kept exactly)."""
    first: dict[str, date] = {}
    for o in orders:
        if o.customer not in first or o.date < first[o.customer]:
            first[o.customer] = o.date
    introduced: set[str] = set()
    for o in sorted(orders, key=lambda o: (o.date, o.line)):
        if o.customer not in introduced:
            introduced.add(o.customer)
            yield identify_event(o.customer, first[o.customer] + timedelta(days=shift_days))
            consent = subscribed_event(o.customer, first[o.customer] + timedelta(days=shift_days))
            if consent is not None:
                yield consent
        yield order_event(o, shift_days)
