"""Segmenter settings (env ``LOYALIST_SEGMENTER_*``), next to the shared ``loyalist.settings.Settings``."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from services.segmenter.domain.lifecycle import LifecycleThresholds


class SegmenterConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALIST_SEGMENTER_", extra="ignore")

    # How often the durable scheduler looks for due re-evaluations.
    scheduler_poll_s: float = 1.0
    scheduler_batch: int = 500
    # Track events kept for event-count rules (orders are kept for CLV, backtests and recommendations).
    event_retention_days: int = 400
    # Lifecycle thresholds (docs/segmenter.md).
    at_risk_days: float = 90.0
    lapsed_days: float = 180.0
    won_back_days: float = 90.0
    vip_min_orders: int = 5
    vip_min_revenue: float = 1000.0
    # Churn label: no order within this many days of an observation.
    churn_label_days: float = 90.0
    # Observe a customer for the churn model at most this often (days); every order is observed.
    churn_observation_interval_days: float = 7.0
    # An untrained model says 0.5 for everyone: publish churn probabilities only after this many updates.
    churn_min_updates_to_publish: int = 50
    # How often observations whose label window closed without an order are labelled "churned".
    churn_label_scan_interval_s: float = 60.0
    # CLV refit and prediction write-back; 0 disables the periodic refit.
    clv_refit_interval_s: float = 24 * 3600.0
    clv_period_days: int = 7
    # Write predictions back only when they move at least this much (stops feedback loops).
    prediction_min_probability_change: float = 0.05
    prediction_min_relative_change: float = 0.10
    backfill_page: int = 500
    # Segment sizes (loyalist_segmenter_segment_members) are recounted from the store this often.
    member_count_interval_s: float = 60.0

    def lifecycle(self) -> LifecycleThresholds:
        return LifecycleThresholds(self.at_risk_days, self.lapsed_days, self.won_back_days, self.vip_min_orders,
                                   self.vip_min_revenue)
