"""Instance state as a JSON document (what the store keeps) and back.

>>> from datetime import UTC, datetime
>>> t = datetime(2024, 1, 1, tzinfo=UTC)
>>> i = Instance("i1", "j1", 2, "p1", "c1", t, {"properties": {"checkout_id": "c1"}}, status="waiting",
...              node_id="w", waiting=Waiting("event", "w", t), history=(Step(t, "w", "entered", "x"),))
>>> instance_from_doc(instance_to_doc(i)) == i
True
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from services.journeys.domain.engine import Instance, Step, Waiting


def _t(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _p(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def instance_to_doc(i: Instance) -> dict[str, Any]:
    return {
        "instance_id": i.instance_id, "journey_id": i.journey_id, "version": i.version, "profile_id": i.profile_id,
        "key": i.key, "entered_at": _t(i.entered_at), "entry": dict(i.entry), "status": i.status,
        "node_id": i.node_id,
        "waiting": {"kind": i.waiting.kind, "node_id": i.waiting.node_id, "until": _t(i.waiting.until)}
        if i.waiting else None,
        "group": i.group, "visited": list(i.visited), "exit_reason": i.exit_reason,
        "goal_deadline": _t(i.goal_deadline), "converted_at": _t(i.converted_at), "revenue": i.revenue,
        "history": [{"at": _t(s.at), "node_id": s.node_id, "what": s.what, "why": s.why} for s in i.history],
    }


def instance_from_doc(d: Mapping[str, Any]) -> Instance:
    w = d.get("waiting")
    entered_at = _p(d["entered_at"])
    assert entered_at is not None
    return Instance(
        instance_id=d["instance_id"], journey_id=d["journey_id"], version=int(d["version"]),
        profile_id=d["profile_id"], key=d.get("key") or "", entered_at=entered_at, entry=d.get("entry") or {},
        status=d["status"], node_id=d.get("node_id"),
        waiting=Waiting(w["kind"], w["node_id"], _p(w["until"])) if w else None,  # type: ignore[arg-type]
        group=d.get("group", "treated"), visited=tuple(d.get("visited") or ()), exit_reason=d.get("exit_reason"),
        goal_deadline=_p(d.get("goal_deadline")), converted_at=_p(d.get("converted_at")),
        revenue=float(d.get("revenue") or 0.0),
        history=tuple(Step(_p(s["at"]), s.get("node_id"), s["what"], s["why"])  # type: ignore[arg-type]
                      for s in d.get("history") or ()),
    )
