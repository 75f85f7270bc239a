"""Prometheus metrics of the profile service (``loyalist_profile_`` prefix, base units)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from loyalist.metrics import LATENCY_BUCKETS

PROCESSED = Counter(
    "loyalist_profile_events_total", "Events handled by a profile stage, by outcome", ["stage", "outcome"]
)
BATCH_SECONDS = Histogram(
    "loyalist_profile_batch_duration_seconds", "Time to process one batch", ["stage"], buckets=LATENCY_BUCKETS
)
BATCH_FAILURES = Counter("loyalist_profile_batch_failures_total", "Batches that failed and were retried", ["stage"])
EMITTED = Counter("loyalist_profile_emitted_messages_total", "Messages sent downstream", ["topic"])
REFOLDS = Counter("loyalist_profile_refolds_total", "Profiles refolded from the event store (late events)")
FORWARDED = Counter("loyalist_profile_forwarded_total", "Events forwarded from a merged profile to its survivor")
MERGES = Counter("loyalist_profile_merges_total", "Profile merges, by reason", ["reason"])
CLAIM_CONFLICTS = Counter("loyalist_profile_identity_claim_conflicts_total", "Identifier claims lost to a race")
ERASURES = Counter("loyalist_profile_erasures_total", "Profiles erased")
FRESHNESS = Histogram(
    "loyalist_profile_freshness_seconds", "From ingest acceptance (receivedAt) to the profile being updated",
    buckets=LATENCY_BUCKETS,
)
