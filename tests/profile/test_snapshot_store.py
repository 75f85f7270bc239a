"""Profile snapshots against a real Cassandra: what a snapshot write leaves in the row."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from loyalist.cassandra import connect
from loyalist.settings import Settings
from services.profile.domain.profile import new_state
from services.profile.store import ProfileStore
from tests.cassandra_traces import traced_tombstones

pytestmark = pytest.mark.integration


def test_a_snapshot_of_an_unmerged_profile_writes_no_tombstone(stack_settings: Settings) -> None:
    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    pid, merged = f"p-{uuid.uuid4().hex}", f"p-{uuid.uuid4().hex}"

    async def scenario() -> None:
        store = ProfileStore(session)
        now = datetime.now(UTC)
        for _ in range(3):
            await store.save_many([(pid, new_state(pid), {"profileId": pid})], now)
        # A merged profile's snapshot does say so.
        await store.save(merged, None, None, pid, now)

    try:
        asyncio.run(scenario())
        query = "SELECT document, merged_into FROM profiles WHERE profile_id = %s"
        row = session.execute(query, (pid,)).one()
        assert row["document"] is not None and row["merged_into"] is None
        assert session.execute(query, (merged,)).one()["merged_into"] == pid
        # Writing merged_into as null would leave one tombstone cell per write for every read to go through.
        assert traced_tombstones(session, query, (pid,)) == 0
    finally:
        cluster.shutdown()
