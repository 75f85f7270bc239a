"""The journey gauges' refresh loop: who publishes, and how often it scans (pure logic, fake clock and scan)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
import pytest
from prometheus_client import REGISTRY

from services.journeys.domain.codec import instance_to_doc
from services.journeys.domain.definition import parse_definition
from services.journeys.domain.engine import EventTrigger, decide_entry
from services.journeys.domain.templates import build_template
from services.journeys.gauges import refresh_gauges_forever

T0 = datetime(2024, 3, 1, 10, tzinfo=UTC)


def _states(n: int) -> list[str]:
    d = parse_definition(build_template("abandoned_checkout", {"first_reminder_after": "PT1H"}))
    out = []
    for i in range(n):
        entry = decide_entry(d, "jg", 1, f"p{i}", EventTrigger("Checkout Started", f"m{i}", {"checkout_id": str(i)}),
                             [], T0, None)
        assert entry is not None
        out.append(orjson.dumps(instance_to_doc(entry.instance)).decode())
    return out


def _entered(journey_id: str) -> float | None:
    return REGISTRY.get_sample_value("loyalist_journey_instances", {"journey": journey_id, "state": "entered"})


async def _run(publishes: list[bool], scan_s: float, *, rounds: int) -> tuple[list[float], int]:
    """Drive the loop ``rounds`` sleeps on a fake clock where a scan takes ``scan_s``; returns the waits asked
    for and the number of scans."""
    now = [0.0]
    waits: list[float] = []
    scans = [0]
    states = _states(3)

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds
        if len(waits) > rounds:
            raise asyncio.CancelledError

    async def states_for_journey(_: str) -> Sequence[str]:
        scans[0] += 1
        now[0] += scan_s
        return states

    turn = iter(publishes)
    with pytest.raises(asyncio.CancelledError):
        await refresh_gauges_forever(publishes=lambda: next(turn), active_journeys=lambda: ["jg"],
                                     states_for_journey=states_for_journey, every_s=30, sleep=sleep,
                                     clock=lambda: now[0])
    return waits, scans[0]


async def test_only_the_publishing_worker_scans_and_a_worker_that_stops_publishing_drops_its_gauges() -> None:
    waits, scans = await _run([True, False], scan_s=0.5, rounds=2)
    assert scans == 1 and waits == [30, 30, 30]
    assert _entered("jg") is None  # published on the first round, dropped on the second
    await _run([True], scan_s=0.5, rounds=1)
    assert _entered("jg") == 3


async def test_a_long_scan_stretches_the_wait_to_ten_times_its_length() -> None:
    waits, scans = await _run([True, True], scan_s=12.0, rounds=2)
    assert scans == 2 and waits == [30, 120, 120]
