"""The models at run time: the online churn model (observations, delayed labels, checkpoints) and the CLV
refit with prediction write-back, plus the backtest over the stored orders.

Churn learning neither loses nor repeats an update across restarts: labelled observations are learned in
batches; each batch ends with one checkpoint (model + the keys of the observations it learned, version + 1)
and only then are those pending observations deleted. At start the latest checkpoint is loaded and the
observations it lists are deleted again (in case the crash came between checkpoint and deletes); any
observation still pending was not in a checkpoint, so it is learned once more from the restored model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from services.segmenter import metrics
from services.segmenter.config import SegmenterConfig
from services.segmenter.domain.churn import ChurnModel, Observation, churn_features, resolve_labels
from services.segmenter.domain.clv import (
    BacktestResult,
    ClvModel,
    backtest,
    fit_bgnbd,
    fit_gamma_gamma,
    predict,
    summarize,
)
from services.segmenter.domain.rules import parse_datetime
from services.segmenter.engine import SegmenterEngine, iso
from services.segmenter.store import SegmenterStore

log = logging.getLogger(__name__)

CHURN = "churn"
CLV = "clv"
# Customers whose predictions a refit reads and writes together.
PREDICTIONS_PAGE = 500


def _ordered(document: dict[str, Any], old_document: dict[str, Any]) -> bool:
    """Whether this update brought a new order."""
    last_order = parse_datetime(document.get("last_order_at"))
    return last_order is not None and last_order != parse_datetime(old_document.get("last_order_at"))


def _ms(when: datetime) -> datetime:
    # Cassandra timestamps keep milliseconds; keys must round-trip exactly.
    return when.replace(microsecond=(when.microsecond // 1000) * 1000)


class ModelRuntime:
    def __init__(self, engine: SegmenterEngine, store: SegmenterStore, config: SegmenterConfig) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        self.churn = ChurnModel()
        self.churn_version = 0
        self.clv: ClvModel | None = None
        self._learn_lock = asyncio.Lock()
        self._queue: dict[tuple[str, datetime], tuple[Observation, int]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        # profile id -> when its latest pending churn observation was taken (what the store would say)
        self._latest_observed: dict[str, datetime] = {}

    async def start(self) -> None:
        latest = await self.store.latest_model(CHURN)
        if latest is not None:
            version, data, meta = latest
            self.churn = ChurnModel.loads(data)
            self.churn_version = version
            for profile_id, observed in meta.get("batch", []):
                when = parse_datetime(observed)
                if when is not None:
                    await self.store.delete_observation(profile_id, when)
        clv = await self.store.latest_model(CLV)
        if clv is not None:
            import orjson

            self.clv = ClvModel.from_dict(orjson.loads(clv[1]))
        self._publish_metrics()
        self._tasks.append(asyncio.create_task(self._loop(), name="models"))

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- churn -----------------------------------------------------------------------------------
    async def observe(self, profile_id: str, document: dict[str, Any], old_document: dict[str, Any]) -> float:
        """Resolve this customer's pending observations against a new order, maybe record a new observation,
        and return the current churn probability."""
        now = _ms(datetime.now(UTC))
        last_order = parse_datetime(document.get("last_order_at"))
        ordered = last_order is not None and last_order != parse_datetime(old_document.get("last_order_at"))
        interval = timedelta(days=self.config.churn_observation_interval_days)
        recent = self._latest_observed.get(profile_id)
        if not ordered and recent is not None and now - recent < interval:
            # Nothing to label and observed lately: most profile updates end here, without a store round trip.
            return self.churn.observe(profile_id, document, now).prediction
        pending = await self.store.observations(profile_id)
        if ordered and pending:
            observations = [Observation(p["profile_id"], p["observed_at"], p["features"], p["prediction"])
                            for p in pending]
            labelled, _ = resolve_labels(observations, last_order, now, self.config.churn_label_days)
            for obs, label in labelled:
                self._queue[(obs.profile_id, obs.observed_at)] = (obs, label)
        observation = self.churn.observe(profile_id, document, now)
        latest = max((p["observed_at"] for p in pending), default=None)
        if ordered or latest is None or now - latest >= interval:
            await self.store.add_observation(profile_id, now, observation.features, observation.prediction)
            latest = now
        self._remember_observed(profile_id, latest)
        return observation.prediction

    async def observe_many(self, updates: Sequence[tuple[str, dict[str, Any], dict[str, Any]]],
                           new_profiles: frozenset[str] = frozenset()) -> dict[str, float]:
        """:meth:`observe` for a batch of profile updates (profile id, new document, previous document), in
        order, with the pending observations of the customers that need them read together and the new
        observations written together. ``new_profiles`` were never seen before (no observation to read).
        Returns each customer's latest churn probability."""
        now = _ms(datetime.now(UTC))
        interval = timedelta(days=self.config.churn_observation_interval_days)
        need: set[str] = set()
        for profile_id, document, old_document in updates:
            recent = self._latest_observed.get(profile_id)
            if recent is None or now - recent >= interval or _ordered(document, old_document):
                need.add(profile_id)
        pending: dict[str, list[dict[str, Any]]] = {pid: [] for pid in need & new_profiles}
        to_read = sorted(need - new_profiles)
        if to_read:
            pending.update(await self.store.observations_many(to_read))
        rows = []
        probabilities: dict[str, float] = {}
        remembered: dict[str, datetime] = {}
        for profile_id, document, old_document in updates:
            observation = self.churn.observe(profile_id, document, now)
            probabilities[profile_id] = observation.prediction
            ordered = _ordered(document, old_document)
            recent = remembered.get(profile_id) or self._latest_observed.get(profile_id)
            if profile_id not in pending or (not ordered and recent is not None and now - recent < interval):
                continue
            waiting = pending[profile_id]
            if ordered and waiting:
                last_order = parse_datetime(document.get("last_order_at"))
                observations = [Observation(p["profile_id"], p["observed_at"], p["features"], p["prediction"])
                                for p in waiting]
                labelled, _ = resolve_labels(observations, last_order, now, self.config.churn_label_days)
                for obs, label in labelled:
                    self._queue[(obs.profile_id, obs.observed_at)] = (obs, label)
            latest = max((p["observed_at"] for p in waiting), default=None)
            if ordered or latest is None or now - latest >= interval:
                rows.append(self.store.observation_row(profile_id, now, observation.features,
                                                       observation.prediction))
                waiting[:] = [p for p in waiting if p["observed_at"] != now]
                waiting.append({"profile_id": profile_id, "observed_at": now, "features": observation.features,
                                "prediction": observation.prediction})
                latest = now
            if latest is not None:
                remembered[profile_id] = latest
        await self.store.write(rows)
        # Only once written: a failed write is retried from the start and must not take the fast path.
        for profile_id, latest in remembered.items():
            self._remember_observed(profile_id, latest)
        return probabilities

    def _remember_observed(self, profile_id: str, at: datetime) -> None:
        # Bounded: a forgotten profile only costs one store read on its next update.
        if len(self._latest_observed) >= 500_000:
            self._latest_observed.clear()
        self._latest_observed[profile_id] = at

    async def learn_pending(self) -> int:
        """Label the observations whose window passed with no order, then learn every queued label as one
        checkpointed batch. Returns how many were learned."""
        now = datetime.now(UTC)
        async for row in self.store.all_observations():
            if now >= row["observed_at"] + timedelta(days=self.config.churn_label_days):
                obs = Observation(row["profile_id"], row["observed_at"], row["features"], row["prediction"])
                self._queue.setdefault((obs.profile_id, obs.observed_at), (obs, 1))
        return await self.flush()

    async def flush(self) -> int:
        async with self._learn_lock:
            if not self._queue:
                return 0
            batch = sorted(self._queue.values(), key=lambda item: item[0].observed_at)
            self._queue.clear()
            for obs, label in batch:
                self.churn.learn(obs, label)
            self.churn_version += 1
            keys = [[obs.profile_id, iso(obs.observed_at)] for obs, _ in batch]
            await self.store.save_model(CHURN, self.churn_version, self.churn.dumps(),
                                        {"batch": keys, **self.churn.scores()})
            for obs, _ in batch:
                await self.store.delete_observation(obs.profile_id, obs.observed_at)
            metrics.CHURN_UPDATES.inc(len(batch))
            self._publish_metrics()
            return len(batch)

    def _publish_metrics(self) -> None:
        scores = self.churn.scores()
        if self.churn.updates:
            if scores["roc_auc"] is not None:
                metrics.CHURN_AUC.set(scores["roc_auc"])
            if scores["log_loss"] is not None:
                metrics.CHURN_LOG_LOSS.set(scores["log_loss"])

    # ---- CLV -------------------------------------------------------------------------------------
    async def _days_by_customer(self, population: tuple[str, Any] | None = None
                                ) -> dict[str, dict[date, float]]:
        """Spend per purchase day per customer, from one scan of the stored orders (and, with a population
        filter, one scan of the stored profiles)."""
        allowed: set[str] | None = None
        if population is not None:
            allowed = set()
            async for stored in self.store.all_profiles():
                if (stored.document.get("traits") or {}).get(population[0]) == population[1]:
                    allowed.add(stored.profile_id)
        days: dict[str, dict[date, float]] = defaultdict(lambda: defaultdict(float))
        async for order in self.store.all_orders():
            if allowed is not None and order["profile_id"] not in allowed:
                continue
            days[order["profile_id"]][order["ts"].date()] += float(order["amount"] or 0.0)
        return days

    async def backtest(self, calibration_end: date, holdout_end: date, period_days: int,
                       population: tuple[str, Any] | None, per_customer_limit: int) -> BacktestResult:
        days = await self._days_by_customer(population)
        return await asyncio.to_thread(backtest, days, calibration_end, holdout_end, period_days,
                                       per_customer_limit=per_customer_limit)

    async def refit_and_predict(self) -> dict[str, Any]:
        """Refit BG/NBD + Gamma-Gamma over every customer's orders up to today and write material changes
        of the predictions (with the churn probability) back to the profiles."""
        started = time.monotonic()
        now = datetime.now(UTC)
        days = await self._days_by_customer()
        period = self.config.clv_period_days
        summaries = summarize(days, now.date(), period)
        try:
            bg = await asyncio.to_thread(fit_bgnbd, summaries)
        except Exception:
            metrics.CLV_REFITS.labels("failed").inc()
            raise
        try:
            gg = await asyncio.to_thread(fit_gamma_gamma, summaries)
        except Exception:
            gg = None
        version = int(now.timestamp())
        model = ClvModel(bg, gg, float(period), f"clv-{version}")
        import orjson

        await self.store.save_model(CLV, version, orjson.dumps(model.to_dict()), {"customers": len(summaries)})
        self.clv = model
        metrics.CLV_REFITS.labels("ok").inc()
        predictions = await asyncio.to_thread(predict, model, summaries, now)
        written = 0
        # A page of customers at a time: their rows read together (the churn features), their changed
        # predictions written and published together.
        for start in range(0, len(predictions), PREDICTIONS_PAGE):
            page = predictions[start:start + PREDICTIONS_PAGE]
            stored_rows = await self.store.profiles([p.customer_id for p in page])
            new: dict[str, dict[str, Any]] = {}
            for p in page:
                stored = stored_rows.get(p.customer_id)
                if stored is None or stored.deleted:
                    continue
                values: dict[str, Any] = {
                    "p_alive": round(p.p_alive, 4),
                    "expected_orders_90d": round(p.expected_orders_90d, 4),
                    "predicted_clv_365d": None if p.predicted_clv_365d is None else round(p.predicted_clv_365d, 2),
                    "expected_next_order_at": None if p.expected_next_order_at is None
                    else iso(p.expected_next_order_at),
                }
                if self.churn.updates >= self.config.churn_min_updates_to_publish:
                    values["churn_probability"] = round(self.churn.predict(churn_features(stored.document, now)), 4)
                new[p.customer_id] = values
            written += await self.engine.write_predictions_many(new, f"{model.version}+churn-v{self.churn_version}")
        return {"model_version": model.version, "customers": len(summaries),
                "params": {**model.to_dict()["bgnbd"], **(model.to_dict()["gamma_gamma"] or {})},
                "predictions_written": written, "took_s": round(time.monotonic() - started, 3)}

    async def status(self) -> dict[str, Any]:
        return {
            "churn": {"version": self.churn_version, "label_days": self.config.churn_label_days,
                      **self.churn.scores()},
            "clv": None if self.clv is None else self.clv.to_dict(),
        }

    async def _loop(self) -> None:
        last_refit = last_scan = time.monotonic()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            try:
                await self.flush()
                if time.monotonic() - last_scan >= self.config.churn_label_scan_interval_s:
                    last_scan = time.monotonic()
                    await self.learn_pending()
                interval = self.config.clv_refit_interval_s
                if interval > 0 and time.monotonic() - last_refit >= interval:
                    last_refit = time.monotonic()
                    await self.learn_pending()
                    await self.refit_and_predict()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model loop pass failed")
