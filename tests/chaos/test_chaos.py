"""Resilience under steady load: kill -9 and restart each process in turn, then verify from the outside that
nothing acknowledged was lost or applied twice (see ``harness.py``).

Short form (part of ``make test``): the service processes, in a private namespace on the shared servers.
Full form (``make chaos``, ``LOYALIST_CHAOS=full``): the services and then Kafka, Cassandra and Redis of a
private stack started for the run — the shared servers are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from bench.procs import Fleet, available_services
from loyalist.settings import Settings
from tests.chaos.harness import ChaosRun, Report, private_stack

pytestmark = pytest.mark.integration

FULL = os.environ.get("LOYALIST_CHAOS", "short") == "full"


def _publish(report: Report, settings: Settings, name: str) -> None:
    text = report.render()
    print(f"\n=== chaos ({name}) ===\n{text}")
    out = Settings().state_dir / "chaos"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(text + "\n")


def _assert_clean(report: Report) -> None:
    assert report.acknowledged > 0, "the load generator got no acknowledgement at all"
    assert report.lost_from_log == 0, f"acknowledged events missing from events.raw: {report.lost_from_log}"
    assert not report.lost_from_store, f"acknowledged events missing from the event store: {report.lost_from_store}"
    assert not report.stored_duplicates, f"events stored twice: {report.stored_duplicates}"
    assert not report.profile_mismatches, report.profile_mismatches[:10]
    assert not report.replay_mismatches, report.replay_mismatches[:10]
    assert not report.messages_duplicated, f"messages sent twice: {report.messages_duplicated}"
    assert not report.messages_unhandled, f"message requests never handled: {report.messages_unhandled}"
    unrecovered = [f.target for f in report.faults if f.recovery_s is None]
    assert not unrecovered, f"ingest never acknowledged again after killing {unrecovered}"


def _run(fleet: Fleet, targets: list[str], **kwargs: float) -> Report:
    return asyncio.run(ChaosRun(fleet, **kwargs).run(targets))  # type: ignore[arg-type]


# The short form kills the entry point, the profile processor and the sender; the full form kills every process.
SHORT_TARGETS = ("ingest", "profile", "notify")


@pytest.mark.timeout(600)
@pytest.mark.skipif(FULL, reason="the full form runs instead")
def test_services_killed_in_turn_lose_and_duplicate_nothing() -> None:
    services = available_services()
    fleet = Fleet.create(prefix="chaos")
    try:
        fleet.start(services)
        assert "ingest" in fleet.services, fleet.failures
        targets = [t for t in SHORT_TARGETS if t in fleet.services]
        report = _run(fleet, targets, rate=150, gap_s=3, settle_s=60)
        _publish(report, fleet.settings, "short")
        _assert_clean(report)
    finally:
        fleet.stop()
        with contextlib.suppress(Exception):
            fleet.drop()


@pytest.mark.timeout(1800)
@pytest.mark.skipif(not FULL, reason="full chaos runs with `make chaos` (LOYALIST_CHAOS=full)")
def test_every_process_and_server_killed_in_turn() -> None:
    services = available_services()
    with private_stack() as (settings, stack):
        fleet = Fleet.create(settings, prefix="chaos")
        try:
            fleet.start(services)
            assert "ingest" in fleet.services, fleet.failures
            run = ChaosRun(fleet, stack=stack, rate=200, gap_s=8, settle_s=180)
            report = asyncio.run(run.run([*fleet.services, "kafka", "cassandra", "redis"]))
            _publish(report, fleet.settings, "full")
            _assert_clean(report)
        finally:
            fleet.stop()
