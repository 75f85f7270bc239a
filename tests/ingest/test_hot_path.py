"""The tracking hot path: the short ASGI path answers exactly like the full FastAPI stack, and the one-command
Redis round trip (remember + token buckets + dedup lookup) behaves like the separate steps it replaced."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from loyalist.redis import make_redis
from loyalist.settings import Settings
from services.ingest.adapters.guard import IngestGuard

pytestmark = pytest.mark.integration

ORIGIN = {"Origin": "http://localhost:8080"}  # a configured storefront origin: the full FastAPI stack


@pytest.mark.parametrize(("path", "content", "headers"), [
    ("/v1/track", b"{not json", {}),
    ("/v1/track", b'{"event": "no identity"}', {}),
    ("/v1/identify", b"[1, 2]", {}),
    ("/v1/batch", b'{"batch": "nope"}', {}),
    ("/v1/batch", b'{"batch": [{"type": "track", "userId": "u"}]}', {}),
    ("/lp/v1/page", b"", {}),
    ("/v1/track", b'{"userId": "u", "event": "x"}', {"Authorization": "Basic d3Jvbmc6"}),
    ("/v1/track", b'{"userId": "u", "event": "x"}', {"Content-Encoding": "br"}),
])
def test_short_path_and_full_stack_answer_alike(track_client: httpx.Client, path: str, content: bytes,
                                                headers: dict[str, str]) -> None:
    short = track_client.post(path, content=content, headers={"Content-Type": "application/json", **headers})
    full = track_client.post(path, content=content, headers={"Content-Type": "application/json", **headers,
                                                             **ORIGIN})
    assert 400 <= short.status_code < 500, short.text
    assert (short.status_code, short.json()) == (full.status_code, full.json())
    assert full.headers["access-control-allow-origin"] == ORIGIN["Origin"]
    for name in ("retry-after", "www-authenticate", "content-type"):
        assert short.headers.get(name) == full.headers.get(name)


def test_short_path_success_and_metrics(track_client: httpx.Client) -> None:
    ok = track_client.post("/v1/track", json={"userId": "hp-u", "event": "Product Viewed"})
    assert ok.status_code == 200 and ok.json() == {"success": True, "duplicate": False}
    assert ok.headers["content-type"] == "application/json"
    metrics = track_client.get("/metrics").text
    assert 'loyalist_http_requests_total{method="POST",route="/v1/track",service="ingest",status="200"}' in metrics
    assert "loyalist_ingest_coalesced_calls_count" in metrics


async def test_one_round_trip_takes_tokens_in_order_and_remembers_before_looking_up(ingest: Any) -> None:
    settings: Settings = ingest.settings
    redis = make_redis(settings)
    guard = IngestGuard(redis, settings, rate_per_s=1.0, burst=3, dedup_ttl_s=60)
    limiter = f"hp-{secrets.token_hex(4)}"
    try:
        # Four requests on one bucket of 3 tokens (costs 2, 2, 1, 5): the second and the last do not fit and
        # take nothing; a request costs at most the burst.
        admission = await guard.admit([(limiter, 2), (limiter, 2), (limiter, 1), (limiter, 5)],
                                      [("web", "a"), ("web", "b")])
        assert admission.allowed == [True, False, True, False]
        assert admission.retry_after_s[0] == 0.0 and 0.5 < admission.retry_after_s[1] <= 1.0
        assert 1.5 < admission.retry_after_s[3] <= 3.0
        assert admission.seen == [False, False]
        # Remembered ids are recorded first, so the same round trip already sees them; per source.
        other = f"{limiter}-2"
        admission = await guard.admit([(other, 1)], [("web", "a"), ("web", "b"), ("shop", "a")],
                                      remember=[("web", "a")])
        assert admission.allowed == [True] and admission.seen == [True, False, False]
        ttl = await redis.ttl(guard.dedup_key("web", "a"))
        assert 0 < ttl <= 60
        # A remember-only round trip.
        empty = await guard.admit([], [], remember=[("web", "b")])
        assert empty.allowed == [] and empty.seen == []
        assert (await guard.admit([(other, 1)], [("web", "b")])).seen == [True]
    finally:
        await redis.aclose()
