"""The loyalty ledger of one customer: immutable ledger events and the fold that rebuilds the account.

Every ledger event carries its effects explicitly (the lot it creates, the lots it consumes, the order
record after it, the qualifying entry, the cap usage), so ``fold`` is mechanical: folding the stored events
in order rebuilds exactly the account that ``decide`` saw. Points are integers.

>>> from datetime import UTC, datetime
>>> t = datetime(2024, 1, 1, tzinfo=UTC)
>>> earned = LedgerEvent(event_id="earn:o1", kind=POINTS_EARNED, profile_id="p1", at=t, points=120,
...     lifetime_delta=120, reason="purchase", new_lot=Lot("earn:o1", t, None, 120))
>>> spent = LedgerEvent(event_id="redeem:k1", kind=POINTS_REDEEMED, profile_id="p1", at=t, points=-100,
...     reason="redemption", consumed=(LotChange("earn:o1", -100),))
>>> acc = fold_all(Ledger("p1"), [earned, spent])
>>> acc.balance, acc.lifetime_points, acc.seq, acc.lots[0].remaining
(20, 120, 2, 20)
>>> event_from_dict(event_to_dict(spent)) == spent
True
>>> ledger_from_dict(ledger_to_dict(acc)) == acc
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

POINTS_EARNED: Final = "Points Earned"
POINTS_REDEEMED: Final = "Points Redeemed"
POINTS_EXPIRED: Final = "Points Expired"
POINTS_ADJUSTED: Final = "Points Adjusted"
TIER_CHANGED: Final = "Tier Changed"
LEDGER_EVENT_NAMES: Final = frozenset({POINTS_EARNED, POINTS_REDEEMED, POINTS_EXPIRED, POINTS_ADJUSTED, TIER_CHANGED})

# Qualifying entries older than the longest allowed tier window can never count again.
_QUALIFYING_HORIZON = timedelta(days=3660)
_CAP_HORIZON = timedelta(days=2)


@dataclass(frozen=True, slots=True)
class Lot:
    """Points earned together that expire together; consumed first-in, first-out."""

    lot_id: str
    earned_at: datetime
    expires_at: datetime | None
    remaining: int


@dataclass(frozen=True, slots=True)
class LotChange:
    lot_id: str
    points: int  # negative: taken from the lot


@dataclass(frozen=True, slots=True)
class OrderPoints:
    """What one order earned and what refunds and cancellation took back."""

    order_id: str
    earned: int
    clawed_back: int
    net_base: Decimal  # net revenue in the base currency
    gross_base: Decimal  # the order total in the base currency (what partial refunds are measured against)
    refunded_base: Decimal
    cancelled: bool = False
    refund_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Qualifying:
    """Spend and points that count towards a tier over the rolling window (negative after refunds)."""

    at: datetime
    spend: Decimal
    points: int


@dataclass(frozen=True, slots=True)
class CapUsage:
    key: str
    ends_at: datetime
    points: int


@dataclass(frozen=True, slots=True)
class Redemption:
    idempotency_key: str
    event_id: str
    reward_id: str
    reward_name: str
    kind: str
    points: int
    code: str
    value: Decimal | None
    currency: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    event_id: str  # deterministic, unique within the customer's ledger
    kind: str
    profile_id: str
    at: datetime
    points: int  # signed change of the balance
    reason: str
    lifetime_delta: int = 0
    program_version: int | None = None
    new_lot: Lot | None = None
    consumed: tuple[LotChange, ...] = ()
    order: OrderPoints | None = None
    qualifying: Qualifying | None = None
    cap_usage: tuple[CapUsage, ...] = ()
    action_key: str | None = None
    tier_from: str | None = None
    tier_to: str | None = None
    redemption: Redemption | None = None
    idempotency_key: str | None = None
    actor: str | None = None
    note: str | None = None
    source_message_id: str | None = None
    unrecovered: int = 0  # clawback points the balance could not cover
    # A merge moves another ledger's lots, orders and qualifying history into this one.
    lots_added: tuple[Lot, ...] = ()
    orders_added: tuple[OrderPoints, ...] = ()
    qualifying_added: tuple[Qualifying, ...] = ()
    action_keys_added: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ledger:
    """A customer's loyalty account, the fold of their ledger events."""

    profile_id: str
    seq: int = 0
    balance: int = 0
    lifetime_points: int = 0
    tier: str | None = None  # None: the program's entry tier
    tier_since: datetime | None = None
    last_at: datetime | None = None
    lots: tuple[Lot, ...] = ()
    orders: Mapping[str, OrderPoints] = field(default_factory=dict)
    qualifying: tuple[Qualifying, ...] = ()
    cap_totals: Mapping[str, CapUsage] = field(default_factory=dict)
    action_keys: Mapping[str, datetime] = field(default_factory=dict)
    redemptions: Mapping[str, Redemption] = field(default_factory=dict)
    adjustments: Mapping[str, str] = field(default_factory=dict)  # idempotency key -> event id

    def lots_fifo(self) -> list[Lot]:
        return sorted(self.lots, key=_lot_order)


def _lot_order(lot: Lot) -> tuple[datetime, str]:
    return (lot.earned_at, lot.lot_id)


def fold(ledger: Ledger, event: LedgerEvent) -> Ledger:
    """Apply one ledger event."""
    lots = {lot.lot_id: lot for lot in ledger.lots}
    if event.new_lot is not None and event.new_lot.remaining > 0:
        lots[event.new_lot.lot_id] = event.new_lot
    for lot in event.lots_added:
        lots[lot.lot_id] = lot
    for change in event.consumed:
        lot = lots[change.lot_id]
        lots[change.lot_id] = replace(lot, remaining=lot.remaining + change.points)
    kept_lots = tuple(sorted((lot for lot in lots.values() if lot.remaining > 0), key=_lot_order))

    orders = ledger.orders
    if event.order is not None or event.orders_added:
        orders = {**{o.order_id: o for o in event.orders_added}, **orders}
        if event.order is not None:
            orders[event.order.order_id] = event.order

    qualifying = ledger.qualifying
    if event.qualifying is not None or event.qualifying_added:
        horizon = event.at - _QUALIFYING_HORIZON
        added = (*event.qualifying_added, *((event.qualifying,) if event.qualifying is not None else ()))
        qualifying = tuple(sorted((q for q in (*qualifying, *added) if q.at > horizon), key=lambda q: q.at))

    cap_totals = ledger.cap_totals
    if event.cap_usage:
        stale = event.at - _CAP_HORIZON
        totals = {k: u for k, u in cap_totals.items() if u.ends_at > stale}
        for usage in event.cap_usage:
            before = totals.get(usage.key)
            totals[usage.key] = replace(usage, points=(before.points if before else 0) + usage.points)
        cap_totals = totals

    action_keys = ledger.action_keys
    if event.action_key is not None or event.action_keys_added:
        action_keys = {**{k: event.at for k in event.action_keys_added}, **action_keys}
        if event.action_key is not None:
            action_keys[event.action_key] = event.at

    redemptions = ledger.redemptions
    if event.redemption is not None:
        redemptions = {**redemptions, event.redemption.idempotency_key: event.redemption}

    adjustments = ledger.adjustments
    if event.kind == POINTS_ADJUSTED and event.idempotency_key is not None:
        adjustments = {**adjustments, event.idempotency_key: event.event_id}

    tier, tier_since = ledger.tier, ledger.tier_since
    if event.kind == TIER_CHANGED:
        tier, tier_since = event.tier_to, event.at

    return Ledger(
        profile_id=ledger.profile_id,
        seq=ledger.seq + 1,
        balance=ledger.balance + event.points,
        lifetime_points=max(0, ledger.lifetime_points + event.lifetime_delta),
        tier=tier,
        tier_since=tier_since,
        last_at=event.at if ledger.last_at is None else max(ledger.last_at, event.at),
        lots=kept_lots,
        orders=orders,
        qualifying=qualifying,
        cap_totals=cap_totals,
        action_keys=action_keys,
        redemptions=redemptions,
        adjustments=adjustments,
    )


def fold_all(ledger: Ledger, events: Iterable[LedgerEvent]) -> Ledger:
    for event in events:
        ledger = fold(ledger, event)
    return ledger


def expiring_summary(ledger: Ledger, *, limit: int = 24) -> list[dict[str, Any]]:
    """Points that will expire, grouped by expiry instant, soonest first (what the profile's
    ``loyalty.expiring`` holds; consumers filter "within N days" against their own clock)."""
    by_instant: dict[datetime, int] = {}
    for lot in ledger.lots:
        if lot.expires_at is not None:
            by_instant[lot.expires_at] = by_instant.get(lot.expires_at, 0) + lot.remaining
    out: list[dict[str, Any]] = [{"points": pts, "expires_at": _iso(at)} for at, pts in sorted(by_instant.items())]
    if len(out) > limit:  # keep the list short: the tail is reported at its earliest instant
        tail = sum(int(e["points"]) for e in out[limit - 1:])
        out = [*out[: limit - 1], {"points": tail, "expires_at": out[limit - 1]["expires_at"]}]
    return out


# ---- serialisation (JSON-safe dicts; used for the Cassandra snapshot and the ledger lines) -------------

def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _req_dt(value: str) -> datetime:
    parsed = _dt(value)
    assert parsed is not None
    return parsed


def _lot_to(lot: Lot) -> dict[str, Any]:
    return {"lot_id": lot.lot_id, "earned_at": _iso(lot.earned_at),
            "expires_at": _iso(lot.expires_at) if lot.expires_at else None, "remaining": lot.remaining}


def _lot_from(d: Mapping[str, Any]) -> Lot:
    return Lot(d["lot_id"], _req_dt(d["earned_at"]), _dt(d["expires_at"]), int(d["remaining"]))


def _order_to(o: OrderPoints) -> dict[str, Any]:
    return {"order_id": o.order_id, "earned": o.earned, "clawed_back": o.clawed_back, "net_base": str(o.net_base),
            "gross_base": str(o.gross_base), "refunded_base": str(o.refunded_base), "cancelled": o.cancelled,
            "refund_ids": list(o.refund_ids)}


def _order_from(d: Mapping[str, Any]) -> OrderPoints:
    return OrderPoints(d["order_id"], int(d["earned"]), int(d["clawed_back"]), Decimal(d["net_base"]),
                       Decimal(d["gross_base"]), Decimal(d["refunded_base"]), bool(d["cancelled"]),
                       tuple(d["refund_ids"]))


def _qual_to(q: Qualifying) -> dict[str, Any]:
    return {"at": _iso(q.at), "spend": str(q.spend), "points": q.points}


def _qual_from(d: Mapping[str, Any]) -> Qualifying:
    return Qualifying(_req_dt(d["at"]), Decimal(d["spend"]), int(d["points"]))


def _cap_to(c: CapUsage) -> dict[str, Any]:
    return {"key": c.key, "ends_at": _iso(c.ends_at), "points": c.points}


def _cap_from(d: Mapping[str, Any]) -> CapUsage:
    return CapUsage(d["key"], _req_dt(d["ends_at"]), int(d["points"]))


def redemption_to_dict(r: Redemption) -> dict[str, Any]:
    return {"idempotency_key": r.idempotency_key, "event_id": r.event_id, "reward_id": r.reward_id,
            "reward_name": r.reward_name, "kind": r.kind, "points": r.points, "code": r.code,
            "value": None if r.value is None else str(r.value), "currency": r.currency, "at": _iso(r.at)}


def _redemption_from(d: Mapping[str, Any]) -> Redemption:
    return Redemption(d["idempotency_key"], d["event_id"], d["reward_id"], d["reward_name"], d["kind"],
                      int(d["points"]), d["code"], _dec(d["value"]), d["currency"], _req_dt(d["at"]))


def event_to_dict(e: LedgerEvent) -> dict[str, Any]:
    return {
        "event_id": e.event_id, "kind": e.kind, "profile_id": e.profile_id, "at": _iso(e.at), "points": e.points,
        "reason": e.reason, "lifetime_delta": e.lifetime_delta, "program_version": e.program_version,
        "new_lot": _lot_to(e.new_lot) if e.new_lot else None,
        "consumed": [{"lot_id": c.lot_id, "points": c.points} for c in e.consumed],
        "order": _order_to(e.order) if e.order else None,
        "qualifying": _qual_to(e.qualifying) if e.qualifying else None,
        "cap_usage": [_cap_to(c) for c in e.cap_usage], "action_key": e.action_key,
        "tier_from": e.tier_from, "tier_to": e.tier_to,
        "redemption": redemption_to_dict(e.redemption) if e.redemption else None,
        "idempotency_key": e.idempotency_key, "actor": e.actor, "note": e.note,
        "source_message_id": e.source_message_id, "unrecovered": e.unrecovered, "details": dict(e.details),
        "lots_added": [_lot_to(lot) for lot in e.lots_added],
        "orders_added": [_order_to(o) for o in e.orders_added],
        "qualifying_added": [_qual_to(q) for q in e.qualifying_added],
        "action_keys_added": list(e.action_keys_added),
    }


def event_from_dict(d: Mapping[str, Any]) -> LedgerEvent:
    return LedgerEvent(
        event_id=d["event_id"], kind=d["kind"], profile_id=d["profile_id"], at=_req_dt(d["at"]),
        points=int(d["points"]), reason=d["reason"], lifetime_delta=int(d["lifetime_delta"]),
        program_version=d["program_version"],
        new_lot=_lot_from(d["new_lot"]) if d["new_lot"] else None,
        consumed=tuple(LotChange(c["lot_id"], int(c["points"])) for c in d["consumed"]),
        order=_order_from(d["order"]) if d["order"] else None,
        qualifying=_qual_from(d["qualifying"]) if d["qualifying"] else None,
        cap_usage=tuple(_cap_from(c) for c in d["cap_usage"]), action_key=d["action_key"],
        tier_from=d["tier_from"], tier_to=d["tier_to"],
        redemption=_redemption_from(d["redemption"]) if d["redemption"] else None,
        idempotency_key=d["idempotency_key"], actor=d["actor"], note=d["note"],
        source_message_id=d["source_message_id"], unrecovered=int(d["unrecovered"]), details=dict(d["details"]),
        lots_added=tuple(_lot_from(x) for x in d.get("lots_added", ())),
        orders_added=tuple(_order_from(o) for o in d.get("orders_added", ())),
        qualifying_added=tuple(_qual_from(q) for q in d.get("qualifying_added", ())),
        action_keys_added=tuple(d.get("action_keys_added", ())),
    )


def ledger_to_dict(ledger: Ledger) -> dict[str, Any]:
    return {
        "profile_id": ledger.profile_id, "seq": ledger.seq, "balance": ledger.balance,
        "lifetime_points": ledger.lifetime_points, "tier": ledger.tier,
        "tier_since": _iso(ledger.tier_since) if ledger.tier_since else None,
        "last_at": _iso(ledger.last_at) if ledger.last_at else None,
        "lots": [_lot_to(lot) for lot in ledger.lots],
        "orders": {k: _order_to(o) for k, o in ledger.orders.items()},
        "qualifying": [_qual_to(q) for q in ledger.qualifying],
        "cap_totals": {k: _cap_to(c) for k, c in ledger.cap_totals.items()},
        "action_keys": {k: _iso(v) for k, v in ledger.action_keys.items()},
        "redemptions": {k: redemption_to_dict(r) for k, r in ledger.redemptions.items()},
        "adjustments": dict(ledger.adjustments),
    }


def ledger_from_dict(d: Mapping[str, Any]) -> Ledger:
    return Ledger(
        profile_id=d["profile_id"], seq=int(d["seq"]), balance=int(d["balance"]),
        lifetime_points=int(d["lifetime_points"]), tier=d["tier"], tier_since=_dt(d["tier_since"]),
        last_at=_dt(d["last_at"]), lots=tuple(_lot_from(x) for x in d["lots"]),
        orders={k: _order_from(o) for k, o in d["orders"].items()},
        qualifying=tuple(_qual_from(q) for q in d["qualifying"]),
        cap_totals={k: _cap_from(c) for k, c in d["cap_totals"].items()},
        action_keys={k: _req_dt(v) for k, v in d["action_keys"].items()},
        redemptions={k: _redemption_from(r) for k, r in d["redemptions"].items()},
        adjustments=dict(d["adjustments"]),
    )
