"""The stream side of the profile service: three batch consumers that hand batches to the pipeline stages.

``resolve`` reads ``events.raw``; ``fold`` reads the internal ``profile.fold`` topic; ``membership`` turns
``segment.membership`` messages into fold operations so each profile is written only by its owner.

They are plain aiokafka consumers (:class:`loyalist.consumer.BatchConsumer`), not faust agents: the two stages
handle thousands of events a second and faust's per-message machinery would cost more than the work. A batch's
offsets are committed only after every effect of the batch; a failed batch is retried. The faust app of the
service keeps the lighter agents (loyalty) and the tombstone refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
from aiokafka import TopicPartition

from loyalist.consumer import BatchConsumer, Record, record_values
from loyalist.service import make_stream_app
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW, PROFILE_FOLD, SEGMENT_MEMBERSHIP
from services.profile import metrics
from services.profile.processor import Folder, Resolver, Tombstones, segment_message

# Upper bounds: a batch is whatever arrived since the last one, so under light load it is a few records
# (low latency) and a stage that fell behind catches up with large batches (few round trips per event).
RESOLVE_BATCH = 2000
FOLD_BATCH = 4000
MEMBERSHIP_BATCH = 1000
# The resolver pauses while the folder of the same worker has more than this many records to go.
FOLD_BACKLOG_MAX = 3 * FOLD_BATCH

log = logging.getLogger(__name__)


class Runtime:
    """The pipeline objects, built in the service lifespan once the adapters are open."""

    resolver: Resolver
    folder: Folder
    tombstones: Tombstones
    dispatch: Any
    consumers: list[BatchConsumer]


def build_stream_app(settings: Settings, runtime: Runtime) -> faust.App:
    # A crashed worker's partitions move to the others after the session timeout: keep it short.
    app = make_stream_app(settings, "profile", broker_session_timeout=10.0, broker_heartbeat_interval=2.0)

    @app.timer(2.0)
    async def refresh_tombstones() -> None:
        # An exception escaping a faust timer crashes the whole faust app (its agents stop for good), so an
        # unreachable Cassandra only skips this refresh: the last known tombstones stay until the next one.
        try:
            await runtime.tombstones.refresh()
        except Exception as exc:
            log.warning("refreshing the erasure tombstones failed (%s); keeping the last ones", exc)

    return app


def build_consumers(settings: Settings, runtime: Runtime) -> list[BatchConsumer]:
    """The consumers of the stages this worker runs (``LOYALIST_PROFILE_STAGES``); segment memberships go with
    the fold stage, whose owner writes each profile."""
    group = f"{settings.namespace}-profile"

    fold_consumer: BatchConsumer | None = None

    async def resolve(records: Sequence[Record]) -> None:
        # Back-pressure: while this worker's folder is far behind, resolving more only competes with it for
        # the CPU (both stages share the process); wait a little for it to catch up.
        waited = 0.0
        while fold_consumer is not None and fold_consumer.backlog() > FOLD_BACKLOG_MAX and waited < 5.0:
            await asyncio.sleep(0.05)
            waited += 0.05
        started = time.perf_counter()
        await runtime.resolver.resolve_batch(record_values(records))
        metrics.BATCH_SECONDS.labels("resolve").observe(time.perf_counter() - started)

    async def fold(records: Sequence[Record]) -> None:
        started = time.perf_counter()
        await runtime.folder.fold_batch(record_values(records))
        metrics.BATCH_SECONDS.labels("fold").observe(time.perf_counter() - started)

    async def membership(records: Sequence[Record]) -> None:
        ops = [m for m in (segment_message(raw) for raw in record_values(records)) if m is not None]
        if ops:
            await runtime.dispatch(ops)

    def forget_profiles(_partitions: set[TopicPartition]) -> None:
        # Profiles of moved partitions may now be written by another worker: drop the cached states.
        runtime.folder.forget_all()

    stages = settings.profile_stage_set
    consumers: list[BatchConsumer] = []
    if "fold" in stages:
        fold_consumer = BatchConsumer(settings, settings.topic(PROFILE_FOLD.name), group_id=f"{group}-fold",
                                      handler=fold, service="profile", stage="fold", max_records=FOLD_BATCH,
                                      on_revoked=forget_profiles, on_assigned=forget_profiles)
    if "resolve" in stages:
        consumers.append(BatchConsumer(settings, settings.topic(EVENTS_RAW.name), group_id=f"{group}-resolve",
                                       handler=resolve, service="profile", stage="resolve",
                                       max_records=RESOLVE_BATCH))
    if fold_consumer is not None:
        consumers += [fold_consumer, BatchConsumer(
            settings, settings.topic(SEGMENT_MEMBERSHIP.name), group_id=f"{group}-membership", handler=membership,
            service="profile", stage="membership", max_records=MEMBERSHIP_BATCH)]
    return consumers
