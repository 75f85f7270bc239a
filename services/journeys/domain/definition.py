"""The journey graph a marketer defines, and its validation.

A definition is a JSON/YAML document::

    name: Abandoned checkout
    entry: {type: event, event: Checkout Started, key: checkout_id, where: {...}}
    reentry: {policy: cooldown, cooldown: P7D}          # never | cooldown | always
    start: wait_order
    nodes:
      - {id: wait_order, type: wait_for_event, event: Order Completed, match_key: checkout_id,
         timeout: PT1H, next: done, timeout_next: remind}
      - {id: remind, type: send, channel: email, template: abandoned_checkout, next: done}
      - {id: done, type: exit}
    exit_rules: [{type: unsubscribed}, {type: segment_exited, segment_id: buyers}]
    goal: {event: Order Completed, within: P7D, match_key: checkout_id}

``parse_definition`` turns it into frozen dataclasses or raises ``InvalidDefinition`` listing every problem,
each naming the node (or section) at fault. Graphs are acyclic, so every node runs at most once per instance
and ``(journey, version, instance, node)`` identifies each step's effect exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from typing import Any, Literal

from services.journeys.domain.conditions import validate_condition
from services.journeys.domain.durations import parse_duration, parse_time_of_day

NODE_TYPES = ("delay", "wait_for_event", "condition", "split", "send", "update_trait", "webhook", "exit")
CHANNELS = ("email", "sms", "webhook")
CATEGORIES = ("marketing", "transactional")
EXIT_RULE_TYPES = ("segment_exited", "segment_entered", "unsubscribed", "goal_reached", "event")


@dataclass(frozen=True, slots=True)
class Problem:
    where: str  # a node id, or a section such as "entry" / "exit_rules[1]"
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"node": self.where, "message": self.message}


class InvalidDefinition(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.where}: {p.message}" for p in problems))


@dataclass(frozen=True, slots=True)
class Entry:
    type: Literal["event", "segment", "date_trait"]
    event: str | None = None
    where: Mapping[str, Any] | None = None
    segment_id: str | None = None
    change: Literal["entered", "exited"] = "entered"
    # date_trait: a profile field holding a date (``traits.birthday``); entry every year on that month/day
    # at ``at_local_time`` in the customer's timezone.
    trait: str | None = None
    at_local_time: time = time(9, 0)
    # Keyed entry: one running instance per value of this entry-event property (e.g. checkout_id).
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Reentry:
    policy: Literal["never", "cooldown", "always"] = "never"
    cooldown: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    type: str
    next: str | None = None

    def successors(self) -> tuple[str, ...]:
        return (self.next,) if self.next else ()


@dataclass(frozen=True, slots=True)
class DelayNode(Node):
    duration: timedelta | None = None
    until_local_time: time | None = None
    until_date_field: str | None = None  # a profile/entry path holding an ISO date or datetime
    offset: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class WaitForEventNode(Node):
    event: str = ""
    where: Mapping[str, Any] | None = None
    match_key: str | None = None  # the waited-for event must carry the entry event's value of this property
    timeout: timedelta = timedelta(days=1)
    timeout_next: str | None = None

    def successors(self) -> tuple[str, ...]:
        return tuple(n for n in (self.next, self.timeout_next) if n)


@dataclass(frozen=True, slots=True)
class ConditionNode(Node):
    condition: Mapping[str, Any] = field(default_factory=dict)
    else_next: str | None = None

    def successors(self) -> tuple[str, ...]:
        return tuple(n for n in (self.next, self.else_next) if n)


@dataclass(frozen=True, slots=True)
class Branch:
    id: str
    weight: float
    next: str | None
    holdout: bool = False


@dataclass(frozen=True, slots=True)
class SplitNode(Node):
    branches: tuple[Branch, ...] = ()

    def successors(self) -> tuple[str, ...]:
        return tuple(b.next for b in self.branches if b.next)


@dataclass(frozen=True, slots=True)
class SendNode(Node):
    channel: str = "email"
    template: str = ""
    category: str = "marketing"
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UpdateTraitNode(Node):
    traits: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WebhookNode(Node):
    url: str = ""
    method: str = "POST"
    body: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExitNode(Node):
    pass


@dataclass(frozen=True, slots=True)
class ExitRule:
    type: str
    segment_id: str | None = None
    event: str | None = None
    where: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.type}:{self.segment_id or self.event}" if (self.segment_id or self.event) else self.type


@dataclass(frozen=True, slots=True)
class Goal:
    event: str
    within: timedelta
    where: Mapping[str, Any] | None = None
    match_key: str | None = None
    revenue_property: str = "revenue"


@dataclass(frozen=True, slots=True)
class JourneyDefinition:
    name: str
    entry: Entry
    start: str
    nodes: Mapping[str, Node]
    reentry: Reentry = Reentry()
    exit_rules: tuple[ExitRule, ...] = ()
    goal: Goal | None = None
    description: str = ""

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def duration(self, where: str, value: Any, name: str) -> timedelta | None:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.add(where, f"{name}: {exc}")
            return None

    def time_of_day(self, where: str, value: Any, name: str) -> time | None:
        try:
            return parse_time_of_day(value)
        except ValueError as exc:
            self.add(where, f"{name}: {exc}")
            return None

    def condition(self, where: str, value: Any, name: str) -> Mapping[str, Any] | None:
        if value is None:
            return None
        for problem in validate_condition(value, name):
            self.add(where, problem)
        return value if isinstance(value, Mapping) else None


def _text(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _parse_entry(raw: Any, c: _Collector) -> Entry:
    if not isinstance(raw, Mapping):
        c.add("entry", "entry must be an object with a 'type' (event, segment or date_trait)")
        return Entry(type="event", event="?")
    kind = raw.get("type")
    where = c.condition("entry", raw.get("where"), "where")
    key = _text(raw, "key")
    if kind == "event":
        event = _text(raw, "event")
        if not event:
            c.add("entry", "an event entry needs 'event' (e.g. Checkout Started)")
        return Entry(type="event", event=event, where=where, key=key)
    if kind == "segment":
        segment_id = _text(raw, "segment_id")
        change = raw.get("change", "entered")
        if not segment_id:
            c.add("entry", "a segment entry needs 'segment_id'")
        if change not in ("entered", "exited"):
            c.add("entry", "change must be 'entered' or 'exited'")
            change = "entered"
        if key:
            c.add("entry", "'key' applies to event entries only")
        return Entry(type="segment", segment_id=segment_id, change=change, where=where)
    if kind == "date_trait":
        trait = _text(raw, "trait")
        if not trait:
            c.add("entry", "a date_trait entry needs 'trait' (a profile field such as traits.birthday)")
        at = c.time_of_day("entry", raw.get("at_local_time", "09:00"), "at_local_time") or time(9, 0)
        return Entry(type="date_trait", trait=trait, at_local_time=at, where=where)
    c.add("entry", f"unknown entry type {kind!r} (use event, segment or date_trait)")
    return Entry(type="event", event="?")


def _parse_reentry(raw: Any, c: _Collector) -> Reentry:
    if raw is None:
        return Reentry()
    if isinstance(raw, str):
        raw = {"policy": raw}
    if not isinstance(raw, Mapping) or raw.get("policy") not in ("never", "cooldown", "always"):
        c.add("reentry", "reentry.policy must be never, cooldown or always")
        return Reentry()
    if raw["policy"] == "cooldown":
        cooldown = c.duration("reentry", raw.get("cooldown"), "cooldown")
        if cooldown is not None and cooldown <= timedelta(0):
            c.add("reentry", "cooldown must be positive")
        return Reentry(policy="cooldown", cooldown=cooldown)
    return Reentry(policy=raw["policy"])


def _parse_node(raw: Mapping[str, Any], c: _Collector) -> Node | None:
    node_id = str(raw["id"])
    kind = raw.get("type")
    nxt = _text(raw, "next")
    if kind == "delay":
        modes = [k for k in ("duration", "until_local_time", "until_date") if raw.get(k) is not None]
        if len(modes) != 1:
            c.add(node_id, "a delay needs exactly one of duration, until_local_time, until_date")
            return DelayNode(node_id, "delay", nxt)
        offset = c.duration(node_id, raw["offset"], "offset") if raw.get("offset") else timedelta(0)
        if modes[0] == "duration":
            duration = c.duration(node_id, raw["duration"], "duration")
            if duration is not None and duration < timedelta(0):
                c.add(node_id, "duration must not be negative")
            return DelayNode(node_id, "delay", nxt, duration=duration)
        if modes[0] == "until_local_time":
            return DelayNode(node_id, "delay", nxt, until_local_time=c.time_of_day(
                node_id, raw["until_local_time"], "until_local_time"))
        until = raw["until_date"]
        if not isinstance(until, str) or until.split(".")[0] not in ("profile", "entry"):
            c.add(node_id, "until_date must be a field path starting with profile. or entry.")
        return DelayNode(node_id, "delay", nxt, until_date_field=str(until), offset=offset or timedelta(0))
    if kind == "wait_for_event":
        event = _text(raw, "event")
        if not event:
            c.add(node_id, "wait_for_event needs 'event'")
        timeout = c.duration(node_id, raw.get("timeout"), "timeout")
        if timeout is not None and timeout <= timedelta(0):
            c.add(node_id, "timeout must be positive")
        return WaitForEventNode(node_id, "wait_for_event", nxt, event=event or "",
                                where=c.condition(node_id, raw.get("where"), "where"),
                                match_key=_text(raw, "match_key"), timeout=timeout or timedelta(days=1),
                                timeout_next=_text(raw, "timeout_next"))
    if kind == "condition":
        condition = c.condition(node_id, raw.get("if"), "if")
        if condition is None:
            c.add(node_id, "a condition needs 'if'")
        return ConditionNode(node_id, "condition", nxt, condition=condition or {}, else_next=_text(raw, "else_next"))
    if kind == "split":
        branches_raw = raw.get("branches")
        if not isinstance(branches_raw, list) or len(branches_raw) < 2:
            c.add(node_id, "a split needs at least two branches")
            return SplitNode(node_id, "split")
        branches: list[Branch] = []
        for i, b in enumerate(branches_raw):
            if not isinstance(b, Mapping):
                c.add(node_id, f"branches[{i}] must be an object")
                continue
            weight = b.get("weight")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
                c.add(node_id, f"branches[{i}].weight must be a positive number")
                weight = 0
            branches.append(Branch(str(b.get("id") or f"b{i}"), float(weight), _text(b, "next"),
                                   bool(b.get("holdout", False))))
        if sum(1 for b in branches if b.holdout) > 1:
            c.add(node_id, "at most one branch may be the holdout")
        if len({b.id for b in branches}) != len(branches):
            c.add(node_id, "branch ids must be unique")
        return SplitNode(node_id, "split", branches=tuple(branches))
    if kind == "send":
        channel = raw.get("channel", "email")
        template = _text(raw, "template")
        category = raw.get("category", "marketing")
        if channel not in CHANNELS:
            c.add(node_id, f"channel must be one of {', '.join(CHANNELS)}")
        if category not in CATEGORIES:
            c.add(node_id, "category must be marketing or transactional")
        if not template:
            c.add(node_id, "a send needs 'template' (a notify template id)")
        data = raw.get("data") or {}
        if not isinstance(data, Mapping):
            c.add(node_id, "data must be an object")
            data = {}
        return SendNode(node_id, "send", nxt, channel=str(channel), template=template or "",
                        category=str(category), data=data)
    if kind == "update_trait":
        traits = raw.get("traits")
        if not isinstance(traits, Mapping) or not traits:
            c.add(node_id, "update_trait needs a non-empty 'traits' object")
            traits = {}
        return UpdateTraitNode(node_id, "update_trait", nxt, traits=traits)
    if kind == "webhook":
        url = _text(raw, "url")
        if not url or not url.startswith(("http://", "https://")):
            c.add(node_id, "a webhook needs an http(s) 'url'")
        body = raw.get("body") or {}
        if not isinstance(body, Mapping):
            c.add(node_id, "body must be an object")
            body = {}
        method = str(raw.get("method", "POST")).upper()
        if method not in ("POST", "PUT", "PATCH"):
            c.add(node_id, "method must be POST, PUT or PATCH")
        return WebhookNode(node_id, "webhook", nxt, url=url or "", method=method, body=body)
    if kind == "exit":
        if nxt:
            c.add(node_id, "an exit node has no 'next'")
        return ExitNode(node_id, "exit")
    c.add(node_id, f"unknown node type {kind!r} (use one of {', '.join(NODE_TYPES)})")
    return None


def _parse_exit_rules(raw: Any, c: _Collector) -> tuple[ExitRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.add("exit_rules", "exit_rules must be a list")
        return ()
    rules: list[ExitRule] = []
    for i, r in enumerate(raw):
        where = f"exit_rules[{i}]"
        if not isinstance(r, Mapping) or r.get("type") not in EXIT_RULE_TYPES:
            c.add(where, f"type must be one of {', '.join(EXIT_RULE_TYPES)}")
            continue
        if r["type"] in ("segment_exited", "segment_entered") and not _text(r, "segment_id"):
            c.add(where, f"{r['type']} needs 'segment_id'")
        if r["type"] == "event" and not _text(r, "event"):
            c.add(where, "an event exit rule needs 'event'")
        rules.append(ExitRule(r["type"], _text(r, "segment_id"), _text(r, "event"),
                              c.condition(where, r.get("where"), "where")))
    return tuple(rules)


def _parse_goal(raw: Any, c: _Collector) -> Goal | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not _text(raw, "event"):
        c.add("goal", "a goal needs 'event'")
        return None
    within = c.duration("goal", raw.get("within", "P7D"), "within") or timedelta(days=7)
    return Goal(str(raw["event"]), within, c.condition("goal", raw.get("where"), "where"), _text(raw, "match_key"),
                str(raw.get("revenue_property", "revenue")))


def parse_definition(raw: Any) -> JourneyDefinition:
    """Parse and validate; raises ``InvalidDefinition`` with every problem found."""
    c = _Collector()
    if not isinstance(raw, Mapping):
        raise InvalidDefinition([Problem("journey", "a journey definition must be an object")])
    name = _text(raw, "name")
    if not name:
        c.add("journey", "'name' is required")
    entry = _parse_entry(raw.get("entry"), c)
    reentry = _parse_reentry(raw.get("reentry"), c)
    nodes: dict[str, Node] = {}
    raw_nodes = raw.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        c.add("nodes", "'nodes' must be a non-empty list")
        raw_nodes = []
    for i, rn in enumerate(raw_nodes):
        if not isinstance(rn, Mapping) or not _text(rn, "id"):
            c.add(f"nodes[{i}]", "every node needs an 'id'")
            continue
        if rn["id"] in nodes:
            c.add(str(rn["id"]), "duplicate node id")
            continue
        node = _parse_node(rn, c)
        if node is not None:
            nodes[node.id] = node
    start = _text(raw, "start") or (str(raw_nodes[0].get("id")) if raw_nodes and isinstance(raw_nodes[0], Mapping)
                                     else None)
    if start and nodes and start not in nodes:
        c.add("journey", f"start node '{start}' does not exist")
    for node in nodes.values():
        for succ in node.successors():
            if succ not in nodes:
                c.add(node.id, f"next node '{succ}' does not exist")
        if isinstance(node, WaitForEventNode) and node.match_key and entry.type != "event":
            c.add(node.id, "match_key needs an event entry (it matches a property of the entry event)")
    _check_graph(start, nodes, c)
    exit_rules = _parse_exit_rules(raw.get("exit_rules"), c)
    goal = _parse_goal(raw.get("goal"), c)
    if any(r.type == "goal_reached" for r in exit_rules) and goal is None:
        c.add("exit_rules", "a goal_reached exit rule needs a 'goal'")
    if c.problems:
        raise InvalidDefinition(c.problems)
    assert name is not None and start is not None
    return JourneyDefinition(name=name, entry=entry, start=start, nodes=nodes, reentry=reentry,
                             exit_rules=exit_rules, goal=goal, description=str(raw.get("description") or ""))


def _check_graph(start: str | None, nodes: Mapping[str, Node], c: _Collector) -> None:
    """Acyclic, and every node reachable from the start."""
    if not start or start not in nodes:
        return
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node_id: str, path: list[str]) -> None:
        state[node_id] = 1
        for succ in nodes[node_id].successors():
            if succ not in nodes:
                continue
            if state.get(succ) == 1:
                c.add(node_id, f"cycle: {' -> '.join([*path, node_id, succ])} (journeys must be acyclic)")
            elif succ not in state:
                visit(succ, [*path, node_id])
        state[node_id] = 2

    visit(start, [])
    for node_id in nodes:
        if node_id not in state:
            c.add(node_id, "node is not reachable from the start node")
