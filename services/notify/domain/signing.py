"""Signed, tamper-proof tokens for links in messages (unsubscribe, click redirect, open pixel) and webhook
signatures. HMAC-SHA256 with the service's signing secret; tokens are URL-safe and carry their payload.

>>> tok = sign_token(b"k", {"p": "prof-1", "c": "email"})
>>> verify_token(b"k", tok)
{'p': 'prof-1', 'c': 'email'}
>>> verify_token(b"other", tok) is None
True
>>> verify_token(b"k", tok[:-2] + "AA") is None
True
>>> webhook_signature(b"k", 1700000000, b'{"a":1}')[:3]
'v1='
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_key(secret: str, purpose: str) -> bytes:
    """One key per purpose, so a click token can never be replayed as an unsubscribe token."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()


def sign_token(key: bytes, payload: dict[str, Any]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=False).encode())
    mac = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest()[:20])
    return f"{body}.{mac}"


def verify_token(key: bytes, token: str) -> dict[str, Any] | None:
    body, _, mac = token.partition(".")
    if not body or not mac:
        return None
    expected = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest()[:20])
    if not hmac.compare_digest(expected, mac):
        return None
    try:
        payload = json.loads(_unb64(body))
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def webhook_signature(key: bytes, timestamp: int, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`` (the Stripe scheme: the timestamp is signed too, so
    receivers can reject replays older than a few minutes)."""
    mac = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify_webhook(key: bytes, timestamp: int, body: bytes, header: str, *, now: int, tolerance_s: int = 300) -> bool:
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(webhook_signature(key, timestamp, body), header)
