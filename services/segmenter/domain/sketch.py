"""Streaming quantiles for the RFM score boundaries: small update/revert/quantile objects (river style).

Values are counted in buckets, so memory is bounded by the number of distinct buckets, never by the number
of customers, and a customer's old value can be *reverted* when their profile changes — the population's
boundaries stay current without a rescan.

- :class:`LogBucketSketch` (DDSketch bucketing): every quantile within a relative error ``alpha`` — for
  money, whose scale spans orders of magnitude.
- :class:`LinearBucketSketch`: buckets of a fixed width — exact for integers (order counts) with width 1,
  and one-day precision for timestamps in days.

>>> s = LinearBucketSketch(width=1.0)
>>> for x in [1, 1, 1, 2, 3, 5, 8]:
...     s.update(x)
>>> s.quantile(0.5), s.quantile(1.0), s.n
(2.0, 8.0, 7)
>>> s.revert(8); s.quantile(1.0)
5.0
"""

from __future__ import annotations

import math
from collections import Counter


class _BucketSketch:
    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.n = 0

    def _index(self, x: float) -> int:
        raise NotImplementedError

    def _value(self, index: int) -> float:
        raise NotImplementedError

    def update(self, x: float) -> None:
        self.buckets[self._index(x)] += 1
        self.n += 1

    def __contains__(self, x: float) -> bool:
        """Whether a value of ``x``'s bucket was added (and not reverted since): whether ``revert(x)`` can run."""
        return self.buckets.get(self._index(x), 0) > 0

    def revert(self, x: float) -> None:
        """Remove one earlier ``update(x)`` (a customer's value changed or the customer left)."""
        index = self._index(x)
        if self.buckets[index] <= 0:
            raise ValueError(f"revert of a value that was never added: {x}")
        self.buckets[index] -= 1
        if not self.buckets[index]:
            del self.buckets[index]
        self.n -= 1

    def quantile(self, q: float) -> float | None:
        """The value below which a fraction ``q`` of the values lie (None while empty)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError("q must be within [0, 1]")
        if self.n == 0:
            return None
        rank = q * (self.n - 1)
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen > rank:
                return self._value(index)
        return self._value(max(self.buckets))

    def to_dict(self) -> dict[str, object]:
        return {"buckets": {str(k): v for k, v in self.buckets.items()}, "n": self.n}


class LinearBucketSketch(_BucketSketch):
    """Buckets ``[k*width, (k+1)*width)``; a quantile is reported as its bucket's lower edge.

    >>> s = LinearBucketSketch(width=10.0)
    >>> s.update(14.0); s.update(27.5); s.quantile(0.0), s.quantile(1.0)
    (10.0, 20.0)
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError("width must be positive")
        self.width = width

    def _index(self, x: float) -> int:
        return math.floor(x / self.width)

    def _value(self, index: int) -> float:
        return index * self.width


class LogBucketSketch(_BucketSketch):
    """DDSketch's logarithmic buckets: quantiles within relative error ``alpha`` for positive values;
    zero and negative values share one bucket reported as 0.

    >>> s = LogBucketSketch(alpha=0.01)
    >>> for x in range(1, 1001):
    ...     s.update(float(x))
    >>> abs(s.quantile(0.5) - 500) / 500 < 0.02
    True
    >>> s.update(0.0); s.quantile(0.0)
    0.0
    """

    ZERO = -(2**62)

    def __init__(self, alpha: float = 0.01) -> None:
        super().__init__()
        if not 0 < alpha < 1:
            raise ValueError("alpha must be within (0, 1)")
        self.alpha = alpha
        self.gamma = (1 + alpha) / (1 - alpha)
        self._log_gamma = math.log(self.gamma)

    def _index(self, x: float) -> int:
        if x <= 1e-12:
            return self.ZERO
        return math.ceil(math.log(x) / self._log_gamma)

    def _value(self, index: int) -> float:
        if index == self.ZERO:
            return 0.0
        return 2 * self.gamma**index / (self.gamma + 1)
