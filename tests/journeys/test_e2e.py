"""End to end on the local stack: ingest → profile → journeys → notify → SMTP sink.

An abandoned-checkout journey from the template with a delay of a few seconds sends exactly one reminder to
the customer whose ``Checkout Started`` is not followed by ``Order Completed`` with the same ``checkout_id``
and none to the one who completed it, also when the journeys process is killed (SIGKILL) and restarted while
the instance waits; notify's delivery log lists the message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from loyalist.settings import Settings
from tests.notify.conftest import launch_notify, message_log, sink_messages, wait_for

pytestmark = pytest.mark.integration


def track(ingest: Any, settings: Settings, call: str, body: dict[str, Any]) -> None:
    resp = httpx.post(f"{ingest.url}/v1/{call}", json={"messageId": str(uuid.uuid4()), **body},
                      auth=(settings.dev_write_key, ""), timeout=10)
    assert resp.status_code == 200, resp.text


def test_abandoned_checkout_end_to_end_with_kill(
        start_service: Callable[..., Any], journeys: Any, stack_settings: Settings,
        api_headers: dict[str, str]) -> None:
    ingest = start_service("ingest")
    profile = start_service("profile")
    notify = launch_notify(journeys.settings, "journeys-e2e")
    try:
        settings = journeys.settings
        with journeys.client(headers=api_headers) as c:
            created = c.post("/v1/journeys/from-template/abandoned_checkout",
                             json={"first_reminder_after": "PT5S", "second_reminder_after": "P1D"})
            assert created.status_code == 201, created.text
            jid = created.json()["id"]
            assert c.post(f"/v1/journeys/{jid}/activate").json()["status"] == "active"

        started = datetime.now(UTC)
        tag = uuid.uuid4().hex[:8]
        abandoner, buyer = f"ab-{tag}", f"buy-{tag}"
        emails = {u: f"{u}@example.test" for u in (abandoner, buyer)}
        for user in (abandoner, buyer):
            track(ingest, settings, "identify", {"userId": user, "traits": {"email": emails[user],
                                                                             "first_name": "Ada"}})
            # marketing email needs an opt-in (notify's default policy)
            track(ingest, settings, "track", {"userId": user, "event": "Subscribed",
                                              "properties": {"channel": "email"}})
        products = [{"product_id": "sku-1", "name": "Linen shirt", "price": 59.0, "quantity": 1,
                     "image_url": "https://shop.example/i/1.jpg"}]
        track(ingest, settings, "track", {"userId": abandoner, "event": "Checkout Started", "properties": {
            "checkout_id": f"chk-{tag}-a", "products": products, "value": 59.0, "currency": "USD",
            "recovery_url": f"https://shop.example/cart/recover/{tag}"}})
        track(ingest, settings, "track", {"userId": buyer, "event": "Checkout Started", "properties": {
            "checkout_id": f"chk-{tag}-b", "products": products, "value": 59.0}})
        track(ingest, settings, "track", {"userId": buyer, "event": "Order Completed", "properties": {
            "checkout_id": f"chk-{tag}-b", "order_id": f"o-{tag}", "revenue": 59.0}})

        def profile_id(user: str) -> str | None:
            resp = httpx.get(f"{profile.url}/v1/profiles/{user}", headers=api_headers, timeout=10)
            return resp.json().get("profile_id") if resp.status_code == 200 else None

        pid_a = wait_for(lambda: profile_id(abandoner), 60, what="the abandoner's profile")
        pid_b = wait_for(lambda: profile_id(buyer), 60, what="the buyer's profile")

        def instance(pid: str) -> dict[str, Any] | None:
            resp = httpx.get(f"{journeys.url}/v1/journeys/{jid}/instances", params={"profile_id": pid},
                             headers=api_headers, timeout=10)
            found = resp.json()["instances"] if resp.status_code == 200 else []
            return found[0] if found else None

        waiting = wait_for(lambda: (i := instance(pid_a)) and i["status"] == "waiting" and i, 60,
                           what="the abandoner's instance waiting")
        assert waiting["node_id"] == "wait_order"
        journeys.kill()  # SIGKILL while the instance waits for its timer
        journeys.start()

        try:
            reminder = wait_for(lambda: sink_messages(stack_settings, emails[abandoner]), 90,
                                what="the reminder in the SMTP sink")
        except AssertionError:
            metrics = [line for line in httpx.get(f"{notify.url}/metrics", timeout=10).text.splitlines()
                       if line.startswith("loyalist_") and "notify" in line and "http" not in line]
            raise AssertionError(f"no email; instance {instance(pid_a)}; delivery log "
                                 f"{message_log(notify, api_headers, profile_id=pid_a)}; notify metrics {metrics}; "
                                 f"notify log {notify.log_tail(30)}") from None
        assert reminder[0]["subject"].startswith("You left something in your cart")
        assert "Linen shirt" in reminder[0]["html"]
        # Settle: no duplicate, and nothing for the customer who completed the order.
        wait_for(lambda: (i := instance(pid_b)) and i["status"] == "completed" and i, 60, what="buyer completed")
        time.sleep(3)
        assert len(sink_messages(stack_settings, emails[abandoner])) == 1
        assert sink_messages(stack_settings, emails[buyer]) == []
        done = instance(pid_b)
        assert done is not None and done["converted_at"] is not None and "reminder_1" not in done["visited"]

        log = wait_for(lambda: [m for m in message_log(notify, api_headers, user_id=abandoner)
                                if m["status"] == "sent"], 30, what="the delivery log entry")
        assert len(log) == 1 and log[0]["templateId"] == "abandoned_checkout"
        assert message_log(notify, api_headers, user_id=buyer) == []

        # Backtest the same journey over the profile service's stored events of this test: what it just did.
        with journeys.client(headers=api_headers) as c:
            report = c.post(f"/v1/journeys/{jid}/backtest", json={
                "from": (started - timedelta(minutes=1)).isoformat(),
                "to": (datetime.now(UTC) + timedelta(hours=1)).isoformat()})
            assert report.status_code == 200, report.text
            r = report.json()
        assert r["source"].endswith(".profile_events")
        assert r["entered"] == 2 and r["messages"] == {"reminder_1": 1} and r["goal_reached"] == 1
        assert r["still_waiting_at_end"] == 1  # the abandoner, in the day-long second wait
    finally:
        notify.kill(hard=False)
