"""Ingest's own Prometheus families. Request latency comes from the shared HTTP middleware
(``loyalist_http_request_duration_seconds``) and Kafka produce latency from the shared
``loyalist_kafka_produce_duration_seconds`` with ``service="ingest"``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS_ACCEPTED = Counter(
    "loyalist_ingest_events_accepted_total", "Events acknowledged by Kafka and answered 2xx", ["source", "type"]
)
EVENTS_REJECTED = Counter(
    "loyalist_ingest_events_rejected_total", "Messages or requests refused, by reason code", ["source", "reason"]
)
DEDUP_HITS = Counter(
    "loyalist_ingest_dedup_hits_total", "Messages acknowledged without producing because already accepted", ["source"]
)
BATCH_SIZE = Histogram(
    "loyalist_ingest_batch_size_messages", "Messages per /v1/batch request",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
COALESCED_CALLS = Histogram(
    "loyalist_ingest_coalesced_calls", "Concurrent publish calls admitted and produced together (one Redis round trip)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
RATE_LIMITED = Counter("loyalist_ingest_rate_limited_total", "Requests refused by the rate limiter", ["source"])
WEBHOOKS = Counter(
    "loyalist_ingest_webhooks_total", "Platform webhooks by outcome", ["platform", "topic", "outcome"]
)
REDIS_DEGRADED = Counter(
    "loyalist_ingest_redis_errors_total",
    "Redis calls that failed; ingest then accepts without dedup/rate limiting (downstream dedups)", ["operation"],
)
