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
from typing import Any

import orjson
from redis.asyncio import Redis

from loyalist.settings import Settings
from services.ingest.metrics import REDIS_DEGRADED

log = logging.getLogger(__name__)

# One Redis round trip of the ingest pipeline (see ``services/ingest/pipeline.py``), in one command:
#   1. remember: SET <key> 1 EX <ttl> for the ids Kafka acknowledged since the previous round trip;
#   2. token buckets on the Redis server clock (replicas' clocks may differ), one take per request, in order
#      (a key may repeat; a refused request takes no tokens);
#   3. dedup lookup: whether each id of the admitted requests was already accepted.
# KEYS: the nr remember keys, then the nb bucket keys, then the dedup keys.
# ARGV: nr, nb, ttl (s), rate (tokens/s), burst, then the nb costs.
# Returns {allowed_1 (0/1), wait_1 (seconds, string), ..., allowed_nb, wait_nb, seen_1 (0/1), ...}.
_ROUND = """
local nr = tonumber(ARGV[1])
local nb = tonumber(ARGV[2])
local ttl = ARGV[3]
for i = 1, nr do
  redis.call('SET', KEYS[i], '1', 'EX', ttl)
end
local out = {}
if nb > 0 then
  local rate = tonumber(ARGV[4])
  local burst = tonumber(ARGV[5])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local buckets = {}
  local order = {}
  for i = 1, nb do
    local key = KEYS[nr + i]
    local tokens = buckets[key]
    if tokens == nil then
      local state = redis.call('HMGET', key, 'tokens', 'at')
      tokens = tonumber(state[1])
      local at = tonumber(state[2])
      if tokens == nil then tokens = burst; at = now end
      tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
      order[#order + 1] = key
    end
    local cost = tonumber(ARGV[5 + i])
    if tokens >= cost then
      tokens = tokens - cost
      out[#out + 1] = 1
      out[#out + 1] = '0'
    else
      out[#out + 1] = 0
      out[#out + 1] = tostring((cost - tokens) / rate)
    end
    buckets[key] = tokens
  end
  local expire = math.ceil(burst / rate * 1000) + 1000
  for _, key in ipairs(order) do
    redis.call('HSET', key, 'tokens', tostring(buckets[key]), 'at', tostring(now))
    redis.call('PEXPIRE', key, expire)
  end
end
for i = nr + nb + 1, #KEYS do
  out[#out + 1] = redis.call('EXISTS', KEYS[i])
end
return out
"""


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: list[bool]  # per request
    retry_after_s: list[float]  # per request: seconds until it would be allowed (0 when allowed)
    seen: list[bool]  # per message id: already accepted within the dedup window


class IngestGuard:
    def __init__(self, redis: Redis, settings: Settings, *, rate_per_s: float, burst: int, dedup_ttl_s: int) -> None:
        self.redis = redis
        self.settings = settings
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.dedup_ttl_s = dedup_ttl_s
        self._seen_prefix = settings.redis_key("ingest", "seen", "")
        self._round = redis.register_script(_ROUND)
        self._bucket_keys: dict[str, str] = {}

    def dedup_key(self, source: str, message_id: str) -> str:
        return f"{self._seen_prefix}{source}:{message_id}"

    def bucket_key(self, limiter_id: str) -> str:
        key = self._bucket_keys.get(limiter_id)
        if key is None:
            if len(self._bucket_keys) > 10_000:
                self._bucket_keys.clear()
            key = self._bucket_keys[limiter_id] = self.settings.redis_key("ingest", "rate", limiter_id)
        return key

    async def admit(self, requests: Sequence[tuple[str, int]], ids: Sequence[tuple[str, str]], *,
                    remember: Sequence[tuple[str, str]] = ()) -> Admission:
        """One round trip (one command) for any number of requests: first record ``remember`` — the
        ``(source, message_id)`` pairs Kafka acknowledged, so that resends within the window are recognised —
        then take each request's tokens (``(limiter_id, events)``, in order) and look every
        ``(source, message_id)`` of ``ids`` up in the dedup window."""
        burst = self.burst
        dedup_key = self.dedup_key
        keys = [dedup_key(source, m) for source, m in remember]
        keys += [self.bucket_key(limiter) for limiter, _ in requests]
        keys += [dedup_key(source, m) for source, m in ids]
        args: list[Any] = [len(remember), len(requests), self.dedup_ttl_s, self.rate_per_s, burst]
        args += [max(1, min(n, burst)) for _, n in requests]
        try:
            flat = await self._round(keys=keys, args=args)
        except Exception as exc:
            REDIS_DEGRADED.labels("admit").inc()
            if remember:
                REDIS_DEGRADED.labels("remember").inc()
            log.warning("redis unavailable for admission (%s); accepting without dedup/rate limit, %d ids not "
                        "recorded (downstream dedups)", exc, len(remember))
            return Admission([True] * len(requests), [0.0] * len(requests), [False] * len(ids))
        nb2 = 2 * len(requests)
        allowed = [bool(a) for a in flat[0:nb2:2]]
        waits = [float(w) for w in flat[1:nb2:2]]
        seen = [bool(v) for v in flat[nb2:]]
        return Admission(allowed, waits, seen)

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
