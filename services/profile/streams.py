"""Faust agents of the profile service: thin loops that hand batches to the pipeline stages.

``resolve`` reads ``events.raw``; ``fold`` reads the internal ``profile.fold`` topic; ``membership`` turns
``segment.membership`` messages into fold operations so each profile is written only by its owner.
A batch is retried until it succeeds: faust acknowledges the batch's offsets after the loop body, so the
offsets are committed only after every effect.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import faust

from loyalist.service import make_stream_app
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW, PROFILE_FOLD, SEGMENT_MEMBERSHIP
from services.profile import metrics
from services.profile.processor import Folder, Resolver, Tombstones, retry_forever, segment_message

BATCH_SIZE = 500
BATCH_WITHIN_S = 0.05
# The fold stage's cost is a few Cassandra round trips per batch whatever its size: when it falls behind,
# larger batches are how it catches up (under light load a batch still closes after FOLD_WITHIN_S).
FOLD_BATCH_SIZE = 2000
FOLD_WITHIN_S = 0.1


class Runtime:
    """The pipeline objects, built in the service lifespan once the adapters are open."""

    resolver: Resolver
    folder: Folder
    tombstones: Tombstones
    dispatch: Any


def build_stream_app(settings: Settings, runtime: Runtime) -> faust.App:
    # A crashed worker's partitions move to the others after the session timeout: keep it short.
    app = make_stream_app(settings, "profile", broker_session_timeout=10.0, broker_heartbeat_interval=2.0)
    raw_topic = app.topic(settings.topic(EVENTS_RAW.name), value_serializer="raw", key_serializer="raw")
    fold_topic = app.topic(settings.topic(PROFILE_FOLD.name), value_serializer="raw", key_serializer="raw")
    membership_topic = app.topic(settings.topic(SEGMENT_MEMBERSHIP.name), value_serializer="raw",
                                 key_serializer="raw")

    @app.agent(raw_topic, name="resolve")
    async def resolve(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(BATCH_SIZE, within=BATCH_WITHIN_S):
            started = time.perf_counter()
            await retry_forever("resolve", partial(runtime.resolver.resolve_batch, batch))
            metrics.BATCH_SECONDS.labels("resolve").observe(time.perf_counter() - started)

    @app.agent(fold_topic, name="fold")
    async def fold(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(FOLD_BATCH_SIZE, within=FOLD_WITHIN_S):
            started = time.perf_counter()
            await retry_forever("fold", partial(runtime.folder.fold_batch, batch))
            metrics.BATCH_SECONDS.labels("fold").observe(time.perf_counter() - started)

    @app.agent(membership_topic, name="membership")
    async def membership(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(BATCH_SIZE, within=BATCH_WITHIN_S):
            ops = [m for m in (segment_message(raw) for raw in batch) if m is not None]
            if ops:
                await retry_forever("membership", partial(runtime.dispatch, ops))

    @app.timer(2.0)
    async def refresh_tombstones() -> None:
        await runtime.tombstones.refresh()

    async def forget_profiles(*_args: Any, **_kwargs: Any) -> None:
        # Profiles of revoked partitions may now be written by another worker: drop the cached states.
        runtime.folder.forget_all()

    app.on_partitions_revoked.connect(forget_profiles)
    app.on_partitions_assigned.connect(forget_profiles)
    return app
