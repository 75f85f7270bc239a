"""Prometheus metrics of the journeys service (``loyalist_journey_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from loyalist.metrics import LATENCY_BUCKETS

ENTERED = Counter("loyalist_journey_instances_entered_total", "Instances started", ["journey"])
MESSAGES = Counter("loyalist_journey_messages_requested_total", "Message requests emitted to notify",
                   ["journey", "node", "channel"])
EXITS = Counter("loyalist_journey_exits_total", "Instances ended, by exit rule (or completed)", ["journey", "reason"])
CONVERSIONS = Counter("loyalist_journey_conversions_total", "Goal conversions within the attribution window",
                      ["journey", "group"])
REVENUE = Counter("loyalist_journey_attributed_revenue_total", "Revenue of goal events attributed to a journey",
                  ["journey"])
TRIGGER_LATENCY = Histogram(
    "loyalist_journey_trigger_latency_seconds",
    "Triggering event accepted by ingest (eventAcceptedAt) to message request acknowledged by Kafka",
    ["journey"], buckets=LATENCY_BUCKETS)
TIMERS_FIRED = Counter("loyalist_journey_timers_fired_total", "Timer wake-ups processed", ["kind"])
# Lateness has a target (p99 within 1 s): buckets every 100 ms up to 1 s, so a quantile read from them is off by
# at most 100 ms there (with LATENCY_BUCKETS' 0.5-1 s bucket, linear interpolation put p99 near 1 s whenever the
# slowest timers fell in that bucket).
TIMER_LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 2.5,
                          5.0, 10.0, 30.0, 60.0, 300.0)
TIMER_LATENESS = Histogram("loyalist_journey_timer_lateness_seconds", "Timer processed after its due time",
                           buckets=TIMER_LATENESS_BUCKETS)
TRIGGERS = Counter("loyalist_journey_triggers_total", "Records consumed by the engine", ["topic", "outcome"])
SKIPPED = Counter("loyalist_journey_records_skipped_total",
                  "Records dropped before any read: no journey reacts to their event, segment or profile change")
BATCH_ERRORS = Counter("loyalist_journey_batch_errors_total", "Engine batches retried after an error", ["reason"])

# Gauges refreshed from stored instance states (the source of truth), per journey and node.
NODE_INSTANCES = Gauge("loyalist_journey_node_instances", "Instances per node and measure",
                       ["journey", "node", "measure"])
JOURNEY_INSTANCES = Gauge("loyalist_journey_instances", "Instances per journey and state", ["journey", "state"])
UPLIFT = Gauge("loyalist_journey_uplift", "Treated minus holdout conversion rate (and 95% CI bounds)",
               ["journey", "bound"])
CONVERSION_RATE = Gauge("loyalist_journey_conversion_rate", "Conversion rate per group", ["journey", "group"])
