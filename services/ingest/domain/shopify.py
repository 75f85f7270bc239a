"""Shopify webhooks → canonical events (Segment e-commerce spec v2).

| topic | event |
|---|---|
| orders/create | Order Completed |
| orders/paid, orders/updated | Order Updated (``status``: the financial status) |
| orders/cancelled | Order Cancelled |
| refunds/create | Order Refunded |
| checkouts/create, checkouts/update | Checkout Started (latest cart state, with ``recovery_url``) |
| customers/create, customers/update | identify (traits, marketing consent) |

Message ids are derived from the platform's ids (and ``updated_at`` for updates), so a fact delivered twice
under two webhook ids is still one event.

>>> from datetime import UTC, datetime
>>> now = datetime(2024, 1, 1, tzinfo=UTC)
>>> order = {"id": 820982911946154500, "email": "jon@example.com", "created_at": "2021-12-31T19:00:00-05:00",
...          "currency": "USD", "total_price": "403.00", "customer": {"id": 115310627314723954},
...          "line_items": [{"product_id": 788032119674292900, "sku": "IPOD2008BLACK", "title": "IPod Nano",
...                          "price": "199.00", "quantity": 1}],
...          "discount_codes": [{"code": "TENOFF", "amount": "10.00", "type": "fixed_amount"}]}
>>> [doc] = map_shopify("orders/create", order, shop="x.myshopify.com", source="shopify", received_at=now)
>>> doc["event"], doc["userId"], doc["properties"]["total"], doc["properties"]["coupon"]
('Order Completed', '115310627314723954', 403.0, 'TENOFF')
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.ingest.domain.commerce import compact, event_doc, identity, money, obj, text, when
from services.ingest.domain.tracking import MessageRejected

TOPICS = (
    "orders/create", "orders/paid", "orders/updated", "orders/cancelled", "refunds/create",
    "checkouts/create", "checkouts/update", "customers/create", "customers/update",
)


def _products(line_items: Any) -> list[dict[str, Any]]:
    products = []
    for item in line_items or []:
        if not isinstance(item, dict):
            continue
        discount = sum(money(a.get("amount")) or 0.0 for a in item.get("discount_allocations") or []
                       if isinstance(a, dict)) or money(item.get("total_discount"))
        products.append(compact({
            "product_id": text(item.get("product_id")), "variant_id": text(item.get("variant_id")),
            "sku": text(item.get("sku")), "name": text(item.get("title")) or text(item.get("name")),
            "variant": text(item.get("variant_title")), "brand": text(item.get("vendor")),
            "price": money(item.get("price")), "quantity": item.get("quantity"),
            "discount": discount or None, "line_item_id": text(item.get("id")),
        }))
    return products


def _discounts(codes: Any) -> list[dict[str, Any]]:
    return [
        compact({"code": text(d.get("code")), "amount": money(d.get("amount")), "type": text(d.get("type"))})
        for d in codes or [] if isinstance(d, dict)
    ]


def _shipping(payload: dict[str, Any]) -> float | None:
    lines = [money(s.get("price")) for s in payload.get("shipping_lines") or [] if isinstance(s, dict)]
    if any(v is not None for v in lines):
        return sum(v or 0.0 for v in lines)
    shop_money = ((payload.get("total_shipping_price_set") or {}).get("shop_money") or {})
    return money(shop_money.get("amount"))


def order_properties(order: dict[str, Any], shop: str) -> dict[str, Any]:
    discounts = _discounts(order.get("discount_codes"))
    return {
        "order_id": text(order.get("id")),
        "order_number": text(order.get("order_number")) or text(order.get("name")),
        "checkout_id": text(order.get("checkout_id")) or text(order.get("checkout_token")),
        "total": money(order.get("total_price")),
        "subtotal": money(order.get("subtotal_price")),
        "tax": money(order.get("total_tax")),
        "discount": money(order.get("total_discounts")),
        "shipping": _shipping(order),
        "coupon": discounts[0]["code"] if discounts and "code" in discounts[0] else None,
        "discounts": discounts,
        "currency": text(order.get("currency")),
        "products": _products(order.get("line_items")),
        "shop_id": shop,
        "financial_status": text(order.get("financial_status")),
        "fulfillment_status": text(order.get("fulfillment_status")),
    }


def order_customer(order: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    customer = obj(order.get("customer"))
    email = text(order.get("email")) or text(order.get("contact_email")) or text(customer.get("email"))
    return identity(customer_id=customer.get("id"), email=email), email


def _consent(customer: dict[str, Any]) -> dict[str, Any] | None:
    consent: dict[str, Any] = {}
    for channel, field in (("email", "email_marketing_consent"), ("sms", "sms_marketing_consent")):
        value = customer.get(field)
        if isinstance(value, dict) and value.get("state"):
            consent[channel] = compact({"subscribed": value["state"] == "subscribed",
                                        "updated_at": text(value.get("consent_updated_at")),
                                        "opt_in_level": text(value.get("opt_in_level"))})
    if "email" not in consent and isinstance(customer.get("accepts_marketing"), bool):
        consent["email"] = compact({"subscribed": customer["accepts_marketing"],
                                    "updated_at": text(customer.get("accepts_marketing_updated_at"))})
    return consent or None


def customer_traits(customer: dict[str, Any]) -> dict[str, Any]:
    address = obj(customer.get("default_address"))
    tags = text(customer.get("tags"))
    return {
        "email": text(customer.get("email")), "first_name": text(customer.get("first_name")),
        "last_name": text(customer.get("last_name")), "phone": text(customer.get("phone")),
        "created_at": text(customer.get("created_at")), "orders_count": customer.get("orders_count"),
        "total_spent": money(customer.get("total_spent")), "currency": text(customer.get("currency")),
        "verified_email": customer.get("verified_email"), "state": text(customer.get("state")),
        "tags": [t.strip() for t in tags.split(",") if t.strip()] if tags else None,
        "address": compact({
            "city": text(address.get("city")), "country": text(address.get("country")),
            "country_code": text(address.get("country_code")), "postal_code": text(address.get("zip")),
            "state": text(address.get("province")), "street": text(address.get("address1")),
        }) or None,
        "consent": _consent(customer),
        "shopify_customer_id": text(customer.get("id")),
    }


def map_shopify(
    topic: str,
    payload: Any,
    *,
    shop: str,
    source: str,
    received_at: datetime,
    known_order_customer: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One webhook → canonical event documents. ``known_order_customer`` is the identity recorded for the
    refunded order (refund payloads name only the order id)."""
    if not isinstance(payload, dict) or payload.get("id") is None:
        raise MessageRejected("invalid_payload", "a Shopify webhook body is a JSON object with an id")
    pid = text(payload["id"])
    base = f"shopify:{shop}:{topic}:{pid}"
    context = {"integration": {"name": "shopify", "shop": shop, "topic": topic}}
    common: dict[str, Any] = {"source": source, "received_at": received_at, "context": context}

    if topic.startswith("orders/"):
        who, email = order_customer(payload)
        props = order_properties(payload, shop)
        if topic == "orders/create":
            return [event_doc(call="track", event="Order Completed", message_id=base, who=who, email=email,
                              timestamp=when(payload.get("processed_at") or payload.get("created_at"), received_at),
                              properties=props, **common)]
        if topic in ("orders/paid", "orders/updated"):
            updated = text(payload.get("updated_at")) or ""
            props["status"] = "paid" if topic == "orders/paid" else text(payload.get("financial_status"))
            return [event_doc(call="track", event="Order Updated", message_id=f"{base}:{updated}", who=who,
                              email=email, timestamp=when(payload.get("updated_at"), received_at),
                              properties=props, **common)]
        if topic == "orders/cancelled":
            props["reason"] = text(payload.get("cancel_reason"))
            return [event_doc(call="track", event="Order Cancelled", message_id=base, who=who, email=email,
                              timestamp=when(payload.get("cancelled_at") or payload.get("updated_at"), received_at),
                              properties=props, **common)]
    if topic == "refunds/create":
        order_id = text(payload.get("order_id"))
        transactions = [t for t in payload.get("transactions") or [] if isinstance(t, dict)
                        and t.get("kind") == "refund" and t.get("status") in (None, "success")]
        refunded_items = [
            {**(r.get("line_item") or {}), "quantity": r.get("quantity")}
            for r in payload.get("refund_line_items") or [] if isinstance(r, dict)
        ]
        total = sum(money(t.get("amount")) or 0.0 for t in transactions) if transactions else None
        if total is None:
            total = sum(money(r.get("subtotal")) or 0.0 for r in payload.get("refund_line_items") or []
                        if isinstance(r, dict)) or None
        who = known_order_customer or {"anonymousId": f"shopify-order:{shop}:{order_id}"}
        props = {
            "order_id": order_id, "refund_id": pid, "total": total,
            "currency": text(transactions[0].get("currency")) if transactions else None,
            "products": _products(refunded_items), "shop_id": shop, "reason": text(payload.get("note")),
        }
        return [event_doc(call="track", event="Order Refunded", message_id=base, who=who,
                          timestamp=when(payload.get("processed_at") or payload.get("created_at"), received_at),
                          properties=props, **common)]
    if topic in ("checkouts/create", "checkouts/update"):
        who, email = order_customer(payload)
        token = text(payload.get("token")) or pid
        discounts = _discounts(payload.get("discount_codes"))
        updated = text(payload.get("updated_at")) or ""
        props = {
            "checkout_id": token, "cart_id": text(payload.get("cart_token")),
            "value": money(payload.get("total_price")), "total": money(payload.get("total_price")),
            "subtotal": money(payload.get("subtotal_price")), "tax": money(payload.get("total_tax")),
            "discount": money(payload.get("total_discounts")), "currency": text(payload.get("currency")),
            "coupon": discounts[0].get("code") if discounts else None, "discounts": discounts,
            "products": _products(payload.get("line_items")),
            "recovery_url": text(payload.get("abandoned_checkout_url")), "shop_id": shop,
        }
        message_id = f"shopify:{shop}:checkout:{token}:{updated}"
        return [event_doc(call="track", event="Checkout Started", message_id=message_id, who=who, email=email,
                          timestamp=when(payload.get("updated_at"), received_at),
                          properties=props, **common)]
    if topic in ("customers/create", "customers/update"):
        email = text(payload.get("email"))
        updated = text(payload.get("updated_at")) or ""
        return [event_doc(call="identify", message_id=f"shopify:{shop}:customer:{pid}:{updated}",
                          who=identity(customer_id=pid, email=email), email=email,
                          timestamp=when(payload.get("updated_at"), received_at), traits=customer_traits(payload),
                          **common)]
    raise MessageRejected("unsupported_topic",
                          f"Shopify topic {topic!r} is not handled; subscribe to {', '.join(TOPICS)}")
