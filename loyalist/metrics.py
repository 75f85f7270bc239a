"""Prometheus metrics shared by all services (``loyalist_`` prefix, base units, ``_total`` counters).

Service-specific metrics are declared in each service's own ``metrics.py`` with the helpers here, so every
service's families share label names and buckets.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Buckets from 0.5 ms to 10 s: wide enough for an API read and a cross-service trip.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "loyalist_http_requests_total", "HTTP requests handled", ["service", "method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "loyalist_http_request_duration_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("loyalist_http_requests_in_flight", "HTTP requests being handled", ["service"])

KAFKA_PRODUCED = Counter(
    "loyalist_kafka_produced_messages_total", "Messages acknowledged by Kafka", ["service", "topic"]
)
KAFKA_PRODUCE_ERRORS = Counter(
    "loyalist_kafka_produce_errors_total", "Produce attempts that failed", ["service", "topic", "reason"]
)
KAFKA_PRODUCE_DURATION = Histogram(
    "loyalist_kafka_produce_duration_seconds", "Time until Kafka acknowledged a produce", ["service", "topic"],
    buckets=LATENCY_BUCKETS,
)
KAFKA_CONSUMER_LAG = Gauge(
    "loyalist_kafka_consumer_lag_messages", "Messages not yet processed", ["group", "topic", "partition"]
)
STREAM_PROCESSED = Counter(
    "loyalist_stream_events_processed_total", "Events processed by a stream agent", ["service", "agent", "outcome"]
)
STREAM_DURATION = Histogram(
    "loyalist_stream_processing_duration_seconds", "Time to process one event", ["service", "agent"],
    buckets=LATENCY_BUCKETS,
)
STREAM_BATCH_SIZE = Histogram(
    "loyalist_stream_batch_size_records", "Records handed to a batch stage at once", ["service", "stage"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
STREAM_BATCH_DURATION = Histogram(
    "loyalist_stream_batch_duration_seconds", "Time to process one batch of a batch stage", ["service", "stage"],
    buckets=LATENCY_BUCKETS,
)
STREAM_FAILURES = Counter(
    "loyalist_stream_batch_failures_total", "Batches that failed and were retried", ["service", "stage"]
)
STORE_CALLS = Histogram(
    "loyalist_store_call_duration_seconds", "Cassandra/Redis call latency", ["service", "store", "operation"],
    buckets=LATENCY_BUCKETS,
)
STORE_ERRORS = Counter(
    "loyalist_store_errors_total", "Cassandra/Redis call errors", ["service", "store", "operation"]
)
SERVICE_UP = Gauge("loyalist_service_info", "Service build information", ["service", "version"])


@contextmanager
def timed(histogram: Histogram, **labels: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.labels(**labels).observe(time.perf_counter() - started)


def render_latest() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
