"""Message templates: Jinja2's sandbox with StrictUndefined, validated at save time against a
contract-exact sample context, so a missing variable is a 400 when the template is saved instead of a
broken email at send time.

Variables: ``profile`` (the profile document), ``event`` and ``data`` (the request's data, e.g. cart items
with name, image_url, price, quantity, and recovery_url), ``recommendations`` (``data.recommendations`` or
[]), ``unsubscribe_url``.

>>> t = Template(id="t1", channel="email", subject="Hi {{ profile.traits.first_name }}",
...              html="<p>{{ data.cart.items|length }} items</p>", text="{{ unsubscribe_url }}")
>>> validate(t) == []
True
>>> bad = Template(id="t2", channel="email", subject="{{ profile.nickname }}", html="x", text="x")
>>> validate(bad)[0]["field"]
'subject'
>>> validate(Template(id="t3", channel="email", subject="{% if %}", html="x", text="x"))[0]["kind"]
'syntax'
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import SandboxedEnvironment

ALLOWED_VARIABLES = frozenset({"profile", "event", "data", "recommendations", "unsubscribe_url", "message_id"})
TEMPLATE_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def _money(value: Any, currency: str = "USD") -> str:
    try:
        amount = float(value)
    except (TypeError, ValueError):
        return str(value)
    symbol = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}.get(str(currency).upper())
    return f"{symbol}{amount:,.2f}" if symbol else f"{amount:,.2f} {currency}"


class DataFirstEnvironment(SandboxedEnvironment):
    """``cart.items`` means the key ``items`` of the cart document, never ``dict.items``: documents are looked up
    by key only (plain Jinja falls back to Python attributes, a classic trap with JSON documents); a missing key
    is undefined, which StrictUndefined reports. ``.get`` stays available."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute != "get":
            if attribute in obj:
                return obj[attribute]
            return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, Mapping):
            if argument in obj:
                return obj[argument]
            return self.undefined(obj=obj, name=argument)
        return super().getitem(obj, argument)


def make_environment(autoescape: bool) -> SandboxedEnvironment:
    env = DataFirstEnvironment(undefined=StrictUndefined, autoescape=autoescape, trim_blocks=True,
                               lstrip_blocks=True)
    env.filters["money"] = _money
    return env


_HTML_ENV = make_environment(autoescape=True)
_TEXT_ENV = make_environment(autoescape=False)


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    channel: str
    subject: str = ""
    html: str = ""
    text: str = ""
    name: str = ""
    # The subscription group a marketing send of this template belongs to (unsubscribe granularity).
    group: str = "marketing"
    # Extra request data this template needs, used for validation and previews (merged over the sample).
    sample_data: Mapping[str, Any] = field(default_factory=dict)
    version: int = 1
    builtin: bool = False

    def fields(self) -> dict[str, str]:
        if self.channel == "email":
            return {"subject": self.subject, "html": self.html, "text": self.text}
        return {"text": self.text}


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str
    text: str


class RenderError(ValueError):
    def __init__(self, field_name: str, kind: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.kind = kind
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "kind": self.kind, "message": self.message}


SAMPLE_PROFILE: dict[str, Any] = {
    "profile_id": "prof_sample", "user_id": "user_sample", "email": "ada@example.com", "phone": "+15555550100",
    "timezone": "Europe/London", "locale": "en-GB",
    "traits": {"first_name": "Ada", "last_name": "Lovelace", "birthday": "1990-12-10"},
    "first_seen_at": "2024-01-01T00:00:00Z", "last_seen_at": "2024-06-01T00:00:00Z",
    "orders_count": 3, "revenue_total": 240.0, "currency": "USD", "revenue_by_currency": {"USD": 240.0},
    "average_order_value": 80.0, "first_order_at": "2024-01-02T00:00:00Z", "last_order_at": "2024-05-01T00:00:00Z",
    "refunds_count": 0, "cancellations_count": 0,
    "rfm": {"frequency": 2, "recency_days": 120, "T_days": 150, "monetary_value": 80.0},
    "cart": {"checkout_id": "chk_1", "items": [{"product_id": "sku-1", "name": "Linen shirt", "price": 59.0,
                                                 "quantity": 1, "image_url": "https://shop.example/i/1.jpg",
                                                 "url": "https://shop.example/p/1"}],
             "value": 59.0, "currency": "USD", "updated_at": "2024-06-01T00:00:00Z",
             "recovery_url": "https://shop.example/cart/recover/chk_1"},
    "consent": {"email": {"subscribed": True, "updated_at": "2024-01-01T00:00:00Z"}},
    "engagement": {}, "segments": [],
    "predictions": {"churn_probability": 0.2, "p_alive": 0.8, "expected_orders_90d": 0.7,
                    "predicted_clv_365d": 180.0, "expected_next_order_at": "2024-07-01T00:00:00Z"},
    "loyalty": {"balance": 1200, "lifetime_points": 3400, "tier": "gold",
                "expiring": [{"points": 200, "expires_at": "2024-07-01T00:00:00Z"}]},
}

SAMPLE_DATA: dict[str, Any] = {
    "checkout_id": "chk_1",
    "items": SAMPLE_PROFILE["cart"]["items"],
    "cart": SAMPLE_PROFILE["cart"],
    "value": 59.0, "currency": "USD",
    "recovery_url": "https://shop.example/cart/recover/chk_1",
    "order_id": "ord_1",
    "recommendations": [{"product_id": "sku-2", "name": "Canvas tote", "price": 25.0,
                         "image_url": "https://shop.example/i/2.jpg", "url": "https://shop.example/p/2"}],
}


def build_context(profile: Mapping[str, Any] | None, data: Mapping[str, Any], unsubscribe_url: str,
                  message_id: str = "") -> dict[str, Any]:
    recommendations = data.get("recommendations")
    return {
        "profile": dict(profile or {}),
        "event": dict(data),
        "data": dict(data),
        "recommendations": list(recommendations) if isinstance(recommendations, list) else [],
        "unsubscribe_url": unsubscribe_url,
        "message_id": message_id,
    }


def sample_context(template: Template) -> dict[str, Any]:
    return build_context(SAMPLE_PROFILE, {**SAMPLE_DATA, **dict(template.sample_data)},
                         "https://notify.example/u/sample-token", "msg_sample")


@lru_cache(maxsize=2048)
def _compiled(source: str, html_field: bool) -> Any:
    """A template field compiled once (compiling costs far more than rendering); sources are the cache keys,
    so an edited template is simply a new entry."""
    return (_HTML_ENV if html_field else _TEXT_ENV).from_string(source)


def _render_field(name: str, source: str, context: Mapping[str, Any], html_field: bool) -> str:
    try:
        return str(_compiled(source, html_field).render(context))
    except TemplateSyntaxError as exc:
        raise RenderError(name, "syntax", f"line {exc.lineno}: {exc.message}") from exc
    except UndefinedError as exc:
        raise RenderError(name, "undefined", str(exc.message)) from exc
    except SecurityError as exc:
        raise RenderError(name, "security", str(exc)) from exc
    except TemplateError as exc:
        raise RenderError(name, "error", str(exc)) from exc
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
        raise RenderError(name, "error", f"{type(exc).__name__}: {exc}") from exc


def render(template: Template, context: Mapping[str, Any]) -> Rendered:
    """Render every field; raises RenderError naming the field on any problem."""
    out = {name: _render_field(name, src, context, html_field=(name == "html"))
           for name, src in template.fields().items()}
    return Rendered(subject=" ".join(out.get("subject", "").split()), html=out.get("html", ""),
                    text=out.get("text", ""))


def validate(template: Template) -> list[dict[str, str]]:
    """Problems with a template (empty list: valid): syntax errors, unknown top-level variables, and any
    undefined attribute when rendered against the sample profile and data."""
    problems: list[dict[str, str]] = []
    if not TEMPLATE_ID.match(template.id):
        problems.append({"field": "id", "kind": "invalid", "message": "id must match [a-z0-9][a-z0-9_-]{0,63}"})
    if template.channel not in ("email", "sms", "webhook"):
        problems.append({"field": "channel", "kind": "invalid", "message": "channel must be email, sms or webhook"})
        return problems
    if template.channel == "email" and not (template.subject.strip() and (template.html.strip() or
                                                                          template.text.strip())):
        problems.append({"field": "subject", "kind": "missing", "message": "an email needs a subject and a body"})
    if template.channel == "sms" and not template.text.strip():
        problems.append({"field": "text", "kind": "missing", "message": "an SMS template needs a text body"})
    context = sample_context(template)
    for name, source in template.fields().items():
        try:
            parsed = _TEXT_ENV.parse(source)
        except TemplateSyntaxError as exc:
            problems.append({"field": name, "kind": "syntax", "message": f"line {exc.lineno}: {exc.message}"})
            continue
        unknown = meta.find_undeclared_variables(parsed) - ALLOWED_VARIABLES
        if unknown:
            problems.append({"field": name, "kind": "undefined",
                             "message": f"unknown variables {sorted(unknown)}; use {sorted(ALLOWED_VARIABLES)}"})
            continue
        try:
            _render_field(name, source, context, html_field=(name == "html"))
        except RenderError as exc:
            problems.append(exc.as_dict())
    return problems


_HREF = re.compile(r"""href=(["'])(https?://[^"']+)\1""", re.IGNORECASE)


def track_links(html: str, wrap: Callable[[str], str], skip: Callable[[str], bool]) -> str:
    """Rewrite every http(s) link of an HTML body through ``wrap`` (the signed click redirect), except the
    ones ``skip`` keeps as they are (the unsubscribe link must work without the tracker).

    >>> track_links('<a href="https://a.example/x?y=1&amp;z=2">x</a>', lambda u: "T(" + u + ")", lambda u: False)
    '<a href="T(https://a.example/x?y=1&amp;z=2)">x</a>'
    """
    def replace_href(match: re.Match[str]) -> str:
        url = html_lib.unescape(match.group(2))
        if skip(url):
            return match.group(0)
        return f"href={match.group(1)}{html_lib.escape(wrap(url), quote=True)}{match.group(1)}"

    return _HREF.sub(replace_href, html)


def add_open_pixel(html: str, pixel_url: str) -> str:
    tag = f'<img src="{html_lib.escape(pixel_url, quote=True)}" width="1" height="1" alt="" style="display:none">'
    index = html.lower().rfind("</body>")
    return html + tag if index < 0 else html[:index] + tag + html[index:]


def with_changes(template: Template, **changes: Any) -> Template:
    return replace(template, **changes)
