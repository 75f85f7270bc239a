"""Turning Segment-style tracking calls into canonical events: validation, field mapping, clock-skew
correction. Pure: time and ids are passed in.

Segment's rules (HTTP Tracking API, "Timestamps" in the spec):

- ``receivedAt`` is the server clock when ingest accepted the call;
- ``originalTimestamp`` is the client's ``timestamp`` as sent;
- when the client also sent ``sentAt``, its clock skew is removed:
  ``timestamp = receivedAt - (sentAt - originalTimestamp)``; otherwise ``timestamp = originalTimestamp``,
  or ``receivedAt`` when the client sent no time at all.

>>> from datetime import UTC, datetime
>>> now = datetime(2024, 5, 1, 12, 0, 10, tzinfo=UTC)
>>> doc = normalize_message(
...     {"userId": 42, "event": "Product Viewed", "timestamp": "2024-05-01T12:00:00Z",
...      "sentAt": "2024-05-01T12:00:05Z", "properties": {"sku": "A"}},
...     call_type="track", received_at=now, source="web", new_message_id=lambda: "generated")
>>> doc["userId"], doc["messageId"], doc["timestamp"].isoformat()
('42', 'generated', '2024-05-01T12:00:05+00:00')
>>> normalize_message({"event": "x"}, call_type="track", received_at=now, source="web",
...     new_message_id=lambda: "m")
Traceback (most recent call last):
...
services.ingest.domain.tracking.MessageRejected: missing_identity: a message needs a userId or an anonymousId
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

EVENT_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})

# Top-level fields of a tracking call that map one-to-one onto the canonical envelope.
_OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
_ID_FIELDS = ("userId", "anonymousId", "groupId", "previousId")
_KNOWN_FIELDS = frozenset({
    "type", "messageId", "timestamp", "originalTimestamp", "sentAt", "receivedAt", "userId", "anonymousId",
    "event", "name", "groupId", "previousId", "properties", "traits", "context", "integrations", "writeKey",
    "category", "channel", "version", "source", "schemaVersion",
})
MAX_ID_LENGTH = 200
# What counts as blank: the union of Python's and ECMAScript's whitespace, so that the OpenAPI pattern
# NON_BLANK_PATTERN (evaluated with JavaScript regex semantics by clients and validators) and the server's
# stripping agree on every string.
BLANK_CHARS = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + (
    "\u2028\u2029\u202f\u205f\u3000\ufeff")
NON_BLANK_PATTERN = "[^\t-\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
_LEAP_SECOND = re.compile(r"T\d\d:\d\d:60")


class MessageRejected(Exception):
    """A message that cannot become an event; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    code: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "code": self.code, "message": self.message}


def parse_timestamp(value: Any, field: str) -> datetime | None:
    """ISO 8601 string (``Z`` or offset; naive means UTC) or epoch milliseconds → aware UTC datetime.

    >>> parse_timestamp("2024-01-02T03:04:05.678+02:00", "timestamp").isoformat()
    '2024-01-02T01:04:05.678000+00:00'
    >>> parse_timestamp(1704164645000, "timestamp").isoformat()
    '2024-01-02T03:04:05+00:00'
    >>> parse_timestamp(None, "timestamp") is None
    True
    """
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            # RFC 3339 allows lower-case separators and leap seconds; Python's parser wants neither.
            iso = value.strip().replace("t", "T").replace("z", "Z")
            parsed = datetime.fromisoformat(iso.replace(":60", ":59") if _LEAP_SECOND.search(iso) else iso)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            parsed = datetime.fromtimestamp(value / 1000.0, UTC)
        else:
            raise ValueError(value)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise MessageRejected("invalid_timestamp", f"{field} is not an ISO 8601 date-time") from exc


def _as_id(value: Any, field: str) -> str | None:
    """Ids are strings; clients send numbers too (Segment accepts them), so they are stringified."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MessageRejected("invalid_field", f"{field} must be a string")
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        raise MessageRejected("invalid_field", f"{field} must be a string")
    value = value.strip(BLANK_CHARS)
    if not value:
        return None
    if len(value) > MAX_ID_LENGTH:
        raise MessageRejected("invalid_field", f"{field} is longer than {MAX_ID_LENGTH} characters")
    return value


def correct_clock_skew(
    received_at: datetime, sent_at: datetime | None, original: datetime | None
) -> datetime:
    """Segment's rule: shift the client's time by the difference between its clock and ours.

    >>> r = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    >>> correct_clock_skew(r, datetime(2024, 1, 1, 13, 0, 0, tzinfo=UTC),
    ...                    datetime(2024, 1, 1, 12, 59, 0, tzinfo=UTC)).isoformat()
    '2024-01-01T11:59:00+00:00'
    >>> correct_clock_skew(r, None, None) == r
    True
    """
    if original is None:
        return received_at
    if sent_at is None:
        return original
    try:
        return received_at - (sent_at - original)
    except OverflowError:  # absurd client clocks (year 1 vs 9999): keep what the client said
        return original


def normalize_message(
    raw: Any,
    *,
    call_type: str | None,
    received_at: datetime,
    source: str,
    new_message_id: Callable[[], str],
    batch_sent_at: datetime | None = None,
    batch_context: Mapping[str, Any] | None = None,
    batch_integrations: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One tracking call (a JSON object) → the canonical event document (``Event`` field aliases).

    ``call_type`` is the endpoint's type (``/v1/track`` → ``track``); ``None`` for batch items, which
    carry their own ``type``. Raises :class:`MessageRejected` with a machine-readable code.
    """
    if not isinstance(raw, dict):
        raise MessageRejected("invalid_message", "a message must be a JSON object")
    kind = call_type or raw.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise MessageRejected(
            "invalid_type", f"type must be one of {', '.join(sorted(EVENT_TYPES))}, got {kind!r}"
        )
    doc: dict[str, Any] = {"type": kind, "source": source}

    for field in _ID_FIELDS:
        value = _as_id(raw.get(field), field)
        if value is not None:
            doc[field] = value
    if "userId" not in doc and "anonymousId" not in doc:
        raise MessageRejected("missing_identity", "a message needs a userId or an anonymousId")

    for field in _OBJECT_FIELDS:
        value = raw.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise MessageRejected("invalid_field", f"{field} must be a JSON object")
        doc[field] = value

    # Batch-level context/integrations apply to every message; the message's own keys win.
    if batch_context:
        doc["context"] = {**batch_context, **doc.get("context", {})}
    if batch_integrations:
        doc["integrations"] = {**batch_integrations, **doc.get("integrations", {})}

    # RudderStack's SDKs send identify traits only as context.traits; Segment puts them top-level.
    if kind == "identify":
        context_traits = doc.get("context", {}).get("traits")
        if isinstance(context_traits, dict) and context_traits:
            doc["traits"] = {**context_traits, **doc.get("traits", {})}

    for field in ("event", "name"):
        value = raw.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise MessageRejected("invalid_field", f"{field} must be a string")
        if value.strip(BLANK_CHARS):
            doc[field] = value.strip(BLANK_CHARS)

    if kind == "track" and "event" not in doc:
        raise MessageRejected("missing_event", "a track call needs an event name")
    if kind == "group" and "groupId" not in doc:
        raise MessageRejected("missing_group_id", "a group call needs a groupId")
    if kind == "alias" and ("previousId" not in doc or "userId" not in doc):
        raise MessageRejected("missing_previous_id", "an alias call needs a previousId and a userId")

    # Fields clients send that the envelope has no slot for are kept where the spec puts them:
    # page/screen category is a page property; Rudder's channel and anything else go to context.
    category = raw.get("category")
    if category is not None and kind in ("page", "screen"):
        doc["properties"] = {"category": category, **doc.get("properties", {})}
    extra = {k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}
    channel = raw.get("channel")
    if channel is not None:
        doc["context"] = {"channel": channel, **doc.get("context", {})}
    if extra:
        doc["context"] = {**doc.get("context", {}), "extra": extra}

    message_id = _as_id(raw.get("messageId"), "messageId")
    doc["messageId"] = message_id or new_message_id()

    original = parse_timestamp(raw.get("originalTimestamp"), "originalTimestamp") or parse_timestamp(
        raw.get("timestamp"), "timestamp"
    )
    sent_at = parse_timestamp(raw.get("sentAt"), "sentAt") or batch_sent_at
    doc["receivedAt"] = received_at
    doc["timestamp"] = correct_clock_skew(received_at, sent_at, original)
    if original is not None:
        doc["originalTimestamp"] = original
    if sent_at is not None:
        doc["sentAt"] = sent_at
    return doc


def write_key_from_body(body: Any) -> str | None:
    """The ``writeKey`` field some clients put in the body instead of HTTP Basic auth.

    >>> write_key_from_body({"writeKey": "abc", "batch": []})
    'abc'
    >>> write_key_from_body([1]) is None
    True
    """
    if isinstance(body, dict):
        key = body.get("writeKey")
        if isinstance(key, str) and key:
            return key
    return None
