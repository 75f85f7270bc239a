"""Loyalty metrics (``loyalist_loyalty_`` prefix, base units, ``_total`` counters)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from loyalist.metrics import LATENCY_BUCKETS

LEDGER_EVENTS = Counter(
    "loyalist_loyalty_ledger_events_total", "Ledger events committed", ["kind", "reason"]
)
POINTS = Counter(
    "loyalist_loyalty_points_total", "Points moved by committed ledger events (absolute)", ["kind"]
)
COMMANDS = Counter(
    "loyalist_loyalty_commands_total", "Commands handled", ["command", "outcome"]
)
CAS_CONFLICTS = Counter(
    "loyalist_loyalty_cas_conflicts_total", "Ledger writes lost to a concurrent writer and retried"
)
COMMAND_DURATION = Histogram(
    "loyalist_loyalty_command_duration_seconds", "Time to decide and commit one command (with retries)",
    ["command"], buckets=LATENCY_BUCKETS,
)
STREAM_SKIPPED = Counter(
    "loyalist_loyalty_stream_skipped_total", "events.resolved messages loyalty did not act on", ["reason"]
)
PUBLISH_ERRORS = Counter(
    "loyalist_loyalty_publish_errors_total", "Ledger lines whose produce to Kafka failed (retried later)"
)
