"""Pure pieces around the policy: request parsing, consent merge, templates and the sandbox, signed links,
retry schedule, MIME building."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.notify.adapters.email import OutgoingEmail, build_mime, mime_bytes
from services.notify.builtin_templates import BUILTIN_SMS, BUILTIN_TEMPLATES
from services.notify.domain.messages import (
    ConsentRow,
    InvalidRequest,
    MessageRequest,
    can_transition,
    merge_consent,
    message_id_for,
    recipient_for,
)
from services.notify.domain.retry import backoff_delay
from services.notify.domain.signing import derive_key, sign_token, verify_token, verify_webhook, webhook_signature
from services.notify.domain.templates import Template, build_context, render, track_links, validate

JOURNEY_IDS = {"abandoned_checkout", "abandoned_checkout_incentive", "welcome_1", "welcome_2", "review_request",
               "win_back", "vip_early_access", "birthday", "points_expiring"}


def base_request(**overrides: object) -> dict[str, object]:
    return {"idempotencyKey": "k", "profileId": "p", "channel": "email", "category": "marketing",
            "templateId": "welcome_1", "data": {}, "requestedAt": "2024-01-01T00:00:00Z", **overrides}


def test_request_parsing_and_rejections() -> None:
    req = MessageRequest.from_wire(base_request(expiresAt="2024-01-02T00:00:00Z", journeyId="j1"))
    assert req.expires_at == datetime(2024, 1, 2, tzinfo=UTC) and req.journey == {"journeyId": "j1"}
    assert req.message_id == message_id_for("k") and req.kafka_key == "p"
    for bad in ({"idempotencyKey": ""}, {"channel": "fax"}, {"category": "spam"}, {"templateId": None},
                {"data": [1]}, {"profileId": None}, {"requestedAt": "yesterday"}, {"to": {"email": 5}}):
        with pytest.raises(InvalidRequest):
            MessageRequest.from_wire(base_request(**bad))
    assert MessageRequest.from_wire(base_request(profileId=None, to={"email": "a@b.c"})).kafka_key == "a@b.c"


def test_recipient_override_and_profile_fields() -> None:
    profile = {"email": "p@x.test", "phone": "+1555"}
    assert recipient_for(MessageRequest.from_wire(base_request()), profile) == "p@x.test"
    assert recipient_for(MessageRequest.from_wire(base_request(to={"email": "o@x.test"})), profile) == "o@x.test"
    assert recipient_for(MessageRequest.from_wire(base_request(channel="sms")), profile) == "+1555"
    assert recipient_for(MessageRequest.from_wire(base_request(channel="sms")), {}) is None
    hook = MessageRequest.from_wire(base_request(channel="webhook", data={"url": "https://h.test/x"}))
    assert recipient_for(hook, profile) == "https://h.test/x"


def test_state_machine() -> None:
    assert can_transition("claimed", "sending") and can_transition("sending", "sent")
    for final in ("sent", "skipped", "failed"):
        assert not any(can_transition(final, s) for s in ("claimed", "sending", "sent", "failed"))


def test_consent_merge_groups_and_latest_wins() -> None:
    t = datetime(2024, 5, 1, tzinfo=UTC)
    profile = {"consent": {"email": {"subscribed": True, "updated_at": "2024-01-01T00:00:00Z",
                                     "groups": {"newsletter": False}}}}
    merged = merge_consent(profile, [ConsentRow("email", "promotions", False, t)])
    assert merged.subscribed == {"email": True}
    assert merged.unsubscribed_groups["email"] == frozenset({"newsletter", "promotions"})
    resubscribed = merge_consent(profile, [ConsentRow("email", "newsletter", True, t)])
    assert resubscribed.unsubscribed_groups["email"] == frozenset()


def test_builtin_templates_are_valid_and_cover_the_journey_ids() -> None:
    assert {t.id for t in BUILTIN_TEMPLATES} == JOURNEY_IDS
    for template in BUILTIN_TEMPLATES:
        assert validate(template) == [], template.id
        # a sparse profile and empty data must still render (no KeyError on a new customer)
        render(template, build_context({"profile_id": "p"}, {}, "https://u"))
    for template_id, body in BUILTIN_SMS.items():
        assert validate(Template(id=template_id, channel="sms", text=body)) == []


def test_template_renders_cart_items_and_escapes_html() -> None:
    t = next(t for t in BUILTIN_TEMPLATES if t.id == "abandoned_checkout")
    data = {"items": [{"name": "<b>Mug</b>", "image_url": "https://i/1.jpg", "price": 12.5, "quantity": 2}],
            "recovery_url": "https://shop/r/1", "currency": "EUR"}
    out = render(t, build_context({"traits": {"first_name": "Grace"}}, data, "https://u/x"))
    assert out.subject == "You left something in your cart, Grace"
    assert "&lt;b&gt;Mug&lt;/b&gt;" in out.html and "<b>Mug</b>" not in out.html
    assert "€12.50" in out.html and "- <b>Mug</b> x2 €12.50" in out.text and "https://u/x" in out.text


def test_cart_templates_take_line_items_with_only_some_fields() -> None:
    # A checkout from the shop platform or the tracker may carry no image, no name, no quantity.
    data = {"items": [{"product_id": "p1", "sku": "SKU-1", "price": 42.0},
                      {"product_id": "p2", "price": 3.0, "quantity": 2}, {"name": "Gift card"}],
            "recovery_url": "https://shop/r/2", "currency": "USD"}
    cart_templates = [t for t in BUILTIN_TEMPLATES if "{% for item in items %}" in t.text]
    assert cart_templates
    for t in cart_templates:
        out = render(t, build_context({"traits": {"first_name": "Ada"}}, data, "https://u/y"))
        assert "<img" not in out.html
        assert "- SKU-1 x1 $42.00" in out.text and "- p2 x2 $3.00" in out.text and "- Gift card x1" in out.text


@pytest.mark.parametrize(("field", "source", "kind"), [
    ("subject", "{{ profile.nickname }}", "undefined"),
    ("subject", "{{ data.coupon }}", "undefined"),
    ("html", "{{ customer.name }}", "undefined"),
    ("text", "{% for x in %}", "syntax"),
    ("html", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "security"),
    ("text", "{{ profile.email.__class__ }}", "security"),
])
def test_validation_rejects(field: str, source: str, kind: str) -> None:
    fields = {"subject": "s", "html": "h", "text": "t", field: source}
    problems = validate(Template(id="x", channel="email", subject=fields["subject"], html=fields["html"],
                                 text=fields["text"]))
    assert problems and problems[0]["field"] == field and problems[0]["kind"] == kind, problems


def test_sample_data_declares_extra_variables() -> None:
    t = Template(id="coupon", channel="email", subject="{{ data.coupon }}", html="x", text="x",
                 sample_data={"coupon": "SAVE"})
    assert validate(t) == []


def test_link_tracking_keeps_unsubscribe_links() -> None:
    html = '<a href="https://shop/x">x</a><a href="https://n/u/tok">unsub</a>'
    out = track_links(html, lambda u: "https://n/c/" + u[-1], lambda u: u.startswith("https://n/u/"))
    assert out == '<a href="https://n/c/x">x</a><a href="https://n/u/tok">unsub</a>'


@given(st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=4), st.binary(min_size=1, max_size=8))
def test_tokens_roundtrip_and_resist_tampering(payload: dict[str, str], flip: bytes) -> None:
    key = derive_key("secret", "unsubscribe")
    token = sign_token(key, payload)
    assert verify_token(key, token) == payload
    assert verify_token(derive_key("secret", "click"), token) is None
    body, _, mac = token.partition(".")
    assert verify_token(key, body + "x." + mac) is None


def test_webhook_signature_checks_time_and_body() -> None:
    key = b"k"
    sig = webhook_signature(key, 1000, b"{}")
    assert verify_webhook(key, 1000, b"{}", sig, now=1100)
    assert not verify_webhook(key, 1000, b"{ }", sig, now=1100)
    assert not verify_webhook(key, 1000, b"{}", sig, now=2000)


@given(st.integers(min_value=1, max_value=30), st.floats(min_value=0, max_value=1))
def test_backoff_is_bounded_and_grows(attempt: int, r: float) -> None:
    delay = backoff_delay(attempt, base_s=2, cap_s=600, rand=lambda: r)
    ceiling = min(600, 2 * 2 ** (attempt - 1))
    assert ceiling / 8 <= delay <= ceiling


def test_mime_has_both_parts_and_list_headers() -> None:
    msg = build_mime(OutgoingEmail(message_id="m1", sender="a@x", to="b@y", subject="Hi", text="plain",
                                   html="<p>html</p>", unsubscribe_https="https://n/u/t",
                                   unsubscribe_mailto="mailto:u@x?subject=t"), "x.test")
    assert msg["Message-ID"] == "<m1@x.test>"
    assert msg["List-Unsubscribe"] == "<mailto:u@x?subject=t>, <https://n/u/t>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def _parts(msg: email.message.EmailMessage) -> list[tuple[str, str]]:
    parts = msg.iter_parts() if msg.is_multipart() else [msg]
    return [(p.get_content_type(), p.get_content()) for p in parts]  # type: ignore[attr-defined]


@pytest.mark.parametrize("mail", [
    OutgoingEmail(message_id="m1", sender="Loyalist <no-reply@loyalist.local>", to="b@y.test",
                  subject="Your cart: Mug = 12,50 € and more " * 4, text="plain\nline two  \n.\nFrom x =3D ünï\r\nz",
                  html="<p class=\"a\">html</p>" * 30, unsubscribe_https="https://n/u/" + "t" * 120,
                  unsubscribe_mailto="mailto:u@x?subject=unsubscribe%20t", headers=(("X-Loyalist-Category", "m"),)),
    OutgoingEmail(message_id="m2", sender="a@x", to="b@y", subject="Receipt", text="only text", html=""),
    OutgoingEmail(message_id="m3", sender="a@x", to="b@y", subject="literal =?utf-8?q?x?= word", text="", html="<b>x"),
])
def test_wire_bytes_read_as_the_email_package_would_write_them(mail: OutgoingEmail) -> None:
    """mime_bytes writes the message by hand (speed): a mail reader sees the same headers and parts as in the
    message the email package builds, without defects."""
    fast = email.message_from_bytes(mime_bytes(mail, "x.test") or b"", policy=email.policy.default)
    ref = email.message_from_bytes(build_mime(mail, "x.test").as_bytes(policy=email.policy.SMTP),
                                   policy=email.policy.default)
    for name in ("From", "To", "Message-ID", "List-Unsubscribe", "List-Unsubscribe-Post", "X-Loyalist-Category",
                 "MIME-Version"):
        assert fast[name] == ref[name], name
    assert fast["Subject"] == mail.subject  # (the email package would decode the literal encoded word in m3)
    assert fast.get_content_type() == ref.get_content_type()
    assert _parts(fast) == _parts(ref)  # type: ignore[arg-type]
    assert not any(part.defects for part in fast.walk())


def test_unusual_addresses_and_headers_take_the_email_package() -> None:
    base = OutgoingEmail(message_id="m1", sender="a@x", to="b@y", subject="s", text="t", html="")
    assert mime_bytes(base, "x.test") is not None
    for odd in (replace(base, sender="Müller <a@x>"), replace(base, to="b@y\r\nBcc: c@z"),
                replace(base, headers=(("X-A", "v\nBcc: c@z"),))):
        assert mime_bytes(odd, "x.test") is None
