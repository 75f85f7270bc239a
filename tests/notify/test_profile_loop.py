"""The whole loop with the real profile service: events on events.raw build a profile (with email consent)
→ a message request → one email → the unsubscribe link → notify's Unsubscribed event is folded by the
profile service, whose profile then shows the opt-out; the next marketing request is skipped."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import httpx
import pytest

from loyalist.events import Event, encode_event, utcnow
from loyalist.kafka import make_producer
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW
from tests.conftest import ServiceProcess
from tests.notify.conftest import message_log, produce_requests, request_doc, sink_messages, unique_email, wait_for

pytestmark = pytest.mark.integration


def _produce_events(settings: Settings, *events: Event) -> None:
    async def run() -> None:
        producer = make_producer(settings, client_id="notify-test-events")
        await producer.start()
        try:
            for e in events:
                await producer.send_and_wait(settings.topic(EVENTS_RAW.name), encode_event(e),
                                             key=e.partition_key.encode())
        finally:
            await producer.stop()

    asyncio.run(run())


def _event(**fields: Any) -> Event:
    now = utcnow()
    return Event(message_id=str(uuid.uuid4()), timestamp=now, received_at=now, source="web", **fields)


def test_unsubscribe_reaches_the_profile(stack_settings: Settings, notify_factory: Any, start_service: Any,
                                         api_headers: dict[str, str]) -> None:
    profile: ServiceProcess = start_service("profile")
    notify: ServiceProcess = notify_factory("loop")
    email = unique_email("loop")
    user_id = f"u-{uuid.uuid4().hex[:10]}"
    _produce_events(
        stack_settings,
        _event(type="identify", user_id=user_id, traits={"email": email, "first_name": "Lin"}),
        _event(type="track", event="Subscribed", user_id=user_id, properties={"channel": "email"}),
    )
    prof = httpx.Client(base_url=profile.url, headers=api_headers, timeout=10)

    def subscribed_profile() -> dict[str, Any] | None:
        resp = prof.get(f"/v1/profiles/{user_id}", params={"by": "user_id"})
        doc = resp.json() if resp.status_code == 200 else {}
        return doc if (doc.get("consent") or {}).get("email", {}).get("subscribed") is True else None

    doc = wait_for(subscribed_profile, 90, 0.5, "the profile with email consent")
    pid = doc["profile_id"]

    first = request_doc(pid, "welcome_1")
    produce_requests(stack_settings, first)
    msg = wait_for(lambda: sink_messages(stack_settings, email), 60, what="the email")[0]
    assert msg["subject"] == "Welcome, Lin!"
    url = re.findall(r"<(https?://[^>]+)>", msg["headers"]["List-Unsubscribe"])[0]
    assert httpx.post(url, data={"confirm": "yes"}, timeout=10).status_code == 200

    def opted_out() -> dict[str, Any] | None:
        resp = prof.get(f"/v1/profiles/{pid}")
        consent = (resp.json().get("consent") or {}).get("email", {}) if resp.status_code == 200 else {}
        return consent if consent.get("subscribed") is False else None

    wait_for(opted_out, 90, 0.5, "the profile to show the opt-out")
    later = request_doc(pid, "win_back")
    produce_requests(stack_settings, later)

    def skipped() -> dict[str, Any] | None:
        rows = message_log(notify, api_headers, idempotency_key=later["idempotencyKey"])
        return rows[0] if rows and rows[0]["status"] == "skipped" else None

    assert wait_for(skipped, 30, what="skipped")["reason"] == "unsubscribed"
    assert len(sink_messages(stack_settings, email)) == 1
    prof.close()
