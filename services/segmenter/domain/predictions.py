"""When predictions are worth writing back to the profile: only material moves, so the profile update they
cause (which comes back through profile.changed) cannot start a feedback loop.

>>> materially_changed({"churn_probability": 0.30}, {"churn_probability": 0.32}, 0.05, 0.10)
False
>>> materially_changed({"churn_probability": 0.30}, {"churn_probability": 0.40}, 0.05, 0.10)
True
>>> materially_changed({}, {"p_alive": 0.9}, 0.05, 0.10)
True
>>> materially_changed({"expected_orders_90d": 1.0}, {"expected_orders_90d": 1.05}, 0.05, 0.10)
False
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROBABILITIES = ("churn_probability", "p_alive")
AMOUNTS = ("expected_orders_90d", "predicted_clv_365d")


def materially_changed(old: Mapping[str, Any], new: Mapping[str, Any], min_probability_change: float,
                       min_relative_change: float) -> bool:
    for key, value in new.items():
        before = old.get(key)
        if value is None:
            continue
        if before is None:
            return True
        if key in PROBABILITIES and abs(float(value) - float(before)) >= min_probability_change:
            return True
        if key in AMOUNTS:
            scale = max(abs(float(before)), 1e-9)
            # Tiny amounts (0.001 vs 0.002 orders) are not material however large the ratio.
            if abs(float(value) - float(before)) >= max(min_relative_change * scale, 0.01):
                return True
        if key == "expected_next_order_at" and value != before:
            from services.segmenter.domain.rules import parse_datetime

            a, b = parse_datetime(value), parse_datetime(before)
            if a is None or b is None or abs((a - b).total_seconds()) >= 86400:
                return True
    return False
