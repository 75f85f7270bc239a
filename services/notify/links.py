"""Signed public links carried in messages: unsubscribe, click redirect and open pixel."""

from __future__ import annotations

from services.notify.domain.signing import derive_key, sign_token, verify_token

UNSUBSCRIBE = "unsubscribe"
CLICK = "click"
OPEN = "open"


class LinkSigner:
    def __init__(self, secret: str, public_url: str) -> None:
        self.base = public_url.rstrip("/")
        self.keys = {purpose: derive_key(secret, purpose) for purpose in (UNSUBSCRIBE, CLICK, OPEN)}

    def unsubscribe_token(self, *, profile_id: str | None, channel: str, group: str, message_id: str,
                          address: str | None) -> str:
        return sign_token(self.keys[UNSUBSCRIBE], {"p": profile_id, "c": channel, "g": group, "m": message_id,
                                                   "a": address})

    def unsubscribe_url(self, token: str) -> str:
        return f"{self.base}/u/{token}"

    def click_url(self, *, message_id: str, url: str) -> str:
        return f"{self.base}/c/{sign_token(self.keys[CLICK], {'m': message_id, 'u': url})}"

    def open_url(self, *, message_id: str) -> str:
        return f"{self.base}/o/{sign_token(self.keys[OPEN], {'m': message_id})}.gif"

    def verify(self, purpose: str, token: str) -> dict[str, object] | None:
        return verify_token(self.keys[purpose], token)
