"""Redis-backed guards shared by every ingest replica: a token bucket per write key and the
deduplication window by (source, messageId).

Deduplication never loses an accepted message: ids are checked before producing but recorded only after
Kafka acknowledged. A crash between the acknowledgement and the record, or two concurrent copies of one
message, can therefore let a duplicate through — downstream consumers deduplicate by messageId too.
When Redis is unreachable, ingest keeps accepting (without dedup and rate limiting) for the same reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from loyalist.settings import Settings
from services.ingest.metrics import REDIS_DEGRADED

log = logging.getLogger(__name__)

# Token bucket on the Redis server clock (replicas' clocks may differ). KEYS[1] the bucket; ARGV rate per
# second, burst, cost. Returns {allowed (0/1), seconds to wait (string)}.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil then tokens = burst; at = now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    retry_after_s: float
    seen: list[bool]  # per message id: already accepted within the dedup window


class IngestGuard:
    def __init__(self, redis: Redis, settings: Settings, *, rate_per_s: float, burst: int, dedup_ttl_s: int) -> None:
        self.redis = redis
        self.settings = settings
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.dedup_ttl_s = dedup_ttl_s
        self._bucket = redis.register_script(_TOKEN_BUCKET)

    def dedup_key(self, source: str, message_id: str) -> str:
        return self.settings.redis_key("ingest", "seen", source, message_id)

    def bucket_key(self, limiter_id: str) -> str:
        return self.settings.redis_key("ingest", "rate", limiter_id)

    async def admit(self, limiter_id: str, source: str, message_ids: Sequence[str]) -> Admission:
        """One round trip: take ``len(message_ids)`` tokens and look the ids up in the dedup window."""
        cost = max(1, min(len(message_ids), self.burst))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._bucket(keys=[self.bucket_key(limiter_id)], args=[self.rate_per_s, self.burst, cost],
                                   client=pipe)
                if message_ids:
                    pipe.mget([self.dedup_key(source, m) for m in message_ids])
                results = await pipe.execute()
        except Exception as exc:
            REDIS_DEGRADED.labels("admit").inc()
            log.warning("redis unavailable for admission (%s); accepting without dedup/rate limit", exc)
            return Admission(True, 0.0, [False] * len(message_ids))
        allowed, wait = results[0]
        seen = [v is not None for v in results[1]] if message_ids else []
        return Admission(bool(int(allowed)), float(wait), seen)

    async def remember(self, source: str, message_ids: Sequence[str]) -> None:
        """Record ids acknowledged by Kafka so resends within the window are recognised."""
        if not message_ids:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for m in message_ids:
                    pipe.set(self.dedup_key(source, m), b"1", ex=self.dedup_ttl_s)
                await pipe.execute()
        except Exception as exc:
            REDIS_DEGRADED.labels("remember").inc()
            log.warning("redis unavailable to record %d ids (%s); downstream dedups", len(message_ids), exc)

    async def remember_order_customer(self, platform: str, shop: str, order_id: str, who: dict[str, str],
                                      ttl_s: int = 400 * 24 * 3600) -> None:
        """Refund webhooks name only the order; remember whose order it was."""
        try:
            await self.redis.set(self.settings.redis_key("ingest", "order", platform, shop, order_id),
                                 orjson.dumps(who), ex=ttl_s)
        except Exception:
            REDIS_DEGRADED.labels("order_index").inc()

    async def order_customer(self, platform: str, shop: str, order_id: str) -> dict[str, str] | None:
        try:
            raw = await self.redis.get(self.settings.redis_key("ingest", "order", platform, shop, order_id))
        except Exception:
            REDIS_DEGRADED.labels("order_index").inc()
            return None
        return orjson.loads(raw) if raw else None

    async def seen_once(self, key_parts: Sequence[str]) -> bool:
        """True when this key (e.g. a webhook delivery id) was recorded by :meth:`record_once` — only after
        its events were acknowledged, so a failed delivery is processed again on the platform's retry."""
        try:
            return bool(await self.redis.exists(self.settings.redis_key("ingest", *key_parts)))
        except Exception:
            REDIS_DEGRADED.labels("claim").inc()
            return False

    async def record_once(self, key_parts: Sequence[str], ttl_s: int) -> None:
        try:
            await self.redis.set(self.settings.redis_key("ingest", *key_parts), b"1", ex=ttl_s)
        except Exception:
            REDIS_DEGRADED.labels("record").inc()
