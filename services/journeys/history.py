"""Read-only access to the profile service's event store for backtests (tables of migration 0200:
``profile_events`` with the encoded Event per profile and time, ``profiles`` with the latest documents).

A period query scans the whole event table (events are partitioned by profile, not by time): a backtest is
an occasional analyst query, bounded by ``limit``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
from cassandra.cluster import Session

from loyalist.cassandra import execute
from loyalist.events import decode_event
from services.journeys.domain.backtest import HistoricalFact
from services.journeys.runner import _event_trigger

log = logging.getLogger(__name__)


class EventHistory:
    def __init__(self, session: Session, keyspace: str) -> None:
        self.s = session
        self.keyspace = keyspace

    def describe(self) -> str:
        return f"{self.keyspace}.profile_events"

    async def available(self) -> bool:
        rows = await execute(self.s, "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s",
                             (self.keyspace,))
        names = {r["table_name"] for r in rows}
        return {"profile_events", "profiles"} <= names

    async def facts(self, start: datetime, end: datetime, *, limit: int) -> list[HistoricalFact]:
        rows = await execute(
            self.s, "SELECT profile_id, ts, body FROM profile_events WHERE ts >= %s AND ts < %s LIMIT %s "
                    "ALLOW FILTERING", (start, end, limit))
        facts: list[HistoricalFact] = []
        for r in rows:
            try:
                event = decode_event(r["body"])
            except ValueError:
                log.warning("undecodable stored event of %s skipped", r["profile_id"])
                continue
            facts.append(HistoricalFact(r["profile_id"], event.timestamp, _event_trigger(event)))
        return facts

    async def profiles(self, profile_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        ids = sorted(profile_ids)
        out: dict[str, dict[str, Any]] = {}
        select = self.s.prepare("SELECT profile_id, document FROM profiles WHERE profile_id IN ?")
        for i in range(0, len(ids), 100):
            rows = await execute(self.s, select, (ids[i:i + 100],))
            for r in rows:
                if r["document"]:
                    out[r["profile_id"]] = orjson.loads(r["document"])
        return out
