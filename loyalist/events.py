"""The canonical event envelope: every fact Loyalist knows travels in this shape.

Field names on the wire are Segment's (``userId``, ``anonymousId``, ``messageId`` ...) so that an event
accepted by ingest, stored in Cassandra and replayed from Kafka is byte-for-byte the same document.
Events are immutable facts; services fold them, never edit them.

>>> e = Event.model_validate({"type": "track", "event": "Order Completed", "userId": "u1",
...     "messageId": "m1", "timestamp": "2024-01-02T03:04:05Z", "receivedAt": "2024-01-02T03:04:06Z",
...     "source": "web", "properties": {"total": 10}})
>>> e.partition_key
'u1'
>>> decode_event(encode_event(e)) == e
True
>>> encode_event(e)[:40]
b'{"type":"track","messageId":"m1","timest'
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

EventType = Literal["identify", "track", "page", "screen", "group", "alias"]
EVENT_TYPES: tuple[str, ...] = ("identify", "track", "page", "screen", "group", "alias")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Naive datetimes are taken as UTC; aware ones are converted to UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Event(BaseModel):
    model_config = ConfigDict(
        frozen=True, populate_by_name=True, alias_generator=to_camel, extra="ignore", ser_json_timedelta="float"
    )

    type: EventType
    message_id: str = Field(min_length=1, max_length=200)
    # When the event happened, corrected for client clock skew (Segment's rule).
    timestamp: datetime
    # When ingest accepted it (server clock).
    received_at: datetime
    sent_at: datetime | None = None
    original_timestamp: datetime | None = None
    user_id: str | None = None
    anonymous_id: str | None = None
    event: str | None = None
    name: str | None = None
    group_id: str | None = None
    previous_id: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    integrations: dict[str, Any] = Field(default_factory=dict)
    # Which source accepted the event (a write key's source, "shopify", "support", "import", "notify"...).
    # Deduplication is per (source, messageId).
    source: str = "unknown"
    schema_version: int = 1

    @field_validator("timestamp", "received_at", "sent_at", "original_timestamp")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else as_utc(value)

    @property
    def partition_key(self) -> str:
        """Customer key used for Kafka partitioning: userId, else anonymousId (never empty)."""
        return self.user_id or self.anonymous_id or self.previous_id or self.message_id

    @property
    def dedup_key(self) -> str:
        return f"{self.source}:{self.message_id}"

    @property
    def label(self) -> str:
        """Human name: the track event name, or the call type for the other calls."""
        if self.type == "track" and self.event:
            return self.event
        return self.type


def encode_event(event: Event) -> bytes:
    return orjson.dumps(event.model_dump(mode="json", by_alias=True, exclude_none=True))


def decode_event(raw: bytes | str | dict[str, Any]) -> Event:
    if isinstance(raw, dict):
        return Event.model_validate(raw)
    return Event.model_validate_json(raw)
