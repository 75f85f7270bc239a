"""A batch consumer that commits offsets only after its handler finished the whole batch.

Stages on the hot path (the profile resolver and folder) use this instead of a faust agent: faust's per-message
machinery (events, processors, acks) costs more CPU than the work itself at thousands of events a second. Here a
batch is whatever ``getmany`` has buffered — one record under light load (low latency), thousands when the
stage falls behind (high throughput) — and it goes to the handler in one call.

At-least-once: a failed batch is rewound and retried, and offsets are committed only after the handler returned
(at most every ``LOYALIST_CONSUMER_COMMIT_INTERVAL_MS`` while records keep coming, at once when they stop), so
every effect of the handler must be idempotent. When partitions move to another worker, ``on_revoked`` runs
after the batch in hand finished, so cached state of the lost partitions can be dropped before anyone else
writes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from loyalist.kafka import make_consumer
from loyalist.metrics import STREAM_BATCH_DURATION, STREAM_BATCH_SIZE, STREAM_FAILURES
from loyalist.settings import Settings

log = logging.getLogger(__name__)
# A consume loop stuck in one await for this long is considered dead (BatchConsumer.stalled): more than the
# rebalance timeout (60 s) plus a slow batch.
STALL_S = 180.0

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
Handler = Callable[[Sequence[Record]], Awaitable[None]]
Hook = Callable[[set[TopicPartition]], Awaitable[None] | None]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: BatchConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait for the batch in hand: its effects land before another worker may own these partitions.
        async with self.owner.busy:
            await self.owner._commit_pending()
            await self.owner._call(self.owner.on_revoked, set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.owner._call(self.owner.on_assigned, set(assigned))


class BatchConsumer:
    """Consume ``topic`` in group ``group_id``, hand batches of up to ``max_records`` to ``handler``.

    ``service``/``stage`` label the metrics (batch sizes, batch durations, failures).
    """

    def __init__(self, settings: Settings, topic: str, *, group_id: str, handler: Handler, service: str,
                 stage: str, max_records: int = 2000, poll_ms: int = 200, session_timeout_ms: int = 10_000,
                 on_revoked: Hook | None = None, on_assigned: Hook | None = None) -> None:
        self.settings = settings
        self.topic = topic
        self.topics = [topic]  # subclasses reading several co-partitioned topics replace this
        self.group_id = group_id
        self.handler = handler
        self.service = service
        self.stage = stage
        self.max_records = max_records
        self.poll_ms = poll_ms
        self._min_interval_s = settings.consumer_min_batch_interval_ms / 1000
        self._commit_interval_s = settings.consumer_commit_interval_ms / 1000
        self._committed_at = 0.0  # when the last commit was started (time.monotonic())
        self.on_revoked = on_revoked
        self.on_assigned = on_assigned
        self._consumer_options: dict[str, Any] = {
            "session_timeout_ms": session_timeout_ms, "heartbeat_interval_ms": max(500, session_timeout_ms // 5),
            "max_poll_records": max_records, "max_partition_fetch_bytes": 4 * 1024 * 1024, "fetch_max_wait_ms": 500,
            "rebalance_timeout_ms": 60_000,
        }
        self._consumer: AIOKafkaConsumer | None = None
        self.busy = asyncio.Lock()
        self._pending: dict[TopicPartition, int] = {}
        self._processed: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self.batches = 0
        self.records = 0
        # When the consume loop last came round (a batch handled or failed, or an empty poll): see stalled().
        self.last_turn = time.monotonic()
        self._sizes = STREAM_BATCH_SIZE.labels(service, stage)
        self._durations = STREAM_BATCH_DURATION.labels(service, stage)
        self._failures = STREAM_FAILURES.labels(service, stage)

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "the consumer is created by start()"
        return self._consumer

    async def start(self) -> None:
        # aiokafka binds a consumer to the running loop: it is made here, not in __init__.
        self._consumer = make_consumer(self.settings, group_id=self.group_id,
                                       client_id=f"{self.group_id}-{self.stage}", **self._consumer_options)
        self.consumer.subscribe(self.topics, listener=_Listener(self))
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"{self.service}-{self.stage}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stalled(self, after_s: float = STALL_S) -> bool:
        """The consume loop has been stuck in one await for ``after_s``: longer than a rebalance may take, a
        poll, or a batch retried against an unreachable store (those come round every few seconds). One chaos
        run had a fold consumer stop for good after a Kafka restart (cause not found yet): a liveness check on
        this gets the process restarted, and its records are redone from the committed offsets."""
        return self.running and time.monotonic() - self.last_turn > after_s

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._consumer is not None:
            await self._commit_pending()
            await self._consumer.stop()

    def backlog(self) -> int:
        """Records of the assigned partitions not processed yet, as far as the last fetches tell."""
        if self._consumer is None:
            return 0
        behind = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            done = self._processed.get(tp)
            if high is not None and done is not None:
                behind += max(0, high - done)
        return behind

    @staticmethod
    async def _call(hook: Hook | None, partitions: set[TopicPartition]) -> None:
        if hook is None:
            return
        result = hook(partitions)
        if result is not None:
            await result

    def _commit_in_background(self) -> None:
        """Commit what was processed while the next batch is fetched and handled: one round trip less per batch.
        One commit at a time, in order (a commit still in flight is chained before this one); a rebalance and
        stop() wait for it."""
        previous, pending = self._commit_task, self._take_pending()
        self._committed_at = time.monotonic()

        async def commit() -> None:
            if previous is not None:
                await previous
            await self._commit(pending)

        self._commit_task = asyncio.create_task(commit())

    async def _commit_pending(self) -> None:
        """Commit every processed offset now (after the commit in flight, if any)."""
        await self._settle_commit()
        await self._commit(self._take_pending())

    def _take_pending(self) -> dict[TopicPartition, int]:
        pending, self._pending = self._pending, {}
        return pending

    async def _settle_commit(self) -> None:
        task, self._commit_task = self._commit_task, None
        if task is not None:
            await task

    async def _commit(self, pending: dict[TopicPartition, int]) -> None:
        if not pending:
            return
        try:
            await self.consumer.commit(pending)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The partitions moved on: their new owner redoes these records, and every effect is idempotent.
            log.warning("%s/%s: offsets not committed (%s); the records will be processed again",
                        self.service, self.stage, exc)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            self.last_turn = time.monotonic()
            try:
                batches = await self.consumer.getmany(timeout_ms=self.poll_ms, max_records=self.max_records)
            except KafkaError as exc:
                # A broker restart or a coordinator move: the consumer recovers by itself; this loop must live on
                # (a dead loop leaves the process up and its partitions unconsumed).
                log.warning("%s/%s: fetching failed (%s); retrying", self.service, self.stage, exc)
                await asyncio.sleep(1.0)
                continue
            if not batches:
                if self._pending:
                    self._commit_in_background()  # the input ran dry: what was processed is committed now
                continue
            records = [r for rs in batches.values() for r in rs]
            started = time.perf_counter()
            try:
                async with self.busy:
                    await self.handler(records)
                    for tp, rs in batches.items():
                        self._pending[tp] = self._processed[tp] = rs[-1].offset + 1
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failures.inc()
                log.exception("%s/%s: a batch of %d records failed; retrying it in %.1fs",
                              self.service, self.stage, len(records), delay)
                for tp, rs in batches.items():
                    try:
                        self.consumer.seek(tp, rs[0].offset)
                    except IllegalStateError:
                        pass  # no longer ours: the new owner starts from the committed offset
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            self.batches += 1
            self.records += len(records)
            self._sizes.observe(len(records))
            self._durations.observe(time.perf_counter() - started)
            # Offsets are committed at most every commit interval while records keep coming (and at once when
            # the input runs dry, a rebalance or stop()), each commit covering only finished effects.
            if time.monotonic() - self._committed_at >= self._commit_interval_s:
                self._commit_in_background()
            if self._min_interval_s:
                # Batches come at most this often: a stage that is quicker than its input would otherwise take
                # a few records at a time, and every batch has a cost of its own (fetch, round trips, commit).
                rest = self._min_interval_s - (time.perf_counter() - started)
                if rest > 0:
                    await asyncio.sleep(rest)


def record_values(records: Sequence[Any]) -> list[bytes]:
    return [r.value for r in records if r.value is not None]


class TimeSlice:
    """Gives the event loop back once a CPU-bound loop has held it for ``slice_s``: the HTTP API served by the
    same process answers within a slice instead of waiting for a whole batch to be processed.

    >>> import asyncio
    >>> async def count() -> int:
    ...     turns = TimeSlice(0.0)
    ...     for _ in range(3):
    ...         await turns.pause()
    ...     return turns.yields
    >>> asyncio.run(count())
    3
    """

    __slots__ = ("_since", "slice_s", "yields")

    def __init__(self, slice_s: float = 0.004) -> None:
        self.slice_s = slice_s
        self._since = time.perf_counter()
        self.yields = 0

    async def pause(self) -> None:
        now = time.perf_counter()
        if now - self._since >= self.slice_s:
            await asyncio.sleep(0)
            self.yields += 1
            self._since = time.perf_counter()
