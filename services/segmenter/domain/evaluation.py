"""Offline evaluation, through the same domain code as the live service: the online churn model's
progressive ROC AUC next to the AUC of ``1 - P(alive)`` from BG/NBD, on the same customers and dates.

Protocol (a replay of a transaction log in time order): at each observation date ``d`` every customer who
has purchased before ``d`` is observed — the online model predicts from the profile as of ``d`` and BG/NBD,
refitted on the purchases before ``d``, gives ``1 - P(alive)``. The label is "no purchase in the next
``label_days``", revealed to the online model only at ``d + label_days`` (delayed labels), so every
prediction is made before the model has seen its own label. Observations whose label lies beyond the end
of the log are not scored.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from services.segmenter.domain.churn import ChurnModel, Observation, roc_auc
from services.segmenter.domain.clv import FitError, conditional_expected_purchases, fit_bgnbd, p_alive, summarize


@dataclass
class ChurnComparison:
    observations: int
    dates: list[str]
    churn_rate: float
    online_progressive_auc: float
    online_auc_exact: float
    online_log_loss: float
    bgnbd_auc: float
    # A stronger BG/NBD baseline, for reference: fewer expected orders in the label window = more churn.
    bgnbd_expected_orders_auc: float

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _profile_as_of(days: Sequence[date], spend: Mapping[date, float], d: date) -> dict[str, Any]:
    before = days[:bisect.bisect_left(days, d)]
    return {
        "orders_count": len(before),
        "revenue_total": sum(spend[x] for x in before),
        "first_order_at": datetime(before[0].year, before[0].month, before[0].day, tzinfo=UTC).isoformat(),
        "last_order_at": datetime(before[-1].year, before[-1].month, before[-1].day, tzinfo=UTC).isoformat(),
    }


def compare_churn_models(days_by_customer: Mapping[str, Mapping[date, float]], observation_dates: Sequence[date],
                         label_days: int = 90, period_days: int = 7) -> ChurnComparison:
    end = max(max(days) for days in days_by_customer.values() if days)
    sorted_days = {c: sorted(spend) for c, spend in days_by_customer.items() if spend}
    model = ChurnModel()
    # Pending observations by the date their label becomes known.
    waiting: list[tuple[date, Observation, int]] = []
    labels: list[int] = []
    online: list[float] = []
    baseline: list[float] = []
    expected_baseline: list[float] = []
    scored_dates = []
    for d in sorted(observation_dates):
        # Reveal every label that is known by d (delayed labels), oldest first.
        ready = [w for w in waiting if w[0] <= d]
        waiting = [w for w in waiting if w[0] > d]
        for _, obs, label in sorted(ready, key=lambda w: w[1].observed_at):
            model.learn(obs, label)
        if d + timedelta(days=label_days) > end:
            continue
        calibration = d - timedelta(days=1)
        summaries = summarize(days_by_customer, calibration, period_days)
        try:
            params = fit_bgnbd(summaries)
        except FitError:
            continue
        ids = [s.customer_id for s in summaries]
        alive = dict(zip(ids, p_alive(params, summaries), strict=True))
        expected = dict(zip(ids, conditional_expected_purchases(params, summaries, label_days / period_days),
                            strict=True))
        now = datetime(d.year, d.month, d.day, tzinfo=UTC)
        scored_dates.append(d.isoformat())
        for customer, days in sorted_days.items():
            if days[0] >= d:
                continue
            profile = _profile_as_of(days, days_by_customer[customer], d)
            obs = model.observe(customer, profile, now)
            horizon = d + timedelta(days=label_days)
            nxt = bisect.bisect_left(days, d)
            label = 0 if nxt < len(days) and days[nxt] < horizon else 1
            waiting.append((horizon, obs, label))
            labels.append(label)
            online.append(obs.prediction)
            baseline.append(1.0 - float(alive[customer]))
            expected_baseline.append(-float(expected[customer]))
    scores = model.scores()
    return ChurnComparison(
        observations=len(labels), dates=scored_dates, churn_rate=sum(labels) / max(len(labels), 1),
        online_progressive_auc=float(scores["roc_auc"] or 0.0), online_auc_exact=roc_auc(labels, online),
        online_log_loss=float(scores["log_loss"] or 0.0), bgnbd_auc=roc_auc(labels, baseline),
        bgnbd_expected_orders_auc=roc_auc(labels, expected_baseline),
    )


def monthly_dates(start: date, stop: date, step_days: int = 30) -> list[date]:
    out = []
    d = start
    while d <= stop:
        out.append(d)
        d += timedelta(days=step_days)
    return out
