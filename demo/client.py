"""Small HTTP helpers for the demo: sending events through the public ingest API, and calling the other
services' APIs in a way that turns "service missing" into a sentence instead of a stack trace."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import httpx
from tqdm import tqdm

JSON = dict[str, Any]
T = TypeVar("T")
R = TypeVar("R")


class Unavailable(Exception):
    """A service or endpoint the demo needs is not there; the message says which and why."""


async def send_events(ingest_url: str, write_key: str, events: Sequence[JSON], *, desc: str, batch_size: int = 500,
                      concurrency: int = 4) -> JSON:
    """Post ``events`` in batches to ``/v1/batch``; a refused batch (429/503) is resent after Retry-After, so
    every event is acknowledged once the call returns. Returns counts from ingest's answers."""
    chunks = [list(events[i:i + batch_size]) for i in range(0, len(events), batch_size)]
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0, "retries": 0}
    first_rejection: list[Any] = []
    queue: asyncio.Queue[list[JSON]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)
    bar = tqdm(total=len(events), desc=desc, unit="ev", unit_scale=True, dynamic_ncols=True)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                chunk = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            for attempt in range(30):
                try:
                    resp = await client.post("/v1/batch", json={"batch": chunk})
                except httpx.HTTPError:
                    totals["retries"] += 1
                    await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))
                    continue
                if resp.status_code in (429, 503):
                    totals["retries"] += 1
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                    continue
                body = resp.json() if resp.content else {}
                if resp.status_code == 200:
                    totals["accepted"] += int(body.get("accepted", len(chunk)))
                    totals["duplicates"] += int(body.get("duplicates") or 0)
                else:
                    totals["accepted"] += int(body.get("accepted") or 0)
                    rejected = body.get("rejected") or []
                    totals["rejected"] += len(rejected) or len(chunk)
                    if not first_rejection:
                        first_rejection.append(rejected[:1] or body)
                break
            else:
                raise Unavailable(f"ingest kept refusing a batch at {ingest_url}")
            bar.update(len(chunk))

    async with httpx.AsyncClient(base_url=ingest_url, auth=(write_key, ""), timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    bar.close()
    if first_rejection:
        totals["first_rejection"] = first_rejection[0]
    return totals


async def fetch_all(items: Iterable[T], fetch: Callable[[T], Awaitable[R]], *, desc: str, concurrency: int = 24,
                    ) -> list[R]:
    """Run ``fetch`` over ``items`` with bounded concurrency and a progress bar, keeping the input order."""
    todo = list(items)
    results: list[Any] = [None] * len(todo)
    bar = tqdm(total=len(todo), desc=desc, unit="req", dynamic_ncols=True)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(todo):
            i = next_index
            next_index += 1
            results[i] = await fetch(todo[i])
            bar.update(1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.close()
    return results


async def get_json(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    try:
        resp = await client.get(path, params=params or None)
    except httpx.HTTPError as exc:
        raise Unavailable(f"{client.base_url}{path}: {type(exc).__name__}") from exc
    if resp.status_code != 200:
        raise Unavailable(f"GET {client.base_url}{path} → {resp.status_code} {resp.text[:200]}")
    return resp.json()


async def post_json(client: httpx.AsyncClient, path: str, body: Any = None, *, ok: Iterable[int] = (200, 201, 202),
                    ) -> Any:
    try:
        resp = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        raise Unavailable(f"{client.base_url}{path}: {type(exc).__name__}") from exc
    if resp.status_code not in set(ok):
        raise Unavailable(f"POST {client.base_url}{path} → {resp.status_code} {resp.text[:300]}")
    return resp.json() if resp.content else {}


def parse_prometheus(text: str, family: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric family from Prometheus text format.

    >>> parse_prometheus('a_total{x="1",y="b"} 3.0\\na_created 1\\nb 2', "a_total")
    [({'x': '1', 'y': 'b'}, 3.0)]
    """
    out = []
    for line in text.splitlines():
        if not line.startswith(family) or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        if name != family and not (not rest and line.split()[0] == family):
            continue
        labels: dict[str, str] = {}
        if rest:
            label_text, _, value_text = rest.rpartition("}")
            for part in label_text.split('",'):
                if "=" in part:
                    k, _, v = part.partition("=")
                    labels[k.strip()] = v.strip().strip('"')
        else:
            value_text = line.split()[1]
        try:
            out.append((labels, float(value_text.split()[0])))
        except (ValueError, IndexError):
            continue
    return out
