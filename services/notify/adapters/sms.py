"""SMS through a provider speaking the Twilio Messages API (the de-facto standard shape; Twilio itself, or any
compatible gateway):

``POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP Basic ``AccountSid:AuthToken`` and a
form body ``To``, ``From``, ``Body`` → ``201 {"sid": "SM...", "status": "queued", ...}``. Errors answer
``{"code": <int>, "message": "...", "status": <http status>}``; 4xx are permanent (e.g. code 21211, invalid
number) except 429, 5xx and network errors are transient. We also send an ``Idempotency-Key`` header, which
gateways that support it use to drop a retried duplicate.
"""

from __future__ import annotations

import httpx

from services.notify.adapters import Delivered, DeliveryError

# Twilio error codes meaning the number itself can never receive (unsubscribed with STOP, invalid, landline).
_BOUNCE_CODES = frozenset({21211, 21214, 21610, 21614})


class SmsSender:
    def __init__(self, client: httpx.AsyncClient, *, base_url: str, account_sid: str, auth_token: str,
                 sender: str) -> None:
        self.client = client
        self.url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self.auth = (account_sid, auth_token)
        self.sender = sender

    async def send(self, *, to: str, body: str, idempotency_key: str) -> Delivered:
        try:
            resp = await self.client.post(
                self.url, data={"To": to, "From": self.sender, "Body": body}, auth=self.auth,
                headers={"Idempotency-Key": idempotency_key},
            )
        except httpx.HTTPError as exc:
            raise DeliveryError("sms_unavailable", f"{type(exc).__name__}: {exc}", permanent=False) from exc
        if resp.status_code in (200, 201):
            doc = resp.json()
            return Delivered(provider_id=str(doc.get("sid", "")), response=str(doc.get("status", "")))
        try:
            doc = resp.json()
        except ValueError:
            doc = {}
        code = doc.get("code")
        detail = f"{resp.status_code} {code or ''} {doc.get('message') or resp.text[:200]}".strip()
        if resp.status_code == 429 or resp.status_code >= 500:
            raise DeliveryError("sms_provider_busy", detail, permanent=False)
        if code in _BOUNCE_CODES:
            raise DeliveryError("sms_undeliverable", detail, permanent=True, bounce=True)
        raise DeliveryError("sms_rejected", detail, permanent=True)
