"""Every Kafka topic Loyalist uses, declared once. Services import names from here; nothing else
spells a topic name.

Each topic's record key is the customer: ``events.raw`` is keyed by userId (else anonymousId) as the
tracking call named it, every later topic by the canonical profile id, so one customer's events stay in
one partition and in order.

>>> [t.name for t in TOPICS][:3]
['events.raw', 'events.resolved', 'profile.fold']
>>> TOPIC_BY_NAME["profile.snapshots"].compacted
True
"""

from __future__ import annotations

from dataclasses import dataclass

from loyalist.settings import Settings

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    description: str
    key: str
    retention_ms: int = 30 * DAY_MS
    compacted: bool = False
    partitions: int | None = None  # None: Settings.kafka_partitions

    def config(self) -> dict[str, str]:
        if self.compacted:
            return {"cleanup.policy": "compact", "min.insync.replicas": "1"}
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}


EVENTS_RAW = Topic(
    "events.raw",
    "Every event accepted by ingest (tracking API, webhooks, imports, notify feedback), as ingest wrote it.",
    key="userId, else anonymousId",
    # The log is the source of truth for replays: keep it long. The Cassandra event store keeps it forever.
    retention_ms=365 * DAY_MS,
)
EVENTS_RESOLVED = Topic(
    "events.resolved",
    "Events after identity resolution, re-keyed by canonical profile id; merges appear here as events too.",
    key="profile id",
    retention_ms=365 * DAY_MS,
)
PROFILE_FOLD = Topic(
    "profile.fold",
    "Internal to the profile service: resolved events and merge/erase/segment operations by profile id.",
    key="profile id",
)
PROFILE_CHANGED = Topic(
    "profile.changed",
    "What changed on a profile after each folded event (changed field names, new values, cause).",
    key="profile id",
)
PROFILE_SNAPSHOTS = Topic(
    "profile.snapshots",
    "Latest full profile per customer (compacted changelog).",
    key="profile id",
    compacted=True,
)
SEGMENT_MEMBERSHIP = Topic(
    "segment.membership",
    "segment.entered / segment.exited with the reason.",
    key="profile id",
)
MESSAGE_REQUESTS = Topic(
    "message.requests",
    "Requests to deliver a message (from journeys or the notify API), each with an idempotency key.",
    key="profile id",
)
MESSAGE_DLQ = Topic(
    "message.dlq",
    "Message requests that failed permanently, with the reason.",
    key="profile id",
    retention_ms=90 * DAY_MS,
)
JOURNEY_TIMERS = Topic(
    "journey.timers",
    "Timer wake-ups for journey instances.",
    key="profile id",
)
LOYALTY_COMMANDS = Topic(
    "loyalty.commands",
    "Serialised loyalty commands (redemptions, adjustments) per customer.",
    key="profile id",
)

TOPICS: tuple[Topic, ...] = (
    EVENTS_RAW,
    EVENTS_RESOLVED,
    PROFILE_FOLD,
    PROFILE_CHANGED,
    PROFILE_SNAPSHOTS,
    SEGMENT_MEMBERSHIP,
    MESSAGE_REQUESTS,
    MESSAGE_DLQ,
    JOURNEY_TIMERS,
    LOYALTY_COMMANDS,
)
TOPIC_BY_NAME = {t.name: t for t in TOPICS}


def topic_name(settings: Settings, topic: Topic) -> str:
    return settings.topic(topic.name)
