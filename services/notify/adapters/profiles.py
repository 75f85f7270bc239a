"""The profile document (written by the profile service) from its Redis hot copy."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from loyalist.settings import Settings


class ProfileReader:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis

    async def get(self, profile_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.settings.redis_key("profile", profile_id))
        if raw is None:
            return None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return doc if isinstance(doc, dict) else None
