"""The segmenter's faust agents: thin — decode, hand to the engine (which decides, persists, emits).

Inputs are taken in small batches; one customer's messages stay in order, different customers run
concurrently. faust acknowledges a batch only after the agent finished it (commit after the effect), and a
failing effect is retried, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import faust
import orjson

from loyalist.metrics import STREAM_DURATION, STREAM_PROCESSED
from loyalist.service import make_stream_app
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RESOLVED, PROFILE_CHANGED
from services.segmenter.engine import SegmenterEngine

log = logging.getLogger(__name__)

BATCH = 200
RESOLVED_BATCH = 2000
WITHIN_S = 0.05


async def _retrying(work: Callable[[], Awaitable[None]], what: str) -> None:
    delay = 0.2
    while True:
        try:
            await work()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; retrying in %.1fs", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _by_customer(events: list[Any], handle: Callable[[Any], Awaitable[None]]) -> None:
    groups: dict[bytes, list[Any]] = defaultdict(list)
    for event in events:
        groups[event.message.key or b""].append(event)

    async def run(group: list[Any]) -> None:
        for event in group:
            await handle(event)

    await asyncio.gather(*(run(g) for g in groups.values()))


def build_stream_app(settings: Settings, get_engine: Callable[[], SegmenterEngine]) -> faust.App:
    app = make_stream_app(settings, "segmenter")
    changed = app.topic(settings.topic(PROFILE_CHANGED.name), key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw")
    resolved = app.topic(settings.topic(EVENTS_RESOLVED.name), key_type=bytes, value_type=bytes,
                         key_serializer="raw", value_serializer="raw")

    @app.agent(changed)
    async def profile_changed(stream: Any) -> None:
        async for events in stream.take_events(BATCH, within=WITHIN_S):
            async def handle(event: Any) -> None:
                with _timer("profile_changed"):
                    message = orjson.loads(event.value)
                    await _retrying(lambda: get_engine().on_profile_changed(
                        message, event.message.partition, event.message.offset), "profile.changed")
                STREAM_PROCESSED.labels("segmenter", "profile_changed", "ok").inc()

            await _by_customer(list(events), handle)

    @app.agent(resolved)
    async def events_resolved(stream: Any) -> None:
        # The whole batch at once: its events are stored with one round of writes (most of them only feed
        # event-based rules and the co-purchase model), then the profiles they may move are decided.
        async for values in stream.take(RESOLVED_BATCH, within=WITHIN_S):
            messages = []
            for value in values:
                try:
                    messages.append(orjson.loads(value))
                except orjson.JSONDecodeError:
                    STREAM_PROCESSED.labels("segmenter", "events_resolved", "invalid").inc()
            with _timer("events_resolved"):
                await _retrying(partial(get_engine().on_events_resolved, messages), "events.resolved")
            STREAM_PROCESSED.labels("segmenter", "events_resolved", "ok").inc(len(messages))

    return app


class _timer:
    def __init__(self, agent: str) -> None:
        self.agent = agent

    def __enter__(self) -> None:
        import time

        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        import time

        STREAM_DURATION.labels("segmenter", self.agent).observe(time.perf_counter() - self.started)
