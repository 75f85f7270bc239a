"""End to end on the local stack: message requests on Kafka → exactly one email in the SMTP sink, with a
working unsubscribe link; engagement links; the transactional API and the delivery log."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from loyalist.settings import Settings
from tests.conftest import ServiceProcess
from tests.notify.conftest import (
    message_log,
    notify_events,
    produce_requests,
    profile_doc,
    put_profiles,
    request_doc,
    sink_messages,
    unique_email,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def notify(notify_factory: Any) -> ServiceProcess:
    return notify_factory("email")  # type: ignore[no-any-return]


def _log_entry(notify: ServiceProcess, headers: dict[str, str], key: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        rows = message_log(notify, headers, idempotency_key=key)
        return rows[0] if rows and rows[0]["status"] in statuses else None

    return wait_for(check, 30, what=f"{key} in {statuses}")  # type: ignore[no-any-return]


def _unsubscribe_https(msg: dict[str, Any]) -> str:
    header = msg["headers"]["List-Unsubscribe"]
    urls = re.findall(r"<(https?://[^>]+)>", header)
    assert len(urls) == 1, header
    return urls[0]


def test_request_gives_one_email_and_the_unsubscribe_link_stops_marketing(
    stack_settings: Settings, notify: ServiceProcess, api_headers: dict[str, str]
) -> None:
    email = unique_email("e2e")
    pid = f"p-{email.split('@')[0]}"
    put_profiles(stack_settings, profile_doc(pid, email))
    first = request_doc(pid)
    produce_requests(stack_settings, first)

    messages = wait_for(lambda: sink_messages(stack_settings, email), what="the email in the sink")
    msg = messages[0]
    assert msg["subject"] == "You left something in your cart, Ada"
    assert "Linen shirt" in msg["html"] and "https://shop.example/i/1.jpg" in msg["html"]
    assert "Linen shirt x1 $59.00" in msg["text"]
    assert msg["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "mailto:" in msg["headers"]["List-Unsubscribe"]
    # the recovery link goes through the signed click redirect, the unsubscribe link does not
    assert "/c/" in msg["html"] and "https://shop.example/cart/recover/chk-1" not in msg["html"]

    # a redelivered request (same idempotency key) sends nothing more
    produce_requests(stack_settings, first)
    entry = _log_entry(notify, api_headers, first["idempotencyKey"], ("sent",))
    assert entry["recipient"] == email and entry["userId"] == f"user-{pid}"

    # follow the link: a page with a form, then the form's POST
    url = _unsubscribe_https(msg)
    page = httpx.get(url, timeout=10)
    assert page.status_code == 200 and "<form method='post'" in page.text
    done = httpx.post(url, data={"confirm": "yes"}, timeout=10)
    assert done.status_code == 200 and "unsubscribed" in done.text.lower()

    later = request_doc(pid, "win_back")
    produce_requests(stack_settings, later)
    skipped = _log_entry(notify, api_headers, later["idempotencyKey"], ("skipped",))
    assert skipped["reason"] == "unsubscribed"
    # a transactional message still reaches someone who left marketing
    receipt = request_doc(pid, "review_request", category="transactional")
    produce_requests(stack_settings, receipt)
    _log_entry(notify, api_headers, receipt["idempotencyKey"], ("sent",))
    assert len(sink_messages(stack_settings, email)) == 2
    assert [m["subject"] for m in sink_messages(stack_settings, email)].count(msg["subject"]) == 1

    # feedback for the profile: sent twice, one unsubscribe, userId and profileId set
    def feedback() -> list[Any] | None:
        events = notify_events(stack_settings, pid)
        names = sorted(e.event or "" for e in events)
        return events if names.count("Email Sent") == 2 and "Unsubscribed" in names else None

    events = wait_for(feedback, 30, interval_s=1, what="feedback events")
    unsub = next(e for e in events if e.event == "Unsubscribed")
    assert unsub.properties["channel"] == "email" and unsub.user_id == f"user-{pid}"
    sent = [e for e in events if e.event == "Email Sent"]
    assert {e.properties["idempotency_key"] for e in sent} == {first["idempotencyKey"], receipt["idempotencyKey"]}
    assert all(e.properties["journey_id"] == "j-test" for e in sent)

    metrics = httpx.get(f"{notify.url}/metrics", timeout=10).text
    assert 'loyalist_notify_sent_total{category="marketing",channel="email"}' in metrics
    assert 'loyalist_notify_skipped_total{channel="email",reason="unsubscribed"}' in metrics
    assert "loyalist_notify_delivery_latency_seconds_bucket" in metrics
    assert 'loyalist_notify_duplicates_total{status="sent"}' in metrics


def test_one_click_unsubscribe_and_tracking_links(
    stack_settings: Settings, notify: ServiceProcess, api_headers: dict[str, str]
) -> None:
    email = unique_email("oneclick")
    pid = f"p-{email.split('@')[0]}"
    put_profiles(stack_settings, profile_doc(pid, email))
    produce_requests(stack_settings, request_doc(pid))
    msg = wait_for(lambda: sink_messages(stack_settings, email), what="email")[0]

    click = re.search(r'href="([^"]+/c/[^"]+)"', msg["html"])
    assert click is not None
    resp = httpx.get(click.group(1).replace("&amp;", "&"), follow_redirects=False, timeout=10)
    assert resp.status_code == 302 and resp.headers["location"] == "https://shop.example/cart/recover/chk-1"
    pixel = re.search(r'<img src="([^"]+/o/[^"]+)"', msg["html"])
    assert pixel is not None
    gif = httpx.get(pixel.group(1), timeout=10)
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    # a forged token is refused
    assert httpx.get(click.group(1)[:-3] + "xyz", timeout=10).status_code == 400

    # RFC 8058 one-click: what a mailbox provider posts
    one_click = httpx.post(_unsubscribe_https(msg), content=b"List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert one_click.status_code == 200
    consent = httpx.get(f"{notify.url}/v1/consent/{pid}", headers=api_headers, timeout=10).json()
    assert consent["subscribed"]["email"] is False

    def engagement() -> set[str] | None:
        names = {e.event or "" for e in notify_events(stack_settings, pid)}
        return names if {"Email Link Clicked", "Email Opened", "Unsubscribed"} <= names else None

    wait_for(engagement, 30, interval_s=1, what="engagement events")


def test_transactional_api_and_delivery_log(
    stack_settings: Settings, notify: ServiceProcess, api_headers: dict[str, str]
) -> None:
    email = unique_email("api")
    with httpx.Client(base_url=notify.url, headers=api_headers, timeout=30) as client:
        body = {"to": {"email": email}, "templateId": "welcome_1", "data": {}, "idempotencyKey": f"api-{email}"}
        resp = client.post("/v1/messages", params={"wait": 15}, json=body)
        assert resp.status_code == 200, resp.text
        sent = resp.json()
        assert sent["status"] == "sent" and sent["category"] == "transactional" and sent["recipient"] == email
        # the same key again: the same message, nothing new sent
        again = client.post("/v1/messages", params={"wait": 5}, json=body)
        assert again.json()["id"] == sent["id"]
        assert len(sink_messages(stack_settings, email)) == 1
        msg = sink_messages(stack_settings, email)[0]
        assert "List-Unsubscribe" not in msg["headers"]  # transactional mail carries no list headers
        assert msg["headers"]["Message-ID"].startswith(f"<{sent['id']}@")

        assert client.get(f"/v1/messages/{sent['id']}").json()["idempotencyKey"] == body["idempotencyKey"]
        assert client.get("/v1/messages/nope").status_code == 404
        missing = client.post("/v1/messages", json={**body, "templateId": "no_such", "idempotencyKey": "x1"})
        assert missing.status_code == 400 and missing.json()["code"] == "unknown_template"
        assert client.post("/v1/messages", json={"templateId": "welcome_1"}).json()["code"] == "invalid_message"
        assert client.post("/v1/messages", json={"channel": "fax"}).status_code == 422
        assert client.get("/v1/messages").json()["code"] == "missing_filter"
        assert httpx.get(f"{notify.url}/v1/messages", params={"profile_id": "x"}, timeout=5).status_code == 401

    # by profile and by user
    pid = f"p-{uuid_hex()}"
    addr = unique_email("bylog")
    put_profiles(stack_settings, profile_doc(pid, addr))
    req = request_doc(pid, "welcome_2", category="transactional")
    produce_requests(stack_settings, req)
    wait_for(lambda: message_log(notify, api_headers, profile_id=pid), what="log by profile")
    by_user = wait_for(lambda: message_log(notify, api_headers, user_id=f"user-{pid}"), what="log by user")
    assert by_user[0]["idempotencyKey"] == req["idempotencyKey"]


def uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex[:10]


def test_templates_crud_validation_and_preview(
    stack_settings: Settings, notify: ServiceProcess, api_headers: dict[str, str]
) -> None:
    with httpx.Client(base_url=notify.url, headers=api_headers, timeout=30) as client:
        listed = {(t["id"], t["channel"]) for t in client.get("/v1/templates").json()["templates"]}
        for template_id in ("abandoned_checkout", "abandoned_checkout_incentive", "welcome_1", "welcome_2",
                            "review_request", "win_back", "vip_early_access", "birthday", "points_expiring"):
            assert (template_id, "email") in listed
        assert ("abandoned_checkout", "sms") in listed

        tid = f"promo_{uuid_hex()}"
        undefined = client.put(f"/v1/templates/{tid}", json={"subject": "Hi {{ profile.nickname }}", "html": "x"})
        assert undefined.status_code == 400 and undefined.json()["code"] == "invalid_template"
        assert undefined.json()["problems"][0] == {"field": "subject", "kind": "undefined",
                                                   "message": "'dict object' has no attribute 'nickname'"}
        syntax = client.put(f"/v1/templates/{tid}", json={"subject": "s", "html": "{% if %}"})
        assert syntax.status_code == 400 and syntax.json()["problems"][0]["kind"] == "syntax"
        escape = client.put(f"/v1/templates/{tid}", json={"subject": "{{ ''.__class__.__mro__ }}", "html": "x"})
        assert escape.status_code == 400 and escape.json()["problems"][0]["kind"] == "security"
        assert client.get(f"/v1/templates/{tid}").status_code == 404

        body = {"name": "Promo", "subject": "{{ profile.traits.first_name }}, {{ data.percent }}% off",
                "html": "<p>Hello {{ profile.traits.first_name }}</p><a href='{{ unsubscribe_url }}'>unsub</a>",
                "text": "Hello {{ profile.traits.first_name }}", "sampleData": {"percent": 20}}
        created = client.put(f"/v1/templates/{tid}", json=body)
        assert created.status_code == 200 and created.json()["version"] == 1
        updated = client.put(f"/v1/templates/{tid}", json={**body, "text": "Hi {{ profile.traits.first_name }}"})
        assert updated.json()["version"] == 2

        email = unique_email("preview")
        pid = f"p-{email.split('@')[0]}"
        put_profiles(stack_settings, profile_doc(pid, email, first_name="Grace"))
        preview = client.post(f"/v1/templates/{tid}/preview", json={"profileId": pid, "data": {"percent": 30}})
        assert preview.status_code == 200, preview.text
        assert preview.json()["subject"] == "Grace, 30% off" and preview.json()["text"] == "Hi Grace"
        missing_data = client.post(f"/v1/templates/{tid}/preview", json={"profileId": pid, "data": {}})
        assert missing_data.status_code == 400 and missing_data.json()["code"] == "render_error"
        assert client.post(f"/v1/templates/{tid}/preview", json={"profileId": "nobody"}).status_code == 404

        # the edited template is used for the next send
        sent = client.post("/v1/messages", params={"wait": 15},
                           json={"profileId": pid, "templateId": tid, "data": {"percent": 5}})
        assert sent.status_code == 200 and sent.json()["status"] == "sent", sent.text
        assert sink_messages(stack_settings, email)[0]["subject"] == "Grace, 5% off"

        assert client.delete(f"/v1/templates/{tid}").status_code == 204
        assert client.get(f"/v1/templates/{tid}").status_code == 404
        assert client.delete(f"/v1/templates/{tid}").status_code == 404
