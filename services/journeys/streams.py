"""The journeys engine's consumer: reads the customer-keyed topics and hands batches to the runner.

One consumer over ``events.resolved``, ``segment.membership``, ``journey.timers`` and ``profile.changed``: all
keyed by profile id with the same partition count, so one worker owns a customer's events and timers alike,
and adding workers splits customers between them (the range assignor gives a worker the same partition
numbers of every topic).

It is a plain aiokafka batch consumer (:class:`loyalist.consumer.BatchConsumer`), not a faust agent: at
thousands of records a second faust's per-message machinery costs more than the (mostly skipped) work. A
batch's offsets are committed only after the runner carried out every effect of the batch; a failed batch is
retried. The group id is the one the faust agent used, so a deployment continues from its committed offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from loyalist.consumer import BatchConsumer, Handler, Hook
from loyalist.consumer import Record as KafkaRecord
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RESOLVED, JOURNEY_TIMERS, PROFILE_CHANGED, SEGMENT_MEMBERSHIP
from services.journeys.runner import JourneyRunner, Record

# Up to this many records per batch: what getmany buffered, so a few under light load and many when the
# service catches up (500 was measured worse: more round trips per record, and the service fell behind).
BATCH = 2000


class MultiTopicConsumer(BatchConsumer):
    """A :class:`BatchConsumer` subscribed to several co-partitioned topics."""

    def __init__(self, settings: Settings, topics: Sequence[str], *, group_id: str, handler: Handler,
                 service: str, stage: str, max_records: int = BATCH, on_revoked: Hook | None = None,
                 on_assigned: Hook | None = None) -> None:
        super().__init__(settings, topics[0], group_id=group_id, handler=handler, service=service, stage=stage,
                         max_records=max_records, on_revoked=on_revoked, on_assigned=on_assigned)
        self.topics = list(topics)
        self._consumer_options["partition_assignment_strategy"] = (RangePartitionAssignor,)


    def owned(self, topic: str) -> set[int]:
        """Partitions of ``topic`` assigned to this worker right now (empty before the first assignment)."""
        if self._consumer is None:
            return set()
        try:
            return {tp.partition for tp in self._consumer.assignment() if tp.topic == topic}
        except Exception:
            return set()


class RunnerHolder:
    """The runner is built in the lifespan (it needs open adapters); the consumer is declared before that."""

    runner: JourneyRunner | None = None


def build_consumer(settings: Settings, holder: RunnerHolder, *, batch: int = BATCH) -> MultiTopicConsumer:
    names = [settings.topic(t.name) for t in (EVENTS_RESOLVED, SEGMENT_MEMBERSHIP, JOURNEY_TIMERS, PROFILE_CHANGED)]

    async def journey_steps(records: Sequence[KafkaRecord]) -> None:
        assert holder.runner is not None
        await holder.runner.handle([Record(r.topic, r.key, r.value) for r in records if r.value is not None])

    # A short session timeout (the BatchConsumer default, 10 s): when a worker dies, its customers (and their
    # timers) move to the others within seconds rather than a minute.
    return MultiTopicConsumer(settings, names, group_id=f"{settings.namespace}-journeys", handler=journey_steps,
                              service="journeys", stage="steps", max_records=batch)
