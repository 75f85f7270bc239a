"""Redis adapter: one asyncio client per process, keys always under the namespace."""

from __future__ import annotations

import redis
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


def delete_namespace_keys(settings: Settings) -> int:
    """Remove every key of the namespace (``<namespace>:*``), e.g. when a test or bench namespace is dropped
    with its topics and keyspace. Returns how many were removed."""
    client = redis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db)
    removed = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{settings.namespace}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                removed += int(client.unlink(*batch))
                batch = []
        if batch:
            removed += int(client.unlink(*batch))
    finally:
        client.close()
    return removed
