"""The historical CSV import CLI, run as a process against a live ingest."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.ingest.domain.orders_csv import orders_to_calls, parse_items
from services.ingest.domain.tracking import MessageRejected

REPO = Path(__file__).resolve().parents[2]


def test_compact_and_json_items() -> None:
    assert parse_items("A:2:9.5|B:1:3") == [{"sku": "A", "product_id": "A", "quantity": 2, "price": 9.5},
                                            {"sku": "B", "product_id": "B", "quantity": 1, "price": 3.0}]
    with pytest.raises(MessageRejected):
        parse_items("A:two:9.5")
    with pytest.raises(MessageRejected):
        parse_items("[1, 2]")


def test_one_identify_per_customer() -> None:
    rows = [{"order_id": str(i), "customer_id": "c1", "date": "2023-01-0" + str(i), "total": "5"} for i in (1, 2)]
    assert [c["type"] for c in orders_to_calls(rows)] == ["identify", "track", "track"]


@pytest.mark.integration
def test_import_cli_goes_through_batch_and_is_idempotent(ingest: Any, kafka_raw: Any, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    csv_file = tmp_path / "orders.csv"
    csv_file.write_text(
        "order_id,customer_id,email,date,total,currency,items,discount,coupon\n"
        f"{tag}-1,cust-{tag},Ada@Example.com,2023-01-05T10:00:00Z,29.00,EUR,MUG-01:2:9.50|TEA-07:1:10.00,0,\n"
        f"{tag}-2,cust-{tag},ada@example.com,2023-03-01,12.50,EUR,MUG-01:1:12.50,2.5,SPRING\n"
        f"{tag}-3,,guest-{tag}@example.com,2023-04-01,8.90,eur,"
        '"[{""sku"": ""TEA-07"", ""quantity"": 1, ""price"": 8.9}]",,\n'
        f"{tag}-4,cust-{tag},,2023-05-01,,EUR,MUG-01:1:12.50,,\n"
        f"{tag}-5,cust-{tag},,2023-06-01,10,EUR,MUG-01:x:12.50,,\n"
    )
    command = [sys.executable, "-m", "services.ingest.import_orders", str(csv_file), "--write-key",
               ingest.settings.dev_write_key, "--url", ingest.url, "--batch-size", "2"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stderr
    assert "line 5: missing_column: missing total" in first.stderr
    assert "line 6: invalid_items" in first.stderr
    assert "5 rows → 5 events: 5 accepted (0 already imported), 2 rows rejected" in first.stdout
    assert "event" in first.stderr  # the tqdm progress bar

    ids = [f"import:order:{tag}-1", f"import:order:{tag}-2", f"import:order:{tag}-3",
           f"import:customer:cust-{tag}", f"import:customer:email:guest-{tag}@example.com"]
    found = kafka_raw.by_ids(ids)
    assert set(found) == set(ids)
    [(key, order)] = found[f"import:order:{tag}-1"]
    assert key == f"cust-{tag}".encode() and order.event == "Order Completed"
    assert order.timestamp.isoformat() == "2023-01-05T10:00:00+00:00"
    assert order.properties["products"][0] == {"sku": "MUG-01", "product_id": "MUG-01", "quantity": 2, "price": 9.5}
    assert found[f"import:order:{tag}-2"][0][1].properties["coupon"] == "SPRING"
    assert found[f"import:order:{tag}-3"][0][1].properties["currency"] == "EUR"

    again = subprocess.run([*command, "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "5 accepted (5 already imported)" in again.stdout
    assert all(len(v) == 1 for v in kafka_raw.by_ids(ids).values())
