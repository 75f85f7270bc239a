"""Import past orders from a CSV file through ingest's ``/v1/batch`` (the same path as live events).

    python -m services.ingest.import_orders orders.csv --write-key KEY --url http://127.0.0.1:8001

Use a write key whose source names the import (e.g. ``import``). Re-running is safe: message ids derive from
order ids. Exit status 0 when every row was accepted, 1 when some rows were rejected (listed with their line
numbers), 2 on a usage or connection error.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from tqdm import tqdm

from services.ingest.domain.orders_csv import RowError, row_to_calls
from services.ingest.domain.tracking import MessageRejected

MAX_BATCH_BYTES = 450 * 1024  # below ingest's 500 KB limit, leaving room for the envelope


@dataclass
class ImportReport:
    rows: int = 0
    events: int = 0
    accepted: int = 0
    duplicates: int = 0
    errors: list[RowError] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.rows} rows → {self.events} events: {self.accepted} accepted "
                f"({self.duplicates} already imported), {len(self.errors)} rows rejected")


def read_calls(path: Path, report: ImportReport) -> list[tuple[int, dict[str, Any]]]:
    """(CSV line number, call) pairs; bad rows are reported, not fatal."""
    calls: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            report.rows += 1
            line = reader.line_num
            try:
                calls.extend((line, call) for call in row_to_calls(row, seen))
            except MessageRejected as exc:
                report.errors.append(RowError(line, f"{exc.code}: {exc.message}"))
    report.events = len(calls)
    return calls


def batches(calls: Sequence[tuple[int, dict[str, Any]]], max_messages: int) -> list[list[tuple[int, dict[str, Any]]]]:
    out: list[list[tuple[int, dict[str, Any]]]] = []
    current: list[tuple[int, dict[str, Any]]] = []
    size = 0
    for item in calls:
        item_size = len(orjson.dumps(item[1])) + 1
        if current and (len(current) >= max_messages or size + item_size > MAX_BATCH_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        out.append(current)
    return out


def send(client: httpx.Client, batch: list[tuple[int, dict[str, Any]]], report: ImportReport,
         *, attempts: int = 8) -> None:
    body = orjson.dumps({"batch": [call for _, call in batch]})
    delay = 1.0
    for attempt in range(attempts):
        try:
            response = client.post("/v1/batch", content=body, headers={"Content-Type": "application/json"})
        except httpx.TransportError as exc:
            if attempt == attempts - 1:
                raise
            print(f"connection problem ({exc}); retrying in {delay:.0f}s", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 30)
            continue
        if response.status_code in (429, 503):
            wait = float(response.headers.get("Retry-After") or delay)
            time.sleep(wait)
            delay = min(delay * 2, 30)
            continue
        payload = response.json()
        if response.status_code == 200:
            report.accepted += payload.get("accepted", len(batch))
            report.duplicates += payload.get("duplicates", 0)
            return
        if response.status_code == 400 and payload.get("code") == "invalid_messages":
            report.accepted += payload.get("accepted", 0)
            report.duplicates += payload.get("duplicates", 0)
            for rejected in payload.get("rejected", []):
                line = batch[rejected["index"]][0]
                report.errors.append(RowError(line, f"{rejected['code']}: {rejected['message']}"))
            return
        raise SystemExit(f"ingest answered {response.status_code}: {payload.get('code')}: {payload.get('message')}")
    raise SystemExit("ingest kept refusing (429/503); try again later — re-running is safe")


def run(path: Path, *, write_key: str, url: str, batch_size: int, progress: bool = True) -> ImportReport:
    report = ImportReport()
    calls = read_calls(path, report)
    with httpx.Client(base_url=url.rstrip("/"), auth=(write_key, ""), timeout=60) as client, \
            tqdm(total=len(calls), unit="event", desc=path.name, disable=not progress) as bar:
        for batch in batches(calls, batch_size):
            send(client, batch, report)
            bar.update(len(batch))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ingest.import_orders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="CSV of past orders")
    parser.add_argument("--write-key", required=True, help="write key (its source is stamped on the events)")
    parser.add_argument("--url", default="http://127.0.0.1:8001", help="ingest base URL")
    parser.add_argument("--batch-size", type=int, default=500, help="messages per /v1/batch request (max 2500)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        print(f"no such file: {args.file}", file=sys.stderr)
        return 2
    try:
        report = run(args.file, write_key=args.write_key, url=args.url,
                     batch_size=max(1, min(args.batch_size, 2500)), progress=not args.no_progress)
    except httpx.HTTPError as exc:
        print(f"cannot reach ingest at {args.url}: {exc}", file=sys.stderr)
        return 2
    for error in sorted(report.errors, key=lambda e: e.line):
        print(f"line {error.line}: {error.message}", file=sys.stderr)
    print(report.summary())
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
