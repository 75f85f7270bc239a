"""The journeys engine's faust agent: consumes the customer-keyed topics and hands batches to the runner.

One agent over ``events.resolved``, ``segment.membership``, ``journey.timers`` and ``profile.changed``: all
keyed by profile id with the same partition count, so one worker owns a customer's events and timers alike,
and adding workers splits customers between them.
"""

from __future__ import annotations

from typing import Any

import faust

from loyalist.service import make_stream_app
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RESOLVED, JOURNEY_TIMERS, PROFILE_CHANGED, SEGMENT_MEMBERSHIP
from services.journeys.runner import JourneyRunner, Record


class RunnerHolder:
    """The runner is built in the lifespan (it needs open adapters); the agent is declared before that."""

    runner: JourneyRunner | None = None


def build_stream_app(settings: Settings, holder: RunnerHolder, *, batch: int = 500,
                     within_s: float = 0.02) -> faust.App:
    # A short session timeout: when a worker dies, its customers (and their timers) move to the others within
    # seconds rather than a minute.
    app = make_stream_app(settings, "journeys", broker_session_timeout=10.0, broker_heartbeat_interval=2.0)
    names = [settings.topic(t.name) for t in (EVENTS_RESOLVED, SEGMENT_MEMBERSHIP, JOURNEY_TIMERS, PROFILE_CHANGED)]
    topic = app.topic(*names, key_serializer="raw", value_serializer="raw")

    @app.agent(topic, name="journey_steps")
    async def journey_steps(stream: Any) -> None:
        async for events in stream.take_events(batch, within=within_s):
            assert holder.runner is not None
            await holder.runner.handle([Record(e.message.topic, e.key, e.value) for e in events])

    return app


def owned_partitions(app: faust.App, topic: str) -> set[int]:
    """Partitions of ``topic`` assigned to this worker right now (empty before the first assignment)."""
    try:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == topic}
    except Exception:
        return set()
