"""Journeys shipped with the product: parameterised definitions a marketer instantiates by id.

Every parameter has a default; delays are ISO 8601 durations (so a test can use ``PT5S``).

>>> d = build_template("abandoned_checkout", {"first_reminder_after": "PT5S"})
>>> d["nodes"][0]["timeout"]
'PT5S'
>>> sorted(TEMPLATES)[:3]
['abandoned_checkout', 'birthday', 'points_expiring']
>>> build_template("abandoned_checkout", {"first_reminder_after": "soon"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
services.journeys.domain.templates.TemplateParamError: first_reminder_after: 'soon' is not an ISO 8601 duration (...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.journeys.domain.durations import parse_duration, parse_time_of_day


class TemplateParamError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: str  # duration | number | percent | text | time
    default: Any
    description: str


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    name: str
    description: str
    params: tuple[Param, ...]
    build: Callable[[Mapping[str, Any]], dict[str, Any]]

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "description": self.description,
                "params": [{"name": p.name, "kind": p.kind, "default": p.default, "description": p.description}
                           for p in self.params]}


def _holdout(percent: float, node_id: str, treated_next: str, holdout_next: str) -> list[dict[str, Any]]:
    """A random split sending ``percent`` % of customers to a holdout (control) branch; none when 0."""
    if percent <= 0:
        return []
    return [{"id": node_id, "type": "split", "branches": [
        {"id": "treated", "weight": 100 - percent, "next": treated_next},
        {"id": "holdout", "weight": percent, "next": holdout_next, "holdout": True}]}]


def _start(percent: float, first: str) -> str:
    return "holdout_split" if percent > 0 else first


def _abandoned_checkout(p: Mapping[str, Any]) -> dict[str, Any]:
    first = "wait_order"
    cart_data = {
        "checkout_id": "$entry.properties.checkout_id",
        "items": "$entry.properties.products|profile.cart.items",
        "value": "$entry.properties.value|entry.properties.revenue|profile.cart.value",
        "currency": "$entry.properties.currency|profile.cart.currency",
        "recovery_url": "$entry.properties.recovery_url|profile.cart.recovery_url",
    }
    return {
        "name": "Abandoned checkout",
        "description": "Reminds customers who started a checkout and did not complete the order; a second "
                       "reminder with an incentive goes only to customers with a high predicted CLV.",
        "entry": {"type": "event", "event": "Checkout Started", "key": "checkout_id"},
        "reentry": {"policy": "never"},  # per checkout: a new checkout_id is a new entry
        "start": _start(p["holdout_percent"], first),
        "nodes": [
            *_holdout(p["holdout_percent"], "holdout_split", first, "done"),
            {"id": "wait_order", "type": "wait_for_event", "event": "Order Completed", "match_key": "checkout_id",
             "timeout": p["first_reminder_after"], "next": "done", "timeout_next": "reminder_1"},
            {"id": "reminder_1", "type": "send", "channel": "email", "template": "abandoned_checkout",
             "data": cart_data, "next": "wait_order_2"},
            {"id": "wait_order_2", "type": "wait_for_event", "event": "Order Completed", "match_key": "checkout_id",
             "timeout": p["second_reminder_after"], "next": "done", "timeout_next": "high_clv"},
            {"id": "high_clv", "type": "condition",
             "if": {"field": "profile.predictions.predicted_clv_365d", "op": "gte", "value": p["high_clv_threshold"]},
             "next": "reminder_2", "else_next": "done"},
            {"id": "reminder_2", "type": "send", "channel": "email", "template": "abandoned_checkout_incentive",
             "data": {**cart_data, "coupon_code": p["coupon_code"], "discount_percent": p["discount_percent"]},
             "next": "done"},
            {"id": "done", "type": "exit"},
        ],
        "exit_rules": [{"type": "unsubscribed"}],
        "goal": {"event": "Order Completed", "match_key": "checkout_id", "within": p["goal_window"]},
    }


def _welcome(p: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": "Welcome series",
        "description": "Welcomes new customers; the second email goes only to those who have not ordered yet.",
        "entry": {"type": "event", "event": p["entry_event"]},
        "reentry": {"policy": "never"},
        "start": _start(p["holdout_percent"], "welcome_1"),
        "nodes": [
            *_holdout(p["holdout_percent"], "holdout_split", "welcome_1", "done"),
            {"id": "welcome_1", "type": "send", "channel": "email", "template": "welcome_1",
             "next": "wait"},
            {"id": "wait", "type": "delay", "duration": p["second_email_after"], "next": "not_ordered"},
            {"id": "not_ordered", "type": "condition",
             "if": {"any": [{"field": "profile.orders_count", "op": "not_exists"},
                            {"field": "profile.orders_count", "op": "eq", "value": 0}]},
             "next": "welcome_2", "else_next": "done"},
            {"id": "welcome_2", "type": "send", "channel": "email", "template": "welcome_2",
             "next": "done"},
            {"id": "done", "type": "exit"},
        ],
        "exit_rules": [{"type": "unsubscribed"}],
        "goal": {"event": "Order Completed", "within": p["goal_window"]},
    }


def _review_request(p: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": "Post-purchase review request",
        "description": "Asks for a review some time after an order, unless it was refunded or cancelled.",
        "entry": {"type": "event", "event": "Order Completed", "key": "order_id"},
        "reentry": {"policy": "always"},
        "start": "wait",
        "nodes": [
            {"id": "wait", "type": "wait_for_event", "event": "Order Refunded", "match_key": "order_id",
             "timeout": p["review_after"], "next": "done", "timeout_next": "request"},
            {"id": "request", "type": "send", "channel": "email", "template": "review_request",
             "data": {"order_id": "$entry.properties.order_id", "items": "$entry.properties.products"},
             "next": "done"},
            {"id": "done", "type": "exit"},
        ],
        "exit_rules": [{"type": "unsubscribed"},
                       {"type": "event", "event": "Order Cancelled"}],
        "goal": {"event": "Product Reviewed", "within": p["goal_window"]},
    }


def _win_back(p: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": "Win-back for rising churn risk",
        "description": "When a customer's predicted churn probability rises above a threshold, send a win-back "
                       "offer; a holdout group measures the uplift.",
        "entry": {"type": "event", "event": "Predictions Updated",
                  "where": {"field": "profile.predictions.churn_probability", "op": "gte",
                            "value": p["churn_threshold"]}},
        "reentry": {"policy": "cooldown", "cooldown": p["cooldown"]},
        "start": _start(p["holdout_percent"], "offer"),
        "nodes": [
            *_holdout(p["holdout_percent"], "holdout_split", "offer", "done"),
            {"id": "offer", "type": "send", "channel": "email", "template": "win_back",
             "data": {"coupon_code": p["coupon_code"], "discount_percent": p["discount_percent"]}, "next": "done"},
            {"id": "done", "type": "exit"},
        ],
        "exit_rules": [{"type": "unsubscribed"}],
        "goal": {"event": "Order Completed", "within": p["goal_window"]},
    }


def _vip_early_access(p: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": "VIP early access",
        "description": "Invites customers who enter the VIP segment to early access; leaves them when they exit it.",
        "entry": {"type": "segment", "segment_id": p["segment_id"], "change": "entered"},
        "reentry": {"policy": "cooldown", "cooldown": p["cooldown"]},
        "start": "invite",
        "nodes": [
            {"id": "invite", "type": "send", "channel": "email", "template": "vip_early_access",
             "next": "tag"},
            {"id": "tag", "type": "update_trait", "traits": {"vip_invited_at": "$now"}, "next": "done"},
            {"id": "done", "type": "exit"},
        ],
        "exit_rules": [{"type": "segment_exited", "segment_id": p["segment_id"]}, {"type": "unsubscribed"}],
        "goal": {"event": "Order Completed", "within": p["goal_window"]},
    }


def _birthday(p: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": "Birthday",
        "description": "A birthday greeting with a gift, every year at a local time of day.",
        "entry": {"type": "date_trait", "trait": p["trait"], "at_local_time": p["at_local_time"]},
        "reentry": {"policy": "always"},  # once per year: the occurrence year is the instance key
        "start": "greet",
        "nodes": [
            {"id": "greet", "type": "send", "channel": "email", "template": "birthday",
             "data": {"coupon_code": p["coupon_code"]}, "next": "done"},
            {"id": "done", "type": "exit"},
        ],
        "exit_rules": [{"type": "unsubscribed"}],
        "goal": {"event": "Order Completed", "within": p["goal_window"]},
    }


def _points_expiring(p: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": "Points expiring",
        "description": "Reminds members before their loyalty points expire (profile.loyalty.expiring.0.expires_at).",
        "entry": {"type": "event", "event": "Points Earned"},
        "reentry": {"policy": "cooldown", "cooldown": p["cooldown"]},
        "start": "has_expiry",
        "nodes": [
            # loyalty.expiring lists the points to expire by instant, soonest first.
            {"id": "has_expiry", "type": "condition",
             "if": {"field": "profile.loyalty.expiring.0.expires_at", "op": "exists"}, "next": "wait",
             "else_next": "done"},
            {"id": "wait", "type": "delay", "until_date": "profile.loyalty.expiring.0.expires_at",
             "offset": "-" + p["remind_before"], "next": "still_has_points"},
            {"id": "still_has_points", "type": "condition",
             "if": {"field": "profile.loyalty.balance", "op": "gt", "value": 0}, "next": "remind",
             "else_next": "done"},
            {"id": "remind", "type": "send", "channel": "email", "template": "points_expiring",
             "data": {"points": "$profile.loyalty.expiring.0.points|profile.loyalty.balance",
                      "expires_at": "$profile.loyalty.expiring.0.expires_at"}, "next": "done"},
            {"id": "done", "type": "exit"},
        ],
        "exit_rules": [{"type": "unsubscribed"}],
        "goal": {"event": "Points Redeemed", "within": p["goal_window"]},
    }


def _p(name: str, kind: str, default: Any, description: str) -> Param:
    return Param(name, kind, default, description)


_HOLDOUT = _p("holdout_percent", "percent", 0, "share of customers held out as a control group (0-50)")
TEMPLATES: dict[str, Template] = {t.id: t for t in (
    Template("abandoned_checkout", "Abandoned checkout", "Cart reminder, then an incentive for high-CLV customers",
             (_p("first_reminder_after", "duration", "PT1H", "wait for the order before the first reminder"),
              _p("second_reminder_after", "duration", "P1D", "wait after the first reminder"),
              _p("high_clv_threshold", "number", 300, "predicted 365-day CLV that earns the incentive"),
              _p("coupon_code", "text", "COMEBACK10", "the second reminder's coupon code"),
              _p("discount_percent", "number", 10, "the second reminder's discount"),
              _p("goal_window", "duration", "P7D", "attribution window for the order"), _HOLDOUT),
             _abandoned_checkout),
    Template("welcome_series", "Welcome series", "Two welcome emails; the second only if no order yet",
             (_p("entry_event", "text", "Signed Up", "the event that starts the series"),
              _p("second_email_after", "duration", "P2D", "delay before the second email"),
              _p("goal_window", "duration", "P14D", "attribution window for a first order"), _HOLDOUT), _welcome),
    Template("review_request", "Post-purchase review request", "Ask for a review after an order",
             (_p("review_after", "duration", "P7D", "delay after the order"),
              _p("goal_window", "duration", "P14D", "attribution window for the review")), _review_request),
    Template("win_back", "Win-back", "Offer for customers whose churn risk rises",
             (_p("churn_threshold", "number", 0.6, "churn probability that starts the journey"),
              _p("coupon_code", "text", "WELCOMEBACK15", "the offer's coupon code"),
              _p("discount_percent", "number", 15, "the offer's discount"),
              _p("cooldown", "duration", "P30D", "minimum time between two win-backs for one customer"),
              _p("goal_window", "duration", "P30D", "attribution window for an order"),
              _p("holdout_percent", "percent", 10, "control group share")), _win_back),
    Template("vip_early_access", "VIP early access", "Invite customers entering the VIP segment",
             (_p("segment_id", "text", "vip", "the VIP segment's id"),
              _p("cooldown", "duration", "P30D", "minimum time between two invitations"),
              _p("goal_window", "duration", "P14D", "attribution window for an order")), _vip_early_access),
    Template("birthday", "Birthday", "Yearly greeting on a date trait",
             (_p("trait", "text", "traits.birthday", "profile field holding the date"),
              _p("at_local_time", "time", "09:00", "local time of day to send"),
              _p("coupon_code", "text", "BIRTHDAY", "the gift's coupon code"),
              _p("goal_window", "duration", "P14D", "attribution window for an order")), _birthday),
    Template("points_expiring", "Points expiring", "Remind members before points expire",
             (_p("remind_before", "duration", "P7D", "how long before expiry to remind"),
              _p("cooldown", "duration", "P30D", "minimum time between two reminders"),
              _p("goal_window", "duration", "P14D", "attribution window for a redemption")), _points_expiring),
)}


def _check(param: Param, value: Any) -> Any:
    if param.kind == "duration":
        try:
            if parse_duration(value).total_seconds() < 0:
                raise TemplateParamError(f"{param.name}: must not be negative")
        except ValueError as exc:
            if isinstance(exc, TemplateParamError):
                raise
            raise TemplateParamError(f"{param.name}: {exc}") from None
        return value
    if param.kind in ("number", "percent"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TemplateParamError(f"{param.name}: must be a number")
        if param.kind == "percent" and not 0 <= value <= 50:
            raise TemplateParamError(f"{param.name}: must be between 0 and 50")
        return value
    if param.kind == "time":
        try:
            parse_time_of_day(value)
        except ValueError as exc:
            raise TemplateParamError(f"{param.name}: {exc}") from None
        return value
    if not isinstance(value, str) or not value:
        raise TemplateParamError(f"{param.name}: must be a non-empty string")
    return value


def build_template(template_id: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The raw definition of a shipped template with ``params`` applied (unknown template: KeyError)."""
    template = TEMPLATES[template_id]
    given = dict(params or {})
    known = {p.name for p in template.params}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TemplateParamError(f"unknown parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values = {p.name: _check(p, given[p.name]) if p.name in given else p.default for p in template.params}
    return template.build(values)
