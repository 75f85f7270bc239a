"""The one path every accepted fact takes, whatever door it came in by (tracking API, webhooks, support,
CSV import): build canonical events, validate them against their schema, admit (rate limit + dedup),
publish to ``events.raw`` and wait for Kafka, then remember the ids.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from loyalist.events import Event
from loyalist.http import ApiError
from services.ingest.adapters.guard import IngestGuard
from services.ingest.adapters.kafka_sink import EventSink, KafkaUnavailable
from services.ingest.config import IngestConfig
from services.ingest.domain.schemas import SchemaRegistry
from services.ingest.domain.tracking import MessageRejected, Rejection, normalize_message
from services.ingest.metrics import DEDUP_HITS, EVENTS_ACCEPTED, EVENTS_REJECTED, RATE_LIMITED


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
    ) -> tuple[list[Prepared], list[Rejection]]:
        """Tracking calls → prepared events and per-index rejections (the valid ones are kept)."""
        prepared: list[Prepared] = []
        rejected: list[Rejection] = []
        limit = self.config.max_message_bytes
        for index, raw in enumerate(messages):
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
        """Admit, deduplicate, publish and wait for Kafka. Raises ``ApiError`` 429/503."""
        outcome = Outcome(message_ids=[p.event.message_id for p in prepared])
        if not prepared:
            return outcome
        ids = outcome.message_ids
        admission = await self.guard.admit(limiter_id, source, ids)
        if not admission.allowed:
            RATE_LIMITED.labels(source).inc()
            EVENTS_REJECTED.labels(source, "rate_limited").inc(len(prepared))
            retry_after = max(1, int(admission.retry_after_s + 0.999))
            raise ApiError(429, "rate_limited", f"too many events for this write key; retry in {retry_after}s",
                           headers={"Retry-After": str(retry_after)}, retryAfter=retry_after)
        fresh: list[Prepared] = []
        in_request: set[str] = set()
        for item, seen in zip(prepared, admission.seen, strict=True):
            mid = item.event.message_id
            if seen or mid in in_request:
                outcome.duplicates += 1
                continue
            in_request.add(mid)
            fresh.append(item)
        if outcome.duplicates:
            DEDUP_HITS.labels(source).inc(outcome.duplicates)
        try:
            await self.sink.publish([(p.key, p.value) for p in fresh])
        except KafkaUnavailable as exc:
            # Records Kafka did acknowledge are remembered, so the client's retry does not write them twice.
            acked = [p.event.message_id for p, ok in zip(fresh, exc.acked, strict=True) if ok]
            await self.guard.remember(source, acked)
            EVENTS_REJECTED.labels(source, "kafka_unavailable").inc(len(fresh))
            retry_after = self.config.retry_after_s
            raise ApiError(503, "kafka_unavailable", "the event log is unavailable; retry later",
                           headers={"Retry-After": str(retry_after)}, retryAfter=retry_after) from exc
        await self.guard.remember(source, [p.event.message_id for p in fresh])
        outcome.accepted = len(prepared)
        by_type = Counter(p.event.type for p in fresh)
        for call_type, count in by_type.items():
            EVENTS_ACCEPTED.labels(source, call_type).inc(count)
        return outcome
