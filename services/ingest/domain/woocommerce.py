"""WooCommerce webhooks (REST API v3 resource bodies) → canonical events (Segment e-commerce spec v2).

| topic | event |
|---|---|
| order.created | Order Completed (Checkout Started while the order is ``pending``/``checkout-draft``) |
| order.updated | Order Cancelled / Order Refunded / Order Completed (pending → paid) / Order Updated, by status |
| order.deleted | Order Cancelled |
| customer.created, customer.updated | identify |

>>> from datetime import UTC, datetime
>>> now = datetime(2024, 1, 1, tzinfo=UTC)
>>> order = {"id": 727, "status": "processing", "currency": "USD", "total": "29.35", "customer_id": 0,
...          "billing": {"email": "john.doe@example.com"}, "date_created_gmt": "2017-03-22T16:28:02",
...          "line_items": [{"id": 315, "name": "Woo Single #1", "product_id": 93, "quantity": 2,
...                          "price": 3, "sku": ""}]}
>>> [doc] = map_woocommerce("order.created", order, shop="https://shop.example", source="woo", received_at=now)
>>> doc["event"], doc["anonymousId"], doc["properties"]["products"][0]["price"]
('Order Completed', 'email:john.doe@example.com', 3.0)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.ingest.domain.commerce import compact, event_doc, identity, money, obj, text, when
from services.ingest.domain.tracking import MessageRejected

TOPICS = ("order.created", "order.updated", "order.deleted", "customer.created", "customer.updated")
_UNPAID = ("pending", "checkout-draft", "failed")


def _gmt(value: Any, fallback: datetime) -> datetime:
    """WooCommerce's ``*_gmt`` fields are UTC without an offset."""
    moment = when(value, fallback)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _products(items: Any) -> list[dict[str, Any]]:
    products = []
    for item in items or []:
        if not isinstance(item, dict):
            continue
        quantity = item.get("quantity")
        subtotal, total = money(item.get("subtotal")), money(item.get("total"))
        products.append(compact({
            "product_id": text(item.get("product_id")),
            "variant_id": text(item.get("variation_id")) if item.get("variation_id") else None,
            "sku": text(item.get("sku")), "name": text(item.get("name")),
            "price": money(item.get("price")), "quantity": quantity,
            "discount": round(subtotal - total, 2) if subtotal is not None and total is not None and subtotal > total
            else None,
            "line_item_id": text(item.get("id")),
        }))
    return products


def order_properties(order: dict[str, Any], shop: str) -> dict[str, Any]:
    coupons = [compact({"code": text(c.get("code")), "amount": money(c.get("discount"))})
               for c in order.get("coupon_lines") or [] if isinstance(c, dict)]
    total = money(order.get("total"))
    tax = money(order.get("total_tax"))
    shipping = money(order.get("shipping_total"))
    return {
        "order_id": text(order.get("id")), "order_number": text(order.get("number")),
        "checkout_id": text(order.get("order_key")), "total": total,
        "subtotal": sum(money(i.get("subtotal")) or 0.0 for i in order.get("line_items") or [] if isinstance(i, dict))
        or None,
        "tax": tax, "shipping": shipping, "discount": money(order.get("discount_total")),
        "coupon": coupons[0].get("code") if coupons else None, "discounts": coupons,
        "currency": text(order.get("currency")), "products": _products(order.get("line_items")),
        "shop_id": shop, "status": text(order.get("status")), "payment_method": text(order.get("payment_method")),
    }


def map_woocommerce(topic: str, payload: Any, *, shop: str, source: str, received_at: datetime) -> list[dict[str, Any]]:
    if not isinstance(payload, dict) or payload.get("id") is None:
        raise MessageRejected("invalid_payload", "a WooCommerce webhook body is a JSON object with an id")
    pid = text(payload["id"])
    context = {"integration": {"name": "woocommerce", "shop": shop, "topic": topic}}
    common: dict[str, Any] = {"source": source, "received_at": received_at, "context": context}
    base = f"woocommerce:{shop}:{topic}:{pid}"

    if topic.startswith("order."):
        billing = obj(payload.get("billing"))
        email = text(billing.get("email"))
        who = identity(customer_id=payload.get("customer_id"), email=email)
        if topic == "order.deleted":
            who = who or {"anonymousId": f"woocommerce-order:{shop}:{pid}"}
            return [event_doc(call="track", event="Order Cancelled", message_id=base, who=who, email=email,
                              timestamp=received_at, properties={"order_id": pid, "shop_id": shop,
                                                                 "reason": "deleted"}, **common)]
        props = order_properties(payload, shop)
        status = props["status"] or ""
        modified = text(payload.get("date_modified_gmt")) or ""
        created_at = _gmt(payload.get("date_created_gmt") or payload.get("date_created"), received_at)
        modified_at = _gmt(payload.get("date_modified_gmt") or payload.get("date_modified"), received_at)
        if topic == "order.created":
            if status in _UNPAID:
                props = {**props, "value": props["total"]}
                return [event_doc(call="track", event="Checkout Started", message_id=f"{base}:{modified}", who=who,
                                  email=email, timestamp=created_at, properties=props, **common)]
            return [event_doc(call="track", event="Order Completed", message_id=f"woocommerce:{shop}:order:{pid}",
                              who=who, email=email, timestamp=created_at, properties=props, **common)]
        if topic == "order.updated":
            if status == "cancelled":
                event, message_id = "Order Cancelled", f"woocommerce:{shop}:order:{pid}:cancelled"
            elif status == "refunded":
                refunds = [r for r in payload.get("refunds") or [] if isinstance(r, dict)]
                refunded = sum(abs(money(r.get("total")) or 0.0) for r in refunds)
                props = {**props, "total": refunded or props["total"],
                         "refund_id": text(refunds[0].get("id")) if refunds else None,
                         "reason": text(refunds[0].get("reason")) if refunds else None}
                event, message_id = "Order Refunded", f"woocommerce:{shop}:order:{pid}:refunded"
            elif status in ("processing", "completed") and payload.get("date_paid_gmt"):
                # The same id as order.created's Order Completed: whichever arrives first counts, once.
                event, message_id = "Order Completed", f"woocommerce:{shop}:order:{pid}"
                return [
                    event_doc(call="track", event=event, message_id=message_id, who=who, email=email,
                              timestamp=_gmt(payload.get("date_paid_gmt"), created_at), properties=props, **common),
                    event_doc(call="track", event="Order Updated", message_id=f"{base}:{modified}", who=who,
                              email=email, timestamp=modified_at, properties=props, **common),
                ]
            else:
                event, message_id = "Order Updated", f"{base}:{modified}"
            return [event_doc(call="track", event=event, message_id=message_id, who=who, email=email,
                              timestamp=modified_at, properties=props, **common)]
    if topic in ("customer.created", "customer.updated"):
        email = text(payload.get("email"))
        billing = obj(payload.get("billing"))
        traits = {
            "email": email, "first_name": text(payload.get("first_name")),
            "last_name": text(payload.get("last_name")), "username": text(payload.get("username")),
            "phone": text(billing.get("phone")), "created_at": text(payload.get("date_created_gmt")),
            "is_paying_customer": payload.get("is_paying_customer"),
            "address": compact({"city": text(billing.get("city")), "country_code": text(billing.get("country")),
                                "postal_code": text(billing.get("postcode")), "state": text(billing.get("state")),
                                "street": text(billing.get("address_1"))}) or None,
            "woocommerce_customer_id": pid,
        }
        modified = text(payload.get("date_modified_gmt")) or ""
        return [event_doc(call="identify", message_id=f"woocommerce:{shop}:customer:{pid}:{modified}",
                          who=identity(customer_id=pid, email=email), email=email,
                          timestamp=_gmt(payload.get("date_modified_gmt"), received_at), traits=traits, **common)]
    raise MessageRejected("unsupported_topic",
                          f"WooCommerce topic {topic!r} is not handled; subscribe to {', '.join(TOPICS)}")
