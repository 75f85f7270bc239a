"""Publish stored-state measurement (``summarize`` output) as Prometheus gauges."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from services.journeys import metrics
from services.journeys.domain.codec import instance_from_doc
from services.journeys.domain.stats import summarize

log = logging.getLogger(__name__)


def summarize_states(states: Sequence[str]) -> dict[str, Any]:
    """``summarize`` over stored instance states (JSON), decoding them one at a time."""
    return summarize(instance_from_doc(orjson.loads(state)) for state in states)


def clear_stats() -> None:
    """Drop every journey gauge series: a worker that no longer publishes them must not leave its last values
    behind (a dashboard sums them over workers)."""
    for gauge in (metrics.JOURNEY_INSTANCES, metrics.NODE_INSTANCES, metrics.CONVERSION_RATE, metrics.UPLIFT):
        gauge.clear()


def publish_stats(journey_id: str, summary: dict[str, Any]) -> None:
    for state in ("entered", "waiting", "active", "completed", "exited", "converted"):
        metrics.JOURNEY_INSTANCES.labels(journey_id, state).set(summary[state])
    for node_id, counts in summary["nodes"].items():
        for measure, value in counts.items():
            metrics.NODE_INSTANCES.labels(journey_id, node_id, measure).set(value)
    holdout = summary["holdout"]
    for group in ("treated", "holdout"):
        rate = holdout[group]["rate"]
        if rate is not None:
            metrics.CONVERSION_RATE.labels(journey_id, group).set(rate)
    if holdout["uplift"] is not None:
        metrics.UPLIFT.labels(journey_id, "estimate").set(holdout["uplift"])
        metrics.UPLIFT.labels(journey_id, "ci95_low").set(holdout["ci95"][0])
        metrics.UPLIFT.labels(journey_id, "ci95_high").set(holdout["ci95"][1])


async def refresh_gauges_forever(*, publishes: Callable[[], bool], active_journeys: Callable[[], Sequence[str]],
                                 states_for_journey: Callable[[str], Awaitable[Sequence[str]]], every_s: float,
                                 scan_share_inverse: float = 10,
                                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                                 clock: Callable[[], float] = time.monotonic) -> None:
    """Keep the journey gauges current from the stored instances.

    Every worker would compute the same global figures, and a dashboard sums a gauge over workers: only the
    worker for which ``publishes()`` holds publishes them, the others drop theirs. A refresh reads every instance
    of every active journey, so it comes at most every ``every_s`` and takes at most 1/``scan_share_inverse`` of
    the time (the wait grows with the last scan); the decoding runs off the event loop."""
    wait = every_s
    while True:
        await sleep(wait)
        if not publishes():
            clear_stats()
            wait = every_s
            continue
        started = clock()
        try:
            for journey_id in active_journeys():
                states = await states_for_journey(journey_id)
                publish_stats(journey_id, await asyncio.to_thread(summarize_states, states))
        except Exception:
            log.exception("refreshing journey gauges")
        wait = max(every_s, scan_share_inverse * (clock() - started))
