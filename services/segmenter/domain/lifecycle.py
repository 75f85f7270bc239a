"""Lifecycle stages: where a customer stands in their relationship with the shop, from the profile alone
plus one remembered fact (when they came back after a long absence).

Stages, first matching wins:

1. ``prospect`` — no order yet.
2. ``lapsed`` — the last order is at least ``lapsed_days`` old (default 180).
3. ``at_risk`` — the last order is at least ``at_risk_days`` old (default 90).
4. ``won_back`` — the latest order ended a gap of at least ``lapsed_days`` and is less than
   ``won_back_days`` old (default 90).
5. ``vip`` — at least ``vip_min_orders`` orders (default 5) or ``vip_min_revenue`` revenue (default 1000).
6. ``repeat`` — two or more orders.
7. ``first_time_buyer`` — exactly one order.

>>> t = LifecycleThresholds()
>>> now = datetime(2024, 6, 1, tzinfo=UTC)
>>> stage = lifecycle_stage(LifecycleFacts(2, 80.0, datetime(2024, 5, 1, tzinfo=UTC)), t, now)
>>> stage.stage, stage.changes_at
('repeat', datetime.datetime(2024, 7, 30, 0, 0, tzinfo=datetime.timezone.utc))
>>> lifecycle_stage(LifecycleFacts(0, 0.0, None), t, now).stage
'prospect'
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta  # noqa: F401  (UTC: doctests)

LIFECYCLE_STAGES = ("prospect", "first_time_buyer", "repeat", "vip", "at_risk", "lapsed", "won_back")


@dataclass(frozen=True, slots=True)
class LifecycleThresholds:
    at_risk_days: float = 90.0
    lapsed_days: float = 180.0
    won_back_days: float = 90.0
    vip_min_orders: int = 5
    vip_min_revenue: float = 1000.0

    def __post_init__(self) -> None:
        if not 0 < self.at_risk_days < self.lapsed_days:
            raise ValueError("lifecycle thresholds need 0 < at_risk_days < lapsed_days")
        if self.won_back_days <= 0 or self.vip_min_orders < 2 or self.vip_min_revenue <= 0:
            raise ValueError("won_back_days, vip_min_revenue must be positive and vip_min_orders >= 2")


@dataclass(frozen=True, slots=True)
class LifecycleFacts:
    orders: int
    revenue: float
    last_order_at: datetime | None
    # The moment of the order that ended a gap of at least ``lapsed_days`` (see :func:`note_order`).
    won_back_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Stage:
    stage: str
    # The next moment the stage changes with no new order; None if only a new order can change it.
    changes_at: datetime | None


def note_order(won_back_at: datetime | None, previous_last_order: datetime | None, new_last_order: datetime | None,
               thresholds: LifecycleThresholds) -> datetime | None:
    """Fold of the remembered "won back" moment over changes of ``last_order_at``.

    >>> t = LifecycleThresholds()
    >>> jan, sep = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 9, 1, tzinfo=UTC)
    >>> note_order(None, jan, sep, t) == sep
    True
    >>> note_order(sep, sep, datetime(2024, 9, 5, tzinfo=UTC), t) == sep  # a later order keeps the comeback
    True
    """
    if new_last_order is None or previous_last_order is None or new_last_order <= previous_last_order:
        return won_back_at
    if new_last_order - previous_last_order >= timedelta(days=thresholds.lapsed_days):
        return new_last_order
    return won_back_at


def lifecycle_stage(facts: LifecycleFacts, thresholds: LifecycleThresholds, now: datetime) -> Stage:
    if facts.orders <= 0 or facts.last_order_at is None:
        return Stage("prospect", None)
    at_risk = facts.last_order_at + timedelta(days=thresholds.at_risk_days)
    lapsed = facts.last_order_at + timedelta(days=thresholds.lapsed_days)
    if now >= lapsed:
        return Stage("lapsed", None)
    if now >= at_risk:
        return Stage("at_risk", lapsed)
    if facts.won_back_at is not None:
        won_back_until = facts.won_back_at + timedelta(days=thresholds.won_back_days)
        if now < won_back_until:
            return Stage("won_back", min(won_back_until, at_risk))
    if facts.orders >= thresholds.vip_min_orders or facts.revenue >= thresholds.vip_min_revenue:
        return Stage("vip", at_risk)
    return Stage("repeat" if facts.orders >= 2 else "first_time_buyer", at_risk)
