"""Counting the tombstones a queue poll reads: a Cassandra session wrapper that runs one kind of SELECT with
tracing, and the sum of what the traces report (``Read N live rows and M tombstone cells``).

Shared by the tests that check what a read goes through: the read floors of the queues (segmenter, notify,
loyalty) and the profile snapshots."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from cassandra.cluster import ResponseFuture, Session

_READ = re.compile(r"Read (\d+) live rows and (\d+) tombstone cells")


class TracedReads:
    """Stands in for a session: statements whose CQL starts with ``prefix`` run traced and are kept in
    ``futures``; everything else passes through untouched."""

    def __init__(self, session: Session, prefix: str) -> None:
        self.session = session
        self.prefix = prefix
        self.futures: list[ResponseFuture] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def execute_async(self, statement: Any, parameters: Any = None, *args: Any, **kwargs: Any) -> ResponseFuture:
        traced = str(getattr(statement, "query_string", statement)).startswith(self.prefix)
        if traced:
            kwargs["trace"] = True
        future = self.session.execute_async(statement, parameters, *args, **kwargs)
        if traced:
            self.futures.append(future)
        return future

    def take(self) -> list[ResponseFuture]:
        """The traced reads since the last call."""
        futures, self.futures = self.futures, []
        return futures


def _tombstones(future: ResponseFuture) -> int:
    trace = future.get_query_trace(max_wait=10)
    counts = [_READ.search(event.description or "") for event in trace.events]
    found = [int(m.group(2)) for m in counts if m]
    assert found, f"no read summary in the trace: {[e.description for e in trace.events]}"
    return sum(found)


async def tombstones_read(futures: Sequence[ResponseFuture]) -> int:
    """The tombstone cells the traced reads went through (the traces are fetched off the event loop)."""
    assert futures, "no traced read"
    counts = await asyncio.gather(*(asyncio.to_thread(_tombstones, f) for f in futures))
    return sum(counts)


def traced_tombstones(session: Session, query: Any, params: Sequence[Any]) -> int:
    """The tombstone cells one traced run of ``query`` (CQL or a prepared statement) goes through."""
    result = session.execute(query, params, trace=True)
    return _tombstones(result.response_future)
