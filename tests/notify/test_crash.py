"""kill -9 notify at chosen points of delivery, many times, while a batch of requests flows, and count what
reached the SMTP sink: no duplicate and no loss where the design promises it, and an honest, visible
outcome in the one window it cannot close (provider accepted, not yet recorded)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest

from loyalist.settings import Settings
from tests.conftest import ServiceProcess
from tests.notify.conftest import (
    launch_notify,
    message_log,
    produce_requests,
    profile_doc,
    put_profiles,
    request_doc,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _sink_counts(settings: Settings, emails: list[str]) -> Counter[str]:
    """Copies per address, one filtered query each (listing the whole shared sink parses every stored
    message, which is slow and starves the sink's SMTP side)."""
    counts: Counter[str] = Counter()
    with httpx.Client(timeout=20) as client:
        for email in emails:
            resp = client.get(f"http://127.0.0.1:{settings.smtp_sink_http_port}/messages", params={"to": email})
            resp.raise_for_status()
            counts[email] = len(resp.json())
    return counts


def _drive(settings: Settings, headers: dict[str, str], svc: ServiceProcess, run_tag: str,
           emails: list[str], keys: list[str], final: set[str], timeout_s: float) -> tuple[int, list[dict[str, Any]]]:
    """Keep notify alive (restart it whenever it killed itself) until every key has a final status."""
    crashes = 0
    deadline = time.monotonic() + timeout_s
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        assert svc.proc is not None
        if svc.proc.poll() is not None:
            crashes += 1
            try:
                svc.start()
            except RuntimeError:
                continue  # it died again before it was ready: that is a crash too, counted next round
        try:
            rows = [r for k in keys for r in message_log(svc, headers, idempotency_key=k)]
        except httpx.HTTPError:
            time.sleep(0.3)
            continue
        if len(rows) == len(keys) and all(r["status"] in final for r in rows):
            return crashes, rows
        time.sleep(0.3)
    raise AssertionError(f"not finished in {timeout_s}s after {crashes} crashes: "
                         f"{Counter(r['status'] for r in rows)}; sink {sum(_sink_counts(settings, emails).values())}")


def _batch(settings: Settings, n: int, tag: str) -> tuple[str, list[str], list[dict[str, Any]]]:
    run_tag = f"{tag}{uuid.uuid4().hex[:8]}"
    emails = [f"{run_tag}-{i}@example.test" for i in range(n)]
    profiles = [profile_doc(f"p-{run_tag}-{i}", email) for i, email in enumerate(emails)]
    put_profiles(settings, *profiles)
    requests = [request_doc(p["profile_id"], "welcome_1", key=f"crash:{run_tag}:{i}") for i, p in enumerate(profiles)]
    return run_tag, emails, requests


@pytest.mark.parametrize("point", ["after_record", "before_send"])
def test_kill9_between_send_and_commit_never_duplicates_nor_loses(
    stack_settings: Settings, api_headers: dict[str, str], point: str
) -> None:
    n = 16
    run_tag, emails, requests = _batch(stack_settings, n, point.replace("_", ""))
    # One message in flight at a time, so a crash lands exactly at the named point of one message.
    # Every process incarnation dies at its 5th pass through the point: several kills, guaranteed progress.
    svc = launch_notify(stack_settings, f"crash-{point}", LOYALIST_NOTIFY_CRASH_POINT=point,
                        LOYALIST_NOTIFY_CRASH_EVERY="5", LOYALIST_NOTIFY_CONCURRENCY="1",
                        LOYALIST_NOTIFY_BATCH_SIZE="10")
    # Requests go out once notify is ready: a crash before readiness would look like a failed start.
    produce_requests(stack_settings, *requests)
    try:
        crashes, rows = _drive(stack_settings, api_headers, svc, run_tag, emails,
                               [r["idempotencyKey"] for r in requests], {"sent"}, 150)
        time.sleep(1.5)  # let any stray redelivery land before counting
        counts = _sink_counts(stack_settings, emails)
    finally:
        svc.kill(hard=False)
    assert crashes >= 3, f"only {crashes} crashes: the test did not exercise the crash point"
    missing = [e for e in emails if counts[e] == 0]
    duplicated = {e: c for e, c in counts.items() if c > 1}
    assert not missing, f"lost: {missing}"
    assert not duplicated, f"duplicated: {duplicated}"
    if point == "after_record":
        # "sent" was recorded before the kill: a redelivery never even reaches the provider again.
        assert all(not r["ambiguousRecovery"] for r in rows)
    print(f"{point}: {n} messages, {crashes} kill -9, 0 lost, 0 duplicated")


def test_kill9_in_the_residual_window_is_visible_and_never_loses(
    stack_settings: Settings, api_headers: dict[str, str]
) -> None:
    """After the provider accepted a message and before "sent" is recorded, nobody can know whether it went
    out. With the default policy (resend) nothing is lost; a duplicate can occur and only there, and every such
    message says ``ambiguousRecovery: true`` in the delivery log."""
    n = 8
    run_tag, emails, requests = _batch(stack_settings, n, "window")
    svc = launch_notify(stack_settings, "crash-window", LOYALIST_NOTIFY_CRASH_POINT="after_send",
                        LOYALIST_NOTIFY_CRASH_EVERY="4", LOYALIST_NOTIFY_CONCURRENCY="1",
                        LOYALIST_NOTIFY_BATCH_SIZE="4")
    produce_requests(stack_settings, *requests)
    try:
        crashes, rows = _drive(stack_settings, api_headers, svc, run_tag, emails,
                               [r["idempotencyKey"] for r in requests], {"sent"}, 150)
        time.sleep(1.5)
        counts = _sink_counts(stack_settings, emails)
    finally:
        svc.kill(hard=False)
    assert crashes >= 2
    assert all(counts[e] >= 1 for e in emails), "lost a message"
    by_email = {r["recipient"]: r for r in rows}
    for email, count in counts.items():
        if count > 1:
            assert by_email[email]["ambiguousRecovery"], f"{email} duplicated without being flagged"
    flagged = sum(1 for r in rows if r["ambiguousRecovery"])
    assert flagged >= 1
    print(f"residual window: {n} messages, {crashes} kill -9, {flagged} ambiguous recoveries, "
          f"{sum(c - 1 for c in counts.values())} duplicates, 0 lost")


def test_random_kill9_under_concurrent_load(stack_settings: Settings, api_headers: dict[str, str]) -> None:
    """No crash point: the test kills the process from outside at random moments while it delivers many
    customers concurrently. Nothing is lost; a duplicate can only be a message the log flags as an ambiguous
    recovery (killed inside the residual window)."""
    import random

    n, waves = 60, 3
    run_tag, emails, requests = _batch(stack_settings, n, "random")
    svc = launch_notify(stack_settings, "crash-random", LOYALIST_NOTIFY_BATCH_SIZE="20")
    keys = [r["idempotencyKey"] for r in requests]
    kills = 0
    try:
        size = n // waves
        for wave in range(waves):
            # a wave of requests lands, and the process dies while it is delivering them
            produce_requests(stack_settings, *requests[wave * size:(wave + 1) * size])
            time.sleep(random.uniform(0.05, 0.8))
            svc.kill(hard=True)
            kills += 1
            svc.start()
        _, rows = _drive(stack_settings, api_headers, svc, run_tag, emails, keys, {"sent"}, 120)
        time.sleep(1.5)
        counts = _sink_counts(stack_settings, emails)
    finally:
        svc.kill(hard=True)
    assert all(counts[e] >= 1 for e in emails), f"lost: {[e for e in emails if counts[e] == 0]}"
    by_email = {r["recipient"]: r for r in rows}
    unexplained = [e for e, c in counts.items() if c > 1 and not by_email[e]["ambiguousRecovery"]]
    assert not unexplained, f"duplicated without an ambiguous recovery: {unexplained}"
    print(f"random kill -9: {n} messages, {kills} kills, "
          f"{sum(1 for r in rows if r['ambiguousRecovery'])} ambiguous recoveries, "
          f"{sum(c - 1 for c in counts.values())} duplicates, 0 lost")
