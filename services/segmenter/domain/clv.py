"""Customer lifetime value: BG/NBD (Fader, Hardie & Lee 2005) for purchase counts and P(alive), and
Gamma-Gamma (Fader, Hardie & Lee 2005, "RFM and CLV") for the value of a purchase.

The log-likelihoods are the published ones, evaluated in log space with ``gammaln`` and fitted with
``scipy.optimize.minimize`` over log-parameters (so every parameter stays positive). Identical customer
rows are grouped and weighted, so a fit over a large population costs no more than its distinct rows.

Time is measured in *periods* (``period_days``, 7 = weeks, as in the paper). Same-day purchases count once.

>>> summary = [CustomerSummary("a", 2, 30.43, 38.86, 22.35), CustomerSummary("b", 0, 0.0, 38.86, 0.0)]
>>> params = BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
>>> [round(float(v), 3) for v in p_alive(params, summary)]
[0.727, 1.0]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize
from scipy.special import gammaln, hyp2f1

Array = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class CustomerSummary:
    """The RFM summary BG/NBD needs: repeat purchase days ``frequency``, the age at the last purchase
    ``recency`` and the age at the end of observation ``T`` (both in periods), and the mean value of the
    repeat purchases ``monetary_value`` (0 without repeats)."""

    customer_id: str
    frequency: int
    recency: float
    T: float
    monetary_value: float = 0.0


@dataclass(frozen=True, slots=True)
class BgNbdParams:
    r: float
    alpha: float
    a: float
    b: float


@dataclass(frozen=True, slots=True)
class GammaGammaParams:
    p: float
    q: float
    v: float


class FitError(ValueError):
    """The data cannot support a fit (too few customers, no repeat purchases...)."""


# ---- BG/NBD ----------------------------------------------------------------------------------------


def bgnbd_log_likelihood(params: BgNbdParams, x: Array, t_x: Array, T: Array) -> Array:
    """Per-customer log-likelihood, equation (6) of Fader, Hardie & Lee (2005), in log space."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
    a3 = -(r + x) * np.log(alpha + T)
    repeat = x > 0
    # log(a / (b + x - 1)) - (r + x) log(alpha + t_x), only defined for repeat buyers
    a4 = np.where(
        repeat,
        np.log(a) - np.log(np.where(repeat, b + x - 1, 1.0)) - (r + x) * np.log(alpha + t_x),
        -np.inf,
    )
    return np.asarray(a1 + a2 + np.logaddexp(a3, a4), dtype=np.float64)


def _grouped(summaries: Sequence[CustomerSummary], key: Callable[[CustomerSummary], tuple[float, ...]]
             ) -> tuple[Array, Array]:
    counts: dict[tuple[float, ...], int] = defaultdict(int)
    for s in summaries:
        counts[key(s)] += 1
    rows = np.array(list(counts.keys()), dtype=np.float64)
    weights = np.array(list(counts.values()), dtype=np.float64)
    return rows, weights


def fit_bgnbd(summaries: Sequence[CustomerSummary]) -> BgNbdParams:
    """Maximum-likelihood BG/NBD parameters.

    Raises :class:`FitError` when fewer than 10 customers or no repeat purchase make the fit meaningless.
    """
    if len(summaries) < 10:
        raise FitError("BG/NBD needs at least 10 customers")
    if not any(s.frequency > 0 for s in summaries):
        raise FitError("BG/NBD needs at least one repeat purchase")
    rows, weights = _grouped(summaries, lambda s: (s.frequency, s.recency, s.T))
    x, t_x, T = rows[:, 0], rows[:, 1], rows[:, 2]
    total = weights.sum()

    def negative_ll(log_params: Array) -> float:
        params = BgNbdParams(*np.exp(log_params))
        value = -float((weights * bgnbd_log_likelihood(params, x, t_x, T)).sum()) / total
        return value if math.isfinite(value) else 1e12

    result = _minimize(negative_ll, np.zeros(4))
    return BgNbdParams(*(float(v) for v in np.exp(result)))


def _minimize(objective: Callable[[Array], float], start: Array) -> Array:
    # Nelder-Mead is robust on these likelihoods; a quasi-Newton polish then tightens the optimum.
    first = minimize(objective, start, method="Nelder-Mead",
                     options={"maxiter": 10_000, "xatol": 1e-8, "fatol": 1e-12})
    polished = minimize(objective, first.x, method="BFGS", options={"gtol": 1e-8})
    best = polished.x if polished.fun <= first.fun else first.x
    return np.asarray(best, dtype=np.float64)


def _features(summaries: CustomerSummary | Sequence[CustomerSummary]) -> tuple[Array, Array, Array]:
    items = [summaries] if isinstance(summaries, CustomerSummary) else list(summaries)
    x = np.array([s.frequency for s in items], dtype=np.float64)
    t_x = np.array([s.recency for s in items], dtype=np.float64)
    T = np.array([s.T for s in items], dtype=np.float64)
    return x, t_x, T


def _log_dead_odds(params: BgNbdParams, x: Array, t_x: Array, T: Array) -> Array:
    """log of a/(b+x-1) * ((alpha+T)/(alpha+t_x))^(r+x), the odds of having dropped out (repeat buyers)."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    safe = np.where(x > 0, b + x - 1, 1.0)
    return np.asarray(np.log(a) - np.log(safe) + (r + x) * (np.log(alpha + T) - np.log(alpha + t_x)))


def p_alive(params: BgNbdParams, summaries: CustomerSummary | Sequence[CustomerSummary]) -> Array:
    """P(alive | x, t_x, T), equation (13)."""
    x, t_x, T = _features(summaries)
    log_ratio = _log_dead_odds(params, x, t_x, T)
    return np.where(x > 0, 1.0 / (1.0 + np.exp(log_ratio)), 1.0)


def expected_purchases(params: BgNbdParams, t: float | Array) -> Array:
    """Unconditional E[X(t)] for a new customer, equation (9)."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    t = np.asarray(t, dtype=np.float64)
    z = t / (alpha + t)
    return np.asarray((a + b - 1) / (a - 1) * (1 - (alpha / (alpha + t)) ** r * hyp2f1(r, b, a + b - 1, z)))


def conditional_expected_purchases(params: BgNbdParams, summaries: CustomerSummary | Sequence[CustomerSummary],
                                   t: float | Array) -> Array:
    """E[Y(t) | x, t_x, T]: expected purchases in the next ``t`` periods, equation (10)."""
    x, t_x, T = _features(summaries)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    t_arr = np.asarray(t, dtype=np.float64)
    z = t_arr / (alpha + T + t_arr)
    head = (a + b + x - 1) / (a - 1)
    tail = 1 - ((alpha + T) / (alpha + T + t_arr)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1, z)
    log_ratio = _log_dead_odds(params, x, t_x, T)
    denominator = 1 + np.where(x > 0, np.exp(log_ratio), 0.0)
    return np.asarray(head * tail / denominator)


def time_to_expected_order(params: BgNbdParams, summaries: Sequence[CustomerSummary], *, horizon: float,
                           target: float = 0.5) -> Array:
    """For each customer, the time (in periods) after which ``target`` purchases are expected (the
    moment the next order becomes as likely as not, for target 0.5); NaN if not within ``horizon``."""
    x, _, _ = _features(summaries)
    if not len(x):
        return np.array([], dtype=np.float64)
    reachable = conditional_expected_purchases(params, summaries, horizon) >= target
    low = np.zeros_like(x)
    high = np.full_like(x, horizon)
    for _ in range(50):  # bisection, all customers at once
        mid = (low + high) / 2
        above = conditional_expected_purchases(params, summaries, mid) >= target
        high = np.where(above, mid, high)
        low = np.where(above, low, mid)
    return np.where(reachable, high, np.nan)


# ---- Gamma-Gamma -----------------------------------------------------------------------------------


def gamma_gamma_log_likelihood(params: GammaGammaParams, x: Array, m: Array) -> Array:
    """Per-customer log-likelihood of the mean repeat value ``m`` over ``x`` repeat purchases."""
    p, q, v = params.p, params.q, params.v
    return np.asarray(
        gammaln(p * x + q) - gammaln(p * x) - gammaln(q) + q * np.log(v) + (p * x - 1) * np.log(m)
        + p * x * np.log(x) - (p * x + q) * np.log(x * m + v)
    )


def fit_gamma_gamma(summaries: Sequence[CustomerSummary]) -> GammaGammaParams:
    """Maximum-likelihood Gamma-Gamma parameters over the customers with repeat purchases."""
    repeaters = [s for s in summaries if s.frequency > 0 and s.monetary_value > 0]
    if len(repeaters) < 10:
        raise FitError("Gamma-Gamma needs at least 10 customers with repeat purchases")
    rows, weights = _grouped(repeaters, lambda s: (s.frequency, s.monetary_value))
    x, m = rows[:, 0], rows[:, 1]
    total = weights.sum()

    def negative_ll(log_params: Array) -> float:
        params = GammaGammaParams(*np.exp(log_params))
        value = -float((weights * gamma_gamma_log_likelihood(params, x, m)).sum()) / total
        return value if math.isfinite(value) else 1e12

    result = _minimize(negative_ll, np.zeros(3))
    return GammaGammaParams(*(float(v) for v in np.exp(result)))


def expected_average_value(params: GammaGammaParams, summaries: Sequence[CustomerSummary]) -> Array:
    """E[M | x, m]: a weighted mean of the population mean and the customer's own mean."""
    p, q, v = params.p, params.q, params.v
    x = np.array([s.frequency for s in summaries], dtype=np.float64)
    m = np.array([s.monetary_value for s in summaries], dtype=np.float64)
    population_mean = p * v / (q - 1) if q > 1 else np.nan
    return np.where(x > 0, (p * (v + x * m)) / (p * x + q - 1), population_mean)


# ---- predictions per customer ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClvModel:
    bgnbd: BgNbdParams
    gamma_gamma: GammaGammaParams | None
    period_days: float
    version: str

    def to_dict(self) -> dict[str, Any]:
        return {"bgnbd": asdict(self.bgnbd), "gamma_gamma": asdict(self.gamma_gamma) if self.gamma_gamma else None,
                "period_days": self.period_days, "version": self.version}

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> ClvModel:
        gg = raw.get("gamma_gamma")
        return ClvModel(BgNbdParams(**raw["bgnbd"]), GammaGammaParams(**gg) if gg else None,
                        float(raw["period_days"]), str(raw["version"]))


@dataclass(frozen=True, slots=True)
class ClvPrediction:
    customer_id: str
    p_alive: float
    expected_orders_90d: float
    predicted_clv_365d: float | None
    expected_next_order_at: datetime | None


def predict(model: ClvModel, summaries: Sequence[CustomerSummary], now: datetime) -> list[ClvPrediction]:
    """P(alive), expected orders in 90 days, 365-day value (expected orders x expected order value,
    undiscounted) and the moment the next order becomes as likely as not, per customer."""
    if not summaries:
        return []
    per = model.period_days
    alive = p_alive(model.bgnbd, summaries)
    orders_90 = conditional_expected_purchases(model.bgnbd, summaries, 90 / per)
    orders_365 = conditional_expected_purchases(model.bgnbd, summaries, 365 / per)
    values = expected_average_value(model.gamma_gamma, summaries) if model.gamma_gamma else None
    waits = time_to_expected_order(model.bgnbd, summaries, horizon=5 * 365 / per)
    out = []
    for i, s in enumerate(summaries):
        clv = None if values is None or not math.isfinite(values[i]) else float(orders_365[i] * values[i])
        wait = waits[i]
        out.append(ClvPrediction(
            s.customer_id, float(alive[i]), float(orders_90[i]), clv,
            None if not math.isfinite(wait) else now + timedelta(days=float(wait) * per),
        ))
    return out


# ---- transactions → summaries, and the backtest ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transaction:
    customer_id: str
    at: datetime | date
    amount: float


def _day(value: datetime | date) -> date:
    return value.date() if isinstance(value, datetime) else value


def purchase_days(transactions: Iterable[Transaction]) -> dict[str, dict[date, float]]:
    """Per customer, the spend per purchase day (same-day purchases count once, their values summed)."""
    days: dict[str, dict[date, float]] = defaultdict(lambda: defaultdict(float))
    for t in transactions:
        days[t.customer_id][_day(t.at)] += t.amount
    return days


def summarize(days_by_customer: Mapping[str, Mapping[date, float]], calibration_end: date, period_days: float
              ) -> list[CustomerSummary]:
    """Calibration summaries of every customer whose first purchase day is on or before ``calibration_end``.
    The monetary value is the mean spend of the repeat purchase days (the first purchase is excluded)."""
    out = []
    for customer, spend_by_day in days_by_customer.items():
        days = sorted(d for d in spend_by_day if d <= calibration_end)
        if not days:
            continue
        first, last = days[0], days[-1]
        repeats = days[1:]
        out.append(CustomerSummary(
            customer,
            len(repeats),
            (last - first).days / period_days,
            (calibration_end - first).days / period_days,
            sum(spend_by_day[d] for d in repeats) / len(repeats) if repeats else 0.0,
        ))
    return out


@dataclass
class PeriodComparison:
    period: int  # 1-based period number counted from the first purchase day in the data
    start: date
    end: date
    predicted: float
    actual: int


@dataclass
class BacktestResult:
    customers: int
    params: dict[str, float]
    periods: list[PeriodComparison]
    predicted_total: float
    actual_total: int
    per_customer: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "customers": self.customers,
            "params": self.params,
            "predicted_total": round(self.predicted_total, 4),
            "actual_total": self.actual_total,
            "periods": [
                {"period": p.period, "start": p.start.isoformat(), "end": p.end.isoformat(),
                 "predicted": round(p.predicted, 4), "actual": p.actual}
                for p in self.periods
            ],
            "per_customer": self.per_customer,
        }


def backtest(days_by_customer: Mapping[str, Mapping[date, float]], calibration_end: date, holdout_end: date,
             period_days: int = 7, *, per_customer_limit: int | None = None) -> BacktestResult:
    """Fit on purchases up to ``calibration_end`` and compare the predicted repeat purchases (conditional
    expectation per customer) with the actual purchase days in each holdout period, per customer and in
    total. Periods are numbered from the earliest purchase day, so on CDNOW weeks 40-78 are the holdout."""
    if holdout_end <= calibration_end:
        raise ValueError("holdout_end must be after calibration_end")
    if period_days <= 0:
        raise ValueError("period_days must be positive")
    summaries = summarize(days_by_customer, calibration_end, period_days)
    bg = fit_bgnbd(summaries)
    try:
        gg: GammaGammaParams | None = fit_gamma_gamma(summaries)
    except FitError:
        gg = None
    origin = min(min(days) for days in days_by_customer.values() if days)
    boundaries: list[date] = []
    cursor = calibration_end
    while cursor < holdout_end:
        cursor = min(cursor + timedelta(days=period_days), holdout_end)
        boundaries.append(cursor)
    horizon = np.array([(b - calibration_end).days / period_days for b in boundaries])
    predicted_cumulative = np.stack([conditional_expected_purchases(bg, summaries, h) for h in horizon], axis=1)
    periods: list[PeriodComparison] = []
    previous = calibration_end
    actual_by_customer = []
    for summary in summaries:
        spend = days_by_customer[summary.customer_id]
        actual_by_customer.append([d for d in spend if calibration_end < d <= holdout_end])
    for k, boundary in enumerate(boundaries):
        predicted = predicted_cumulative[:, k] - (predicted_cumulative[:, k - 1] if k else 0.0)
        actual = sum(1 for days in actual_by_customer for d in days if previous < d <= boundary)
        start = previous + timedelta(days=1)
        number = (start - origin).days // period_days + 1
        periods.append(PeriodComparison(int(number), start, boundary,
                                        float(predicted.sum()), actual))
        previous = boundary
    per_customer = [
        {"customer_id": s.customer_id, "frequency": s.frequency, "recency": round(s.recency, 4), "T": round(s.T, 4),
         "predicted": round(float(predicted_cumulative[i, -1]), 4), "actual": len(actual_by_customer[i])}
        for i, s in enumerate(summaries)
    ]
    if per_customer_limit is not None:
        per_customer = per_customer[:per_customer_limit]
    params = {"r": bg.r, "alpha": bg.alpha, "a": bg.a, "b": bg.b}
    if gg is not None:
        params.update({"p": gg.p, "q": gg.q, "v": gg.v})
    return BacktestResult(
        len(summaries), params, periods, float(predicted_cumulative[:, -1].sum()),
        sum(len(a) for a in actual_by_customer), per_customer,
    )


def parse_cdnow(lines: Iterable[str]) -> list[Transaction]:
    """The CDNOW files of the ``lifetimes`` package: the sample's lines are ``master_id  sample_id  YYYYMMDD
    quantity  spend`` (the sample id is used), the master file's ``id  YYYYMMDD  quantity  spend`` after a
    header line (skipped).

    >>> parse_cdnow([" 00004 0001 19970101  2   29.33"])
    [Transaction(customer_id='0001', at=datetime.date(1997, 1, 1), amount=29.33)]
    """
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        customer = parts[1] if len(parts) >= 5 else parts[0]
        stamp = parts[-3]
        if not stamp.isdigit() or len(stamp) != 8:
            continue
        out.append(Transaction(customer, date(int(stamp[:4]), int(stamp[4:6]), int(stamp[6:8])), float(parts[-1])))
    return out
