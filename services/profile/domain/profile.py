"""The profile: a pure, deterministic fold over one person's events.

Events are folded in *event order* — ``(timestamp in ms, source:messageId)``, the order of the Cassandra
event store — so traits are the latest by event time, not by arrival. A state folded from events in that
order is a function of the event set alone; the processor refolds from the store when an event arrives
older than the last one folded, so out-of-order arrival changes nothing. Sums use ``math.fsum`` (exactly
rounded, order independent).

RFM follows ``lifetimes.utils.summary_data_from_transaction_data(..., freq="D")``: purchases are grouped
by UTC day with same-day values summed; ``frequency`` is the number of purchase days after the first,
``recency_days`` the days from the first to the last purchase day, ``T_days`` the days from the first
purchase day to the observation day, and ``monetary_value`` the mean of the repeat days' totals (0 when
there is none).

>>> s = new_state("p0x")
>>> for day, total in [("2024-01-01", 10), ("2024-01-01", 5), ("2024-01-03", 20), ("2024-01-10", 40)]:
...     s = fold(s, _order(day, total))
>>> doc = render(s, now=datetime(2024, 1, 31, tzinfo=UTC))
>>> doc["orders_count"], doc["revenue_total"], doc["rfm"]
(4, 75.0, {'frequency': 2, 'recency_days': 9, 'T_days': 30, 'monetary_value': 30.0})
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

from loyalist.events import Event

SESSION_GAP_MS = 30 * 60 * 1000
TOP_AFFINITIES = 10
# Weights of interest signals for category/brand affinity: a purchase says more than a view.
AFFINITY_WEIGHTS = {"Product Viewed": 1.0, "Product Clicked": 1.0, "Product Added": 3.0, "Order Completed": 5.0}
# Events produced about a person by a system (not the person acting): they do not make the person "seen".
SYSTEM_EVENTS = frozenset({
    "Email Sent", "Email Delivered", "Email Bounced", "Email Opened", "Email Link Clicked", "Predictions Updated",
    "Points Earned", "Points Redeemed", "Points Expired", "Points Adjusted", "Tier Changed", "Ticket Solved",
    "Order Refunded", "Order Cancelled", "SMS Sent", "SMS Delivered",
})
ENGAGEMENT_EVENTS = {
    "Email Sent": "sent", "Email Delivered": "delivered", "Email Bounced": "bounced",
    "Email Opened": "opened", "Email Link Clicked": "clicked",
}
LOYALTY_EVENTS = frozenset({"Points Earned", "Points Redeemed", "Points Expired", "Points Adjusted", "Tier Changed"})
PREDICTION_FIELDS = ("churn_probability", "p_alive", "expected_orders_90d", "predicted_clv_365d",
                     "expected_next_order_at")
CART_EVENTS = frozenset({"Product Added", "Product Removed", "Cart Viewed", "Checkout Started",
                         "Checkout Step Viewed", "Checkout Step Completed", "Payment Info Entered"})

EventKey = tuple[int, str]


@dataclass
class ProfileState:
    """Everything the fold keeps. Plain JSON types only, so a snapshot is ``asdict`` and back."""

    profile_id: str
    last_key: list[Any] | None = None  # [timestamp ms, event key] of the last folded event
    events_count: int = 0
    user_id: str | None = None
    email: str | None = None
    order_email: str | None = None
    phone: str | None = None
    timezone: str | None = None
    locale: str | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    first_seen_ms: int | None = None
    last_seen_ms: int | None = None
    # order id -> [timestamp ms, value, currency]
    orders: dict[str, list[Any]] = field(default_factory=dict)
    cancelled_order_ids: list[str] = field(default_factory=list)
    refunds: list[list[Any]] = field(default_factory=list)  # [timestamp ms, amount, currency]
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    category_scores: dict[str, float] = field(default_factory=dict)
    brand_scores: dict[str, float] = field(default_factory=dict)
    cart: dict[str, Any] | None = None
    sessions_count: int = 0
    page_views_count: int = 0
    last_activity_ms: int | None = None
    last_page: dict[str, Any] | None = None
    tickets_opened: list[str] = field(default_factory=list)
    tickets_solved: list[str] = field(default_factory=list)
    last_satisfaction: dict[str, Any] | None = None
    nps: dict[str, Any] | None = None
    engagement: dict[str, dict[str, Any]] = field(default_factory=dict)
    consent: dict[str, dict[str, Any]] = field(default_factory=dict)
    predictions: dict[str, Any] | None = None
    loyalty: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProfileState:
        return cls(**data)


def new_state(profile_id: str) -> ProfileState:
    return ProfileState(profile_id=profile_id)


def event_key(event: Event) -> EventKey:
    """Fold order, identical to the event store's clustering order (timestamps kept to the ms)."""
    return (to_ms(event.timestamp), event.dedup_key)


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def iso(ms: int | None) -> str | None:
    """
    >>> iso(0)
    '1970-01-01T00:00:00.000Z'
    """
    if ms is None:
        return None
    return _iso(ms)


@lru_cache(maxsize=1 << 16)
def _iso(ms: int) -> str:
    # Cached: rendering a profile formats the same instants (first seen, last order...) on every update.
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def number(value: Any) -> float | None:
    """A finite number from a JSON value (numbers or numeric strings), else None.

    >>> number("12.5"), number(True), number("abc"), number(float("nan"))
    (12.5, None, None, None)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None


def _str(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _currency(props: dict[str, Any]) -> str:
    value = props.get("currency")
    return value.strip().upper() if isinstance(value, str) and value.strip() else "USD"


def _products(props: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``products`` array of an e-commerce event, or the event itself for single-product events."""
    items = props.get("products")
    if isinstance(items, list):
        return [p for p in items if isinstance(p, dict)]
    if any(k in props for k in ("product_id", "sku")):
        return [props]
    return []


def _product_key(product: dict[str, Any]) -> str | None:
    return _str(product.get("product_id")) or _str(product.get("sku")) or _str(product.get("name"))


def _quantity(product: dict[str, Any]) -> float:
    qty = number(product.get("quantity"))
    return qty if qty is not None and qty > 0 else 1.0


def order_value(props: dict[str, Any]) -> float:
    """Segment's order fields in order of preference: total, revenue, value, then the products' sum.

    >>> order_value({"total": "30.5"}), order_value({"products": [{"price": 2, "quantity": 3}]})
    (30.5, 6.0)
    """
    for name in ("total", "revenue", "value"):
        value = number(props.get(name))
        if value is not None:
            return value
    return math.fsum((number(p.get("price")) or 0.0) * _quantity(p) for p in _products(props))


def fold(state: ProfileState, event: Event) -> ProfileState:
    """Apply one event. Callers fold in :func:`event_key` order; the state is updated in place and
    returned (copy first with :func:`copy_state` to keep the old one)."""
    ts = to_ms(event.timestamp)
    key = list(event_key(event))
    if state.last_key is None or key > state.last_key:  # the greatest key folded (see folds_in_any_order)
        state.last_key = key
    state.events_count += 1
    name = event.event if event.type == "track" else None
    props = event.properties
    loyalist_ctx = event.context.get("loyalist")
    system = name in SYSTEM_EVENTS or (isinstance(loyalist_ctx, dict) and loyalist_ctx.get("profileId") is not None)

    if event.user_id:
        state.user_id = event.user_id
    _apply_context(state, event)
    if event.type == "identify":
        _apply_traits(state, event.traits)
    elif isinstance(event.context.get("traits"), dict):
        _apply_traits(state, event.context["traits"])

    if not system:
        if state.first_seen_ms is None or ts < state.first_seen_ms:
            state.first_seen_ms = ts
        if state.last_seen_ms is None or ts > state.last_seen_ms:
            state.last_seen_ms = ts
        if event.type in ("page", "screen", "track"):
            if state.last_activity_ms is None or ts - state.last_activity_ms > SESSION_GAP_MS:
                state.sessions_count += 1
            state.last_activity_ms = ts
    if event.type in ("page", "screen"):
        state.page_views_count += 1
        state.last_page = {
            "name": event.name, "url": _str(props.get("url")), "path": _str(props.get("path")),
            "title": _str(props.get("title")), "at": iso(ts),
        }
    if name is not None:
        _apply_track(state, name, props, event, ts)
    return state


def folds_in_any_order(event: Event) -> bool:
    """Whether folding ``event`` out of event order gives the state folding it in order gives: true of the
    loyalty ledger's own events (they carry no user id, traits, timezone or locale, count as system events, and
    the loyalty section follows their ``ledger_seq``, not their time). They are stamped with the time of the fact
    that caused them, so they reach the profile after later facts; folding them on top instead of refolding the
    whole history is what keeps a replay of order history cheap. (Equal sequence numbers are the caller's to
    rule out: between two events with the same ``ledger_seq`` the later folded wins.)

    >>> from datetime import UTC, datetime
    >>> at = datetime(2024, 1, 1, tzinfo=UTC)
    >>> earned = Event(type="track", event="Points Earned", message_id="m", timestamp=at, received_at=at,
    ...                properties={"ledger_seq": 3}, context={"loyalist": {"profileId": "p1"}})
    >>> folds_in_any_order(earned)
    True
    >>> folds_in_any_order(earned.model_copy(update={"user_id": "u1"}))
    False
    """
    if event.type != "track" or event.event not in LOYALTY_EVENTS or event.user_id:
        return False
    context = event.context
    loyalist_ctx = context.get("loyalist")
    return (isinstance(loyalist_ctx, dict) and loyalist_ctx.get("profileId") is not None
            and isinstance(event.properties.get("ledger_seq"), int)
            and not any(k in context for k in ("traits", "timezone", "locale")))


def _apply_context(state: ProfileState, event: Event) -> None:
    tz = _str(event.context.get("timezone"))
    if tz:
        state.timezone = tz
    locale = _str(event.context.get("locale"))
    if locale:
        state.locale = locale


def _apply_traits(state: ProfileState, traits: dict[str, Any]) -> None:
    for key, value in traits.items():
        state.traits[key] = value
    email = _str(traits.get("email"))
    if email:
        state.email = email.lower()
    phone = _str(traits.get("phone"))
    if phone:
        state.phone = phone
    tz = _str(traits.get("timezone"))
    if tz:
        state.timezone = tz
    locale = _str(traits.get("locale"))
    if locale:
        state.locale = locale


def _affinity(state: ProfileState, weight: float, products: list[dict[str, Any]]) -> None:
    for product in products:
        category = _str(product.get("category"))
        if category:
            state.category_scores[category] = state.category_scores.get(category, 0.0) + weight
        brand = _str(product.get("brand"))
        if brand:
            state.brand_scores[brand] = state.brand_scores.get(brand, 0.0) + weight


def _apply_track(state: ProfileState, name: str, props: dict[str, Any], event: Event, ts: int) -> None:
    if name in AFFINITY_WEIGHTS and name != "Order Completed":
        _affinity(state, AFFINITY_WEIGHTS[name], _products(props))
    if name == "Order Completed":
        _apply_order(state, props, event, ts)
    elif name == "Order Refunded":
        amount = number(props.get("total"))
        if amount is None:
            amount = order_value(props)
        state.refunds.append([ts, amount, _currency(props)])
    elif name == "Order Cancelled":
        order_id = _str(props.get("order_id"))
        if order_id and order_id not in state.cancelled_order_ids:
            state.cancelled_order_ids.append(order_id)
    elif name in CART_EVENTS:
        _apply_cart(state, name, props, ts)
    elif name == "Ticket Opened":
        ticket = _str(props.get("ticket_id")) or event.dedup_key
        if ticket not in state.tickets_opened:
            state.tickets_opened.append(ticket)
    elif name == "Ticket Solved":
        ticket = _str(props.get("ticket_id")) or event.dedup_key
        if ticket not in state.tickets_solved:
            state.tickets_solved.append(ticket)
    elif name == "Satisfaction Rated":
        state.last_satisfaction = {"rating": props.get("rating", props.get("score")),
                                   "ticket_id": _str(props.get("ticket_id")), "at": iso(ts)}
    elif name == "NPS Responded":
        state.nps = {"score": number(props.get("score")), "comment": _str(props.get("comment")), "at": iso(ts)}
    elif name in ENGAGEMENT_EVENTS:
        channel = "email"
        stats = state.engagement.setdefault(channel, {})
        verb = ENGAGEMENT_EVENTS[name]
        stats[verb] = stats.get(verb, 0) + 1
        stats[f"last_{verb}_at"] = iso(ts)
    elif name in ("Unsubscribed", "Subscribed"):
        channel = (_str(props.get("channel")) or "email").lower()
        state.consent[channel] = {"subscribed": name == "Subscribed", "updated_at": iso(ts),
                                  "reason": _str(props.get("reason"))}
    elif name == "Predictions Updated":
        predictions = {k: props.get(k) for k in PREDICTION_FIELDS}
        predictions["model_version"] = _str(props.get("model_version"))
        predictions["updated_at"] = iso(ts)
        state.predictions = predictions
    elif name in LOYALTY_EVENTS:
        loyalty = dict(state.loyalty or {"balance": None, "lifetime_points": None, "tier": None, "expiring": None})
        # The ledger numbers its events: one command can write several at the same instant, and their event
        # order then says nothing, so the highest sequence number holds the ledger's state.
        seq = props.get("ledger_seq")
        held = loyalty.get("ledger_seq")
        if isinstance(seq, int) and isinstance(held, int) and seq < held:
            return
        if isinstance(seq, int):
            loyalty["ledger_seq"] = seq
        if "balance_after" in props:
            loyalty["balance"] = props["balance_after"]
        for key in ("lifetime_points", "tier", "expiring"):
            if key in props:
                loyalty[key] = props[key]
        loyalty["updated_at"] = iso(ts)
        state.loyalty = loyalty


def _apply_order(state: ProfileState, props: dict[str, Any], event: Event, ts: int) -> None:
    # One order counts once even when a shop re-sends it under a new message id.
    order_id = _str(props.get("order_id")) or _str(props.get("checkout_id")) or event.dedup_key
    if order_id in state.orders:
        return
    currency = _currency(props)
    state.orders[order_id] = [ts, order_value(props), currency]
    email = _str(props.get("email"))
    if email:
        state.order_email = email.lower()
    products = _products(props)
    _affinity(state, AFFINITY_WEIGHTS["Order Completed"], products)
    for product in products:
        key = _product_key(product)
        if key is None:
            continue
        seen = state.products.get(key) or {
            "product_id": _str(product.get("product_id")), "sku": _str(product.get("sku")), "quantity": 0.0,
            "orders": 0,
        }
        seen["name"] = _str(product.get("name")) or seen.get("name")
        seen["category"] = _str(product.get("category")) or seen.get("category")
        seen["brand"] = _str(product.get("brand")) or seen.get("brand")
        seen["quantity"] = seen["quantity"] + _quantity(product)
        seen["orders"] = seen["orders"] + 1
        seen["last_bought_at"] = iso(ts)
        state.products[key] = seen
    # The order closes the open cart/checkout.
    cart = state.cart
    if cart is not None and (cart.get("updated_ms", 0) <= ts or cart.get("checkout_id") == _str(
            props.get("checkout_id"))):
        state.cart = None


def _cart_item(product: dict[str, Any]) -> dict[str, Any]:
    return {"product_id": _str(product.get("product_id")), "sku": _str(product.get("sku")),
            "name": _str(product.get("name")), "price": number(product.get("price")),
            "quantity": _quantity(product), "url": _str(product.get("url")),
            "image_url": _str(product.get("image_url"))}


def _apply_cart(state: ProfileState, name: str, props: dict[str, Any], ts: int) -> None:
    cart = dict(state.cart) if state.cart else {"checkout_id": None, "items": [], "value": None,
                                                "explicit_value": False, "currency": None, "recovery_url": None}
    items: list[dict[str, Any]] = [dict(i) for i in cart["items"]]
    if name == "Product Added":
        for product in _products(props):
            key = _product_key(product)
            match = next((i for i in items if key and key in (i["product_id"], i["sku"], i["name"])), None)
            if match:
                match["quantity"] += _quantity(product)
            else:
                items.append(_cart_item(product))
        cart["explicit_value"] = False
    elif name == "Product Removed":
        for product in _products(props):
            key = _product_key(product)
            match = next((i for i in items if key and key in (i["product_id"], i["sku"], i["name"])), None)
            if match:
                match["quantity"] -= _quantity(product)
                if match["quantity"] <= 0:
                    items.remove(match)
        cart["explicit_value"] = False
    elif name in ("Cart Viewed", "Checkout Started") and isinstance(props.get("products"), list):
        items = [_cart_item(p) for p in _products(props)]
    if name.startswith("Checkout") or name == "Payment Info Entered":
        cart["checkout_id"] = _str(props.get("checkout_id")) or cart["checkout_id"]
        value = number(props.get("total")) if "total" in props else number(props.get("revenue", props.get("value")))
        if value is not None:
            cart["value"], cart["explicit_value"] = value, True
        cart["recovery_url"] = (_str(props.get("recovery_url")) or _str(props.get("checkout_url"))
                                or cart["recovery_url"])
    if "currency" in props:
        cart["currency"] = _currency(props)
    if not items:
        state.cart = None
        return
    cart["items"] = items
    if not cart["explicit_value"]:
        cart["value"] = math.fsum((i["price"] or 0.0) * i["quantity"] for i in items)
    cart["updated_ms"] = ts
    state.cart = cart


def copy_state(state: ProfileState) -> ProfileState:
    import copy

    return copy.deepcopy(state)


def fold_all(profile_id: str, events: list[Event]) -> ProfileState:
    """Fold a set of events from scratch, in event order (duplicates by key are folded once)."""
    state = new_state(profile_id)
    seen: set[str] = set()
    for event in sorted(events, key=event_key):
        if event.dedup_key in seen:
            continue
        seen.add(event.dedup_key)
        fold(state, event)
    return state


def _day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def rfm(state: ProfileState, observation_day: date) -> dict[str, Any]:
    """RFM inputs as lifetimes defines them at daily granularity, over orders up to ``observation_day``.

    >>> s = new_state("p")
    >>> rfm(s, date(2024, 1, 1))
    {'frequency': 0, 'recency_days': None, 'T_days': None, 'monetary_value': 0.0}
    """
    day_values: dict[date, list[float]] = {}
    for ts, value, _currency_code in _live_orders(state):
        day = _day(ts)
        if day <= observation_day:
            day_values.setdefault(day, []).append(value)
    if not day_values:
        return {"frequency": 0, "recency_days": None, "T_days": None, "monetary_value": 0.0}
    days = sorted(day_values)
    repeat_totals = [math.fsum(day_values[d]) for d in days[1:]]
    return {
        "frequency": len(days) - 1,
        "recency_days": (days[-1] - days[0]).days,
        "T_days": (observation_day - days[0]).days,
        "monetary_value": math.fsum(repeat_totals) / len(repeat_totals) if repeat_totals else 0.0,
    }


def with_observation_day(document: dict[str, Any], observation_day: date) -> dict[str, Any]:
    """The document with ``rfm.T_days`` measured to another day (the only field that depends on "now").

    >>> with_observation_day({"first_order_at": "2024-01-01T10:00:00.000Z", "rfm": {"T_days": 1}},
    ...                      date(2024, 1, 11))["rfm"]["T_days"]
    10
    """
    first = document.get("first_order_at")
    rfm_doc = document.get("rfm")
    if not first or not isinstance(rfm_doc, dict):
        return document
    first_day = datetime.fromisoformat(first.replace("Z", "+00:00")).date()
    return {**document, "rfm": {**rfm_doc, "T_days": (observation_day - first_day).days}}


def _live_orders(state: ProfileState) -> list[list[Any]]:
    cancelled = set(state.cancelled_order_ids)
    return [o for oid, o in state.orders.items() if oid not in cancelled]


def _top(scores: dict[str, float]) -> dict[str, float]:
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_AFFINITIES]
    return {k: v for k, v in ranked}


def render(state: ProfileState, *, now: datetime, segments: list[str] | None = None) -> dict[str, Any]:
    """The profile document of the contract (docs/architecture.md), from the folded state."""
    orders = sorted(_live_orders(state), key=lambda o: o[0])
    by_currency: dict[str, list[float]] = {}
    for _ts, value, currency in orders:
        by_currency.setdefault(currency, []).append(value)
    # The profile's currency: the one most of its orders were paid in (ties: alphabetical).
    currency = min(by_currency, key=lambda c: (-len(by_currency[c]), c)) if by_currency else None
    revenue_by_currency = {c: math.fsum(v) for c, v in sorted(by_currency.items())}
    revenue_total = revenue_by_currency.get(currency, 0.0) if currency else 0.0
    refunded: dict[str, list[float]] = {}
    for _ts, amount, refund_currency in state.refunds:
        refunded.setdefault(refund_currency, []).append(amount)
    opened = set(state.tickets_opened)
    solved = set(state.tickets_solved)
    cart = None
    if state.cart:
        cart = {k: state.cart.get(k) for k in ("checkout_id", "items", "value", "currency", "recovery_url")}
        cart["updated_at"] = iso(state.cart.get("updated_ms"))
    products = sorted(state.products.values(), key=lambda p: (p.get("last_bought_at") or "", p.get("product_id")
                                                              or p.get("sku") or ""), reverse=True)
    return {
        "profile_id": state.profile_id,
        "user_id": state.user_id,
        "email": state.email or state.order_email,
        "phone": state.phone,
        "timezone": state.timezone,
        "locale": state.locale,
        "traits": state.traits,
        "first_seen_at": iso(state.first_seen_ms),
        "last_seen_at": iso(state.last_seen_ms),
        "events_count": state.events_count,
        "orders_count": len(orders),
        "revenue_total": revenue_total,
        "currency": currency,
        "revenue_by_currency": revenue_by_currency,
        "average_order_value": revenue_total / len(by_currency[currency]) if currency else None,
        "first_order_at": iso(orders[0][0]) if orders else None,
        "last_order_at": iso(orders[-1][0]) if orders else None,
        "refunds_count": len(state.refunds),
        "refunded_by_currency": {c: math.fsum(v) for c, v in sorted(refunded.items())},
        "cancellations_count": len(state.cancelled_order_ids),
        "rfm": rfm(state, now.astimezone(UTC).date()),
        "products_bought": products,
        "category_affinity": _top(state.category_scores),
        "brand_affinity": _top(state.brand_scores),
        "cart": cart,
        "sessions_count": state.sessions_count,
        "page_views_count": state.page_views_count,
        "last_page": state.last_page,
        "support": {
            "tickets_open": len(opened - solved),
            "tickets_solved": len(solved),
            "open_ticket_ids": sorted(opened - solved),
            "last_satisfaction": state.last_satisfaction,
            "nps": state.nps,
        },
        "engagement": state.engagement,
        "consent": state.consent,
        "predictions": state.predictions,
        "loyalty": state.loyalty,
        "segments": sorted(segments or []),
    }


def changed_fields(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """Top-level document fields whose value differs.

    >>> changed_fields({"a": 1, "b": 2}, {"a": 1, "b": 3})
    ['b']
    """
    if before is None:
        return sorted(after)
    return sorted(k for k in after if before.get(k) != after.get(k))


def _order(day: str, total: float) -> Event:
    """A test helper for the doctests above."""
    ts = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(hours=12)
    return Event.model_validate({"type": "track", "event": "Order Completed", "userId": "u",
                                 "messageId": f"{day}-{total}", "timestamp": ts, "receivedAt": ts,
                                 "properties": {"total": total}})
