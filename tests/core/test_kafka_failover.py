"""Kill -9 the Kafka broker in the middle of a steady stream of tracking calls, restart it, and check from
the outside that every event ingest acknowledged with 200 is in the log — and, through the profile
processor, folded exactly once.

The broker here is a private one (own ports and data dir) so the shared servers other sessions use are
never disturbed; Cassandra and Redis are the shared ones, isolated by the test namespace.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from loyalist.devstack import Stack
from loyalist.events import decode_event
from loyalist.kafka import ensure_topics
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = [f"kafka-failover-{i}" for i in range(20)]


async def _send(client: httpx.AsyncClient, user: str, message_id: str) -> int:
    try:
        resp = await client.post("/v1/track", json={
            "userId": user, "event": "Order Completed", "messageId": message_id,
            "properties": {"order_id": message_id, "total": 10.0, "currency": "USD"},
        })
        return resp.status_code
    except httpx.HTTPError:
        return 0


async def _drive(client: httpx.AsyncClient, acked: dict[str, str], failed: dict[str, str], stop: asyncio.Event) -> None:
    """Steady load from 4 concurrent clients until ``stop``; remembers which messages got a 200."""

    async def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            user = USERS[(n + i) % len(USERS)]
            mid = f"m-{n}-{i}-{uuid.uuid4().hex[:6]}"
            status = await _send(client, user, mid)
            (acked if status == 200 else failed)[mid] = user
            i += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(*(worker(n) for n in range(4)))


async def _log_message_ids(settings: Settings) -> list[str]:
    consumer = AIOKafkaConsumer(
        settings.topic(EVENTS_RAW.name), bootstrap_servers=settings.kafka_bootstrap, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    ids: list[str] = []
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if not batch:
                idle += 1
                continue
            idle = 0
            for records in batch.values():
                ids.extend(decode_event(r.value).message_id for r in records)
    finally:
        await consumer.stop()
    return ids


async def test_broker_killed_mid_stream_loses_nothing_acknowledged(
    tmp_path: Path, stack_settings: Settings, start_service
) -> None:
    private = stack_settings.model_copy(update={
        "home": tmp_path / "private-kafka", "kafka_port": free_port(), "kafka_controller_port": free_port(),
        "jars_dir": Settings().state_dir / "jars",
    })
    stack = Stack(private, quiet=True)
    await asyncio.to_thread(stack.up, ["kafka"])
    try:
        await ensure_topics(private)
        kafka_env = {"LOYALIST_KAFKA_PORT": str(private.kafka_port),
                     "LOYALIST_KAFKA_CONTROLLER_PORT": str(private.kafka_controller_port)}
        ingest = start_service("ingest", **kafka_env)
        profile = start_service("profile", LOYALIST_LOG_LEVEL="INFO", **kafka_env)
        acked: dict[str, str] = {}
        failed: dict[str, str] = {}
        async with httpx.AsyncClient(base_url=ingest.url, auth=(private.dev_write_key, ""), timeout=15) as client:
            stop = asyncio.Event()
            load = asyncio.create_task(_drive(client, acked, failed, stop))
            await asyncio.sleep(4)
            before_kill = len(acked)
            await asyncio.to_thread(stack.kill9, "kafka")
            killed_at = time.monotonic()
            await asyncio.sleep(2)
            await asyncio.to_thread(stack.start, "kafka")
            await asyncio.to_thread(stack.wait_ready, "kafka")
            recovered_in = time.monotonic() - killed_at
            after_recovery = len(acked)
            await asyncio.sleep(4)
            stop.set()
            await load
            # A client retries what was refused (ingest said 503 + Retry-After); after recovery it must land.
            for mid, user in list(failed.items()):
                for _ in range(20):
                    if await _send(client, user, mid) == 200:
                        acked[mid] = user
                        break
                    await asyncio.sleep(0.5)
        ids = await _log_message_ids(private)
        in_log = set(ids)
        lost = [m for m in acked if m not in in_log]
        print(f"\nkafka failover: acknowledged={len(acked)} (before kill {before_kill}, after recovery "
              f"{len(acked) - after_recovery} more), refused during outage="
              f"{len(failed)}, in log={len(in_log)} (records {len(ids)}), lost={len(lost)}, "
              f"broker back in {recovered_in:.1f}s")
        assert before_kill > 0, "no event was acknowledged before the broker was killed"
        assert failed, "the outage refused nothing: the broker was not really down"
        assert not lost, f"{len(lost)} acknowledged events are missing from the log: {lost[:5]}"
        assert set(failed) <= set(acked), "some refused events could not be delivered after recovery"
        assert len(acked) > after_recovery, "ingest did not resume acknowledging after the broker came back"

        # The slice recovers: the processor folds every acknowledged order exactly once (the duplicates a
        # retried produce left in the log are dropped by messageId).
        expected = {u: sum(1 for owner in acked.values() if owner == u) for u in USERS}
        seen: dict[str, int] = {}
        headers = {"Authorization": f"Bearer {private.dev_api_token}"}
        async with httpx.AsyncClient(base_url=profile.url, headers=headers, timeout=10) as api:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                for user in USERS:
                    resp = await api.get(f"/v1/profiles/{user}", params={"by": "user_id"})
                    seen[user] = resp.json().get("orders_count", 0) if resp.status_code == 200 else 0
                if seen == expected:
                    break
                await asyncio.sleep(1)
        if seen != expected and profile.proc is not None:
            # Where the profile worker's tasks wait (its SIGUSR1 handler logs them), for the failure message.
            os.kill(profile.proc.pid, signal.SIGUSR1)
            await asyncio.sleep(1)
        assert seen == expected, (
            {u: (seen.get(u), n) for u, n in expected.items() if seen.get(u) != n},
            _tail(profile.log_path, "task dump on SIGUSR1"))
    finally:
        await asyncio.to_thread(stack.down, ["kafka"])


def _tail(log_path: Path, marker: str, lines: int = 150) -> str:
    """The log from its last ``marker`` line on (or its last lines), without the per-fetch connection errors."""
    text = log_path.read_text(errors="replace").splitlines()
    start = max((i for i, line in enumerate(text) if marker in line), default=max(0, len(text) - lines))
    kept = [line for line in text[start:] if "Unable connect" not in line and "Failed fetch" not in line]
    return "\n".join(kept[:lines])
