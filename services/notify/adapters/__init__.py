"""Channel adapters (SMTP, SMS provider, webhooks) behind one small interface, and the Redis profile reader."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Delivered:
    provider_id: str
    response: str = ""


class DeliveryError(Exception):
    def __init__(self, reason: str, detail: str, *, permanent: bool, bounce: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.permanent = permanent
        # A permanent refusal of the address itself (hard bounce): suppress the address from now on.
        self.bounce = bounce
