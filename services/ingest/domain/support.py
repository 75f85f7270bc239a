"""Help-desk facts → canonical ``Ticket Opened``, ``Ticket Updated``, ``Ticket Solved``,
``Satisfaction Rated`` and ``NPS Responded`` events.

Two formats:

* Loyalist's documented support format (``POST /v1/support/events``), which any help desk can send
  (Zendesk triggers, Freshdesk automations, Gorgias HTTP integrations ... with a JSON body template)::

      {"type": "ticket.opened" | "ticket.updated" | "ticket.solved" | "satisfaction.rated" | "nps.responded",
       "id": "<unique id of this fact>", "userId": "...", "email": "...", "timestamp": "...",
       "helpdesk": "zendesk", "ticket": {"id", "subject", "status", "priority", "channel", "tags"},
       "rating": "good" | "bad", "score": 0-10, "comment": "..."}

* Zendesk event webhooks (``zen:event-type:ticket.created`` / ``ticket.status_changed`` /
  ``user.created`` ...), verified with Zendesk's signature.

>>> from datetime import UTC, datetime
>>> now = datetime(2024, 1, 1, tzinfo=UTC)
>>> [doc] = map_support({"type": "nps.responded", "id": "s1", "email": "A@b.co", "score": 9}, source="support",
...                     received_at=now)
>>> doc["event"], doc["anonymousId"], doc["properties"]
('NPS Responded', 'email:a@b.co', {'score': 9, 'category': 'promoter'})
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any

from services.ingest.domain.commerce import event_doc, identity, obj, text, when
from services.ingest.domain.tracking import MessageRejected

SUPPORT_TYPES = {
    "ticket.opened": "Ticket Opened",
    "ticket.updated": "Ticket Updated",
    "ticket.solved": "Ticket Solved",
    "satisfaction.rated": "Satisfaction Rated",
    "nps.responded": "NPS Responded",
}
_RATINGS = {"good": "good", "bad": "bad", "offered": "offered", "unoffered": "unoffered",
            "satisfied": "good", "unsatisfied": "bad", "positive": "good", "negative": "bad"}


def nps_category(score: int) -> str:
    """NPS buckets.

    >>> [nps_category(s) for s in (10, 8, 3)]
    ['promoter', 'passive', 'detractor']
    """
    return "promoter" if score >= 9 else "passive" if score >= 7 else "detractor"


def _tags(value: Any) -> list[str] | None:
    if isinstance(value, list):
        return [str(t) for t in value if str(t).strip()]
    if isinstance(value, str) and value.strip():
        return [t for t in value.replace(",", " ").split() if t]
    return None


def map_support(payload: Any, *, source: str, received_at: datetime) -> list[dict[str, Any]]:
    if not isinstance(payload, dict):
        raise MessageRejected("invalid_payload", "the body must be a JSON object")
    kind = payload.get("type")
    if not isinstance(kind, str) or kind not in SUPPORT_TYPES:
        raise MessageRejected("invalid_type", f"type must be one of {', '.join(SUPPORT_TYPES)}")
    fact_id = text(payload.get("id"))
    if not fact_id:
        raise MessageRejected("missing_id", "id (unique per fact, used for deduplication) is required")
    email = text(payload.get("email"))
    user_id, anonymous_id = text(payload.get("userId")), text(payload.get("anonymousId"))
    who = {"userId": user_id} if user_id else identity(customer_id=None, email=email)
    if anonymous_id and not who:
        who = {"anonymousId": anonymous_id}
    ticket = obj(payload.get("ticket"))
    helpdesk = text(payload.get("helpdesk")) or source
    props: dict[str, Any] = {"helpdesk": helpdesk}
    if ticket:
        props.update({
            "ticket_id": text(ticket.get("id")), "subject": text(ticket.get("subject")),
            "status": text(ticket.get("status")), "priority": text(ticket.get("priority")),
            "channel": text(ticket.get("channel")), "tags": _tags(ticket.get("tags")),
        })
    if kind == "ticket.updated":
        props["previous_status"] = text(ticket.get("previous_status"))
    if kind == "ticket.solved" and isinstance(ticket.get("resolution_time_seconds"), int | float):
        props["resolution_time_seconds"] = ticket["resolution_time_seconds"]
    if kind == "satisfaction.rated":
        rating = _RATINGS.get(str(payload.get("rating", "")).strip().lower())
        if rating is None:
            raise MessageRejected("invalid_rating", "rating must be good or bad")
        props = {"rating": rating, **props, "comment": text(payload.get("comment"))}
        if isinstance(payload.get("score"), int | float) and not isinstance(payload.get("score"), bool):
            props["score"] = payload["score"]
    if kind == "nps.responded":
        score = payload.get("score")
        if isinstance(score, str) and score.strip().isdigit():
            score = int(score)
        if isinstance(score, float) and score.is_integer():  # JSON Schema's "integer" includes 9.0
            score = int(score)
        if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= 10:
            raise MessageRejected("invalid_score", "score must be an integer from 0 to 10")
        props = {"score": score, "category": nps_category(score), "comment": text(payload.get("comment")),
                 "survey_id": text(payload.get("surveyId"))}
    return [event_doc(call="track", event=SUPPORT_TYPES[kind], message_id=f"support:{helpdesk}:{fact_id}",
                      who=who, email=email, timestamp=when(payload.get("timestamp"), received_at),
                      properties=props, source=source, received_at=received_at,
                      context={"integration": {"name": helpdesk}})]


# ---- Zendesk event webhooks ---------------------------------------------------------------------------

def zendesk_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """Zendesk: base64(HMAC-SHA256(secret, timestamp + body))."""
    return base64.b64encode(hmac.new(secret, timestamp.encode() + body, hashlib.sha256).digest()).decode()


def verify_zendesk(secret: bytes, timestamp: str | None, body: bytes, signature: str | None) -> bool:
    if not timestamp or not signature:
        return False
    return hmac.compare_digest(zendesk_signature(secret, timestamp, body), signature.strip())


def zendesk_requester(user_id: Any) -> dict[str, str]:
    """Zendesk ticket events name the requester by id only; ``user.*`` events tie that id to an email."""
    return {"anonymousId": f"zendesk-user:{user_id}"}


def map_zendesk(payload: Any, *, account: str, source: str, received_at: datetime) -> list[dict[str, Any]]:
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str) or not payload.get("id"):
        raise MessageRejected("invalid_payload", "a Zendesk event has type, id, detail and event")
    kind = payload["type"].removeprefix("zen:event-type:")
    detail = obj(payload.get("detail"))
    change = obj(payload.get("event"))
    at = when(payload.get("time"), received_at)
    message_id = f"zendesk:{account}:{payload['id']}"
    context = {"integration": {"name": "zendesk", "account": account, "type": kind}}
    common: dict[str, Any] = {"source": source, "received_at": received_at, "context": context, "timestamp": at,
              "message_id": message_id}
    if kind.startswith("user."):
        email = text(detail.get("email"))
        if detail.get("id") is None:
            raise MessageRejected("invalid_payload", "a Zendesk user event names the user id")
        traits = {"email": email, "zendesk_user_id": text(detail.get("id")), "name": text(detail.get("name"))}
        return [event_doc(call="identify", who=zendesk_requester(detail["id"]), email=email, traits=traits,
                          **common)]
    if not kind.startswith("ticket."):
        raise MessageRejected("unsupported_topic", f"Zendesk event {kind!r} is not handled (ticket.*, user.*)")
    requester = detail.get("requester_id")
    if requester is None:
        raise MessageRejected("missing_identity", "the Zendesk ticket names no requester_id")
    status = (text(detail.get("status")) or "").lower()
    props: dict[str, Any] = {
        "ticket_id": text(detail.get("id")), "subject": text(detail.get("subject")), "status": status or None,
        "priority": (text(detail.get("priority")) or "").lower() or None,
        "channel": text((detail.get("via") or {}).get("channel")) if isinstance(detail.get("via"), dict) else None,
        "tags": _tags(detail.get("tags")), "helpdesk": "zendesk",
    }
    if kind == "ticket.created":
        event = "Ticket Opened"
    elif kind == "ticket.status_changed":
        current = change.get("current")
        current = current.get("status") if isinstance(current, dict) else current
        previous = change.get("previous")
        previous = previous.get("status") if isinstance(previous, dict) else previous
        props["status"] = (text(current) or status or "").lower() or None
        props["previous_status"] = (text(previous) or "").lower() or None
        event = "Ticket Solved" if props["status"] in ("solved", "closed") else "Ticket Updated"
        created = when(detail.get("created_at"), at)
        if event == "Ticket Solved" and at >= created:
            props["resolution_time_seconds"] = (at - created).total_seconds()
    else:
        event = "Ticket Updated"
    return [event_doc(call="track", event=event, who=zendesk_requester(requester), properties=props, **common)]
