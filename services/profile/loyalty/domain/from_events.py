"""Which loyalty command a canonical event means (Segment e-commerce spec v2 property names).

>>> from datetime import UTC, datetime
>>> from loyalist.events import Event
>>> t = datetime(2024, 5, 1, tzinfo=UTC)
>>> e = Event(type="track", event="Order Completed", message_id="m1", timestamp=t, received_at=t, user_id="u1",
...           properties={"order_id": "o1", "total": "27.5", "tax": 2.5, "shipping": 5, "currency": "eur"})
>>> net_and_gross(e.properties)  # net of tax and shipping, as the order earns points
(Decimal('20.0'), Decimal('27.5'))
>>> command_for(e, None) is None  # with no program in effect an order earns nothing: no command
True
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from loyalist.events import Event
from services.profile.loyalty.domain.decide import CancelOrder, Command, CompleteOrder, RecordAction, RefundOrder
from services.profile.loyalty.domain.ledger import LEDGER_EVENT_NAMES
from services.profile.loyalty.domain.program import Program

LOYALTY_SOURCE = "loyalty"
# Track events that become ledger commands whatever the program (action bonuses add the program's own).
ORDER_EVENT_NAMES = frozenset({"Order Completed", "Order Refunded", "Order Cancelled"})


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _order_id(props: dict[str, Any]) -> str | None:
    value = props.get("order_id", props.get("orderId"))
    return None if value in (None, "") else str(value)[:200]


def net_and_gross(props: dict[str, Any]) -> tuple[Decimal, Decimal] | None:
    """Net revenue (after discounts, without tax and shipping) and the order total.

    Segment's ``revenue`` is already net; else ``subtotal``; else ``total`` less tax and shipping.

    >>> net_and_gross({"revenue": 90, "total": 100})
    (Decimal('90'), Decimal('100'))
    >>> net_and_gross({"subtotal": "40", "shipping": 5})
    (Decimal('40'), Decimal('40'))
    >>> net_and_gross({"products": []}) is None
    True
    """
    revenue, subtotal, total = (_decimal(props.get(k)) for k in ("revenue", "subtotal", "total"))
    tax, shipping = (_decimal(props.get(k)) or Decimal(0) for k in ("tax", "shipping"))
    if revenue is not None:
        net = revenue
    elif subtotal is not None:
        net = subtotal
    elif total is not None:
        net = total - tax - shipping
    else:
        return None
    return net, total if total is not None else net


def birthday_from_traits(traits: dict[str, Any]) -> tuple[int, int] | None:
    """(month, day) of Segment's reserved ``birthday`` trait (an ISO date or date-time).

    >>> birthday_from_traits({"birthday": "1990-02-28"}), birthday_from_traits({"birthday": "1988-12-01T00:00:00Z"})
    ((2, 28), (12, 1))
    >>> birthday_from_traits({"birthday": "soon"}) is None
    True
    """
    value = traits.get("birthday")
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        parsed = date.fromisoformat(value[:10])
    except ValueError:
        return None
    return parsed.month, parsed.day


def command_for(event: Event, program: Program | None) -> Command | None:
    """The command an event causes on its customer's ledger, or None.

    Loyalty's own ledger events come back through ``events.resolved``; they are never commands (no loops).
    """
    if event.type != "track" or not event.event or event.source == LOYALTY_SOURCE:
        return None
    if event.event in LEDGER_EVENT_NAMES:
        return None
    props = event.properties or {}
    name = event.event
    currency = props.get("currency")
    currency = str(currency).upper() if isinstance(currency, str) and currency else None
    if name == "Order Completed":
        if program is None:
            # Nothing to earn with no program in effect (decide would return no events): the stream path then
            # reads no ledger for it, so a shop without a loyalty program pays nothing per order.
            return None
        order_id, amounts = _order_id(props), net_and_gross(props)
        if order_id is None or amounts is None:
            return None
        return CompleteOrder(event.message_id, order_id, amounts[0], amounts[1], currency, event.timestamp)
    if name == "Order Refunded":
        order_id = _order_id(props)
        if order_id is None:
            return None
        amount = _decimal(props.get("total", props.get("revenue", props.get("amount"))))
        return RefundOrder(event.message_id, order_id, amount, currency, event.timestamp)
    if name == "Order Cancelled":
        order_id = _order_id(props)
        return None if order_id is None else CancelOrder(event.message_id, order_id, event.timestamp)
    bonus = program.bonus_for(name) if program is not None else None
    if bonus is None:
        return None
    key_value = props.get(bonus.key_property) if bonus.key_property else None
    return RecordAction(event.message_id, name, None if key_value is None else str(key_value)[:200],
                        event.timestamp)
