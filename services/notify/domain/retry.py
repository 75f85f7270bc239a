"""Retry schedule for transient delivery errors: exponential backoff with full jitter (AWS architecture
blog, "Exponential Backoff And Jitter"), the random source injected.

>>> [round(backoff_delay(n, base_s=1, cap_s=60, rand=lambda: 1.0), 1) for n in range(1, 9)]
[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
>>> backoff_delay(3, base_s=1, cap_s=60, rand=lambda: 0.0)
0.5
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number ``attempt`` (1-based): uniform in [ceiling/8, ceiling] where
    ceiling = min(cap, base * 2**(attempt-1)); the floor keeps retries from bunching at zero."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    floor = ceiling / 8
    return floor + (ceiling - floor) * rand() if ceiling > 0 else 0.0


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """``immediate`` quick in-process retries, then up to ``max_attempts`` in total via the schedule."""

    immediate: int = 2
    max_attempts: int = 8
    base_s: float = 2.0
    cap_s: float = 3600.0

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts
