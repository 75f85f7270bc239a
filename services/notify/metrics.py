"""Notify's Prometheus families (``loyalist_notify_*``, base units, ``_total`` counters)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# From request (or the triggering event, when journeys pass it) to the provider's acceptance.
_DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)

SENT = Counter("loyalist_notify_sent_total", "Messages accepted by the provider", ["channel", "category"])
DEFERRED = Counter("loyalist_notify_deferred_total", "Messages deferred by policy", ["channel", "reason"])
SKIPPED = Counter("loyalist_notify_skipped_total", "Messages skipped by policy or input", ["channel", "reason"])
FAILED = Counter("loyalist_notify_failed_total", "Messages failed permanently (sent to the DLQ)",
                 ["channel", "reason"])
RETRIES = Counter("loyalist_notify_retries_total", "Delivery retries after transient errors", ["channel", "reason"])
DUPLICATES = Counter("loyalist_notify_duplicates_total", "Requests already handled (redelivery, replay)",
                     ["status"])
AMBIGUOUS = Counter("loyalist_notify_ambiguous_recoveries_total",
                    "Messages found in 'sending' after a crash (provider outcome unknown)", ["channel", "policy"])
DLQ_SIZE = Gauge("loyalist_notify_dlq_messages", "Messages in the dead-letter topic (sum over partitions)")
SCHEDULED = Gauge("loyalist_notify_scheduled_messages", "Deferred sends and retries waiting in the schedule")
DELIVERY_LATENCY = Histogram("loyalist_notify_delivery_latency_seconds",
                             "Request to provider acceptance", ["channel"], buckets=_DELIVERY_BUCKETS)
SEND_DURATION = Histogram("loyalist_notify_provider_call_duration_seconds", "One provider call",
                          ["channel"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0))
FEEDBACK = Counter("loyalist_notify_feedback_events_total", "Feedback events produced to events.raw", ["event"])
