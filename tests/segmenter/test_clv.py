"""BG/NBD and Gamma-Gamma against the published CDNOW estimates, and the holdout backtest."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from pathlib import Path

import lifetimes.datasets
import numpy as np
import pytest

from services.segmenter.domain.clv import (
    BgNbdParams,
    ClvModel,
    CustomerSummary,
    FitError,
    GammaGammaParams,
    Transaction,
    backtest,
    conditional_expected_purchases,
    expected_purchases,
    fit_bgnbd,
    fit_gamma_gamma,
    p_alive,
    parse_cdnow,
    predict,
    purchase_days,
    summarize,
)

SAMPLE = Path(lifetimes.datasets.__file__).parent / "CDNOW_sample.txt"
PUBLISHED = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426, "p": 6.25, "q": 3.74, "v": 15.44}


@pytest.fixture(scope="module")
def cdnow_days() -> dict[str, dict[date, float]]:
    return purchase_days(parse_cdnow(SAMPLE.read_text().splitlines()))


def test_cdnow_summaries_match_the_paper(cdnow_days: dict[str, dict[date, float]]) -> None:
    summaries = summarize(cdnow_days, date(1997, 9, 30), 7)
    assert len(summaries) == 2357
    assert sum(s.frequency for s in summaries) == 2457  # as in lifetimes' cdnow_customers_summary.csv
    assert max(s.T for s in summaries) == pytest.approx(272 / 7)


def test_fit_reproduces_published_estimates_within_one_percent(cdnow_days: dict[str, dict[date, float]]) -> None:
    summaries = summarize(cdnow_days, date(1997, 9, 30), 7)
    bg = fit_bgnbd(summaries)
    gg = fit_gamma_gamma(summaries)
    fitted = {"r": bg.r, "alpha": bg.alpha, "a": bg.a, "b": bg.b, "p": gg.p, "q": gg.q, "v": gg.v}
    for name, published in PUBLISHED.items():
        assert fitted[name] == pytest.approx(published, rel=0.01), (name, fitted[name])


def test_backtest_weeks_40_to_78(cdnow_days: dict[str, dict[date, float]]) -> None:
    result = backtest(cdnow_days, date(1997, 9, 30), date(1998, 6, 30), 7)
    assert [p.period for p in result.periods] == list(range(40, 79))
    assert result.periods[0].start == date(1997, 10, 1) and result.periods[-1].end == date(1998, 6, 30)
    assert result.actual_total == sum(p.actual for p in result.periods) == 1882
    assert result.predicted_total == pytest.approx(sum(p.predicted for p in result.periods))
    # The model's holdout forecast is within 15 % of what happened (1653 predicted vs 1882 actual).
    assert abs(result.predicted_total - result.actual_total) / result.actual_total < 0.15
    assert result.params["r"] == pytest.approx(PUBLISHED["r"], rel=0.01)
    assert result.customers == 2357 and len(result.per_customer) == 2357


def test_closed_forms_agree_with_lifetimes() -> None:
    import pandas as pd
    from lifetimes import BetaGeoFitter, GammaGammaFitter

    bg = BgNbdParams(0.243, 4.414, 0.793, 2.426)
    ref = BetaGeoFitter()
    ref.params_ = pd.Series({"r": bg.r, "alpha": bg.alpha, "a": bg.a, "b": bg.b})
    people = [CustomerSummary("a", 2, 30.43, 38.86, 22.35), CustomerSummary("b", 0, 0, 38.86),
              CustomerSummary("c", 7, 35.0, 38.0, 40.0)]
    for person in people:
        assert p_alive(bg, person)[0] == pytest.approx(
            float(np.asarray(ref.conditional_probability_alive(person.frequency, person.recency, person.T)).item()))
        assert conditional_expected_purchases(bg, person, 39)[0] == pytest.approx(
            ref.conditional_expected_number_of_purchases_up_to_time(39, person.frequency, person.recency, person.T))
    assert float(expected_purchases(bg, 39)) == pytest.approx(float(ref.expected_number_of_purchases_up_to_time(39)))
    gg = GammaGammaParams(6.25, 3.74, 15.44)
    gref = GammaGammaFitter()
    gref.params_ = pd.Series({"p": gg.p, "q": gg.q, "v": gg.v})
    model = ClvModel(bg, gg, 7.0, "t")
    out = predict(model, people, datetime(1997, 9, 30, tzinfo=UTC))
    expected_value = float(gref.conditional_expected_average_profit(pd.Series([2]), pd.Series([22.35])).iloc[0])
    assert out[0].predicted_clv_365d == pytest.approx(out[0].expected_orders_90d * 0 + float(
        conditional_expected_purchases(bg, people[0], 365 / 7)[0]) * expected_value)
    assert out[1].p_alive == 1.0 and out[0].expected_next_order_at is not None


def test_next_order_moment_is_when_half_an_order_is_expected() -> None:
    bg = BgNbdParams(0.243, 4.414, 0.793, 2.426)
    busy = CustomerSummary("busy", 20, 38.0, 38.5, 30.0)
    out = predict(ClvModel(bg, None, 7.0, "t"), [busy], datetime(2024, 1, 1, tzinfo=UTC))[0]
    assert out.expected_next_order_at is not None and out.predicted_clv_365d is None
    weeks = (out.expected_next_order_at - datetime(2024, 1, 1, tzinfo=UTC)).total_seconds() / 86400 / 7
    assert conditional_expected_purchases(bg, busy, weeks)[0] == pytest.approx(0.5, abs=0.02)


def test_fits_refuse_data_that_cannot_support_them() -> None:
    with pytest.raises(FitError):
        fit_bgnbd([CustomerSummary(str(i), 0, 0, 10) for i in range(50)])
    with pytest.raises(FitError):
        fit_gamma_gamma([CustomerSummary("a", 1, 1, 2, 10.0)])
    with pytest.raises(ValueError):
        backtest({"a": {date(2024, 1, 1): 1.0}}, date(2024, 2, 1), date(2024, 1, 1))


def test_same_day_purchases_count_once() -> None:
    days = purchase_days([Transaction("a", date(2024, 1, 1), 5.0), Transaction("a", date(2024, 1, 1), 7.0),
                          Transaction("a", date(2024, 1, 8), 3.0)])
    (summary,) = summarize(days, date(2024, 1, 15), 7)
    assert summary.frequency == 1 and summary.monetary_value == 3.0 and math.isclose(summary.T, 2.0)
