"""Message requests (the ``message.requests`` contract), delivery states and their allowed transitions,
and the merge of consent sources.

>>> r = MessageRequest.from_wire({"idempotencyKey": "k1", "profileId": "p1", "channel": "email",
...     "category": "marketing", "templateId": "welcome_1", "data": {}, "requestedAt": "2024-01-01T00:00:00Z"})
>>> r.message_id == message_id_for("k1")
True
>>> can_transition("claimed", "sending"), can_transition("sent", "sending")
(True, False)
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.notify.domain.policy import CATEGORIES, CHANNELS, DEFAULT_GROUP, Consent

# Message ids are derived from the idempotency key, so every retry, redelivery and replay of one request
# names the same message (and the same RFC 5322 Message-ID).
_MESSAGE_NS = uuid.UUID("6f1c7e0a-5b59-4d8e-9b0e-2d1f1c3a7e11")

# claimed → sending → sent is the happy path. "deferred" waits in the schedule; "retrying" waits after a
# transient error. Final states never change again.
TRANSITIONS: dict[str, frozenset[str]] = {
    "claimed": frozenset({"sending", "skipped", "deferred", "failed", "claimed"}),
    "deferred": frozenset({"claimed"}),
    "retrying": frozenset({"claimed"}),
    "sending": frozenset({"sent", "retrying", "failed", "claimed"}),
    "sent": frozenset(),
    "skipped": frozenset(),
    "failed": frozenset(),
}
FINAL_STATES = frozenset({"sent", "skipped", "failed"})


def can_transition(current: str, new: str) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


@functools.lru_cache(maxsize=4096)  # asked for several times per message (links, headers, log rows)
def message_id_for(idempotency_key: str) -> str:
    return str(uuid.uuid5(_MESSAGE_NS, idempotency_key))


def feedback_event_id(idempotency_key: str, name: str) -> str:
    """Deterministic event ids make re-emitting a feedback event after a crash a no-op downstream (ingest and
    profile deduplicate on (source, messageId))."""
    return str(uuid.uuid5(_MESSAGE_NS, f"{idempotency_key}|{name}"))


class InvalidRequest(ValueError):
    """A request that can never be delivered as written (goes to the DLQ)."""


def parse_time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidRequest(f"not an ISO 8601 time: {value!r}") from exc
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class MessageRequest:
    idempotency_key: str
    profile_id: str | None
    channel: str
    category: str
    template_id: str
    data: Mapping[str, Any]
    requested_at: datetime
    to: Mapping[str, str] = field(default_factory=dict)
    group: str | None = None
    expires_at: datetime | None = None
    event_accepted_at: datetime | None = None
    journey: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def message_id(self) -> str:
        return message_id_for(self.idempotency_key)

    @property
    def kafka_key(self) -> str:
        return self.profile_id or next(iter(self.to.values()), self.idempotency_key)

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> MessageRequest:
        if not isinstance(doc, Mapping):
            raise InvalidRequest("a message request is a JSON object")
        key = doc.get("idempotencyKey")
        if not isinstance(key, str) or not key or len(key) > 300:
            raise InvalidRequest("idempotencyKey must be a non-empty string (at most 300 characters)")
        channel = doc.get("channel")
        if channel not in CHANNELS:
            raise InvalidRequest(f"channel must be one of {list(CHANNELS)}")
        category = doc.get("category", "marketing")
        if category not in CATEGORIES:
            raise InvalidRequest(f"category must be one of {list(CATEGORIES)}")
        template_id = doc.get("templateId")
        if not isinstance(template_id, str) or not template_id:
            raise InvalidRequest("templateId is required")
        data = doc.get("data") or {}
        if not isinstance(data, Mapping):
            raise InvalidRequest("data must be an object")
        to = doc.get("to") or {}
        if not isinstance(to, Mapping) or not all(isinstance(v, str) for v in to.values()):
            raise InvalidRequest("to must be an object of strings (email, phone, url)")
        profile_id = doc.get("profileId") or None
        if profile_id is None and not to:
            raise InvalidRequest("profileId or a 'to' address is required")
        journey = {k: doc[k] for k in ("journeyId", "journeyVersion", "nodeId", "instanceId") if doc.get(k)}
        group = doc.get("subscriptionGroup") or data.get("subscription_group")
        return cls(
            idempotency_key=key,
            profile_id=str(profile_id) if profile_id else None,
            channel=str(channel),
            category=str(category),
            template_id=template_id,
            data=dict(data),
            requested_at=parse_time(doc.get("requestedAt")) or datetime.now(UTC),
            to=dict(to),
            group=str(group) if group else None,
            expires_at=parse_time(doc.get("expiresAt")),
            event_accepted_at=parse_time(doc.get("eventAcceptedAt")),
            journey=journey,
            raw=dict(doc),
        )


def recipient_for(request: MessageRequest, profile: Mapping[str, Any] | None) -> str | None:
    """Where to deliver: an explicit ``to`` override, else the profile's address for the channel."""
    field_name = {"email": "email", "sms": "phone", "webhook": "url"}[request.channel]
    override = request.to.get(field_name)
    if override:
        return override
    if request.channel == "webhook":
        url = request.data.get("url")
        return str(url) if url else None
    value = (profile or {}).get(field_name)
    return str(value) if value else None


def _as_time(value: Any) -> datetime:
    try:
        return parse_time(value) or datetime.min.replace(tzinfo=UTC)
    except InvalidRequest:
        return datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ConsentRow:
    """One row of notify's own consent table: (channel, group) subscribed or not, and when."""

    channel: str
    group: str  # "*" is the whole channel
    subscribed: bool
    updated_at: datetime
    source: str = "api"


def merge_consent(profile: Mapping[str, Any] | None, rows: list[ConsentRow],
                  suppressions: Mapping[str, str] | None = None) -> Consent:
    """Consent from the profile document and notify's own table; per channel the latest change wins.

    Notify writes its table the moment someone unsubscribes, so the opt-out holds before the profile has
    folded the ``Unsubscribed`` event; a later re-subscription on the profile wins again.

    >>> t1, t2 = "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z"
    >>> prof = {"consent": {"email": {"subscribed": True, "updated_at": t1}}}
    >>> merge_consent(prof, []).subscribed["email"]
    True
    >>> rows = [ConsentRow("email", "*", False, parse_time(t2))]
    >>> merge_consent(prof, rows).subscribed["email"]
    False
    >>> merge_consent({"consent": {"email": {"subscribed": True, "updated_at": "2024-03-01T00:00:00Z"}}},
    ...               rows).subscribed["email"]
    True
    """
    latest: dict[str, tuple[datetime, bool]] = {}
    groups: dict[str, dict[str, tuple[datetime, bool]]] = {}
    for channel, entry in ((profile or {}).get("consent") or {}).items():
        if not isinstance(entry, Mapping) or "subscribed" not in entry:
            continue
        at = _as_time(entry.get("updated_at"))
        latest[channel] = (at, bool(entry["subscribed"]))
        for group, sub in (entry.get("groups") or {}).items():
            sub_value = sub.get("subscribed") if isinstance(sub, Mapping) else sub
            groups.setdefault(channel, {})[group] = (at, bool(sub_value))
    for row in rows:
        if row.group in ("*", ""):
            current = latest.get(row.channel)
            if current is None or row.updated_at >= current[0]:
                latest[row.channel] = (row.updated_at, row.subscribed)
        else:
            current = groups.get(row.channel, {}).get(row.group)
            if current is None or row.updated_at >= current[0]:
                groups.setdefault(row.channel, {})[row.group] = (row.updated_at, row.subscribed)
    return Consent(
        subscribed={ch: sub for ch, (_, sub) in latest.items()},
        unsubscribed_groups={
            ch: frozenset(g for g, (_, sub) in gs.items() if not sub) for ch, gs in groups.items()
        },
        suppressed=dict(suppressions or {}),
    )


def address_subject(channel: str, address: str) -> str:
    """Consent key for a recipient known only by address (a direct send with ``to`` and no profile).

    >>> address_subject("email", "Ada@Example.com")
    'address:email:ada@example.com'
    """
    return f"address:{channel}:{address.lower()}"


def group_of(request: MessageRequest, template_group: str | None) -> str:
    return request.group or template_group or DEFAULT_GROUP
