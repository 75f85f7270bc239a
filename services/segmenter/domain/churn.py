"""The online churn model: a river pipeline that predicts "no order within N days" from the live profile,
and learns when that label becomes known (delayed labels, per customer).

An *observation* is (customer, moment, features, prediction made then). Its label resolves either when the
customer orders within N days of the moment (label 0, known at the order) or when N days pass without an
order (label 1). Progressive validation scores the prediction made at observation time — before the model
learned from that observation — with ROC AUC and log loss.

>>> model = ChurnModel()
>>> obs = model.observe("c1", {"orders_count": 1, "revenue_total": 20.0, "first_order_at": "2024-01-01",
...     "last_order_at": "2024-01-01"}, datetime(2024, 1, 1, tzinfo=UTC))
>>> 0.0 < obs.prediction < 1.0
True
>>> labelled, pending = resolve_labels([obs], order_at=datetime(2024, 2, 1, tzinfo=UTC),
...                                    now=datetime(2024, 2, 1, tzinfo=UTC), label_days=90)
>>> [(o.profile_id, label) for o, label in labelled], pending
([('c1', 0)], [])
>>> model.learn(obs, 0); model.updates
1
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta  # noqa: F401  (UTC: doctests)
from typing import Any

from river import compose, linear_model, metrics, optim, preprocessing

from services.segmenter.domain.rules import parse_datetime

NO_ORDER_DAYS = 3650.0  # "days since last order" of a customer who never ordered


def churn_features(profile: Mapping[str, Any], now: datetime) -> dict[str, float]:
    """Numeric features of a profile document as of ``now``.

    >>> f = churn_features({"orders_count": 3, "revenue_total": 90.0, "first_order_at": "2024-01-01",
    ...                     "last_order_at": "2024-03-01"}, datetime(2024, 4, 1, tzinfo=UTC))
    >>> f["days_since_last_order"], f["orders"], round(f["mean_gap_days"], 1), round(f["overdue_ratio"], 2)
    (31.0, 3.0, 30.0, 1.03)
    """
    orders = profile.get("orders_count") or 0
    orders = float(orders) if isinstance(orders, int | float) else 0.0
    revenue = profile.get("revenue_total") or 0.0
    revenue = float(revenue) if isinstance(revenue, int | float) else 0.0
    first = parse_datetime(profile.get("first_order_at"))
    last = parse_datetime(profile.get("last_order_at"))
    since_last = (now - last).total_seconds() / 86400 if last else NO_ORDER_DAYS
    tenure = (now - first).total_seconds() / 86400 if first else 0.0
    span = (last - first).total_seconds() / 86400 if first and last else 0.0
    mean_gap = span / (orders - 1) if orders > 1 else 0.0
    refunds = profile.get("refunds_count") or 0
    return {
        "orders": orders,
        "log_orders": math.log1p(orders),
        "log_revenue": math.log1p(max(revenue, 0.0)),
        "log_aov": math.log1p(max(revenue / orders, 0.0)) if orders else 0.0,
        "days_since_last_order": round(since_last, 6),
        "log_days_since_last_order": math.log1p(max(since_last, 0.0)),
        "tenure_days": tenure,
        "active_span_days": span,
        "mean_gap_days": mean_gap,
        # How late the customer is compared with their own rhythm (0 for one-time buyers).
        "overdue_ratio": since_last / mean_gap if mean_gap > 0 else 0.0,
        "repeat_buyer": 1.0 if orders > 1 else 0.0,
        "orders_per_year": orders / max(tenure / 365.0, 1 / 12) if orders else 0.0,
        "refunds": float(refunds) if isinstance(refunds, int | float) else 0.0,
    }


@dataclass(frozen=True, slots=True)
class Observation:
    profile_id: str
    observed_at: datetime
    features: dict[str, float]
    prediction: float


def resolve_labels(pending: Sequence[Observation], order_at: datetime | None, now: datetime, label_days: float
                   ) -> tuple[list[tuple[Observation, int]], list[Observation]]:
    """Split a customer's pending observations into labelled ones (1 = churned: no order within
    ``label_days``) and those still waiting. ``order_at`` is the latest known order, if any."""
    window = timedelta(days=label_days)
    labelled: list[tuple[Observation, int]] = []
    waiting: list[Observation] = []
    for obs in pending:
        if order_at is not None and obs.observed_at < order_at <= obs.observed_at + window:
            labelled.append((obs, 0))
        elif now >= obs.observed_at + window:
            labelled.append((obs, 1))
        else:
            waiting.append(obs)
    return labelled, waiting


class ChurnModel:
    """Scaled features into an online logistic regression, with progressive ROC AUC and log loss."""

    def __init__(self, learning_rate: float = 0.001, l2: float = 1e-4) -> None:
        self.pipeline: compose.Pipeline = preprocessing.StandardScaler() | linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate), l2=l2)
        self.auc = metrics.ROCAUC(n_thresholds=200)
        self.log_loss = metrics.LogLoss()
        self.updates = 0

    def predict(self, features: Mapping[str, float]) -> float:
        proba = self.pipeline.predict_proba_one(dict(features))
        return float(proba.get(True, 0.5))

    def observe(self, profile_id: str, profile: Mapping[str, Any], now: datetime) -> Observation:
        features = churn_features(profile, now)
        return Observation(profile_id, now, features, self.predict(features))

    def learn(self, observation: Observation, label: int) -> None:
        churned = bool(label)
        # Progressive validation: score the prediction made back then, before learning from it.
        self.auc.update(churned, {True: observation.prediction, False: 1 - observation.prediction})
        self.log_loss.update(churned, {True: observation.prediction, False: 1 - observation.prediction})
        self.pipeline.learn_one(dict(observation.features), churned)
        self.updates += 1
        # getattr: models pickled before these counters existed still load.
        self.churned_seen = getattr(self, "churned_seen", 0) + int(churned)
        self.retained_seen = getattr(self, "retained_seen", 0) + int(not churned)

    def scores(self) -> dict[str, float | int | None]:
        """Progressive ROC AUC (None until both outcomes have been seen: it is undefined before), log loss and
        the number of labelled outcomes of each kind.

        >>> from datetime import UTC, datetime
        >>> model = ChurnModel()
        >>> model.learn(Observation("p1", datetime(2024, 1, 1, tzinfo=UTC), {"x": 1.0}, 0.3), 0)
        >>> model.scores()["roc_auc"] is None, model.scores()["retained_seen"]
        (True, 1)
        """
        churned, retained = getattr(self, "churned_seen", None), getattr(self, "retained_seen", None)
        defined = churned is None or (churned > 0 and retained)
        return {"roc_auc": float(self.auc.get()) if defined else None, "log_loss": float(self.log_loss.get()),
                "updates": self.updates, "churned_seen": churned, "retained_seen": retained}

    def dumps(self) -> bytes:
        return pickle.dumps(self)

    @staticmethod
    def loads(raw: bytes) -> ChurnModel:
        model = pickle.loads(raw)
        if not isinstance(model, ChurnModel):
            raise TypeError("not a churn model checkpoint")
        return model


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties).

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([0, 1], [0.5, 0.5])
    0.5
    """
    pairs = sorted(zip(scores, labels, strict=True))
    ranks = [0.0] * len(pairs)
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    positives = sum(1 for _, y in pairs if y)
    negatives = len(pairs) - positives
    if not positives or not negatives:
        return float("nan")
    rank_sum = sum(r for r, (_, y) in zip(ranks, pairs, strict=True) if y)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
