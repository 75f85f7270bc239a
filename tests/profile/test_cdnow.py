"""The CDNOW transaction log (shipped in lifetimes) through the public ingest API: every customer's
orders, revenue and RFM inputs must equal what lifetimes computes from the same file."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import httpx
import lifetimes
import pandas as pd
import pytest
from lifetimes.utils import summary_data_from_transaction_data

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CDNOW = Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"
OBSERVATION_END = "1998-06-30"
BATCH = 1000


def load_cdnow() -> pd.DataFrame:
    df = pd.read_csv(CDNOW, sep=r"\s+", header=None, skiprows=1, names=["customer", "date", "cds", "amount"],
                     dtype={"customer": str, "date": str})
    df["date"] = pd.to_datetime(df["date"], format="%Y%m%d")
    return df


def as_messages(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {"type": "track", "event": "Order Completed", "userId": row.customer, "messageId": f"cdnow-{i}",
         "timestamp": f"{row.date:%Y-%m-%d}T12:00:00Z",
         "properties": {"order_id": f"cdnow-{i}", "total": float(row.amount), "revenue": float(row.amount),
                        "currency": "USD", "quantity": int(row.cds)}}
        for i, row in enumerate(df.itertuples(index=False))
    ]


async def post_all(url: str, write_key: str, messages: list[dict[str, Any]]) -> None:
    auth = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"Authorization": auth}) as client:
        semaphore = asyncio.Semaphore(4)

        async def post(chunk: list[dict[str, Any]]) -> None:
            async with semaphore:
                resp = await client.post("/v1/batch", json={"batch": chunk})
                assert resp.status_code == 200, resp.text

        await asyncio.gather(*(post(messages[i:i + BATCH]) for i in range(0, len(messages), BATCH)))


async def fetch_all(url: str, headers: dict[str, str], customers: list[str]) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers,
                                 limits=httpx.Limits(max_connections=32)) as client:
        semaphore = asyncio.Semaphore(32)

        async def one(customer: str) -> None:
            async with semaphore:
                for attempt in range(3):
                    try:
                        resp = await client.get(f"/v1/profiles/{customer}",
                                                params={"by": "user_id", "observation_date": OBSERVATION_END})
                        break
                    except httpx.TransportError:  # a kept-alive connection the server closed meanwhile
                        if attempt == 2:
                            raise
                out[customer] = resp.json() if resp.status_code == 200 else None

        await asyncio.gather(*(one(c) for c in customers))
    return out


def folded(url: str) -> float:
    """Orders the processor has finished with, from its Prometheus counters (folded + duplicates)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith('loyalist_profile_events_total{') and 'stage="fold"' in line and (
                'outcome="ok"' in line or 'outcome="duplicate"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def mismatches(expected: pd.DataFrame, profiles: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    bad: dict[str, str] = {}
    for customer, row in expected.iterrows():
        doc = profiles.get(str(customer))
        if doc is None:
            bad[str(customer)] = "missing"
            continue
        rfm = doc["rfm"]
        got = (doc["orders_count"], rfm["frequency"], rfm["recency_days"], rfm["T_days"])
        want = (int(row["orders"]), int(row["frequency"]), int(row["recency"]), int(row["T"]))
        money_ok = (abs(doc["revenue_total"] - row["revenue"]) < 1e-6
                    and abs(rfm["monetary_value"] - row["monetary_value"]) < 1e-6)
        if got != want or not money_ok:
            bad[str(customer)] = (f"got {got} {doc['revenue_total']} {rfm['monetary_value']}, "
                                  f"want {want} {row['revenue']} {row['monetary_value']}")
    return bad


@pytest.mark.timeout(1800)
def test_cdnow_orders_and_rfm_match_lifetimes(start_service: Any, stack_settings: Any, profile_service: Any,
                                              api_headers: dict[str, str]) -> None:
    df = load_cdnow()
    assert len(df) == 69_659
    summary = summary_data_from_transaction_data(df, "customer", "date", "amount",
                                                 observation_period_end=OBSERVATION_END, freq="D")
    totals = df.groupby("customer").agg(orders=("amount", "size"), revenue=("amount", "sum"))
    expected = summary.join(totals)
    assert len(expected) == 23_570

    ingest = start_service("ingest")
    started = time.monotonic()
    asyncio.run(post_all(ingest.url, stack_settings.dev_write_key, as_messages(df)))
    posted = time.monotonic()

    customers = [str(c) for c in expected.index]
    # Wait until the processor has folded (or deduplicated) every order, then read each profile once.
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline and folded(profile_service.url) < len(df):
        time.sleep(2)
    processed = time.monotonic()
    profiles: dict[str, dict[str, Any] | None] = {}
    pending = customers
    bad: dict[str, str] = {}
    for _round in range(3):  # a profile whose Redis write trails its fold by a moment is read again
        profiles.update(asyncio.run(fetch_all(profile_service.url, api_headers, pending)))
        bad = mismatches(expected.loc[pending], profiles)
        pending = sorted(bad)
        if not pending:
            break
        time.sleep(2)
    print(f"\nCDNOW: posted 69,659 orders in {posted - started:.1f}s, all folded after "
          f"{processed - started:.1f}s, 23,570 profiles read and compared after {time.monotonic() - started:.1f}s")
    assert not bad, f"{len(bad)} customers differ, e.g. {list(bad.items())[:5]}"
