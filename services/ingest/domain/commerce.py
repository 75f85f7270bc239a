"""Helpers shared by the platform mappings (Shopify, WooCommerce, help desks): signatures, money, identity.

Identity rule for platform events: ``userId`` is the platform's customer id when there is one (the id a
storefront's ``identify`` uses too); a guest is keyed by ``anonymousId = "email:<lower-cased email>"``.
The email, when known, is always in ``context.traits.email`` so profile resolution can tie them.

>>> money("19.90"), money(5), money(None), money("n/a")
(19.9, 5.0, None, None)
>>> identity(customer_id=None, email=" Ada@Example.com ")
{'anonymousId': 'email:ada@example.com'}
>>> verify_hmac_base64(b"secret", b"body", "+ehPD3fHpoB2GLmyUXAXG33OzMRB9QYhUOQbBFUwTf8=")
False
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any

from services.ingest.domain.tracking import BLANK_CHARS, MessageRejected, parse_timestamp


class SignatureInvalid(Exception):
    """The webhook's signature does not match its body."""


def sign_base64(secret: bytes, body: bytes) -> str:
    """base64(HMAC-SHA256(secret, body)): Shopify's and WooCommerce's signature."""
    return base64.b64encode(hmac.new(secret, body, hashlib.sha256).digest()).decode()


def verify_hmac_base64(secret: bytes, body: bytes, signature: str | None) -> bool:
    if not signature:
        return False
    return hmac.compare_digest(sign_base64(secret, body), signature.strip())


def money(value: Any) -> float | None:
    """Platforms send amounts as decimal strings ("19.90"); events carry numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def obj(value: Any) -> dict[str, Any]:
    """A nested JSON object of a payload, or {} when it is missing or not an object."""
    return value if isinstance(value, dict) else {}


def text(value: Any) -> str | None:
    if value is None:
        return None
    result = str(value).strip(BLANK_CHARS)
    return result or None


def identity(*, customer_id: Any, email: Any) -> dict[str, str]:
    cid = text(customer_id)
    if cid and cid != "0":
        return {"userId": cid}
    mail = text(email)
    if mail:
        return {"anonymousId": f"email:{mail.lower()}"}
    return {}


def when(value: Any, fallback: datetime) -> datetime:
    try:
        return parse_timestamp(value, "timestamp") or fallback
    except MessageRejected:
        return fallback


def compact(values: dict[str, Any]) -> dict[str, Any]:
    """Drop None values (events leave unknown fields out rather than carrying nulls)."""
    return {k: v for k, v in values.items() if v is not None}


def event_doc(
    *,
    call: str,
    message_id: str,
    source: str,
    who: dict[str, str],
    timestamp: datetime,
    received_at: datetime,
    event: str | None = None,
    properties: dict[str, Any] | None = None,
    traits: dict[str, Any] | None = None,
    email: str | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if not who:
        raise MessageRejected("missing_identity", "the payload names no customer id and no email")
    ctx = dict(context or {})
    if email:
        ctx["traits"] = {**ctx.get("traits", {}), "email": email.strip().lower()}
    doc: dict[str, Any] = {
        "type": call, "messageId": message_id, "source": source, **who,
        "timestamp": timestamp, "receivedAt": received_at, "context": ctx,
    }
    if event is not None:
        doc["event"] = event
    if properties is not None:
        doc["properties"] = compact(properties)
    if traits is not None:
        doc["traits"] = compact(traits)
    return doc
