""""Customers who bought X also bought Y": co-purchase counts over customers (not orders), maintained
incrementally from Order Completed events, and per-customer recommendations from them.

A pair counts once per customer who bought both products (in any orders), so one enthusiastic customer
cannot dominate. Adding the same order twice changes nothing (idempotent by order id).

>>> cp = CoPurchases()
>>> cp.add_order("c1", "o1", ["tea", "mug"])
>>> cp.add_order("c2", "o2", ["tea"]); cp.add_order("c2", "o3", ["mug", "honey"])
>>> cp.add_order("c2", "o3", ["mug", "honey"])  # a replay
>>> cp.also_bought("tea")
[('mug', 2), ('honey', 1)]
>>> cp.recommend_for("c1", limit=3)
[('honey', 2)]
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def order_products(properties: Mapping[str, Any]) -> list[str]:
    """Product ids of a Segment e-commerce order (``products[].product_id``, else ``sku``, else ``id``).

    >>> order_products({"products": [{"product_id": "p1"}, {"sku": "S2"}, {"name": "no id"}]})
    ['p1', 'S2']
    """
    out = []
    for item in properties.get("products") or []:
        if isinstance(item, Mapping):
            pid = item.get("product_id") or item.get("sku") or item.get("id")
            if isinstance(pid, str | int) and str(pid):
                out.append(str(pid))
    return out


class CoPurchases:
    def __init__(self) -> None:
        self.bought: dict[str, set[str]] = defaultdict(set)
        self.pairs: dict[str, Counter[str]] = defaultdict(Counter)
        self._orders: set[tuple[str, str]] = set()

    def add_order(self, customer: str, order_id: str, products: Sequence[str]) -> None:
        if (customer, order_id) in self._orders:
            return
        self._orders.add((customer, order_id))
        owned = self.bought[customer]
        for product in dict.fromkeys(products):
            if product in owned:
                continue
            for other in owned:
                self.pairs[product][other] += 1
                self.pairs[other][product] += 1
            owned.add(product)

    def add_customer(self, customer: str, orders: Iterable[tuple[str, Sequence[str]]]) -> None:
        """Rebuild one customer from stored ``(order_id, products)`` pairs."""
        for order_id, products in orders:
            self.add_order(customer, order_id, products)

    def also_bought(self, product: str, limit: int = 10) -> list[tuple[str, int]]:
        return sorted(self.pairs.get(product, Counter()).items(), key=lambda kv: (-kv[1], kv[0]))[:limit]

    def recommend_for(self, customer: str, limit: int = 10) -> list[tuple[str, int]]:
        owned = self.bought.get(customer, set())
        scores: Counter[str] = Counter()
        for product in owned:
            for other, n in self.pairs.get(product, Counter()).items():
                if other not in owned:
                    scores[other] += n
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
