"""The one path every accepted fact takes, whatever door it came in by (tracking API, webhooks, support,
CSV import): build canonical events, validate them against their schema, admit (rate limit + dedup),
publish to ``events.raw`` and wait for Kafka, then remember the ids.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from loyalist.events import Event
from loyalist.http import ApiError
from services.ingest.adapters.guard import Admission, IngestGuard
from services.ingest.adapters.kafka_sink import EventSink, KafkaUnavailable
from services.ingest.config import IngestConfig
from services.ingest.domain.schemas import SchemaRegistry
from services.ingest.domain.tracking import MessageRejected, Rejection, normalize_message
from services.ingest.metrics import COALESCED_CALLS, DEDUP_HITS, EVENTS_ACCEPTED, EVENTS_REJECTED, RATE_LIMITED


@dataclass(slots=True)
class Prepared:
    """A validated event with its Kafka record, ready to publish."""

    index: int
    event: Event
    key: bytes
    value: bytes


@dataclass(slots=True)
class Outcome:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)


def new_message_id() -> str:
    return str(uuid.uuid4())


def event_record(doc: dict[str, Any], schemas: SchemaRegistry) -> tuple[Event, bytes]:
    """Canonical event document → (Event, its wire bytes). The bytes are exactly ``encode_event(event)``
    (same dump, dumped once), checked against the event's JSON Schema on the way."""
    try:
        event = Event.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise MessageRejected("invalid_field", f"{where}: {first.get('msg')}") from exc
    wire = event.model_dump(mode="json", by_alias=True, exclude_none=True)
    problem = schemas.violation(wire)
    if problem is not None:
        raise MessageRejected("schema_violation", problem)
    return event, orjson.dumps(wire)


class Ingestor:
    def __init__(self, sink: EventSink, guard: IngestGuard, schemas: SchemaRegistry, config: IngestConfig,
                 *, new_id: Callable[[], str] = new_message_id) -> None:
        self.sink = sink
        self.guard = guard
        self.schemas = schemas
        self.config = config
        self.new_id = new_id
        self._coalescer = _Coalescer(self)

    def prepare_calls(
        self,
        messages: Sequence[Any],
        *,
        call_type: str | None,
        source: str,
        received_at: datetime,
        batch_sent_at: datetime | None = None,
        batch_context: Mapping[str, Any] | None = None,
        batch_integrations: Mapping[str, Any] | None = None,
        check_size: bool = True,
        first_index: int = 0,
    ) -> tuple[list[Prepared], list[Rejection]]:
        """Tracking calls → prepared events and per-index rejections (the valid ones are kept)."""
        prepared: list[Prepared] = []
        rejected: list[Rejection] = []
        limit = self.config.max_message_bytes
        for index, raw in enumerate(messages, first_index):
            try:
                if check_size and len(orjson.dumps(raw)) > limit:
                    raise MessageRejected("message_too_large", f"a message may not exceed {limit} bytes")
                doc = normalize_message(
                    raw, call_type=call_type, received_at=received_at, source=source, new_message_id=self.new_id,
                    batch_sent_at=batch_sent_at, batch_context=batch_context, batch_integrations=batch_integrations,
                )
                event, value = event_record(doc, self.schemas)
            except MessageRejected as exc:
                rejected.append(Rejection(index, exc.code, exc.message))
                EVENTS_REJECTED.labels(source, exc.code).inc()
                continue
            prepared.append(Prepared(index, event, event.partition_key.encode(), value))
        return prepared, rejected

    async def prepare_batch(
        self,
        messages: Sequence[Any],
        *,
        source: str,
        received_at: datetime,
        batch_sent_at: datetime | None = None,
        batch_context: Mapping[str, Any] | None = None,
        batch_integrations: Mapping[str, Any] | None = None,
        chunk: int = 100,
    ) -> tuple[list[Prepared], list[Rejection]]:
        """:meth:`prepare_calls` for a batch's items, yielding to the event loop every ``chunk`` messages: a
        large batch is milliseconds of CPU, and meanwhile Kafka acknowledgements, the producer's next sends
        and other requests must not wait."""
        prepared: list[Prepared] = []
        rejected: list[Rejection] = []
        for start in range(0, len(messages), chunk):
            if start:
                await asyncio.sleep(0)
            ok, bad = self.prepare_calls(
                messages[start:start + chunk], call_type=None, source=source, received_at=received_at,
                batch_sent_at=batch_sent_at, batch_context=batch_context, batch_integrations=batch_integrations,
                first_index=start,
            )
            prepared += ok
            rejected += bad
        return prepared, rejected

    def prepare_documents(self, docs: Sequence[dict[str, Any]], *, source: str) -> list[Prepared]:
        """Already-mapped canonical documents (webhooks, support); a mapping bug is a 422, not a 500."""
        prepared = []
        for index, doc in enumerate(docs):
            try:
                event, value = event_record(doc, self.schemas)
            except MessageRejected as exc:
                EVENTS_REJECTED.labels(source, exc.code).inc()
                raise ApiError(422, exc.code, exc.message, index=index) from exc
            prepared.append(Prepared(index, event, event.partition_key.encode(), value))
        return prepared

    async def publish(self, prepared: Sequence[Prepared], *, source: str, limiter_id: str) -> Outcome:
        """Admit, deduplicate, publish and wait for Kafka. Raises ``ApiError`` 429/503.

        Concurrent calls are coalesced (see :class:`_Coalescer`): one Redis round trip admits every call
        that arrived while the previous admission was in flight, their records go to Kafka together, and
        each call is answered once *its* records are acknowledged (or refused)."""
        if not prepared:
            return Outcome()
        return await self._coalescer.submit(prepared, source, limiter_id)


@dataclass(slots=True)
class _Call:
    prepared: Sequence[Prepared]
    source: str
    limiter_id: str
    future: asyncio.Future[Outcome]


@dataclass(slots=True)
class _Admitted:
    call: _Call
    outcome: Outcome
    fresh: list[Prepared]  # the call's records that this group publishes
    needs: list[int]  # indices into the group's records that must be acknowledged for the call to succeed


@dataclass(slots=True)
class _Produced:
    """A group whose records Kafka answered for, waiting for its acknowledged ids to be remembered."""

    admitted: list[_Admitted]
    ids: list[tuple[str, str]]  # (source, message id) of the acknowledged records
    acked: list[bool]  # per record of the group
    failed: bool


class _Coalescer:
    """Groups concurrent ``publish`` calls around Redis round trips. At most one round trip is in flight;
    it carries the admission of every call that arrived since the previous one (token buckets + dedup
    lookup) and the ids of every group Kafka acknowledged since then (remembered before those groups are
    answered). Under load a call therefore costs a share of one Redis round trip and of one Kafka hand-off
    instead of two round trips and a send of its own; with no concurrency a group is the single call,
    started in the same loop iteration (no added delay).

    Each call is still answered only after *its* records are acknowledged (or refused: 429/503). Rate
    limiting stays per call (buckets are taken in arrival order); a message id repeated within one group
    is published once and every call carrying it waits for that record."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self._calls: list[_Call] = []
        self._produced: list[_Produced] = []
        self._busy = False  # a round trip is scheduled or in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted: dict[tuple[str, str], Any] = {}

    async def submit(self, prepared: Sequence[Prepared], source: str, limiter_id: str) -> Outcome:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._calls.append(_Call(prepared, source, limiter_id, future))
        self._kick(loop)
        return await future

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._busy:
            self._busy = True
            # After the callbacks already queued in this iteration: requests read together go together.
            loop.call_soon(self._start_round)

    def _start_round(self) -> None:
        calls, self._calls = self._calls, []
        produced, self._produced = self._produced, []
        if not calls and not produced:
            self._busy = False
            return
        self._spawn(self._round(calls, produced))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _round(self, calls: list[_Call], produced: list[_Produced]) -> None:
        try:
            try:
                if calls:
                    COALESCED_CALLS.observe(len(calls))
                remember = [i for p in produced for i in p.ids]
                requests = [(call.limiter_id, len(call.prepared)) for call in calls]
                ids = [(call.source, p.event.message_id) for call in calls for p in call.prepared]
                admission = await self.ingestor.guard.admit(requests, ids, remember=remember)
            finally:
                # This round trip is done: whatever arrived meanwhile goes in the next one.
                self._start_round()
            for group in produced:
                self._answer(group)
            if calls:
                admitted, records = self._decide(calls, admission)
                if admitted:
                    self._spawn(self._produce(admitted, records))
        except BaseException as exc:
            self._fail([c.future for c in calls] + [a.call.future for p in produced for a in p.admitted], exc)
            if not isinstance(exc, Exception):
                raise

    @staticmethod
    def _fail(futures: list[asyncio.Future[Outcome]], exc: BaseException) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def _decide(self, calls: list[_Call], admission: Admission) -> tuple[list[_Admitted], list[tuple[str, Prepared]]]:
        admitted: list[_Admitted] = []
        records: list[tuple[str, Prepared]] = []  # (source, record) published by this group
        first: dict[tuple[str, str], int] = {}  # (source, message id) → index in records
        position = 0
        for call, allowed, wait in zip(calls, admission.allowed, admission.retry_after_s, strict=True):
            n = len(call.prepared)
            if not allowed:
                position += n
                source = call.source
                RATE_LIMITED.labels(source).inc()
                EVENTS_REJECTED.labels(source, "rate_limited").inc(n)
                retry_after = max(1, int(wait + 0.999))
                if not call.future.done():
                    call.future.set_exception(ApiError(
                        429, "rate_limited", f"too many events for this write key; retry in {retry_after}s",
                        headers={"Retry-After": str(retry_after)}, retryAfter=retry_after))
                continue
            outcome = Outcome(message_ids=[p.event.message_id for p in call.prepared])
            fresh: list[Prepared] = []
            needs: list[int] = []
            for item, seen in zip(call.prepared, admission.seen[position:position + n], strict=True):
                if seen:
                    outcome.duplicates += 1
                    continue
                key = (call.source, item.event.message_id)
                index = first.get(key)
                if index is not None:
                    # Repeated in this group: published once; this call succeeds when that record is acked.
                    outcome.duplicates += 1
                    needs.append(index)
                    continue
                first[key] = len(records)
                needs.append(len(records))
                records.append((call.source, item))
                fresh.append(item)
            position += n
            if outcome.duplicates:
                DEDUP_HITS.labels(call.source).inc(outcome.duplicates)
            admitted.append(_Admitted(call, outcome, fresh, needs))
        return admitted, records

    async def _produce(self, admitted: list[_Admitted], records: list[tuple[str, Prepared]]) -> None:
        try:
            failed = False
            acked = [True] * len(records)
            if records:
                try:
                    await self.ingestor.sink.publish([(p.key, p.value) for _, p in records])
                except KafkaUnavailable as exc:
                    # Acknowledged records are remembered too, so the client's retry does not write them twice.
                    acked = exc.acked
                    failed = True
            ids = [(source, p.event.message_id) for (source, p), ok in zip(records, acked, strict=True) if ok]
            group = _Produced(admitted, ids, acked, failed)
            if not ids:
                self._answer(group)
                return
            self._produced.append(group)
            self._kick(asyncio.get_running_loop())
        except BaseException as exc:
            self._fail([a.call.future for a in admitted], exc)
            if not isinstance(exc, Exception):
                raise

    def _answer(self, group: _Produced) -> None:
        retry_after = self.ingestor.config.retry_after_s
        acked = group.acked
        for a in group.admitted:
            call = a.call
            if group.failed and not all(acked[i] for i in a.needs):
                EVENTS_REJECTED.labels(call.source, "kafka_unavailable").inc(len(a.fresh))
                if not call.future.done():
                    call.future.set_exception(ApiError(
                        503, "kafka_unavailable", "the event log is unavailable; retry later",
                        headers={"Retry-After": str(retry_after)}, retryAfter=retry_after))
                continue
            a.outcome.accepted = len(call.prepared)
            for item in a.fresh:
                self._accepted_counter(call.source, item.event.type).inc()
            if not call.future.done():
                call.future.set_result(a.outcome)

    def _accepted_counter(self, source: str, call_type: str) -> Any:
        counter = self._accepted.get((source, call_type))
        if counter is None:
            counter = self._accepted[(source, call_type)] = EVENTS_ACCEPTED.labels(source, call_type)
        return counter
