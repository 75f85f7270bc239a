"""The loyalty program definition: earning rules, tiers, expiry and the rewards catalogue.

A program is versioned: every change through the API stores a new version with an ``effective_from``
instant, and each decision uses the version in force at the moment of the fact it decides on, so
re-processing history gives the same points.

>>> p = ProgramDefinition.model_validate({
...     "base_currency": "USD", "points_per_unit": 1,
...     "currency_rates": {"EUR": 1.10},
...     "tiers": [{"name": "member", "threshold": 0}, {"name": "gold", "threshold": 500, "multiplier": 1.5}],
...     "rewards": [{"reward_id": "r5", "name": "$5 off", "kind": "discount_code", "points_price": 500,
...                  "value": 5}]})
>>> p.to_base(Decimal("100"), "EUR")
Decimal('110.0')
>>> p.to_base(Decimal("100"), "JPY") is None
True
>>> [t.name for t in p.tiers], p.tier_rank("gold"), p.reward("r5").points_price
(['member', 'gold'], 1, 500)
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loyalist.events import as_utc

ActionPeriod = Literal["lifetime", "year", "month", "day"]
CapPeriod = Literal["day", "month", "year"]
RewardKind = Literal["discount_code", "free_shipping", "gift"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ActionBonus(_Frozen):
    """Bonus points for a non-purchase action, e.g. ``Product Reviewed``.

    ``once_per`` limits how often one customer earns it (per calendar period in UTC, or once ever);
    ``key_property`` makes the limit per distinct value of an event property (one bonus per reviewed
    product, per referred friend).
    """

    event: str = Field(min_length=1, max_length=200, description="Canonical track event name")
    points: int = Field(gt=0, le=1_000_000)
    once_per: ActionPeriod | None = None
    key_property: str | None = Field(default=None, max_length=100)


class EarningCap(_Frozen):
    """At most ``max_points`` earned per calendar period (UTC) from purchases, actions, or both."""

    period: CapPeriod
    max_points: int = Field(gt=0)
    applies_to: Literal["all", "purchases", "actions"] = "all"


class Tier(_Frozen):
    name: str = Field(min_length=1, max_length=60, pattern=r"^[A-Za-z0-9_ -]+$")
    threshold: Decimal = Field(ge=0, description="Qualifying spend (base currency) or points in the window")
    multiplier: Decimal = Field(default=Decimal(1), ge=0, le=100, description="Applies to purchase points")
    perks: tuple[str, ...] = ()


class Reward(_Frozen):
    reward_id: str = Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.-]+$")
    name: str = Field(min_length=1, max_length=200)
    kind: RewardKind
    points_price: int = Field(gt=0, le=100_000_000)
    value: Decimal | None = Field(default=None, ge=0, description="Discount amount or gift value")
    currency: str | None = Field(default=None, min_length=3, max_length=3)
    active: bool = True


class ProgramDefinition(_Frozen):
    """What an operator sends: the rules without version bookkeeping."""

    name: str = Field(default="Loyalty program", max_length=200)
    base_currency: str = Field(default="USD", min_length=3, max_length=3)
    points_per_unit: Decimal = Field(default=Decimal(1), ge=0, le=10_000, description="Points per base-currency unit")
    currency_rates: dict[str, Decimal] = Field(
        default_factory=dict, description="Base-currency units per one unit of each other currency"
    )
    action_bonuses: tuple[ActionBonus, ...] = ()
    caps: tuple[EarningCap, ...] = ()
    tiers: tuple[Tier, ...] = Field(default=(Tier(name="member", threshold=Decimal(0)),), min_length=1)
    tier_metric: Literal["spend", "points"] = "spend"
    tier_window_days: int = Field(default=365, ge=1, le=3660)
    tier_review_months: int = Field(default=12, ge=1, le=120, description="A tier is kept at least this long")
    expiry_months: int | None = Field(default=12, ge=1, le=240, description="None: points never expire")
    point_value: Decimal | None = Field(default=None, ge=0, description="Base-currency value of one point")
    rewards: tuple[Reward, ...] = ()

    @field_validator("base_currency")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("currency_rates")
    @classmethod
    def _rates(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        out = {}
        for code, rate in value.items():
            if len(code) != 3 or not code.isalpha():
                raise ValueError(f"currency code {code!r} is not ISO 4217 (three letters)")
            if rate <= 0:
                raise ValueError(f"rate for {code} must be positive")
            out[code.upper()] = rate
        return out

    @model_validator(mode="after")
    def _consistent(self) -> ProgramDefinition:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError("tier names must be unique")
        thresholds = [t.threshold for t in self.tiers]
        if thresholds != sorted(thresholds) or len(set(thresholds)) != len(thresholds):
            raise ValueError("tiers must be listed by strictly increasing threshold")
        if thresholds[0] != 0:
            raise ValueError("the first tier is the entry tier and needs threshold 0")
        ids = [r.reward_id for r in self.rewards]
        if len(set(ids)) != len(ids):
            raise ValueError("reward ids must be unique")
        events = [(b.event, b.key_property) for b in self.action_bonuses]
        if len(set(events)) != len(events):
            raise ValueError("one action bonus per event name")
        return self

    def to_base(self, amount: Decimal, currency: str | None) -> Decimal | None:
        """Amount in the base currency, or None when the currency has no rate."""
        code = (currency or self.base_currency).upper()
        if code == self.base_currency:
            return amount
        rate = self.currency_rates.get(code)
        return None if rate is None else amount * rate

    def tier_rank(self, name: str | None) -> int:
        for rank, tier in enumerate(self.tiers):
            if tier.name == name:
                return rank
        return 0

    def tier(self, name: str | None) -> Tier:
        return self.tiers[self.tier_rank(name)]

    def reward(self, reward_id: str) -> Reward | None:
        return next((r for r in self.rewards if r.reward_id == reward_id), None)

    def bonus_for(self, event_name: str) -> ActionBonus | None:
        return next((b for b in self.action_bonuses if b.event == event_name), None)


class Program(ProgramDefinition):
    """A stored version of the program."""

    version: int = Field(ge=1)
    effective_from: datetime
    created_at: datetime
    created_by: str = ""

    @field_validator("effective_from", "created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # Cassandra hands timestamps back naive (they are UTC).
        return as_utc(value)


def effective_program(versions: list[Program], at: datetime) -> Program | None:
    """The version in force at ``at``: the newest whose ``effective_from`` is not after it, else the oldest
    (facts older than the first version are judged by the first version).

    >>> from datetime import UTC
    >>> jan = datetime(2024, 1, 1, tzinfo=UTC)
    >>> v1 = Program(version=1, effective_from=jan, created_at=jan)
    >>> v2 = v1.model_copy(update={"version": 2, "effective_from": datetime(2024, 6, 1, tzinfo=UTC)})
    >>> effective_program([v1, v2], datetime(2024, 7, 1, tzinfo=UTC)).version
    2
    >>> effective_program([v1, v2], datetime(2023, 1, 1, tzinfo=UTC)).version
    1
    """
    if not versions:
        return None
    ordered = sorted(versions, key=lambda p: (p.effective_from, p.version))
    chosen = ordered[0]
    for program in ordered:
        if program.effective_from <= at:
            chosen = program
    return chosen
