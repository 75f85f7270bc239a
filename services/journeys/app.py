"""Wiring of the journeys service: settings → adapters (Cassandra stores, Redis profiles, Kafka producer) →
the engine runner, timer poller and batch consumer → the API."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from loyalist.http import create_service_app
from loyalist.service import Resources, watch_consumers
from loyalist.settings import Settings
from loyalist.topics import JOURNEY_TIMERS
from services.journeys.api import backtest_router, journeys_router
from services.journeys.gauges import refresh_gauges_forever
from services.journeys.history import EventHistory
from services.journeys.runner import JourneyRunner, Registry
from services.journeys.store import InstanceStore, JourneyStore, TimerStore
from services.journeys.streams import RunnerHolder, build_consumer
from services.journeys.timers import TimerPoller

log = logging.getLogger(__name__)

DESCRIPTION = """Marketer-configured journeys run as durable state machines, one instance per customer (and
entry key), exactly once per step across restarts.

* **Journeys**: `POST /v1/journeys` (a definition: entry, nodes, exit rules, goal), `PUT /v1/journeys/{id}`
  (a new version; running instances keep theirs), `POST /v1/journeys/{id}/activate|pause|archive`, `DELETE`.
  Invalid definitions answer 400 with the offending node.
* **Templates**: `GET /v1/journeys/templates`, `POST /v1/journeys/from-template/{template_id}` with parameters
  (durations in ISO 8601, e.g. `{"first_reminder_after": "PT5S"}`).
* **Measurement**: `GET /v1/journeys/{id}/stats` (per node entered / waiting / exited / converted, attributed
  revenue, treated-vs-holdout uplift with a 95% confidence interval), `GET /v1/journeys/{id}/instances`.
* **Backtest**: `POST /v1/journeys/{id}/backtest` or `POST /v1/backtests` over a past period, sending nothing.

Bearer tokens with `journeys:read` / `journeys:write`. See docs/journeys.md.
"""

STATS_REFRESH_S = 30.0


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    holder = RunnerHolder()
    consumer = build_consumer(settings, holder)
    timers_topic = settings.topic(JOURNEY_TIMERS.name)
    background: dict[str, object] = {}

    async def on_start(resources: Resources, app: FastAPI) -> None:
        journey_store = JourneyStore(resources.session)
        instance_store = InstanceStore(resources.session)
        timer_store = TimerStore(resources.session, settings.kafka_partitions)
        registry = Registry(journey_store)
        await registry.refresh()
        holder.runner = JourneyRunner(settings, producer=resources.producer, redis=resources.redis,
                                      registry=registry, instances=instance_store, timers=timer_store)
        poller = TimerPoller(timer_store, resources.producer, timers_topic,
                             lambda: consumer.owned(timers_topic))
        poller.start()
        await consumer.start()
        watch_consumers(app, "journeys", lambda: [consumer])
        app.state.journey_store = journey_store
        app.state.instance_store = instance_store
        app.state.registry = registry
        app.state.event_history = EventHistory(resources.session, settings.keyspace)
        background["poller"] = poller

        refresh_gauges = refresh_gauges_forever(
            # The worker holding partition 0 of the timers topic publishes the journey gauges.
            publishes=lambda: 0 in consumer.owned(timers_topic),
            active_journeys=lambda: [r.journey_id for r in registry.journeys.values() if r.status == "active"],
            states_for_journey=instance_store.states_for_journey, every_s=STATS_REFRESH_S)
        background["gauges"] = asyncio.create_task(refresh_gauges, name="journey-gauges")

    async def on_stop(resources: Resources, app: FastAPI) -> None:
        await consumer.stop()
        poller = background.get("poller")
        if isinstance(poller, TimerPoller):
            await poller.stop()
        task = background.get("gauges")
        if isinstance(task, asyncio.Task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    resources = Resources(settings, "journeys", cassandra=True, redis=True, producer=True,
                          on_start=on_start, on_stop=on_stop)
    app = create_service_app("journeys", title="Loyalist journeys", description=DESCRIPTION,
                             lifespan=resources.lifespan)
    app.include_router(journeys_router())
    app.include_router(backtest_router())
    return app
