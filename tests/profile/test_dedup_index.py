"""The folder's dedup index against a real Cassandra: entries by profile, erasure, and the older index (one
partition per event) still read while it holds rows, so an upgraded deployment does not fold an event twice."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from loyalist.cassandra import connect
from loyalist.settings import Settings
from services.profile.domain.profile import event_key
from services.profile.store import ProfileStore, StoredEvent
from tests.profile.conftest import make_event

pytestmark = pytest.mark.integration


def stored(profile_id: str) -> StoredEvent:
    event = make_event(name="Product Viewed", userId="u")
    ts_ms, key = event_key(event)
    return StoredEvent(profile_id, ts_ms, key, event)


def test_processed_events_are_found_by_profile_and_erased_with_it(stack_settings: Settings) -> None:
    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)

    async def scenario() -> None:
        store = ProfileStore(session)
        p1, p2 = f"p-{uuid.uuid4().hex}", f"p-{uuid.uuid4().hex}"
        a, b, c = stored(p1), stored(p1), stored(p2)
        await store.write_index([c, a, b])
        unseen = f"test:{uuid.uuid4().hex}"
        assert await store.existing_event_keys({p1: [a.event_key, unseen], p2: [c.event_key]}) == {
            a.event_key, c.event_key}
        # An entry belongs to its profile: the same key asked for another profile is not processed there
        # (a merge re-points the merged profile's entries to the survivor).
        assert await store.existing_event_keys({p2: [b.event_key]}) == set()
        assert await store.existing_event_keys({}) == set()
        await store.delete_events(p1, [a.event_key, b.event_key])
        assert await store.existing_event_keys({p1: [a.event_key, b.event_key], p2: [c.event_key]}) == {
            c.event_key}

    try:
        asyncio.run(scenario())
    finally:
        cluster.shutdown()


def test_the_older_index_is_read_while_it_holds_rows(stack_settings: Settings) -> None:
    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    old_key = f"test:{uuid.uuid4().hex}"
    pid = f"p-{uuid.uuid4().hex}"

    async def scenario() -> None:
        # What a deployment upgraded from the older index has: an entry there, none in profile_processed.
        session.execute("INSERT INTO profile_event_index (event_key, profile_id, ts) VALUES (%s, %s, %s)",
                        (old_key, pid, 0))
        store = ProfileStore(session)
        assert await store.existing_event_keys({pid: [old_key, f"test:{uuid.uuid4().hex}"]}) == {old_key}
        await store.delete_events(pid, [old_key])  # erasure removes it there too
        assert await ProfileStore(session).existing_event_keys({pid: [old_key]}) == set()

    try:
        asyncio.run(scenario())
    finally:
        session.execute("DELETE FROM profile_event_index WHERE event_key = %s", (old_key,))
        cluster.shutdown()


def test_a_resend_that_sorts_after_the_last_event_is_recognised_after_a_rebalance(stack_settings: Settings) -> None:
    """A client sent no timestamp, so ingest took each attempt's receivedAt: the resend of an order sorts after
    the original, the last folded event. While the profile is cached, the folder's recent keys catch it; after
    a rebalance (or a restart) the cache is gone, and the profile's latest stored events must stand in for them
    — a chaos run stored such resends twice."""
    from datetime import timedelta

    from loyalist.events import encode_event
    from services.profile.domain.profile import new_state
    from services.profile.processor import Emitter, Folder, Tombstones, fold_message

    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    pid = f"p-{uuid.uuid4().hex}"

    async def no_forwards(_: list[tuple[str, bytes]]) -> None:
        return None

    async def scenario() -> None:
        store = ProfileStore(session)
        folder = Folder(store, None, Emitter(None, stack_settings), Tombstones(store), no_forwards)
        first = make_event(name="Order Completed", userId="u", properties={"order_id": "o1", "total": 20.0})
        accepted = first.received_at
        first = first.model_copy(update={"timestamp": accepted})
        resend = first.model_copy(update={"timestamp": accepted + timedelta(seconds=3),
                                          "received_at": accepted + timedelta(seconds=3)})
        assert event_key(resend) > event_key(first) and resend.dedup_key == first.dedup_key

        await folder.fold_batch([fold_message("event", pid, body=encode_event(first))[1]])
        folder.forget_all()  # partitions were revoked and assigned again
        await folder.fold_batch([fold_message("event", pid, body=encode_event(resend))[1]])

        try:
            assert [e.event.message_id for e in await store.events(pid)] == [first.message_id]
            state = folder.cache[pid].state or new_state(pid)
            assert len(state.orders) == 1
        finally:
            # Folded outside the pipeline: leave nothing the session's replay test would rebuild.
            await store.delete_events(pid, [])
            await store.delete_profile(pid)

    try:
        asyncio.run(scenario())
    finally:
        cluster.shutdown()
