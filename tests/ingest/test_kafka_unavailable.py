"""With Kafka unreachable, ingest stays up and answers 503 + Retry-After (never 200, never 500)."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # released on close: nothing listens there


def test_kafka_down_gives_503_with_retry_after(private_ingest: Any, basic_auth: Any, ingest: Any) -> None:
    proc = private_ingest(LOYALIST_KAFKA_PORT=str(_closed_port()), LOYALIST_INGEST_PRODUCE_TIMEOUT_S="1").wait_live()
    with httpx.Client(base_url=proc.url, headers=basic_auth(ingest.settings.dev_write_key), timeout=30) as client:
        single = client.post("/v1/track", json={"userId": "u", "event": "Lost?"})
        batch = client.post("/v1/batch", json={"batch": [{"type": "page", "anonymousId": "a"}] * 3})
        ready = client.get("/readyz")
    for response in (single, batch):
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "kafka_unavailable"
        assert int(response.headers["Retry-After"]) > 0
    assert ready.status_code == 503
    assert ready.json()["checks"]["kafka"] is False
