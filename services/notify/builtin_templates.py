"""The built-in email templates, seeded at start (``INSERT ... IF NOT EXISTS``: edits made through the
API survive restarts). Journeys refer to them by id."""

from __future__ import annotations

from services.notify.domain.templates import Template

_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body style="font-family:Helvetica,Arial,sans-serif;color:#222;max-width:600px;margin:auto">"""
_FOOT = """<p style="font-size:12px;color:#888">You receive this because you are a customer.
<a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>"""
_GREETING = ("{{ profile.traits.first_name if profile.traits is defined and profile.traits and "
             "profile.traits.first_name is defined and profile.traits.first_name else 'there' }}")

# Cart templates read the items and recovery link from the request data, else from the profile's cart.
_CART = """{% set cart = data.cart if data.cart is defined else (profile.cart if profile.cart is defined and \
profile.cart else {}) %}{% set items = data['items'] if data['items'] is defined else (cart['items'] if \
cart['items'] is defined else []) %}{% set recovery_url = data.recovery_url if data.recovery_url is defined else \
(cart.recovery_url if cart.recovery_url is defined else '#') %}{% set currency = data.currency if \
data.currency is defined else (cart.currency if cart.currency is defined else 'USD') %}"""
# Shops send whatever line-item fields they have: only the price is needed, the rest falls back.
_ITEM_NAME = "{{ item.name|default(item.sku|default(item.product_id|default('Item'))) }}"
_ITEM_IMAGE = ('{% if item.image_url is defined and item.image_url %}<img src="{{ item.image_url }}" alt="'
               + _ITEM_NAME + '" width="96">{% endif %}')
_ITEM_PRICE = "{{ item.quantity|default(1) }} &times; {{ item.price|default(0)|money(currency) }}"
_ITEMS_HTML = (_CART + "{% for item in items %}\n<table><tr><td>" + _ITEM_IMAGE + "</td>\n<td>" + _ITEM_NAME
               + "<br>" + _ITEM_PRICE + "</td></tr></table>\n{% endfor %}")
_ITEMS_TEXT = (_CART + "{% for item in items %}- " + _ITEM_NAME
               + " x{{ item.quantity|default(1) }} {{ item.price|default(0)|money(currency) }}\n{% endfor %}")
_POINTS = "{{ data.points|default(profile.loyalty.balance if profile.loyalty is defined and profile.loyalty else 0) }}"
_RECS_HTML = """{% if recommendations %}<h3>You might also like</h3>{% for r in recommendations %}
<p><a href="{{ r.url|default('#') }}">{{ r.name }}</a> {{ r.price|money }}</p>{% endfor %}{% endif %}"""


def _email(template_id: str, name: str, subject: str, body_html: str, body_text: str,
           sample: dict[str, object] | None = None, group: str = "marketing") -> Template:
    return Template(
        id=template_id, channel="email", name=name, subject=subject, group=group, builtin=True,
        html=_HEAD.format(title=name) + body_html + _FOOT,
        text=body_text + "\n\nUnsubscribe: {{ unsubscribe_url }}\n",
        sample_data=sample or {},
    )


BUILTIN_TEMPLATES: tuple[Template, ...] = (
    _email(
        "abandoned_checkout", "Abandoned checkout",
        "You left something in your cart, " + _GREETING,
        "<h2>Still thinking it over?</h2>" + _ITEMS_HTML
        + '<p><a href="{{ recovery_url }}">Return to your cart</a></p>' + _RECS_HTML,
        "Hi " + _GREETING + ", you left these in your cart:\n" + _ITEMS_TEXT
        + "\nComplete your order: {{ recovery_url }}",
    ),
    _email(
        "abandoned_checkout_incentive", "Abandoned checkout with incentive",
        "{{ data.discount_percent|default(10) }}% off what's in your cart",
        "<h2>Here is {{ data.discount_percent|default(10) }}% off</h2>" + _ITEMS_HTML
        + "<p>Use code <b>{{ data.coupon_code|default('COMEBACK') }}</b> at checkout.</p>"
        + '<p><a href="{{ recovery_url }}">Complete your order</a></p>',
        "Hi " + _GREETING + ", take {{ data.discount_percent|default(10) }}% off with code "
        "{{ data.coupon_code|default('COMEBACK') }}:\n" + _ITEMS_TEXT + "\n{{ recovery_url }}",
        sample={"coupon_code": "COMEBACK10", "discount_percent": 10},
    ),
    _email(
        "welcome_1", "Welcome (1/2)", "Welcome, " + _GREETING + "!",
        "<h2>Welcome aboard, " + _GREETING + "</h2><p>We are glad you're here.</p>" + _RECS_HTML,
        "Welcome aboard, " + _GREETING + "! We are glad you're here.",
    ),
    _email(
        "welcome_2", "Welcome (2/2)", "A few favourites to get you started",
        "<h2>Our best sellers, picked for you</h2>" + _RECS_HTML,
        "Hi " + _GREETING + ", here are a few favourites to get you started."
        "{% for r in recommendations %}\n- {{ r.name }}{% endfor %}",
    ),
    _email(
        "review_request", "Review request", "How was your order{{ ' ' ~ data.order_id if data.order_id is defined }}?",
        "<h2>How did we do?</h2>" + _ITEMS_HTML
        + '<p><a href="{{ data.review_url|default(\'https://shop.example/reviews\') }}">Write a review</a></p>',
        "Hi " + _GREETING + ", how was your order? Review it: "
        "{{ data.review_url|default('https://shop.example/reviews') }}",
    ),
    _email(
        "win_back", "Win back", "We miss you, " + _GREETING,
        "<h2>It's been a while</h2><p>Here's what's new since your last visit.</p>"
        "{% if data.coupon_code is defined %}<p>Code <b>{{ data.coupon_code }}</b> gives you "
        "{{ data.discount_percent|default(15) }}% off.</p>{% endif %}" + _RECS_HTML,
        "Hi " + _GREETING + ", it's been a while. Come see what's new."
        "{% if data.coupon_code is defined %} Code {{ data.coupon_code }}.{% endif %}",
    ),
    _email(
        "vip_early_access", "VIP early access",
        "Early access for our {{ profile.loyalty.tier if profile.loyalty is defined and "
        "profile.loyalty and profile.loyalty.tier is defined else 'VIP' }} members",
        "<h2>You're in early</h2><p>As one of our best customers you can shop before everyone else.</p>"
        '<p><a href="{{ data.url|default(\'https://shop.example/early-access\') }}">Shop early access</a></p>'
        + _RECS_HTML,
        "You're in early, " + _GREETING + ": {{ data.url|default('https://shop.example/early-access') }}",
    ),
    _email(
        "birthday", "Birthday", "Happy birthday, " + _GREETING + "!",
        "<h2>Happy birthday!</h2><p>A little gift from us: "
        "<b>{{ data.coupon_code|default('BIRTHDAY') }}</b>.</p>" + _RECS_HTML,
        "Happy birthday, " + _GREETING + "! Your gift code: {{ data.coupon_code|default('BIRTHDAY') }}",
    ),
    _email(
        "points_expiring", "Points expiring",
        _POINTS + " points expire soon",
        "<h2>Use them before they go</h2><p>" + _POINTS + " points expire on "
        "{{ data.expires_at|default('soon') }}.</p>" + _RECS_HTML,
        "Hi " + _GREETING + ", " + _POINTS + " points expire on {{ data.expires_at|default('soon') }}.",
        sample={"points": 200, "expires_at": "2024-07-01"},
    ),
)

# Short SMS counterparts: the same ids on the sms channel (stored as "<id>:sms").
BUILTIN_SMS: dict[str, str] = {
    "abandoned_checkout": _CART + "Your cart is waiting: {{ recovery_url }} Reply STOP to opt out",
    "abandoned_checkout_incentive": _CART + "{{ data.discount_percent|default(10) }}% off your cart with code "
    "{{ data.coupon_code|default('COMEBACK') }}: {{ recovery_url }} Reply STOP to opt out",
    "points_expiring": "{{ data.points|default(0) }} points expire {{ data.expires_at|default('soon') }}. "
    "Reply STOP to opt out",
    "birthday": "Happy birthday! Gift code {{ data.coupon_code|default('BIRTHDAY') }}. Reply STOP to opt out",
    "win_back": "We miss you! New arrivals are in. Reply STOP to opt out",
}
