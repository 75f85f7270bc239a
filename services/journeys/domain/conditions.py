"""Conditions marketers write to filter entry events and split customers.

A condition is a small JSON tree: ``{"all": [...]}``, ``{"any": [...]}``, ``{"not": {...}}``,
``{"in_segment": "vip"}`` or a comparison ``{"field": "profile.predictions.predicted_clv_365d", "op": "gte",
"value": 300}``. Fields are dotted paths into a context of documents: ``profile`` (the profile document),
``event`` (the triggering event: ``event.properties.total``) and ``entry`` (the event that started the
instance).

>>> ctx = {"profile": {"traits": {"plan": "pro"}, "segments": ["vip"], "predictions": {"predicted_clv_365d": 420}}}
>>> evaluate({"field": "profile.traits.plan", "op": "eq", "value": "pro"}, ctx)
True
>>> evaluate({"all": [{"in_segment": "vip"}, {"field": "profile.predictions.predicted_clv_365d", "op": "gte",
...     "value": 300}]}, ctx)
True
>>> evaluate({"not": {"field": "profile.traits.plan", "op": "exists"}}, ctx)
False
>>> evaluate({"field": "profile.traits.missing", "op": "gt", "value": 1}, ctx)
False
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "exists", "not_exists")
_UNARY = ("exists", "not_exists")
_MISSING = object()


def resolve(path: str, context: Mapping[str, Any]) -> Any:
    """The value at a dotted path, or None when any step is missing."""
    current: Any = context
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return None
    return current


def _compare(op: str, actual: Any, expected: Any) -> bool:
    if op == "exists":
        return actual is not None
    if op == "not_exists":
        return actual is None
    if op == "eq":
        return bool(actual == expected)
    if op == "ne":
        return bool(actual != expected)
    if op == "in":
        return isinstance(expected, list) and actual in expected
    if op == "not_in":
        return isinstance(expected, list) and actual not in expected
    if op == "contains":
        return isinstance(actual, (list, str)) and expected in actual
    if actual is None:
        return False
    try:
        if op == "gt":
            return bool(actual > expected)
        if op == "gte":
            return bool(actual >= expected)
        if op == "lt":
            return bool(actual < expected)
        if op == "lte":
            return bool(actual <= expected)
    except TypeError:
        return False  # comparing a string trait with a number: not a match, never an error
    return False


def evaluate(condition: Mapping[str, Any] | None, context: Mapping[str, Any]) -> bool:
    if not condition:
        return True
    if "all" in condition:
        return all(evaluate(c, context) for c in condition["all"])
    if "any" in condition:
        return any(evaluate(c, context) for c in condition["any"])
    if "not" in condition:
        return not evaluate(condition["not"], context)
    if "in_segment" in condition:
        segments = resolve("profile.segments", context) or []
        return condition["in_segment"] in segments
    return _compare(str(condition.get("op", "eq")), resolve(str(condition["field"]), context), condition.get("value"))


def validate_condition(condition: Any, where: str) -> list[str]:
    """Problems with a condition tree, each prefixed with ``where`` (empty when valid).

    >>> validate_condition({"field": "profile.x", "op": "between"}, "if")[0][:33]
    "if: unknown operator 'between' (u"
    >>> validate_condition({"all": [{"field": "profile.x", "op": "gt"}]}, "entry.where")
    ["entry.where.all[0]: operator 'gt' needs a 'value'"]
    """
    if not isinstance(condition, Mapping):
        return [f"{where}: a condition must be an object"]
    for combinator in ("all", "any"):
        if combinator in condition:
            items = condition[combinator]
            if not isinstance(items, list) or not items:
                return [f"{where}: '{combinator}' needs a non-empty list of conditions"]
            problems: list[str] = []
            for i, item in enumerate(items):
                problems += validate_condition(item, f"{where}.{combinator}[{i}]")
            return problems
    if "not" in condition:
        return validate_condition(condition["not"], f"{where}.not")
    if "in_segment" in condition:
        ok = isinstance(condition["in_segment"], str) and condition["in_segment"]
        return [] if ok else [f"{where}: 'in_segment' needs a segment id"]
    field = condition.get("field")
    if not isinstance(field, str) or not field:
        return [f"{where}: a comparison needs a 'field' (e.g. profile.traits.plan)"]
    if field.split(".")[0] not in ("profile", "event", "entry"):
        return [f"{where}: field '{field}' must start with profile., event. or entry."]
    op = condition.get("op", "eq")
    if op not in OPERATORS:
        return [f"{where}: unknown operator '{op}' (use one of {', '.join(OPERATORS)})"]
    if op not in _UNARY and "value" not in condition:
        return [f"{where}: operator '{op}' needs a 'value'"]
    if op in ("in", "not_in") and not isinstance(condition.get("value"), list):
        return [f"{where}: operator '{op}' needs a list 'value'"]
    return []
