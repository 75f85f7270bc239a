"""The segmenter's consumer: thin — decode, hand batches to the engine (which decides, persists, emits).

One batch consumer (:class:`loyalist.consumer.BatchConsumer`, group ``<namespace>-segmenter``) over
``profile.changed`` and ``events.resolved``, not faust agents: faust's per-message machinery cost more CPU
than the decisions. A batch is whatever the consumer has buffered — a few records under light load (low
latency), thousands on a backlog. Its ``profile.changed`` records go to the engine in one call (one customer's
messages in order), its ``events.resolved`` records in another, both at once. Offsets are committed only after
both finished (commit after the effect); a failing batch is rewound and retried, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from loyalist.consumer import BatchConsumer, Hook, Record
from loyalist.metrics import STREAM_DURATION, STREAM_PROCESSED
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RESOLVED, PROFILE_CHANGED
from services.segmenter.engine import SegmenterEngine

log = logging.getLogger(__name__)

BATCH = 2000


class SegmenterConsumer(BatchConsumer):
    """A :class:`BatchConsumer` subscribed to the two co-partitioned input topics."""

    def __init__(self, settings: Settings, topics: list[str], **kwargs: Any) -> None:
        super().__init__(settings, topics[0], **kwargs)
        self.topics = topics
        # Range assignment: a worker gets the same partitions of both topics, so one customer's inputs meet in
        # one process (its locks order them).
        self._consumer_options["partition_assignment_strategy"] = (RangePartitionAssignor,)



def _decode(value: bytes | None, agent: str) -> Any:
    try:
        return orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        STREAM_PROCESSED.labels("segmenter", agent, "invalid").inc()
        return None


def build_consumer(settings: Settings, get_engine: Callable[[], SegmenterEngine], *, batch: int = BATCH,
                   on_revoked: Hook | None = None) -> SegmenterConsumer:
    changed_topic = settings.topic(PROFILE_CHANGED.name)
    resolved_topic = settings.topic(EVENTS_RESOLVED.name)

    async def profile_changed(records: Sequence[Record]) -> None:
        items = []
        for r in records:
            message = _decode(r.value, "profile_changed")
            if isinstance(message, dict):
                items.append((message, r.partition, r.offset))
        if items:
            with STREAM_DURATION.labels("segmenter", "profile_changed").time():
                await get_engine().on_profile_changed_batch(items)
            STREAM_PROCESSED.labels("segmenter", "profile_changed", "ok").inc(len(items))

    async def events_resolved(records: Sequence[Record]) -> None:
        # Its events are stored with one round of writes (most of them only feed event-based rules and the
        # co-purchase model), then the profiles they may move are decided.
        messages = [m for m in (_decode(r.value, "events_resolved") for r in records) if isinstance(m, dict)]
        if messages:
            with STREAM_DURATION.labels("segmenter", "events_resolved").time():
                await get_engine().on_events_resolved(messages)
            STREAM_PROCESSED.labels("segmenter", "events_resolved", "ok").inc(len(messages))

    async def handle(records: Sequence[Record]) -> None:
        changed = [r for r in records if r.topic == changed_topic]
        resolved = [r for r in records if r.topic == resolved_topic]
        await asyncio.gather(profile_changed(changed), events_resolved(resolved))

    # poll_ms only bounds an idle wait: getmany returns as soon as records arrive.
    return SegmenterConsumer(settings, [changed_topic, resolved_topic], group_id=f"{settings.namespace}-segmenter",
                             handler=handle, service="segmenter", stage="inputs", max_records=batch,
                             on_revoked=on_revoked)
