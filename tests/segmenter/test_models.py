"""RFM sketches and scores, lifecycle stages, the churn model's delayed labels and checkpoints, and
co-purchase recommendations (pure)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from services.segmenter.domain.churn import ChurnModel, Observation, churn_features, resolve_labels, roc_auc
from services.segmenter.domain.lifecycle import LifecycleFacts, LifecycleThresholds, lifecycle_stage, note_order
from services.segmenter.domain.recommendations import CoPurchases
from services.segmenter.domain.rfm import RFM_SEGMENTS, RfmScorer, RfmValues, rfm_segment
from services.segmenter.domain.sketch import LinearBucketSketch, LogBucketSketch

NOW = datetime(2024, 6, 1, tzinfo=UTC)


def test_every_rfm_cell_has_a_named_segment_and_all_names_are_used() -> None:
    names = {rfm_segment(r, f, m) for r in range(1, 6) for f in range(1, 6) for m in range(1, 6)}
    assert names == set(RFM_SEGMENTS)
    assert rfm_segment(5, 1, 1) == "New" and rfm_segment(4, 1, 1) == "Promising"
    assert rfm_segment(1, 5, 5) == "Can't Lose Them" and rfm_segment(3, 1, 2) == "About to Sleep"
    with pytest.raises(ValueError):
        rfm_segment(0, 1, 1)


def test_sketch_quantiles_track_exact_quantiles_under_updates_and_reverts() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(4, 1.2) for _ in range(20_000)]
    sketch = LogBucketSketch(alpha=0.01)
    for v in values:
        sketch.update(v)
    removed = values[:5000]
    for v in removed:
        sketch.revert(v)
    kept = sorted(values[5000:])
    for q in (0.2, 0.4, 0.6, 0.8):
        exact = kept[int(q * (len(kept) - 1))]
        assert abs(sketch.quantile(q) - exact) / exact < 0.03  # type: ignore[operator]
    assert sketch.n == 15_000 and len(sketch.buckets) < 1500
    with pytest.raises(ValueError):
        LinearBucketSketch().revert(3.0)


def test_rfm_scores_follow_the_population() -> None:
    scorer = RfmScorer()
    customers = [RfmValues(19000 + i, 1 + i // 20, 10.0 * (i + 1)) for i in range(100)]
    for c in customers:
        scorer.add(c)
    assert scorer.scores(customers[-1]) == scorer.scores(RfmValues(19099, 5, 1000.0))
    assert scorer.scores(customers[-1]).segment == "Champions"
    assert scorer.scores(customers[0]).segment in ("Lost", "Hibernating")
    # the population moves: 100 newer, bigger customers push the old best down
    for i in range(100):
        scorer.add(RfmValues(20000 + i, 10, 5000.0))
    assert scorer.scores(customers[-1]).r <= 3
    scorer.replace(customers[-1], None)
    assert scorer.n == 199


def test_lifecycle_stages_and_won_back() -> None:
    t = LifecycleThresholds(at_risk_days=30, lapsed_days=60, won_back_days=20, vip_min_orders=4, vip_min_revenue=500)

    def stage(orders: int, revenue: float, days_ago: float | None, won_back: datetime | None = None) -> str:
        last = None if days_ago is None else NOW - timedelta(days=days_ago)
        return lifecycle_stage(LifecycleFacts(orders, revenue, last, won_back), t, NOW).stage

    assert stage(0, 0, None) == "prospect"
    assert stage(1, 10, 5) == "first_time_buyer" and stage(2, 10, 5) == "repeat"
    assert stage(4, 10, 5) == "vip" and stage(2, 600, 5) == "vip"
    assert stage(5, 900, 31) == "at_risk" and stage(5, 900, 61) == "lapsed"
    comeback = note_order(None, NOW - timedelta(days=100), NOW - timedelta(days=2), t)
    assert comeback == NOW - timedelta(days=2)
    assert stage(3, 100, 2, comeback) == "won_back"
    assert lifecycle_stage(LifecycleFacts(3, 100, NOW - timedelta(days=2), comeback), t,
                           NOW + timedelta(days=18)).stage == "repeat"
    assert note_order(None, NOW - timedelta(days=10), NOW, t) is None  # a short gap is not a comeback
    with pytest.raises(ValueError):
        LifecycleThresholds(at_risk_days=90, lapsed_days=30)


def test_lifecycle_next_change_times() -> None:
    t = LifecycleThresholds()
    last = NOW - timedelta(days=10)
    first = lifecycle_stage(LifecycleFacts(1, 10, last), t, NOW)
    assert first.changes_at == last + timedelta(days=90)
    risky = lifecycle_stage(LifecycleFacts(1, 10, last), t, last + timedelta(days=100))
    assert risky.stage == "at_risk" and risky.changes_at == last + timedelta(days=180)
    assert lifecycle_stage(LifecycleFacts(1, 10, last), t, last + timedelta(days=200)).changes_at is None


def test_delayed_labels_resolve_per_customer() -> None:
    obs = [Observation("c", NOW - timedelta(days=d), {}, 0.5) for d in (100, 60, 10)]
    labelled, waiting = resolve_labels(obs, order_at=NOW, now=NOW, label_days=90)
    # 100 days ago: the window closed before the order → churned; 60 and 10 days ago: ordered in the window
    assert sorted((round((NOW - o.observed_at).days), y) for o, y in labelled) == [(10, 0), (60, 0), (100, 1)]
    assert waiting == []
    labelled, waiting = resolve_labels(obs, order_at=None, now=NOW, label_days=90)
    assert [y for _, y in labelled] == [1] and len(waiting) == 2


def test_churn_model_learns_and_checkpoints_exactly() -> None:
    rng = random.Random(3)
    model = ChurnModel()
    stream = []
    for i in range(3000):
        active = rng.random() < 0.4
        days_since = rng.uniform(0, 30) if active else rng.uniform(60, 300)
        profile = {"orders_count": rng.randint(2, 9) if active else 1, "revenue_total": 100.0,
                   "first_order_at": (NOW - timedelta(days=400)).isoformat(),
                   "last_order_at": (NOW - timedelta(days=days_since)).isoformat()}
        stream.append((model.observe(f"c{i}", profile, NOW), 0 if active else 1))
    for obs, label in stream[:2000]:
        model.learn(obs, label)
    restored = ChurnModel.loads(model.dumps())
    assert restored.updates == model.updates == 2000
    for obs, label in stream[2000:]:
        model.learn(obs, label)
        restored.learn(obs, label)
    assert restored.scores() == model.scores()
    fresh = [(model.predict(obs.features), label) for obs, label in stream[:500]]
    assert roc_auc([y for _, y in fresh], [p for p, _ in fresh]) > 0.9
    assert 0 <= model.scores()["log_loss"] < 1


def test_churn_features_are_finite_for_empty_profiles() -> None:
    features = churn_features({}, NOW)
    assert all(isinstance(v, float) for v in features.values())
    assert features["orders"] == 0.0 and features["overdue_ratio"] == 0.0


def test_copurchases_are_idempotent_and_per_customer() -> None:
    cp = CoPurchases()
    cp.add_order("a", "o1", ["x", "y"])
    cp.add_order("a", "o2", ["x", "y", "z"])
    cp.add_order("a", "o2", ["x", "y", "z"])
    cp.add_order("b", "o3", ["x", "z"])
    assert cp.also_bought("x") == [("z", 2), ("y", 1)]
    cp.add_order("c", "o4", ["y"])
    assert cp.recommend_for("c") == [("x", 1), ("z", 1)]
    assert cp.recommend_for("nobody") == []


def test_offline_churn_comparison_on_the_cdnow_sample() -> None:
    """The online model (delayed labels, progressive validation) against 1 - P(alive) on the same customers
    and dates of the CDNOW sample; the full-log figures are in docs/segmenter.md."""
    from datetime import date
    from pathlib import Path

    import lifetimes.datasets

    from services.segmenter.domain.clv import parse_cdnow, purchase_days
    from services.segmenter.domain.evaluation import compare_churn_models, monthly_dates

    text = (Path(lifetimes.datasets.__file__).parent / "CDNOW_sample.txt").read_text()
    result = compare_churn_models(purchase_days(parse_cdnow(text.splitlines())),
                                  monthly_dates(date(1997, 2, 1), date(1998, 4, 1)))
    assert result.observations > 30_000 and result.dates[0] == "1997-02-01"
    assert result.online_auc_exact > result.bgnbd_auc + 0.2
    assert result.online_progressive_auc > result.bgnbd_auc
