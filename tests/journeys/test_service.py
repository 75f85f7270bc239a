"""The journeys service as a real process on the local stack: API, engine, timers across a kill -9."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from loyalist.kafka import make_consumer, make_producer
from loyalist.redis import make_redis
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW, EVENTS_RESOLVED, MESSAGE_REQUESTS, SEGMENT_MEMBERSHIP

pytestmark = pytest.mark.integration


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def resolved(profile_id: str, name: str, **properties: Any) -> dict[str, Any]:
    """A contract-exact events.resolved value."""
    at = now_iso()
    return {"profileId": profile_id, "resolvedAt": at, "event": {
        "type": "track", "event": name, "messageId": str(uuid.uuid4()), "timestamp": at, "receivedAt": at,
        "userId": f"user-{profile_id}", "properties": properties, "source": "web"}}


async def produce(settings: Settings, topic: str, values: list[dict[str, Any]]) -> None:
    producer = make_producer(settings, client_id="journeys-test")
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(settings.topic(topic), orjson.dumps(v), key=v["profileId"].encode())
    finally:
        await producer.stop()


async def collect(settings: Settings, topic: str, until: Callable[[list[dict[str, Any]]], bool],
                  timeout_s: float = 60, settle_s: float = 0.0) -> list[dict[str, Any]]:
    """Every value on a topic, read from the beginning until ``until(values)`` holds (then ``settle_s`` more,
    to catch duplicates) or the deadline passes."""
    consumer = make_consumer(settings, settings.topic(topic), group_id=f"t-{uuid.uuid4()}", client_id="t")
    await consumer.start()
    values: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    settled_at: float | None = None
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                values += [orjson.loads(r.value) for r in records]
            if settled_at is None and until(values):
                settled_at = time.monotonic() + settle_s
            if settled_at is not None and time.monotonic() >= settled_at:
                break
    finally:
        await consumer.stop()
    return values


def wait_for(check: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_api_lifecycle_versions_validation_and_auth(journeys: Any, api_headers: dict[str, str]) -> None:
    with journeys.client(headers=api_headers) as c:
        bad = c.post("/v1/journeys", json={"name": "x", "entry": {"type": "event", "event": "A"},
                                           "nodes": [{"id": "s", "type": "send", "template": "t", "next": "gone"}]})
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_journey" and bad.json()["node"] == "s"
        assert c.post("/v1/journeys/from-template/abandoned_checkout",
                      json={"first_reminder_after": "5s"}).status_code == 400
        assert c.post("/v1/journeys/from-template/nope", json={}).status_code == 404
        created = c.post("/v1/journeys", json={
            "id": "welcome-test", "name": "Welcome", "entry": {"type": "event", "event": "Signed Up"},
            "nodes": [{"id": "s", "type": "send", "template": "welcome_1"}]})
        assert created.status_code == 201, created.text
        assert created.json()["status"] == "draft" and created.json()["version"] == 1
        assert c.post("/v1/journeys", json={"id": "welcome-test", **created.json()["definition"]}).status_code == 409
        same = c.put("/v1/journeys/welcome-test", json=created.json()["definition"])
        assert same.json()["changed"] is False and same.json()["version"] == 1
        changed = c.put("/v1/journeys/welcome-test", json={**created.json()["definition"], "name": "Welcome v2"})
        assert changed.json()["version"] == 2 and changed.json()["name"] == "Welcome v2"
        assert c.get("/v1/journeys/welcome-test/versions/1").json()["definition"]["name"] == "Welcome"
        assert [v["version"] for v in c.get("/v1/journeys/welcome-test").json()["versions"]] == [1, 2]
        assert c.post("/v1/journeys/welcome-test/activate").json()["status"] == "active"
        assert c.delete("/v1/journeys/welcome-test").status_code == 409
        assert any(j["id"] == "welcome-test" for j in c.get("/v1/journeys", params={"status": "active"}).json()[
            "journeys"])
        assert c.post("/v1/journeys/welcome-test/pause").json()["status"] == "paused"
        assert c.post("/v1/journeys/welcome-test/archive").json()["status"] == "archived"
        assert c.delete("/v1/journeys/welcome-test").status_code == 204
        assert c.get("/v1/journeys/welcome-test").status_code == 404
        assert len(c.get("/v1/journeys/templates").json()["templates"]) == 7
    with journeys.client() as anonymous:
        assert anonymous.get("/v1/journeys").status_code == 401
        assert anonymous.get("/v1/journeys", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_abandoned_checkout_one_reminder_across_kill_and_restart(
        journeys: Any, api_headers: dict[str, str], stack_settings: Settings) -> None:
    settings = journeys.settings
    with journeys.client(headers=api_headers) as c:
        j = c.post("/v1/journeys/from-template/abandoned_checkout",
                   json={"first_reminder_after": "PT6S", "second_reminder_after": "PT4S",
                         "high_clv_threshold": 500})
        assert j.status_code == 201, j.text
        jid = j.json()["id"]
        assert c.post(f"/v1/journeys/{jid}/activate").status_code == 200
    abandoner, buyer, vip = (f"p-{uuid.uuid4().hex[:8]}" for _ in range(3))

    async def seed_profiles() -> None:
        redis = make_redis(settings)
        try:
            await redis.set(settings.redis_key("profile", vip), orjson.dumps(
                {"profile_id": vip, "predictions": {"predicted_clv_365d": 900}}))
        finally:
            await redis.aclose()

    asyncio.run(seed_profiles())
    products = [{"product_id": "sku-1", "name": "Linen shirt", "price": 59.0, "quantity": 1}]
    asyncio.run(produce(settings, EVENTS_RESOLVED.name, [
        resolved(abandoner, "Checkout Started", checkout_id="c-a", products=products,
                 recovery_url="https://shop.example/r/c-a"),
        resolved(buyer, "Checkout Started", checkout_id="c-b"),
        resolved(buyer, "Order Completed", checkout_id="c-b", revenue=59.0),
        resolved(vip, "Checkout Started", checkout_id="c-v"),
    ]))
    with journeys.client(headers=api_headers) as c:
        def waiting() -> bool:
            docs = [c.get(f"/v1/journeys/{jid}/instances", params={"profile_id": p}).json()["instances"]
                    for p in (abandoner, vip)]
            return all(d and d[0]["status"] == "waiting" for d in docs)
        wait_for(waiting, what="instances waiting")
    journeys.kill()  # SIGKILL while instances wait for their timers
    journeys.start()

    def done(values: list[dict[str, Any]]) -> bool:
        return len({v["idempotencyKey"] for v in values if v.get("journeyId") == jid}) >= 3

    values = asyncio.run(collect(settings, MESSAGE_REQUESTS.name, done, timeout_s=90, settle_s=3))
    mine = [v for v in values if v.get("journeyId") == jid]
    by_profile: dict[str, set[tuple[str, str]]] = {}
    for v in mine:
        by_profile.setdefault(v["profileId"], set()).add((v["templateId"], v["idempotencyKey"]))
    assert {t for t, _ in by_profile[abandoner]} == {"abandoned_checkout"}
    assert len(by_profile[abandoner]) == 1
    assert buyer not in by_profile
    assert sorted(t for t, _ in by_profile[vip]) == ["abandoned_checkout", "abandoned_checkout_incentive"]
    reminder = next(v for v in mine if v["profileId"] == abandoner)
    assert reminder["data"]["items"] == products and reminder["data"]["recovery_url"].endswith("/c-a")
    assert reminder["channel"] == "email" and reminder["category"] == "marketing" and reminder["journeyVersion"] == 1

    with journeys.client(headers=api_headers) as c:
        history = c.get(f"/v1/journeys/{jid}/instances", params={"profile_id": buyer}).json()["instances"][0]
        assert history["status"] == "completed" and history["converted_at"] is not None
        assert [h["what"] for h in history["history"]] == ["entered", "waiting", "converted", "event_received",
                                                           "completed"]

        def stats_ready() -> dict[str, Any] | None:
            s = c.get(f"/v1/journeys/{jid}/stats").json()
            return s if s["completed"] == 3 else None

        stats = wait_for(stats_ready, what="all three instances completed")
        assert stats["entered"] == 3 and stats["converted"] == 1 and stats["attributed_revenue"] == 59.0
        assert stats["nodes"]["reminder_1"]["entered"] == 2 and stats["nodes"]["reminder_2"]["entered"] == 1
        metrics = c.get("/metrics").text
        assert "loyalist_journey_timers_fired_total" in metrics
        assert f'loyalist_journey_node_instances{{journey="{jid}",measure="entered",node="reminder_1"}} 2.0' in metrics


def test_segment_entry_exit_rule_update_trait_and_new_version(
        journeys: Any, api_headers: dict[str, str]) -> None:
    settings = journeys.settings
    segment = f"seg-{uuid.uuid4().hex[:6]}"
    definition = {
        "name": "VIP path", "entry": {"type": "segment", "segment_id": segment, "change": "entered"},
        "reentry": "always",
        "nodes": [{"id": "tag", "type": "update_trait", "traits": {"vip_journey": "$entry.segment_id"},
                   "next": "invite"},
                  {"id": "invite", "type": "send", "template": "vip_early_access", "next": "later"},
                  {"id": "later", "type": "delay", "duration": "PT5S", "next": "again"},
                  {"id": "again", "type": "send", "template": "vip_early_access"}],
        "exit_rules": [{"type": "segment_exited", "segment_id": segment}]}
    with journeys.client(headers=api_headers) as c:
        jid = c.post("/v1/journeys", json=definition).json()["id"]
        c.post(f"/v1/journeys/{jid}/activate")
    stays, leaves = f"p-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}"

    def membership(pid: str, change: str) -> dict[str, Any]:
        return {"profileId": pid, "segmentId": segment, "segmentName": "VIP", "change": change,
                "reason": "rule", "at": now_iso(), "eventAcceptedAt": now_iso()}

    asyncio.run(produce(settings, SEGMENT_MEMBERSHIP.name, [membership(stays, "entered"),
                                                           membership(leaves, "entered")]))
    with journeys.client(headers=api_headers) as c:
        wait_for(lambda: c.get(f"/v1/journeys/{jid}/instances", params={"profile_id": leaves}).json()["instances"],
                 what="instance")
        # a new version while both instances wait: they keep version 1
        assert c.put(f"/v1/journeys/{jid}", json={**definition, "name": "VIP path v2"}).json()["version"] == 2
    asyncio.run(produce(settings, SEGMENT_MEMBERSHIP.name, [membership(leaves, "exited")]))

    def two_from_stays(values: list[dict[str, Any]]) -> bool:
        return sum(1 for v in values if v.get("profileId") == stays) >= 2

    values = asyncio.run(collect(settings, MESSAGE_REQUESTS.name, two_from_stays, settle_s=2))
    assert sorted(v["nodeId"] for v in values if v["profileId"] == stays) == ["again", "invite"]
    assert all(v["journeyVersion"] == 1 for v in values if v["profileId"] == stays)
    assert [v["nodeId"] for v in values if v["profileId"] == leaves] == ["invite"]
    assert all("eventAcceptedAt" in v for v in values if v["nodeId"] == "invite")
    raw = asyncio.run(collect(settings, EVENTS_RAW.name, lambda vs: any(
        v.get("context", {}).get("loyalist", {}).get("profileId") == stays for v in vs), timeout_s=20))
    identify = next(v for v in raw if v.get("context", {}).get("loyalist", {}).get("profileId") == stays)
    assert identify["type"] == "identify" and identify["traits"] == {"vip_journey": segment}
    with journeys.client(headers=api_headers) as c:
        left = c.get(f"/v1/journeys/{jid}/instances", params={"profile_id": leaves}).json()["instances"][0]
        assert left["status"] == "exited" and left["exit_reason"] == f"segment_exited:{segment}"


def test_backtest_over_given_history(journeys: Any, api_headers: dict[str, str]) -> None:
    t0 = datetime(2024, 3, 1, 10, tzinfo=UTC)

    def ev(pid: str, name: str, at: datetime, **props: Any) -> dict[str, Any]:
        return {"profileId": pid, "event": {"type": "track", "event": name, "messageId": str(uuid.uuid4()),
                                            "timestamp": at.isoformat(), "receivedAt": at.isoformat(),
                                            "properties": props}}

    events = [ev("a", "Checkout Started", t0, checkout_id="1"),
              ev("b", "Checkout Started", t0, checkout_id="2"),
              ev("b", "Order Completed", t0 + timedelta(minutes=10), checkout_id="2", revenue=80),
              ev("c", "Checkout Started", t0, checkout_id="3"),
              ev("c", "Unsubscribed", t0 + timedelta(minutes=5))]
    with journeys.client(headers=api_headers) as c:
        jid = c.post("/v1/journeys/from-template/abandoned_checkout", json={"first_reminder_after": "PT1H"}).json()[
            "id"]
        report = c.post(f"/v1/journeys/{jid}/backtest", json={
            "from": t0.isoformat(), "to": (t0 + timedelta(days=3)).isoformat(), "events": events,
            "profiles": {"a": {"predictions": {"predicted_clv_365d": 1000}}}})
        assert report.status_code == 200, report.text
        r = report.json()
        assert r["entered"] == 3 and r["messages"] == {"reminder_1": 1, "reminder_2": 1}
        assert r["exits"] == {"completed": 2, "unsubscribed": 1} and r["goal_reached"] == 1
        assert r["attributed_revenue"] == 80.0
        bad = c.post("/v1/backtests", json={"definition": {"name": "x"}, "from": t0.isoformat(),
                                            "to": t0.isoformat()})
        assert bad.status_code == 400
        for body in ({"from": "yesterday", "to": t0.isoformat(), "events": []},
                     {"from": t0.isoformat(), "to": (t0 + timedelta(days=1)).isoformat(), "version": "x"},
                     {"from": t0.isoformat(), "to": (t0 + timedelta(days=1)).isoformat(), "events": [{"x": 1}]}):
            assert c.post(f"/v1/journeys/{jid}/backtest", json=body).status_code == 400
        assert c.post("/v1/journeys/from-template/win_back", json={"params": [1]}).status_code == 400
        # nothing was sent: the backtest journey is a draft and its stats are empty
        assert c.get(f"/v1/journeys/{jid}/stats").json()["entered"] == 0



def test_cli_apply_examples_then_unchanged_then_invalid(journeys: Any, api_headers: dict[str, str],
                                                        tmp_path: Any) -> None:
    from pathlib import Path

    from services.journeys.cli import main

    env = ["--url", journeys.url, "--token", journeys.settings.dev_api_token]
    examples = sorted(Path("journeys/examples").glob("*.yaml"))
    for path in examples:
        assert main([*env, "apply", "-f", str(path)]) == 0
        assert main([*env, "apply", "-f", str(path)]) == 0  # unchanged: no new version
    with journeys.client(headers=api_headers) as c:
        ac = c.get("/v1/journeys/abandoned-checkout").json()
        assert ac["status"] == "active" and ac["version"] == 1
        assert c.get("/v1/journeys/vip-early-access").json()["status"] == "paused"
    broken = tmp_path / "broken.yaml"
    broken.write_text("id: broken\nname: b\nentry: {type: event, event: A}\nnodes:\n"
                      "  - {id: a, type: delay, duration: soon}\n")
    assert main([*env, "apply", "-f", str(broken)]) == 1
    assert main([*env, "validate", "-f", str(broken)]) == 1


def test_date_trait_entry_timer_from_profile_changes(journeys: Any, api_headers: dict[str, str]) -> None:
    """profile.changed schedules the customer's next birthday; its wake-up starts the yearly instance."""
    from loyalist.topics import JOURNEY_TIMERS, PROFILE_CHANGED

    settings = journeys.settings
    with journeys.client(headers=api_headers) as c:
        jid = c.post("/v1/journeys/from-template/birthday", json={"at_local_time": "09:00"}).json()["id"]
        c.post(f"/v1/journeys/{jid}/activate")
    pid = f"p-{uuid.uuid4().hex[:8]}"
    doc = {"profile_id": pid, "timezone": "Europe/Paris", "traits": {"birthday": "1990-05-04"}}

    async def seed() -> None:
        redis = make_redis(settings)
        try:
            await redis.set(settings.redis_key("profile", pid), orjson.dumps(doc))
        finally:
            await redis.aclose()

    asyncio.run(seed())
    asyncio.run(produce(settings, PROFILE_CHANGED.name, [
        {"profileId": pid, "changed": ["traits"], "profile": doc, "cause": {}, "at": now_iso()}]))

    from loyalist.cassandra import connect

    cluster, session = connect(settings, keyspace=settings.keyspace)
    try:
        def timer_row() -> dict[str, Any] | None:
            rows = list(session.execute("SELECT due, kind, journey_id FROM journey_timers WHERE profile_id = %s "
                                        "ALLOW FILTERING", (pid,)))
            mine = [r for r in rows if r["journey_id"] == jid]  # other active birthday journeys have their own
            return mine[0] if mine else None

        row = wait_for(timer_row, what="the birthday timer")
    finally:
        cluster.shutdown()
    due = row["due"].replace(tzinfo=UTC)
    assert row["kind"] == "entry" and row["journey_id"] == jid
    assert (due.month, due.day, due.hour) == (5, 4, 7)  # 09:00 in Paris (CEST) is 07:00 UTC
    # Deliver that wake-up now (as the poller will on the day): the yearly instance starts and greets.
    asyncio.run(produce(settings, JOURNEY_TIMERS.name, [
        {"kind": "entry", "instanceId": f"date:{jid}:{pid}", "nodeId": "", "profileId": pid, "journeyId": jid,
         "due": due.isoformat()}]))
    values = asyncio.run(collect(settings, MESSAGE_REQUESTS.name,
                                 lambda vs: any(v.get("profileId") == pid for v in vs), timeout_s=30, settle_s=1))
    [greeting] = [v for v in values if v["profileId"] == pid]
    assert greeting["templateId"] == "birthday" and greeting["data"] == {"coupon_code": "BIRTHDAY"}
    with journeys.client(headers=api_headers) as c:
        [inst] = c.get(f"/v1/journeys/{jid}/instances", params={"profile_id": pid}).json()["instances"]
        assert inst["key"] == str(due.year) and inst["status"] == "completed"
