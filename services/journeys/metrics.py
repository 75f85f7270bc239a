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
TIMER_LATENESS = Histogram("loyalist_journey_timer_lateness_seconds", "Timer processed after its due time",
                           buckets=LATENCY_BUCKETS)
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
