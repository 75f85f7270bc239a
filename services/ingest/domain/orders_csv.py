"""Historical orders from a CSV file → tracking calls (``identify`` once per customer, then
``Order Completed`` per order), sent through ``/v1/batch`` like any other client.

Columns (header names, case-insensitive; ``order_id``, ``date`` and ``total`` plus ``customer_id`` or
``email`` are required): ``order_id, customer_id, email, date, total, currency, items`` and optionally
``first_name, last_name, phone, subtotal, tax, shipping, discount, coupon, status``.

``items`` is either a JSON array of products (``[{"sku": "A", "quantity": 2, "price": 9.5}]``) or the compact
form ``SKU:QTY:PRICE`` separated by ``|`` (``A-1:2:9.50|B-7:1:20``).

Message ids derive from the order id, so importing the same file twice counts each order once.

>>> row = {"order_id": "1001", "email": "Ada@Example.com", "date": "2023-04-05", "total": "29.00",
...        "currency": "eur", "items": "MUG:2:9.50|TEA:1:10"}
>>> calls = orders_to_calls([row])
>>> [c["type"] for c in calls]
['identify', 'track']
>>> calls[1]["properties"]["products"][0]
{'sku': 'MUG', 'product_id': 'MUG', 'quantity': 2, 'price': 9.5}
>>> calls[1]["anonymousId"], calls[1]["timestamp"], calls[1]["properties"]["currency"]
('email:ada@example.com', '2023-04-05T00:00:00+00:00', 'EUR')
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.ingest.domain.commerce import compact, identity, money, text
from services.ingest.domain.tracking import MessageRejected, parse_timestamp

REQUIRED = ("order_id", "date", "total")


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    message: str


def parse_items(value: str | None) -> list[dict[str, Any]]:
    """Products of the ``items`` column (JSON array or ``SKU:QTY:PRICE|...``).

    >>> parse_items('[{"sku": "A", "quantity": 1, "price": "2.5"}]')
    [{'sku': 'A', 'quantity': 1, 'price': 2.5, 'product_id': 'A'}]
    >>> parse_items("")
    []
    """
    value = (value or "").strip()
    if not value:
        return []
    products: list[dict[str, Any]] = []
    if value.startswith("["):
        try:
            raw = json.loads(value)
        except json.JSONDecodeError as exc:
            raise MessageRejected("invalid_items", f"items is not valid JSON: {exc}") from exc
        if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
            raise MessageRejected("invalid_items", "items JSON must be an array of objects")
        for item in raw:
            sku = text(item.get("sku")) or text(item.get("product_id"))
            products.append(compact({**item, "sku": sku, "product_id": text(item.get("product_id")) or sku,
                                     "quantity": _quantity(item.get("quantity", 1)),
                                     "price": money(item.get("price"))}))
        return products
    for part in value.split("|"):
        fields = [f.strip() for f in part.split(":")]
        if len(fields) != 3 or not fields[0]:
            raise MessageRejected("invalid_items", f"item {part!r} is not SKU:QTY:PRICE")
        price = money(fields[2])
        if price is None:
            raise MessageRejected("invalid_items", f"item {part!r} has no numeric price")
        products.append({"sku": fields[0], "product_id": fields[0], "quantity": _quantity(fields[1]), "price": price})
    return products


def _quantity(value: Any) -> int:
    try:
        quantity = int(float(value))
    except (TypeError, ValueError) as exc:
        raise MessageRejected("invalid_items", f"quantity {value!r} is not a number") from exc
    if quantity < 0:
        raise MessageRejected("invalid_items", "quantity must not be negative")
    return quantity


def row_to_calls(row: Mapping[str, Any], seen_customers: set[str]) -> list[dict[str, Any]]:
    norm = {str(k).strip().lower(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
    missing = [c for c in REQUIRED if not norm.get(c)]
    if missing:
        raise MessageRejected("missing_column", f"missing {', '.join(missing)}")
    email = text(norm.get("email"))
    who = identity(customer_id=norm.get("customer_id"), email=email)
    if not who:
        raise MessageRejected("missing_identity", "a row needs customer_id or email")
    total = money(norm["total"])
    if total is None:
        raise MessageRejected("invalid_total", f"total {norm['total']!r} is not a number")
    when = parse_timestamp(norm["date"], "date")
    assert when is not None
    currency = (text(norm.get("currency")) or "").upper() or None
    order_id = str(norm["order_id"])
    context: dict[str, Any] = {"integration": {"name": "csv-import"}}
    if email:
        context["traits"] = {"email": email.lower()}
    calls: list[dict[str, Any]] = []
    customer = who.get("userId") or who["anonymousId"]
    if customer not in seen_customers:
        seen_customers.add(customer)
        traits = compact({"email": email.lower() if email else None, "first_name": text(norm.get("first_name")),
                          "last_name": text(norm.get("last_name")), "phone": text(norm.get("phone"))})
        calls.append({"type": "identify", **who, "messageId": f"import:customer:{customer}",
                      "timestamp": when.isoformat(), "traits": traits, "context": context})
    discount = money(norm.get("discount"))
    calls.append({
        "type": "track", "event": "Order Completed", **who, "messageId": f"import:order:{order_id}",
        "timestamp": when.isoformat(), "context": context,
        "properties": compact({
            "order_id": order_id, "total": total, "revenue": total, "currency": currency,
            "subtotal": money(norm.get("subtotal")), "tax": money(norm.get("tax")),
            "shipping": money(norm.get("shipping")), "discount": discount, "coupon": text(norm.get("coupon")),
            "status": text(norm.get("status")), "products": parse_items(norm.get("items")), "imported": True,
        }),
    })
    return calls


def orders_to_calls(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """All rows, raising on the first bad one (the CLI uses :func:`row_to_calls` to report per line)."""
    seen: set[str] = set()
    return [call for row in rows for call in row_to_calls(row, seen)]
