"""Concurrent publish calls are coalesced (one Redis round trip, one Kafka hand-off for a group), yet each
call is answered on its own: 200 only for records Kafka acknowledged, 429 per call, 503 per call, and a
message id repeated in a group is published once. Fakes stand in for Redis and Kafka (no servers)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from loyalist.http import ApiError
from services.ingest.adapters.guard import Admission
from services.ingest.adapters.kafka_sink import KafkaUnavailable
from services.ingest.adapters.schema_files import load_schema_documents
from services.ingest.config import IngestConfig
from services.ingest.domain.schemas import SchemaRegistry
from services.ingest.pipeline import Ingestor, Outcome, Prepared

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
SCHEMAS = SchemaRegistry.from_documents(load_schema_documents())


class FakeGuard:
    """Token buckets of ``tokens`` per limiter and a set of remembered ids, like the Lua round trip."""

    def __init__(self, tokens: dict[str, int] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.seen: set[tuple[str, str]] = set()
        self.rounds: list[tuple[int, int, int]] = []  # (requests, ids, remembered) per round trip

    async def admit(self, requests: Sequence[tuple[str, int]], ids: Sequence[tuple[str, str]], *,
                    remember: Sequence[tuple[str, str]] = ()) -> Admission:
        self.rounds.append((len(requests), len(ids), len(remember)))
        await asyncio.sleep(0.001)  # a round trip
        self.seen.update(remember)
        allowed = []
        for limiter, cost in requests:
            left = self.tokens.get(limiter, 10**9)
            allowed.append(left >= cost)
            if left >= cost:
                self.tokens[limiter] = left - cost
        return Admission(allowed, [0.0 if a else 2.5 for a in allowed], [i in self.seen for i in ids])


class FakeSink:
    """Acknowledges everything, or nothing for keys in ``fail_keys``."""

    def __init__(self, fail_keys: set[bytes] | None = None) -> None:
        self.fail_keys = fail_keys or set()
        self.calls: list[list[tuple[bytes, bytes]]] = []

    async def publish(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        self.calls.append(list(records))
        await asyncio.sleep(0.002)
        acked = [key not in self.fail_keys for key, _ in records]
        if not all(acked):
            raise KafkaUnavailable("partly down", acked)


def make(guard: FakeGuard, sink: FakeSink) -> Ingestor:
    return Ingestor(sink, guard, SCHEMAS, IngestConfig())  # type: ignore[arg-type]


def prepared(ingestor: Ingestor, *messages: dict[str, Any]) -> list[Prepared]:
    ok, bad = ingestor.prepare_calls(list(messages), call_type="track", source="web", received_at=NOW)
    assert not bad
    return ok


def track(user: str, message_id: str) -> dict[str, Any]:
    return {"userId": user, "event": "Product Viewed", "messageId": message_id}


async def gather(*calls: Any) -> list[Outcome | BaseException]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_concurrent_calls_share_round_trips_and_each_gets_its_outcome() -> None:
    guard, sink = FakeGuard(), FakeSink()
    ingestor = make(guard, sink)
    outcomes = await gather(*(ingestor.publish(prepared(ingestor, track(f"u{i}", f"m{i}")), source="web",
                                               limiter_id="dev") for i in range(20)))
    assert all(isinstance(o, Outcome) and o.accepted == 1 and o.duplicates == 0 for o in outcomes)
    assert [o.message_ids for o in outcomes if isinstance(o, Outcome)] == [[f"m{i}"] for i in range(20)]
    # One admission for the 20 calls, one Kafka hand-off, and the ids remembered in the next round trip.
    assert guard.rounds == [(20, 20, 0), (0, 0, 20)]
    assert len(sink.calls) == 1 and len(sink.calls[0]) == 20
    assert guard.seen == {("web", f"m{i}") for i in range(20)}


async def test_a_message_id_repeated_in_a_group_is_published_once() -> None:
    guard, sink = FakeGuard(), FakeSink()
    ingestor = make(guard, sink)
    first, second = await gather(
        ingestor.publish(prepared(ingestor, track("u", "same")), source="web", limiter_id="dev"),
        ingestor.publish(prepared(ingestor, track("u", "same")), source="web", limiter_id="dev"),
    )
    assert isinstance(first, Outcome) and isinstance(second, Outcome)
    assert (first.duplicates, second.duplicates) == (0, 1)
    assert [len(c) for c in sink.calls] == [1]
    # Later resends are recognised through the remembered id.
    again = await ingestor.publish(prepared(ingestor, track("u", "same")), source="web", limiter_id="dev")
    assert again.duplicates == 1 and [len(c) for c in sink.calls] == [1]


async def test_a_duplicate_waits_for_the_record_it_duplicates() -> None:
    guard, sink = FakeGuard(), FakeSink(fail_keys={b"u"})
    ingestor = make(guard, sink)
    results = await gather(
        ingestor.publish(prepared(ingestor, track("u", "same")), source="web", limiter_id="dev"),
        ingestor.publish(prepared(ingestor, track("u", "same")), source="web", limiter_id="dev"),
    )
    # The record was never acknowledged: neither call may be answered 200.
    assert all(isinstance(r, ApiError) and r.status == 503 for r in results)


async def test_rate_limit_is_per_call_within_a_group() -> None:
    guard, sink = FakeGuard(tokens={"small": 2}), FakeSink()
    ingestor = make(guard, sink)
    results = await gather(*(ingestor.publish(prepared(ingestor, track(f"u{i}", f"r{i}")), source="web",
                                              limiter_id="small") for i in range(3)),
                           ingestor.publish(prepared(ingestor, track("v", "other")), source="web", limiter_id="big"))
    assert [type(r).__name__ for r in results] == ["Outcome", "Outcome", "ApiError", "Outcome"]
    limited = results[2]
    assert isinstance(limited, ApiError) and limited.status == 429 and limited.code == "rate_limited"
    assert limited.headers == {"Retry-After": "3"} and limited.details["retryAfter"] == 3
    assert sorted(k for c in sink.calls for k, _ in c) == [b"u0", b"u1", b"v"]


async def test_kafka_failure_is_per_call_and_acknowledged_records_are_remembered() -> None:
    guard, sink = FakeGuard(), FakeSink(fail_keys={b"down"})
    ingestor = make(guard, sink)
    ok, failed = await gather(
        ingestor.publish(prepared(ingestor, track("up", "m-up")), source="web", limiter_id="dev"),
        ingestor.publish(prepared(ingestor, track("down", "m-down")), source="web", limiter_id="dev"),
    )
    assert isinstance(ok, Outcome) and ok.accepted == 1
    assert isinstance(failed, ApiError) and failed.status == 503 and failed.code == "kafka_unavailable"
    assert int(failed.headers["Retry-After"]) > 0  # type: ignore[index]
    assert guard.seen == {("web", "m-up")}


async def test_a_call_alone_is_not_delayed_into_a_later_group() -> None:
    guard, sink = FakeGuard(), FakeSink()
    ingestor = make(guard, sink)
    outcome = await asyncio.wait_for(
        ingestor.publish(prepared(ingestor, track("u", "alone")), source="web", limiter_id="dev"), 1)
    assert outcome.accepted == 1 and guard.rounds[0] == (1, 1, 0)


async def test_an_unexpected_error_fails_the_calls_instead_of_hanging_them() -> None:
    class Broken(FakeGuard):
        async def admit(self, *args: Any, **kwargs: Any) -> Admission:
            raise RuntimeError("bug")

    ingestor = make(Broken(), FakeSink())
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(ingestor.publish(prepared(ingestor, track("u", "x")), source="web",
                                                limiter_id="dev"), 1)
    # The coalescer is usable afterwards.
    ingestor.guard = FakeGuard()  # type: ignore[assignment]
    assert (await ingestor.publish(prepared(ingestor, track("u", "y")), source="web", limiter_id="dev")).accepted == 1
