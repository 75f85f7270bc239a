"""RFM: recency, frequency and monetary scores 1-5 against the live customer population, and the standard
named RFM segments.

Each score is ``1 + the number of population quintile boundaries (20/40/60/80 %) strictly below the
customer's value``, with boundaries from streaming sketches (:mod:`.sketch`) that are updated — and
reverted — as profiles change. Recency is measured as the day of the last order (a later day is more
recent, so a higher score), which keeps a customer's rank fixed while time passes; frequency is the order
count and monetary the total revenue. Customers without an order have no RFM score.

The named segment comes from R and FM = ceil((F + M) / 2) (the widely used R x FM grid):

====  ==============  ==================  ==================  ==========  ===============
R\\FM  1               2                   3                   4           5
====  ==============  ==================  ==================  ==========  ===============
5     New             Potential Loyalist  Potential Loyalist  Champions   Champions
4     Promising       Potential Loyalist  Potential Loyalist  Loyal       Loyal
3     About to Sleep  About to Sleep      Need Attention      Loyal       Loyal
2     Hibernating     Hibernating         At Risk             At Risk     Can't Lose Them
1     Lost            Hibernating         At Risk             At Risk     Can't Lose Them
====  ==============  ==================  ==================  ==========  ===============

>>> rfm_segment(5, 5, 4), rfm_segment(1, 1, 1), rfm_segment(2, 5, 5), rfm_segment(3, 3, 3)
('Champions', 'Lost', "Can't Lose Them", 'Need Attention')
>>> scorer = RfmScorer()
>>> for day, orders, revenue in [(100, 1, 20.0), (110, 1, 35.0), (120, 2, 60.0), (130, 4, 200.0), (140, 9, 900.0)]:
...     scorer.add(RfmValues(day, orders, revenue))
>>> scorer.scores(RfmValues(140, 9, 900.0)), scorer.scores(RfmValues(100, 1, 20.0))
(RfmScores(r=5, f=5, m=5), RfmScores(r=1, f=1, m=1))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.segmenter.domain.sketch import LinearBucketSketch, LogBucketSketch

RFM_SEGMENTS = (
    "Champions", "Loyal", "Potential Loyalist", "New", "Promising", "Need Attention", "About to Sleep",
    "At Risk", "Can't Lose Them", "Hibernating", "Lost",
)

# Rows R = 5..1, columns FM = 1..5 (the table in the module docstring).
_GRID = {
    5: ("New", "Potential Loyalist", "Potential Loyalist", "Champions", "Champions"),
    4: ("Promising", "Potential Loyalist", "Potential Loyalist", "Loyal", "Loyal"),
    3: ("About to Sleep", "About to Sleep", "Need Attention", "Loyal", "Loyal"),
    2: ("Hibernating", "Hibernating", "At Risk", "At Risk", "Can't Lose Them"),
    1: ("Lost", "Hibernating", "At Risk", "At Risk", "Can't Lose Them"),
}
QUINTILES = (0.2, 0.4, 0.6, 0.8)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rfm_segment(r: int, f: int, m: int) -> str:
    for score in (r, f, m):
        if not 1 <= score <= 5:
            raise ValueError("RFM scores are 1..5")
    fm = math.ceil((f + m) / 2)
    return _GRID[r][fm - 1]


@dataclass(frozen=True, slots=True)
class RfmValues:
    """What RFM ranks: the day number of the last order, the order count and the total revenue."""

    last_order_day: float
    orders: int
    revenue: float


@dataclass(frozen=True, slots=True)
class RfmScores:
    r: int
    f: int
    m: int

    @property
    def segment(self) -> str:
        return rfm_segment(self.r, self.f, self.m)


def day_number(when: datetime) -> float:
    return (when - EPOCH).total_seconds() / 86400.0


def rfm_values(profile: dict[str, Any]) -> RfmValues | None:
    """The RFM inputs of a profile document, or None for a customer without orders."""
    from services.segmenter.domain.rules import parse_datetime

    orders = profile.get("orders_count") or 0
    last = parse_datetime(profile.get("last_order_at"))
    if not isinstance(orders, int | float) or orders <= 0 or last is None:
        return None
    revenue = profile.get("revenue_total") or 0.0
    money = float(revenue) if isinstance(revenue, int | float) else 0.0
    return RfmValues(math.floor(day_number(last)), int(orders), money)


class RfmScorer:
    """Population sketches of the three RFM inputs, updated and reverted as customers change."""

    def __init__(self) -> None:
        self.recency = LinearBucketSketch(width=1.0)
        self.frequency = LinearBucketSketch(width=1.0)
        self.monetary = LogBucketSketch(alpha=0.01)

    @property
    def n(self) -> int:
        return self.recency.n

    def add(self, values: RfmValues) -> None:
        self.recency.update(values.last_order_day)
        self.frequency.update(values.orders)
        self.monetary.update(values.revenue)

    def remove(self, values: RfmValues) -> bool:
        """Take a customer's values out; False (and nothing changed) when they are not all in the sketches."""
        if (values.last_order_day not in self.recency or values.orders not in self.frequency
                or values.revenue not in self.monetary):
            return False
        self.recency.revert(values.last_order_day)
        self.frequency.revert(values.orders)
        self.monetary.revert(values.revenue)
        return True

    def replace(self, old: RfmValues | None, new: RfmValues | None) -> bool:
        """A customer's values changed from ``old`` to ``new`` (None: no orders). Returns False when ``old``
        was not in the sketches — they drifted from the stored profiles, e.g. after a change that was applied
        here but never stored: ``new`` is still added, so one stale value may stay counted (until a restart
        rebuilds the sketches) instead of the update failing for ever.

        >>> scorer = RfmScorer()
        >>> scorer.replace(None, RfmValues(100, 1, 20.0)), scorer.n
        (True, 1)
        >>> scorer.replace(RfmValues(100, 1, 20.0), RfmValues(120, 2, 45.0)), scorer.n
        (True, 1)
        >>> scorer.replace(RfmValues(100, 1, 20.0), RfmValues(130, 3, 70.0)), scorer.n
        (False, 2)
        """
        if old == new:
            return True
        removed = old is None or self.remove(old)
        if new is not None:
            self.add(new)
        return removed

    def boundaries(self) -> dict[str, list[float | None]]:
        return {
            "recency_day": [self.recency.quantile(q) for q in QUINTILES],
            "frequency": [self.frequency.quantile(q) for q in QUINTILES],
            "monetary": [self.monetary.quantile(q) for q in QUINTILES],
        }

    def scores(self, values: RfmValues) -> RfmScores:
        return RfmScores(
            _score(self.recency, values.last_order_day, exact=True),
            _score(self.frequency, values.orders, exact=True),
            _score(self.monetary, values.revenue, exact=False),
        )


def _score(sketch: LinearBucketSketch | LogBucketSketch, value: float, *, exact: bool) -> int:
    if sketch.n == 0:
        return 3
    below = 0
    for q in QUINTILES:
        boundary = sketch.quantile(q)
        assert boundary is not None
        # Log buckets report a bucket's representative value; compare at the same bucketing so a value
        # equal to a boundary is not counted above it.
        if exact:
            if math.floor(value) > boundary:
                below += 1
        elif sketch._index(value) > sketch._index(boundary):
            below += 1
    return 1 + below
