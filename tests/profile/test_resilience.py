"""Crashes and rebuilds: kill -9 mid-stream, a second worker taking over, and replay equality."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import orjson
import pytest
from cassandra.cluster import NoHostAvailable

from loyalist.cassandra import connect
from loyalist.settings import Settings
from tests.conftest import REPO, ServiceProcess, free_port
from tests.profile.conftest import T0, ProfileClient, make_event, order, produce, uid, wait_for

pytestmark = pytest.mark.integration


def feed_in_chunks(settings: Settings, users: list[str], orders_each: int, chunks: int, pause_s: float) -> None:
    events = [order(u, i + 1, T0 + timedelta(days=i)) for i in range(orders_each) for u in users]
    size = len(events) // chunks + 1
    for start in range(0, len(events), size):
        produce(settings, events[start:start + size])
        time.sleep(pause_s)


def all_exact(api: ProfileClient, users: list[str], orders_each: int) -> bool:
    expected_revenue = sum(range(1, orders_each + 1))
    for user in users:
        doc = api.profile(user, by="user_id")
        if doc is None or doc["orders_count"] != orders_each or doc["events_count"] != orders_each:
            return False
        assert doc["revenue_total"] == expected_revenue, doc  # more than expected would be double counting
    return True


def test_kill_9_mid_stream_loses_and_double_counts_nothing(stack_settings: Settings, profile_service: Any,
                                                          api: ProfileClient) -> None:
    users = [uid("crash") for _ in range(40)]
    feeder = threading.Thread(target=feed_in_chunks, args=(stack_settings, users, 10, 8, 0.3))
    feeder.start()
    # Kill as soon as the processor is part-way through.
    wait_for(lambda: any(api.profile(u, by="user_id") for u in users), what="some processing")
    profile_service.kill(hard=True)
    feeder.join()
    profile_service.start()
    wait_for(lambda: all_exact(api, users, 10), timeout_s=90, what="every user with exactly 10 orders")


def second_worker(profile_service: ServiceProcess) -> ServiceProcess:
    settings = profile_service.settings.model_copy(update={"profile_port": free_port()})
    env = {**profile_service.env, "LOYALIST_PROFILE_PORT": str(settings.profile_port)}
    worker = ServiceProcess("profile", settings, env, profile_service.log_path.with_name("profile-second.log"))
    return worker.start()


def test_a_second_worker_takes_over_when_the_first_dies(stack_settings: Settings, profile_service: Any,
                                                        api_headers: dict[str, str]) -> None:
    other = second_worker(profile_service)
    try:
        users = [uid("failover") for _ in range(30)]
        feeder = threading.Thread(target=feed_in_chunks, args=(stack_settings, users, 8, 6, 0.5))
        feeder.start()
        with other.client() as client:
            api = ProfileClient(client, api_headers)
            wait_for(lambda: any(api.profile(u, by="user_id") for u in users), what="some processing")
            profile_service.kill(hard=True)
            feeder.join()
            wait_for(lambda: all_exact(api, users, 8), timeout_s=90, what="the survivor finishing the work")
    finally:
        other.kill(hard=False)
        profile_service.start()


def _connect(settings: Settings) -> tuple[Any, Any]:
    for attempt in range(5):  # the shared node can time out a control connection when it is busy
        try:
            return connect(settings, keyspace=settings.keyspace)
        except NoHostAvailable:
            if attempt == 4:
                raise
            time.sleep(2 * (attempt + 1))
    raise AssertionError("unreachable")


def _profiles(settings: Settings) -> dict[str, dict[str, Any]]:
    cluster, session = _connect(settings)
    try:
        out = {}
        for row in session.execute("SELECT profile_id, document, merged_into FROM profiles"):
            if row["document"] and not row["merged_into"]:
                doc = orjson.loads(row["document"])
                doc.pop("segments")
                out[row["profile_id"]] = doc
        return out
    finally:
        cluster.shutdown()


def test_replay_rebuilds_every_profile_field_for_field(stack_settings: Settings, profile_service: Any,
                                                       api: ProfileClient) -> None:
    # Some history of our own (merges, late events), then wait for the live side to be idle.
    anon, user = uid("anon"), uid("user")
    buyers = [uid("buyer") for _ in range(20)]
    history = [order(b, i + 1, T0 + timedelta(days=(7 * i) % 5)) for i in range(3) for b in buyers]
    history.append(order(buyers[1], 9, T0, email=f"{buyers[0]}@x.io"))
    history.append(make_event("identify", userId=buyers[0], traits={"email": f"{buyers[0]}@x.io"}))
    produce(stack_settings, [make_event("page", anonymousId=anon), order(user, 5, T0 + timedelta(days=3)),
                             make_event("identify", userId=user, anonymousId=anon, traits={"email": f"{user}@x.io"}),
                             order(user, 7, T0), *history])
    marker = uid("marker")
    api.wait_profile(user, lambda p: p["orders_count"] == 2 and p["page_views_count"] == 1, by="user_id")
    produce(stack_settings, [order(marker, 1, T0)])
    api.wait_profile(marker, by="user_id")
    time.sleep(2)
    live = _profiles(stack_settings)
    assert len(live) >= 20
    # Rebuild in place (the fresh-namespace mode differs only in where it writes, and would spend minutes
    # creating every service's tables on this machine); the service is stopped meanwhile, as documented.
    profile_service.kill(hard=False)
    try:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "services.profile.replay", "--in-place", "--yes"],
            cwd=REPO, env=profile_service.env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        print(f"\nreplay: {result.stdout.strip()} (wall {time.monotonic() - started:.1f}s)")
        assert "event/s" in result.stderr  # the tqdm progress bar with a rate
        rebuilt = _profiles(stack_settings)
        assert set(rebuilt) == set(live)
        different = [pid for pid in live if live[pid] != rebuilt[pid]]
        assert not different, (different[:3], [(live[p], rebuilt[p]) for p in different[:1]])
    finally:
        profile_service.start()
