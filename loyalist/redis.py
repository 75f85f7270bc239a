"""Redis adapter: one asyncio client per process, keys always under the namespace."""

from __future__ import annotations

import redis.asyncio as aioredis

from loyalist.settings import Settings


def make_redis(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        db=settings.redis_db,
        socket_timeout=5,
        socket_connect_timeout=3,
        health_check_interval=30,
        max_connections=256,
    )


async def redis_ready(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False
