"""Signed webhooks: ``POST`` JSON with ``X-Loyalist-Timestamp`` and ``X-Loyalist-Signature: v1=<hex>`` where the
signature is HMAC-SHA256 over ``"<timestamp>.<body>"`` (verify it, and reject old timestamps, to stop replays).
``X-Loyalist-Idempotency-Key`` lets receivers drop a retried duplicate. 2xx is success; 408, 429, 5xx and
network errors are retried; other 4xx are permanent."""

from __future__ import annotations

import time

import httpx
import orjson

from services.notify.adapters import Delivered, DeliveryError
from services.notify.domain.signing import webhook_signature


class WebhookSender:
    def __init__(self, client: httpx.AsyncClient, *, key: bytes) -> None:
        self.client = client
        self.key = key

    async def send(self, *, url: str, payload: object, idempotency_key: str, message_id: str = "",
                   method: str = "POST") -> Delivered:
        body = orjson.dumps(payload)
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "X-Loyalist-Timestamp": str(ts),
            "X-Loyalist-Signature": webhook_signature(self.key, ts, body),
            "X-Loyalist-Idempotency-Key": idempotency_key,
            "X-Loyalist-Message-Id": message_id,
            "User-Agent": "loyalist-notify/1",
        }
        try:
            resp = await self.client.request(method, url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError("webhook_unreachable", f"{type(exc).__name__}: {exc}", permanent=False) from exc
        if 200 <= resp.status_code < 300:
            return Delivered(provider_id=resp.headers.get("x-request-id", ""), response=str(resp.status_code))
        detail = f"{resp.status_code} {resp.text[:200]}"
        if resp.status_code in (408, 425, 429) or resp.status_code >= 500:
            raise DeliveryError("webhook_retryable", detail, permanent=False)
        raise DeliveryError("webhook_rejected", detail, permanent=True)
