"""Segmenter metrics (``loyalist_segmenter_`` prefix, base units)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from loyalist.metrics import LATENCY_BUCKETS

INPUTS = Counter("loyalist_segmenter_inputs_total", "Stream inputs handled", ["topic", "outcome"])
EVALUATIONS = Counter("loyalist_segmenter_segment_evaluations_total", "Segment rules evaluated for a customer")
DECISION_DURATION = Histogram("loyalist_segmenter_decision_duration_seconds",
                              "Time to decide and apply one customer's memberships", buckets=LATENCY_BUCKETS)
MEMBERSHIP_CHANGES = Counter("loyalist_segmenter_membership_changes_total", "segment.entered/exited emitted",
                             ["change"])
SCHEDULER_LAG = Histogram("loyalist_segmenter_scheduler_lag_seconds",
                          "Delay between a due time-triggered evaluation and its execution", buckets=LATENCY_BUCKETS)
RFM_DRIFT = Counter("loyalist_segmenter_rfm_sketch_drift_total",
                    "Profile updates whose previous RFM values were not in the population sketches (one stale value "
                    "stays counted until the next restart rebuilds them)")
SEGMENTS = Gauge("loyalist_segmenter_segments", "Live rule segments")
SEGMENT_MEMBERS = Gauge("loyalist_segmenter_segment_members",
                        "Customers in a rule segment (kept with every change, recounted from the store regularly)",
                        ["segment_id", "segment_name"])
PREDICTIONS_WRITTEN = Counter("loyalist_segmenter_predictions_written_total",
                              "Predictions Updated events produced (material changes only)")
CLV_REFITS = Counter("loyalist_segmenter_clv_refits_total", "CLV model refits", ["outcome"])
CHURN_UPDATES = Counter("loyalist_segmenter_churn_model_updates_total", "Labelled observations learned")
CHURN_AUC = Gauge("loyalist_segmenter_churn_progressive_roc_auc", "Progressive-validation ROC AUC of the churn model")
CHURN_LOG_LOSS = Gauge("loyalist_segmenter_churn_progressive_log_loss",
                       "Progressive-validation log loss of the churn model")
