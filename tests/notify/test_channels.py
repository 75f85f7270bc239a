"""SMS through a real local HTTP server speaking the Twilio Messages API, signed webhooks with retries, the
dead-letter topic, provider feedback and suppression, and policy on the live service: a frequency-capped
email deferred and sent when due, and quiet hours in the customer's time zone."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from loyalist.settings import Settings
from services.notify.domain.signing import derive_key, verify_webhook
from tests.conftest import ServiceProcess
from tests.notify.conftest import (
    dlq_entries,
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

INVALID_NUMBER = "+15550000400"
BUSY_NUMBER = "+15550000503"


class FakeProviders:
    """A Twilio-compatible SMS endpoint and webhook receivers on one real HTTP server."""

    def __init__(self, signing_key: bytes) -> None:
        self.sms: list[dict[str, str]] = []
        self.hooks: list[dict[str, Any]] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.key = signing_key
        providers = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path.startswith("/2010-04-01/Accounts/AC_test/Messages.json"):
                    providers.on_sms(self, body)
                elif self.path.startswith("/hook/"):
                    providers.on_hook(self, body)
                else:
                    self._reply(404, {"message": "no route"})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _count(self, key: str) -> int:
        with self.lock:
            self.attempts[key] = self.attempts.get(key, 0) + 1
            return self.attempts[key]

    def on_sms(self, h: Any, body: bytes) -> None:
        auth = base64.b64decode(h.headers["Authorization"].split()[1]).decode()
        if auth != "AC_test:secret-token":
            h._reply(401, {"code": 20003, "message": "Authenticate", "status": 401})
            return
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        to = form["To"]
        if to == INVALID_NUMBER:
            h._reply(400, {"code": 21211, "message": "The 'To' number is not a valid phone number.", "status": 400})
            return
        if to.startswith(BUSY_NUMBER) and self._count(to) <= 2:
            h._reply(503, {"code": 20500, "message": "Service unavailable", "status": 503})
            return
        sid = "SM" + uuid.uuid4().hex
        with self.lock:
            self.sms.append({**form, "sid": sid, "idempotency_key": h.headers.get("Idempotency-Key", "")})
        h._reply(201, {"sid": sid, "status": "queued", "to": to, "from": form["From"], "body": form["Body"]})

    def on_hook(self, h: Any, body: bytes) -> None:
        ts = int(h.headers["X-Loyalist-Timestamp"])
        valid = verify_webhook(self.key, ts, body, h.headers["X-Loyalist-Signature"], now=int(time.time()))
        name = h.path.split("/")[2]
        attempt = self._count(h.path)
        if name == "gone":
            h._reply(410, {"message": "gone"})
            return
        if name == "flaky" and attempt == 1:
            h._reply(500, {"message": "try later"})
            return
        with self.lock:
            self.hooks.append({"path": h.path, "valid": valid, "body": json.loads(body),
                               "key": h.headers["X-Loyalist-Idempotency-Key"]})
        h._reply(200, {"ok": True})


@pytest.fixture(scope="module")
def providers(stack_settings: Settings) -> Iterator[FakeProviders]:
    fake = FakeProviders(derive_key(stack_settings.signing_secret, "webhook"))
    yield fake
    fake.server.shutdown()


@pytest.fixture(scope="module")
def notify(notify_factory: Any, providers: FakeProviders) -> ServiceProcess:
    policy = {"caps": [{"channel": "email", "max_count": 1, "window_s": 4, "action": "defer"},
                       {"channel": "sms", "max_count": 1, "window_s": 3600, "action": "skip"}],
              "quiet_hours": [{"channel": "email", "start": "21:00", "end": "08:00"},
                              {"channel": "sms", "start": "21:00", "end": "09:00"}]}
    return notify_factory(  # type: ignore[no-any-return]
        "channels", LOYALIST_NOTIFY_SMS_BASE_URL=providers.url, LOYALIST_NOTIFY_SMS_ACCOUNT_SID="AC_test",
        LOYALIST_NOTIFY_SMS_AUTH_TOKEN="secret-token", LOYALIST_NOTIFY_POLICY_JSON=json.dumps(policy))


def zone_at_local_hour(hour: int) -> str:
    """A fixed-offset IANA zone where the local time now is ``hour`` (Etc/GMT signs are inverted)."""
    offset = (hour - datetime.now(UTC).hour) % 24
    if offset > 14:
        offset -= 24
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"


DAY = zone_at_local_hour(12)


def final(notify: ServiceProcess, headers: dict[str, str], key: str, *statuses: str,
          timeout_s: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        rows = message_log(notify, headers, idempotency_key=key)
        return rows[0] if rows and rows[0]["status"] in statuses else None

    return wait_for(check, timeout_s, what=f"{key} → {statuses}")  # type: ignore[no-any-return]


def test_sms_through_the_provider_api(stack_settings: Settings, notify: ServiceProcess, providers: FakeProviders,
                                      api_headers: dict[str, str]) -> None:
    pid = f"p-sms-{uuid.uuid4().hex[:8]}"
    phone = f"+1555{uuid.uuid4().int % 10**7:07d}"
    put_profiles(stack_settings, profile_doc(pid, None, phone=phone, timezone=DAY))
    req = request_doc(pid, "abandoned_checkout", channel="sms")
    produce_requests(stack_settings, req)
    row = final(notify, api_headers, req["idempotencyKey"], "sent")
    sent = [m for m in providers.sms if m["To"] == phone]
    assert len(sent) == 1 and row["providerId"] == sent[0]["sid"]
    assert "https://shop.example/cart/recover/chk-1" in sent[0]["Body"] and "STOP" in sent[0]["Body"]
    assert sent[0]["From"] and sent[0]["idempotency_key"] == req["idempotencyKey"]
    # the SMS cap (1 per hour, skip) holds the next marketing SMS back
    again = request_doc(pid, "win_back", channel="sms")
    produce_requests(stack_settings, again)
    assert final(notify, api_headers, again["idempotencyKey"], "skipped")["reason"] == "frequency_cap"
    wait_for(lambda: any(e.event == "SMS Sent" for e in notify_events(stack_settings, pid)), 20, 1, "SMS Sent")


def test_permanent_sms_failure_goes_to_the_dlq(stack_settings: Settings, notify: ServiceProcess,
                                               api_headers: dict[str, str]) -> None:
    pid = f"p-bad-{uuid.uuid4().hex[:8]}"
    put_profiles(stack_settings, profile_doc(pid, None, phone=INVALID_NUMBER, timezone=DAY))
    req = request_doc(pid, "birthday", channel="sms", category="transactional")
    produce_requests(stack_settings, req)
    row = final(notify, api_headers, req["idempotencyKey"], "failed")
    assert row["reason"] == "sms_undeliverable" and "21211" in row["detail"]
    dead = wait_for(lambda: [d for d in dlq_entries(stack_settings) if d["idempotencyKey"] == req["idempotencyKey"]],
                    20, 1, "the DLQ entry")
    assert dead[0]["error"]["reason"] == "sms_undeliverable" and dead[0]["templateId"] == "birthday"
    # the number is suppressed: nothing more is even attempted
    later = request_doc(pid, "birthday", channel="sms", category="transactional")
    produce_requests(stack_settings, later)
    assert final(notify, api_headers, later["idempotencyKey"], "skipped")["reason"] == "suppressed:sms_undeliverable"
    wait_for(lambda: any(e.event == "Message Failed" for e in notify_events(stack_settings, pid)), 20, 1, "failed")

    def dlq_gauge() -> float | None:
        for line in httpx.get(f"{notify.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("loyalist_notify_dlq_messages "):
                return float(line.split()[1]) or None
        return None

    assert wait_for(dlq_gauge, 20, 0.5, "the DLQ size gauge") >= 1


def test_transient_sms_errors_are_retried(stack_settings: Settings, notify: ServiceProcess,
                                          providers: FakeProviders, api_headers: dict[str, str]) -> None:
    pid = f"p-busy-{uuid.uuid4().hex[:8]}"
    phone = f"{BUSY_NUMBER}{uuid.uuid4().int % 1000:03d}"
    put_profiles(stack_settings, profile_doc(pid, None, phone=phone, timezone=DAY))
    req = request_doc(pid, "points_expiring", channel="sms", category="transactional", data={"points": 50})
    produce_requests(stack_settings, req)
    row = final(notify, api_headers, req["idempotencyKey"], "sent")
    assert row["attempts"] == 3 and providers.attempts[phone] == 3
    assert len([m for m in providers.sms if m["To"] == phone]) == 1


def test_signed_webhooks_with_retries(stack_settings: Settings, notify: ServiceProcess, providers: FakeProviders,
                                      api_headers: dict[str, str]) -> None:
    pid = f"p-hook-{uuid.uuid4().hex[:8]}"
    put_profiles(stack_settings, profile_doc(pid, None, timezone=DAY))
    tag = uuid.uuid4().hex[:8]
    flaky = request_doc(pid, "order_sync", channel="webhook", category="transactional",
                        data={"url": f"{providers.url}/hook/flaky/{tag}", "order_id": "o-1"})
    gone = request_doc(pid, "order_sync", channel="webhook", category="transactional",
                       data={"url": f"{providers.url}/hook/gone/{tag}"})
    # what a journey's webhook node requests: the configured body is the payload
    node = request_doc(pid, "webhook", channel="webhook", category="transactional",
                       data={"url": f"{providers.url}/hook/node/{tag}", "method": "POST", "body": {"coupon": "X1"}})
    produce_requests(stack_settings, flaky, gone, node)
    row = final(notify, api_headers, flaky["idempotencyKey"], "sent")
    assert row["attempts"] == 2
    hooks = [h for h in providers.hooks if h["path"] == f"/hook/flaky/{tag}"]
    assert len(hooks) == 1 and hooks[0]["valid"] is True
    assert hooks[0]["body"]["data"]["order_id"] == "o-1" and hooks[0]["body"]["profileId"] == pid
    assert hooks[0]["key"] == flaky["idempotencyKey"]
    assert final(notify, api_headers, gone["idempotencyKey"], "failed")["reason"] == "webhook_rejected"
    final(notify, api_headers, node["idempotencyKey"], "sent")
    node_hooks = [h for h in providers.hooks if h["path"] == f"/hook/node/{tag}"]
    assert len(node_hooks) == 1 and node_hooks[0]["body"] == {"coupon": "X1"} and node_hooks[0]["valid"]


def test_frequency_cap_defers_and_the_scheduler_sends_when_due(
    stack_settings: Settings, notify: ServiceProcess, api_headers: dict[str, str]
) -> None:
    email = unique_email("cap")
    pid = f"p-{email.split('@')[0]}"
    put_profiles(stack_settings, profile_doc(pid, email, timezone=DAY))
    first, second = request_doc(pid, "welcome_1"), request_doc(pid, "welcome_2")
    produce_requests(stack_settings, first, second)
    final(notify, api_headers, first["idempotencyKey"], "sent")
    deferred = final(notify, api_headers, second["idempotencyKey"], "deferred", "sent")
    if deferred["status"] == "deferred":
        assert deferred["reason"] == "frequency_cap" and deferred["dueAt"]
    # the cap window is 4 s in this test configuration: the scheduler sends it then
    done = final(notify, api_headers, second["idempotencyKey"], "sent", timeout_s=40)
    assert done["reason"] is None or done["reason"] == "frequency_cap"
    assert len(sink_messages(stack_settings, email)) == 2


def test_quiet_hours_in_the_customer_time_zone(stack_settings: Settings, notify: ServiceProcess,
                                               api_headers: dict[str, str]) -> None:
    email = unique_email("night")
    pid = f"p-{email.split('@')[0]}"
    night_zone = zone_at_local_hour(23)
    put_profiles(stack_settings, profile_doc(pid, email, timezone=night_zone))
    marketing, receipt = request_doc(pid, "win_back"), request_doc(pid, "review_request", category="transactional")
    produce_requests(stack_settings, marketing, receipt)
    row = final(notify, api_headers, marketing["idempotencyKey"], "deferred")
    assert row["reason"] == "quiet_hours"
    due = datetime.fromisoformat(row["dueAt"].replace("Z", "+00:00"))
    from zoneinfo import ZoneInfo

    local_due = due.astimezone(ZoneInfo(night_zone))
    assert (local_due.hour, local_due.minute) == (8, 0) and (due - datetime.now(UTC)).total_seconds() > 6 * 3600
    # transactional mail ignores quiet hours
    final(notify, api_headers, receipt["idempotencyKey"], "sent")
    assert [m["subject"] for m in sink_messages(stack_settings, email)] == ["How was your order?"]


def test_provider_bounce_feedback_suppresses_the_address(stack_settings: Settings, notify: ServiceProcess,
                                                         api_headers: dict[str, str]) -> None:
    email = unique_email("bounce")
    pid = f"p-{email.split('@')[0]}"
    put_profiles(stack_settings, profile_doc(pid, email, timezone=DAY))
    req = request_doc(pid, "review_request", category="transactional")
    produce_requests(stack_settings, req)
    row = final(notify, api_headers, req["idempotencyKey"], "sent")
    with httpx.Client(base_url=notify.url, headers=api_headers, timeout=10) as client:
        delivered = client.post("/v1/feedback/provider", json={"messageId": row["id"], "event": "delivered"})
        assert delivered.status_code == 202
        resp = client.post("/v1/feedback/provider", json={"messageId": row["id"], "event": "bounced",
                                                          "bounceType": "hard", "detail": "550 no such user"})
        assert resp.status_code == 202
        assert client.post("/v1/feedback/provider", json={"messageId": "nope", "event": "delivered"}).status_code == 404
    later = request_doc(pid, "review_request", category="transactional")
    produce_requests(stack_settings, later)
    assert final(notify, api_headers, later["idempotencyKey"], "skipped")["reason"] == "suppressed:hard_bounce"
    names = wait_for(lambda: {e.event for e in notify_events(stack_settings, pid)} >= {"Email Delivered",
                                                                                       "Email Bounced"}, 20, 1)
    assert names
