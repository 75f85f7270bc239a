"""Platform sources (shops and help desks) in Cassandra, cached in-process so webhooks do not read
Cassandra per request."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cassandra.cluster import Session

from loyalist.cassandra import execute

PLATFORMS = ("shopify", "woocommerce", "zendesk")


@dataclass(frozen=True, slots=True)
class PlatformSource:
    platform: str
    shop: str
    source: str
    secret: str

    def public(self) -> dict[str, str]:
        return {"platform": self.platform, "shop": self.shop, "source": self.source}


def normalize_shop(platform: str, shop: str) -> str:
    """Shop identifiers as platforms send them: Shopify domains lower-case, WooCommerce URLs without the
    trailing slash (``X-WC-Webhook-Source`` has one)."""
    shop = shop.strip()
    if platform == "woocommerce":
        return shop.rstrip("/").lower()
    return shop.lower()


class SourceStore:
    def __init__(self, session: Session, *, ttl_s: float = 30.0) -> None:
        self._session = session
        self._ttl = ttl_s
        self._cache: dict[tuple[str, str], tuple[float, PlatformSource | None]] = {}
        self._select = session.prepare(
            "SELECT platform, shop, source, secret, disabled FROM ingest_sources WHERE platform = ? AND shop = ?"
        )
        self._insert = session.prepare(
            "INSERT INTO ingest_sources (platform, shop, source, secret, created_at, disabled) "
            "VALUES (?, ?, ?, ?, toTimestamp(now()), false)"
        )
        self._delete = session.prepare("DELETE FROM ingest_sources WHERE platform = ? AND shop = ?")

    async def get(self, platform: str, shop: str) -> PlatformSource | None:
        key = (platform, normalize_shop(platform, shop))
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached and cached[0] > now:
            return cached[1]
        rows = await execute(self._session, self._select, key)
        found = None
        if rows and not rows[0]["disabled"]:
            r = rows[0]
            found = PlatformSource(r["platform"], r["shop"], r["source"], r["secret"])
        self._cache[key] = (now + self._ttl, found)
        return found

    async def put(self, platform: str, shop: str, source: str, secret: str) -> PlatformSource:
        shop = normalize_shop(platform, shop)
        await execute(self._session, self._insert, (platform, shop, source, secret))
        self._cache.pop((platform, shop), None)
        return PlatformSource(platform, shop, source, secret)

    async def delete(self, platform: str, shop: str) -> None:
        shop = normalize_shop(platform, shop)
        await execute(self._session, self._delete, (platform, shop))
        self._cache.pop((platform, shop), None)

    async def list(self) -> list[PlatformSource]:
        rows = await execute(self._session, "SELECT platform, shop, source, secret, disabled FROM ingest_sources")
        return [PlatformSource(r["platform"], r["shop"], r["source"], r["secret"]) for r in rows if not r["disabled"]]
