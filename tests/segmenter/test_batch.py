"""The batched ``profile.changed`` path of the engine, driven in-process on the real Cassandra and Kafka: a batch
has the effects of its messages handled one at a time (one customer's in order, against the state the previous
one left), and a replayed batch — redelivered because its offsets were not committed — decides nothing again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loyalist.cassandra import connect
from loyalist.kafka import make_producer
from loyalist.settings import Settings
from services.segmenter.config import SegmenterConfig
from services.segmenter.engine import SegmenterEngine
from services.segmenter.store import SegmenterStore, StoredSegment
from tests.segmenter.test_service import profile_changed, profile_document, transitions_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(stack_settings: Settings) -> AsyncIterator[SegmenterEngine]:
    """An engine with one segment of its own (removed afterwards, so no service of the session backfills it)."""
    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    producer = make_producer(stack_settings, client_id="segmenter-batch-test")
    await producer.start()
    store = SegmenterStore(session)
    engine = SegmenterEngine(stack_settings, SegmenterConfig(), store, producer)
    now = datetime.now(UTC)
    segment_id = f"batch-{uuid.uuid4().hex[:10]}"
    await store.put_segment(StoredSegment(segment_id, "two orders or more", "", {
        "field": "orders_count", "op": "gte", "value": 2}, 1, now, now, "done", 0, 0))
    await engine.reload_segments()
    try:
        yield engine
    finally:
        await store.delete_segment(segment_id)
        await producer.stop()
        cluster.shutdown()


def _segment_id(engine: SegmenterEngine) -> str:
    return next(iter(engine.segment_rows))


async def test_a_batch_decides_each_message_in_order_and_a_replay_decides_nothing(
        engine: SegmenterEngine, stack_settings: Settings) -> None:
    segment_id = _segment_id(engine)
    pid, other, gone = (f"batch-{uuid.uuid4().hex[:10]}" for _ in range(3))
    now = datetime.now(UTC)
    accepted = [now - timedelta(seconds=s) for s in (3, 2, 1)]
    # One customer enters, leaves (a refund) and enters again within one batch; another enters; a third enters
    # and is deleted in the same batch (the one-message path for erasures, under the locks the batch holds).
    items: list[tuple[dict[str, Any], int, int]] = [
        (profile_changed(profile_document(pid, orders=2, revenue=20, last_order_at=now),
                         received_at=accepted[0]), 0, 10),
        (profile_changed(profile_document(other, orders=3, revenue=30, last_order_at=now)), 1, 20),
        (profile_changed(profile_document(pid, orders=1, revenue=10, last_order_at=now), event="Order Refunded",
                         received_at=accepted[1]), 0, 11),
        (profile_changed(profile_document(gone, orders=5, revenue=50, last_order_at=now)), 2, 30),
        ({"profileId": gone, "deleted": True, "changed": [], "at": now.isoformat()}, 2, 31),
        (profile_changed(profile_document(pid, orders=2, revenue=25, last_order_at=now),
                         received_at=accepted[2]), 0, 12),
    ]
    await engine.on_profile_changed_batch(items)

    mine = await transitions_for(stack_settings, pid, segment_id)
    assert [(m["change"], m["transitionId"]) for m in mine] == [
        ("entered", f"{segment_id}:{pid}:1"), ("exited", f"{segment_id}:{pid}:2"),
        ("entered", f"{segment_id}:{pid}:3")]
    # Each change carries the acceptance time of the input that caused it.
    assert [m["eventAcceptedAt"] for m in mine] == [profile_changed(profile_document(pid), received_at=a)["cause"][
        "receivedAt"] for a in accepted]
    assert [m["change"] for m in await transitions_for(stack_settings, other, segment_id)] == ["entered"]
    assert [m["change"] for m in await transitions_for(stack_settings, gone, segment_id)] == ["entered", "exited"]

    stored = await engine.store.memberships(pid)
    assert stored[segment_id] == (True, 3)
    profile = await engine.store.profile(pid)
    assert profile is not None and (profile.source_partition, profile.source_offset) == (0, 12)
    assert profile.document["orders_count"] == 2
    assert not await engine.store.outbox()

    # The same batch again (a redelivery after a crash before the commit): every message is a replay.
    await engine.on_profile_changed_batch(items)
    assert len(await transitions_for(stack_settings, pid, segment_id)) == 3
    assert len(await transitions_for(stack_settings, other, segment_id)) == 1
    assert len(await transitions_for(stack_settings, gone, segment_id)) == 2
    assert (await engine.store.memberships(pid))[segment_id] == (True, 3)


async def test_a_batch_whose_writes_fail_is_retried_without_moving_the_rfm_sketches_twice(
        engine: SegmenterEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cassandra went away while a batch was written: the retry (same messages, same stored profiles) must find
    the RFM sketches as they were, not with the batch's changes applied once already (which made the retry take
    an old value out twice: the segmenter stopped on that batch for good in a chaos run)."""
    from cassandra.cluster import NoHostAvailable

    from services.segmenter import metrics

    pid = f"batch-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    await engine.on_profile_changed_batch([
        (profile_changed(profile_document(pid, orders=1, revenue=10, last_order_at=now)), 3, 40)])
    assert engine.scorer.n == 1 and dict(engine.scorer.frequency.buckets) == {1: 1}  # order counts, width 1

    write_decided = engine.store.write_decided
    failures = {"left": 1}

    async def unavailable_once(decided: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            await write_decided(decided[:1])  # some rows may land before the node goes away
            raise NoHostAvailable("Unable to complete the operation against any hosts", {})
        await write_decided(decided)

    monkeypatch.setattr(engine.store, "write_decided", unavailable_once)
    drift_before = metrics.RFM_DRIFT._value.get()
    update = [(profile_changed(profile_document(pid, orders=2, revenue=25, last_order_at=now)), 3, 41)]
    with pytest.raises(NoHostAvailable):
        await engine.on_profile_changed_batch(update)
    assert engine.scorer.n == 1 and dict(engine.scorer.frequency.buckets) == {1: 1}

    await engine.on_profile_changed_batch(update)  # the consumer's retry of the same batch
    assert engine.scorer.n == 1 and dict(engine.scorer.frequency.buckets) == {2: 1}
    assert metrics.RFM_DRIFT._value.get() == drift_before
    profile = await engine.store.profile(pid)
    assert profile is not None and profile.document["orders_count"] == 2 and profile.source_offset == 41
