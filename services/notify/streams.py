"""The stream side of notify: a consumer of ``message.requests`` that commits offsets only after every
request of a batch reached a recorded outcome, and the scheduler that wakes deferred sends and retries.

Why a plain aiokafka consumer and not a faust agent: notify needs to control exactly when offsets are committed
(after the delivery log says so), to run different customers concurrently while keeping one customer's
requests in order (frequency caps), and static group membership so a crashed process gets its partitions back
at once on restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from loyalist.kafka import make_consumer
from loyalist.metrics import STREAM_DURATION, STREAM_PROCESSED
from loyalist.queues import FloorStore, ReadFloors
from loyalist.settings import Settings
from loyalist.topics import MESSAGE_DLQ, MESSAGE_REQUESTS
from services.notify.config import NotifyConfig
from services.notify.delivery import Notifier
from services.notify.domain.messages import InvalidRequest, MessageRequest
from services.notify.metrics import DLQ_SIZE, SCHEDULED, SKIPPED
from services.notify.store import SCHEDULE_QUEUE, SCHEDULE_SHARD

log = logging.getLogger(__name__)


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Partitions moving away: the batch in hand finishes and its offsets are committed first, so the next owner
    starts after it."""

    def __init__(self, owner: RequestConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.owner.busy:
            await self.owner.commit_pending()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None


class RequestConsumer:
    def __init__(self, settings: Settings, config: NotifyConfig, notifier: Notifier, *, instance_id: str) -> None:
        self.settings = settings
        self.config = config
        self.notifier = notifier
        self.topic = settings.topic(MESSAGE_REQUESTS.name)
        self.consumer: AIOKafkaConsumer = make_consumer(
            settings, group_id=f"{settings.namespace}-notify", client_id=f"notify-{instance_id}",
            group_instance_id=instance_id, session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=max(1000, config.session_timeout_ms // 4), max_poll_records=config.batch_size,
        )
        self.consumer.subscribe([self.topic], listener=_CommitOnRevoke(self))
        self._limit = asyncio.Semaphore(config.concurrency)
        self._task: asyncio.Task[None] | None = None
        self.processed = 0
        # Offsets of requests with a recorded outcome, not committed yet: committed at most every
        # LOYALIST_CONSUMER_COMMIT_INTERVAL_MS while requests keep coming, at once when they stop, before partitions
        # move away and on stop (a request seen again finds its outcome in the delivery log either way).
        self.busy = asyncio.Lock()
        self._pending: dict[TopicPartition, int] = {}
        self._committed_at = 0.0

    async def start(self) -> None:
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="notify-consumer")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.commit_pending()
        await self.consumer.stop()

    async def commit_pending(self) -> None:
        pending, self._pending = self._pending, {}
        self._committed_at = time.monotonic()
        if not pending:
            return
        try:
            await self.consumer.commit(pending)
        except KafkaError as exc:
            # Not committed (the broker is restarting, or the partitions moved on): the requests are delivered
            # again and find their recorded outcomes in the delivery log; a later commit covers them.
            log.warning("offsets of message requests not committed (%s); they will be seen again", exc)

    async def _run(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=self.config.batch_size)
            except KafkaError as exc:
                # A broker restart or a coordinator move: the consumer recovers by itself; this loop must live on.
                log.warning("fetching message requests failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if not batches:
                await self.commit_pending()
                continue
            started = time.perf_counter()
            try:
                async with self.busy:
                    await self._process(batches)
                    for tp, records in batches.items():
                        self._pending[tp] = records[-1].offset + 1
            except asyncio.CancelledError:
                raise
            except Exception:
                # Nothing of this batch is committed: rewind and retry it (every step is idempotent).
                log.exception("processing a batch of message requests failed; retrying it")
                for tp, records in batches.items():
                    self.consumer.seek(tp, records[0].offset)
                await asyncio.sleep(1.0)
                continue
            if time.monotonic() - self._committed_at >= self.settings.consumer_commit_interval_ms / 1000:
                await self.commit_pending()
            # Paced as the other stream stages (loyalist.consumer.BatchConsumer): at most one batch per interval.
            rest = self.settings.consumer_min_batch_interval_ms / 1000 - (time.perf_counter() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def _process(self, batches: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        # One customer's requests in order (caps see the previous send); different customers concurrently.
        per_customer: dict[bytes, list[ConsumerRecord[Any, Any]]] = defaultdict(list)
        for records in batches.values():
            for record in records:
                per_customer[record.key or b""].append(record)
        results = await asyncio.gather(*(self._customer(records) for records in per_customer.values()),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _customer(self, records: list[ConsumerRecord[Any, Any]]) -> None:
        async with self._limit:
            for record in records:
                with _timer():
                    outcome = await self.handle_raw(record.value)
                STREAM_PROCESSED.labels("notify", "message_requests", outcome.split(":")[0]).inc()
                self.processed += 1

    async def handle_raw(self, value: bytes) -> str:
        doc: Any = None
        try:
            doc = orjson.loads(value)
            req = MessageRequest.from_wire(doc)
        except (orjson.JSONDecodeError, InvalidRequest) as exc:
            doc_out = doc if isinstance(doc, dict) else {"raw": value.decode(errors="replace")}
            key = str(doc_out.get("profileId") or doc_out.get("idempotencyKey") or "invalid")
            await self.notifier.feedback.dead_letter(doc_out, key=key, reason="invalid_request", detail=str(exc),
                                                     attempts=0)
            SKIPPED.labels(str(doc_out.get("channel", "unknown")), "invalid_request").inc()
            return "invalid"
        return await self.notifier.handle(req)

    async def refresh_dlq_size(self) -> None:
        """DLQ size = end offset minus start offset, summed over the DLQ topic's partitions."""
        topic = self.settings.topic(MESSAGE_DLQ.name)
        partitions = self.consumer.partitions_for_topic(topic)
        if partitions is None:
            await self.consumer._client.force_metadata_update()
            partitions = self.consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return
        ends = await self.consumer.end_offsets(tps)
        starts = await self.consumer.beginning_offsets(tps)
        DLQ_SIZE.set(sum(ends[tp] - starts[tp] for tp in tps))


class _timer:
    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        STREAM_DURATION.labels("notify", "message_requests").observe(time.perf_counter() - self.started)


class Scheduler:
    """Polls the schedule for deferred sends and retries that are due and runs them through the notifier.

    Each poll reads from the schedule's read floor (loyalist/queues.py): not through the tombstones of every
    entry handled in the last ``gc_grace_seconds``, which would make the reads fail for good at Cassandra's
    tombstone threshold."""

    def __init__(self, config: NotifyConfig, notifier: Notifier, clock: Callable[[], datetime],
                 on_tick: Callable[[], Any] | None = None, *, floor_store: FloorStore | None = None,
                 limit: int = 200) -> None:
        self.config = config
        self.notifier = notifier
        self.clock = clock
        self.on_tick = on_tick
        self.limit = limit
        self.floors = ReadFloors()
        self.floor_store = floor_store or FloorStore(notifier.store.s, SCHEDULE_QUEUE)
        self._floors_loaded = False
        self._task: asyncio.Task[None] | None = None
        self._ticks = 0

    async def start(self) -> None:
        await self.load_floors()
        self._task = asyncio.create_task(self._run(), name="notify-scheduler")

    async def load_floors(self) -> None:
        """The floors saved by earlier pollers (once): without them the first polls read from the start."""
        if not self._floors_loaded:
            await self.floor_store.load(self.floors)
            self._floors_loaded = True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler tick failed")
            await asyncio.sleep(self.config.schedule_poll_s)

    def read_from(self, now: datetime) -> datetime | None:
        """Where a poll at ``now`` starts: the floor, or the start when there is none or it is later than ``now``
        (set by a clock ahead of ours, or by ours before it was set back: entries due by ``now`` may lie below
        it)."""
        floor = self.floors.floor(SCHEDULE_SHARD)
        return floor if floor is not None and floor <= now else None

    async def tick(self) -> int:
        await self.load_floors()
        store = self.notifier.store
        now = self.clock()
        due = await store.due(now, self.limit, since=self.read_from(now))
        # The earliest entry this poll leaves in the schedule: the floor must not pass it.
        oldest_left = due[-1][0] if len(due) >= self.limit else None
        for due_at, key in due:
            try:
                row = await store.get(key)
                if row is not None and row.request:
                    try:
                        req = MessageRequest.from_wire(row.request)
                    except InvalidRequest:
                        req = None
                    if req is not None:
                        await self.notifier.handle(req, from_schedule=True)
                await store.unschedule(due_at, key)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Left in the schedule: the next tick tries again; one bad row does not hold up the others.
                log.exception("scheduled message %s failed; will retry", key)
                oldest_left = due_at if oldest_left is None else min(oldest_left, due_at)
        self.floors.advance(SCHEDULE_SHARD, now, oldest_left)
        await self.floor_store.maybe_save(SCHEDULE_SHARD, self.floors)
        self._ticks += 1
        if self._ticks % 10 == 1:
            SCHEDULED.set(await store.scheduled_count(self.read_from(self.clock())))
            if self.on_tick is not None:
                try:
                    await self.on_tick()
                except Exception:
                    log.debug("scheduler side task failed", exc_info=True)
        return len(due)
