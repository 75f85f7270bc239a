"""Journey measurement: per-node counts, attributed revenue and treated-vs-holdout uplift.

Counts are derived from instance states (idempotent by construction: an instance counts once, whatever how
often its updates were replayed).

>>> t = ConversionTally()
>>> for converted in [True] * 30 + [False] * 70: _ = t.update("treated", converted)
>>> for converted in [True] * 20 + [False] * 80: _ = t.update("holdout", converted)
>>> u = t.uplift()
>>> round(u["uplift"], 3), u["treated"]["rate"], u["holdout"]["rate"]
(0.1, 0.3, 0.2)
>>> round(u["ci95"][0], 3), round(u["ci95"][1], 3)
(-0.021, 0.217)
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.journeys.domain.engine import Instance

Z95 = 1.959963984540054


@dataclass
class ConversionTally:
    """Conversions per group, with the uplift of treated over holdout and its 95% confidence interval
    (Agresti-Caffo: one success and one failure added to each group, which keeps the interval honest for
    small groups and rates near 0 or 1)."""

    entered: Counter[str] = field(default_factory=Counter)
    converted: Counter[str] = field(default_factory=Counter)

    def update(self, group: str, converted: bool) -> ConversionTally:
        self.entered[group] += 1
        if converted:
            self.converted[group] += 1
        return self

    def rate(self, group: str) -> float | None:
        n = self.entered[group]
        return self.converted[group] / n if n else None

    def uplift(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            g: {"entered": self.entered[g], "converted": self.converted[g], "rate": self.rate(g)}
            for g in ("treated", "holdout")
        }
        n1, n0 = self.entered["treated"], self.entered["holdout"]
        if not n1 or not n0:
            out.update(uplift=None, ci95=None, relative_uplift=None)
            return out
        p1, p0 = self.converted["treated"] / n1, self.converted["holdout"] / n0
        a1 = (self.converted["treated"] + 1) / (n1 + 2)
        a0 = (self.converted["holdout"] + 1) / (n0 + 2)
        se = math.sqrt(a1 * (1 - a1) / (n1 + 2) + a0 * (1 - a0) / (n0 + 2))
        centre = a1 - a0
        out.update(uplift=p1 - p0, ci95=[max(-1.0, centre - Z95 * se), min(1.0, centre + Z95 * se)],
                   relative_uplift=(p1 - p0) / p0 if p0 else None)
        return out


@dataclass
class NodeCounts:
    entered: int = 0
    waiting: int = 0
    exited: int = 0
    converted: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"entered": self.entered, "waiting": self.waiting, "exited": self.exited, "converted": self.converted}


def summarize(instances: Iterable[Instance]) -> dict[str, Any]:
    """Journey-level and per-node measurement over instances (any versions).

    A node's ``entered`` counts instances that reached it, ``waiting`` those waiting there now, ``exited``
    those that ended there (exit node, end of path or an exit rule), ``converted`` those that reached it and
    then converted.
    """
    nodes: dict[str, NodeCounts] = defaultdict(NodeCounts)
    tally = ConversionTally()
    exits: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    revenue = 0.0
    total = 0
    by_version: Counter[int] = Counter()
    for inst in instances:
        total += 1
        by_version[inst.version] += 1
        statuses[inst.status] += 1
        converted = inst.converted_at is not None
        if converted:
            revenue += inst.revenue
        tally.update(inst.group, converted)
        for node_id in inst.visited:
            nodes[node_id].entered += 1
            if converted:
                nodes[node_id].converted += 1
        if inst.status == "waiting" and inst.node_id:
            nodes[inst.node_id].waiting += 1
        if inst.status in ("completed", "exited") and inst.node_id:
            nodes[inst.node_id].exited += 1
        if inst.status == "exited":
            exits[inst.exit_reason or "unknown"] += 1
        elif inst.status == "completed":
            exits["completed"] += 1
    return {
        "entered": total,
        "waiting": statuses["waiting"],
        "active": statuses["active"] + statuses["waiting"],
        "completed": statuses["completed"],
        "exited": statuses["exited"],
        "converted": sum(tally.converted.values()),
        "attributed_revenue": round(revenue, 2),
        "exits": dict(exits),
        "by_version": {str(v): n for v, n in sorted(by_version.items())},
        "nodes": {k: v.as_dict() for k, v in sorted(nodes.items())},
        "holdout": tally.uplift(),
    }
