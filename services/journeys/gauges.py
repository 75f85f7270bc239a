"""Publish stored-state measurement (``summarize`` output) as Prometheus gauges."""

from __future__ import annotations

from typing import Any

from services.journeys import metrics


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
