"""The live pipeline against the real stack: identity merges, late and duplicate events, as_of, the
timeline, segments, downstream messages and erasure."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loyalist.settings import Settings
from services.profile.domain.identity import Identifier, profile_id_for
from tests.profile.conftest import T0, ProfileClient, make_event, order, produce, read_key, uid, wait_for

pytestmark = pytest.mark.integration


def pid_of(kind: str, value: str) -> str:
    return profile_id_for(Identifier(kind, value))


def test_anonymous_browsing_then_identify_merges_into_the_user(stack_settings: Settings,
                                                                 api: ProfileClient) -> None:
    anon, user = uid("anon"), uid("user")
    produce(stack_settings, [
        make_event("page", anonymousId=anon, at=T0, properties={"url": "https://shop/a"}),
        make_event("page", anonymousId=anon, at=T0 + timedelta(minutes=1), properties={"url": "https://shop/b"}),
        make_event(name="Product Viewed", anonymousId=anon, at=T0 + timedelta(minutes=2),
                   properties={"product_id": "sku1", "category": "Jazz"}),
    ])
    anon_doc = api.wait_profile(anon, lambda p: p["page_views_count"] == 2, by="anonymous_id")
    assert anon_doc["profile_id"] == pid_of("anonymous_id", anon)
    produce(stack_settings, [make_event("identify", userId=user, anonymousId=anon, at=T0 + timedelta(minutes=3),
                                        traits={"email": f"{user}@example.com", "name": "Ann"})])
    doc = api.wait_profile(user, lambda p: p["page_views_count"] == 2 and p["email"] is not None, by="user_id")
    survivor = pid_of("user_id", user)
    assert doc["profile_id"] == survivor
    assert doc["category_affinity"] == {"Jazz": 1.0} and doc["traits"]["name"] == "Ann"
    assert api.must(anon, by="anonymous_id")["profile_id"] == survivor
    assert api.must(anon_doc["profile_id"])["profile_id"] == survivor  # the old id redirects
    identities = api.get(f"/v1/profiles/{survivor}/identities").json()
    assert {(i["kind"], i["value"]) for i in identities["identities"]} == {
        ("anonymous_id", anon), ("user_id", user), ("email", f"{user}@example.com")}
    assert [(m["merged"], m["reason"]) for m in identities["merges"]] == [(anon_doc["profile_id"], "identify")]
    resolved = read_key(stack_settings, "events.resolved", survivor, min_count=2)
    merges = [m["merge"] for m in resolved if "merge" in m]
    assert merges and merges[0]["survivor"] == survivor and merges[0]["merged"] == [anon_doc["profile_id"]]
    changed = read_key(stack_settings, "profile.changed", anon_doc["profile_id"], min_count=2)
    assert any(m.get("deleted") and m.get("mergedInto") == survivor for m in changed)


def test_alias_chain_joins_every_previous_id(stack_settings: Settings, api: ProfileClient) -> None:
    first, second, third = uid("old"), uid("mid"), uid("new")
    produce(stack_settings, [order(first, 10, T0)])
    api.wait_profile(first, lambda p: p["orders_count"] == 1, by="user_id")
    produce(stack_settings, [make_event("alias", userId=second, previousId=first, at=T0 + timedelta(hours=1)),
                             order(second, 20, T0 + timedelta(days=1))])
    api.wait_profile(second, lambda p: p["orders_count"] == 2, by="user_id")
    produce(stack_settings, [make_event("alias", userId=third, previousId=second, at=T0 + timedelta(days=2)),
                             order(third, 30, T0 + timedelta(days=3))])
    doc = api.wait_profile(third, lambda p: p["orders_count"] == 3, by="user_id")
    expected = min(pid_of("user_id", u) for u in (first, second, third))
    assert doc["profile_id"] == expected and doc["revenue_total"] == 60
    for user in (first, second, third):
        assert api.must(user, by="user_id")["profile_id"] == expected


def test_two_known_profiles_merge_when_an_order_carries_a_known_email(stack_settings: Settings,
                                                                     api: ProfileClient) -> None:
    ann, shop_account = uid("ann"), uid("shop")
    email = f"{ann}@example.com"
    produce(stack_settings, [make_event("identify", userId=ann, at=T0, traits={"email": email}),
                             order(ann, 10, T0 + timedelta(days=1)), order(shop_account, 20, T0 + timedelta(days=2))])
    api.wait_profile(ann, lambda p: p["orders_count"] == 1, by="user_id")
    api.wait_profile(shop_account, lambda p: p["orders_count"] == 1, by="user_id")
    produce(stack_settings, [order(shop_account, 30, T0 + timedelta(days=5), email=email.upper())])
    survivor = min(pid_of("user_id", ann), pid_of("user_id", shop_account))
    doc = api.wait_profile(email, lambda p: p["orders_count"] == 3, by="email")
    assert doc["profile_id"] == survivor and doc["revenue_total"] == 60
    assert doc["rfm"]["frequency"] == 2 and doc["rfm"]["recency_days"] == 4
    assert api.must(ann, by="user_id")["profile_id"] == survivor
    assert api.must(shop_account, by="user_id")["profile_id"] == survivor
    merges = api.get(f"/v1/profiles/{survivor}/identities").json()["merges"]
    assert [m["reason"] for m in merges] == ["email_match"]


def test_late_and_out_of_order_events_fold_as_if_in_order(stack_settings: Settings, api: ProfileClient) -> None:
    user = uid()
    produce(stack_settings, [
        make_event("identify", userId=user, at=T0 + timedelta(hours=2), traits={"name": "latest", "tier": "b"}),
        order(user, 30, T0 + timedelta(days=3)),
    ])
    api.wait_profile(user, lambda p: p["orders_count"] == 1, by="user_id")
    # Older events arrive afterwards.
    produce(stack_settings, [
        make_event("identify", userId=user, at=T0 + timedelta(hours=1), traits={"name": "older", "plan": "x"}),
        order(user, 10, T0 + timedelta(days=1)),
        order(user, 5, T0 + timedelta(days=1, hours=3)),
    ])
    doc = api.wait_profile(user, lambda p: p["orders_count"] == 3, by="user_id")
    assert doc["traits"] == {"name": "latest", "tier": "b", "plan": "x"}
    assert doc["first_order_at"] == "2024-03-02T12:00:00.000Z"
    assert doc["rfm"]["frequency"] == 1 and doc["rfm"]["monetary_value"] == 30
    # The live profile equals a rebuild of all its events from the event store.
    rebuilt = api.profile(user, by="user_id", as_of="2100-01-01T00:00:00Z",
                          observation_date=datetime.now(UTC).date().isoformat())
    assert rebuilt is not None
    rebuilt.pop("as_of")
    assert rebuilt == {**doc, "segments": []}


def test_duplicate_deliveries_change_nothing(stack_settings: Settings, api: ProfileClient) -> None:
    user = uid()
    first = order(user, 25, T0, order_id="o-1")
    produce(stack_settings, [first, first, order(user, 5, T0 + timedelta(days=2))])
    api.wait_profile(user, lambda p: p["orders_count"] == 2, by="user_id")
    # The same message again, and the same order re-sent by the shop under a new message id.
    produce(stack_settings, [first, order(user, 25, T0 + timedelta(minutes=1), order_id="o-1"),
                             make_event(name="Marker", userId=user, at=T0 + timedelta(days=9))])
    doc = api.wait_profile(user, lambda p: p["events_count"] == 4, by="user_id")
    assert doc["orders_count"] == 2 and doc["revenue_total"] == 30
    events = api.get(f"/v1/profiles/{doc['profile_id']}/events").json()["events"]
    assert len(events) == 4 and len({e["messageId"] for e in events}) == 4


def test_as_of_and_the_paged_timeline(stack_settings: Settings, api: ProfileClient) -> None:
    user = uid()
    produce(stack_settings, [order(user, 10 * (i + 1), T0 + timedelta(days=10 * i)) for i in range(5)])
    doc = api.wait_profile(user, lambda p: p["orders_count"] == 5, by="user_id")
    past = api.must(user, by="user_id", as_of=(T0 + timedelta(days=15)).isoformat())
    assert past["orders_count"] == 2 and past["revenue_total"] == 30 and past["rfm"]["T_days"] == 15
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = api.get(f"/v1/profiles/{doc['profile_id']}/events", **params).json()
        pages.extend(body["events"])
        cursor = body["next"]
        if not cursor:
            break
    assert [e["properties"]["total"] for e in pages] == [50, 40, 30, 20, 10]
    window = api.get(f"/v1/profiles/{doc['profile_id']}/events", since=(T0 + timedelta(days=15)).isoformat(),
                     until=(T0 + timedelta(days=30)).isoformat()).json()["events"]
    assert [e["properties"]["total"] for e in window] == [40, 30]


def test_profile_changed_carries_the_cause_and_segments_are_kept(stack_settings: Settings,
                                                                 api: ProfileClient) -> None:
    import asyncio

    import orjson

    from loyalist.kafka import make_producer

    user = uid()
    produce(stack_settings, [order(user, 10, T0)])
    doc = api.wait_profile(user, by="user_id")
    pid = doc["profile_id"]
    changed = read_key(stack_settings, "profile.changed", pid)
    assert "orders_count" in changed[0]["changed"] and changed[0]["cause"]["receivedAt"]
    assert changed[0]["profile"]["orders_count"] == 1

    async def send(messages: list[dict[str, Any]]) -> None:
        producer = make_producer(stack_settings, client_id="tests")
        await producer.start()
        try:
            for m in messages:
                await producer.send_and_wait(stack_settings.topic("segment.membership"), orjson.dumps(m),
                                             key=pid.encode())
        finally:
            await producer.stop()

    now = datetime.now(UTC)
    asyncio.run(send([
        {"profileId": pid, "segmentId": "vip", "segmentName": "VIP", "change": "entered", "reason": "rule",
         "at": now.isoformat()},
        {"profileId": pid, "segmentId": "new", "segmentName": "New", "change": "entered", "reason": "rule",
         "at": now.isoformat()},
        {"profileId": pid, "segmentId": "new", "segmentName": "New", "change": "exited", "reason": "rule",
         "at": (now + timedelta(seconds=1)).isoformat()},
        # Late and older than what is held: ignored.
        {"profileId": pid, "segmentId": "new", "segmentName": "New", "change": "entered", "reason": "rule",
         "at": (now - timedelta(seconds=5)).isoformat()},
    ]))
    # The four messages are folded one after the other: the profile passes through ["vip"] before the "new"
    # entry and exit, so wait for the end state in the membership table as well.
    deadline = time.monotonic() + 30
    while True:
        member_of = [s["segment_id"] for s in api.get(f"/v1/profiles/{pid}/segments").json()["segments"]]
        if member_of == ["vip"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert member_of == ["vip"]
    api.wait_profile(pid, lambda p: p["segments"] == ["vip"])


def test_erasure_removes_everything_and_replays_do_not_resurrect(stack_settings: Settings,
                                                                 api: ProfileClient) -> None:
    user = uid()
    email = f"{user}@example.com"
    old = order(user, 10, T0, email=email)
    produce(stack_settings, [old, make_event("identify", userId=user, traits={"email": email})])
    doc = api.wait_profile(email, lambda p: p["orders_count"] == 1, by="email")
    pid = doc["profile_id"]
    export = api.get(f"/v1/profiles/{pid}/export").json()
    assert len(export["events"]) == 2 and {i["kind"] for i in export["identities"]} >= {"user_id", "email"}
    resp = api.client.delete(f"/v1/profiles/{pid}", headers=api.headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "erased" and resp.json()["events_deleted"] == 2
    assert api.profile(user, by="user_id") is None and api.profile(email, by="email") is None
    assert api.get(f"/v1/profiles/{pid}/events").status_code == 404
    # The old event delivered again (a replay): dropped. A marker proves the processor got past it.
    marker = uid("marker")
    produce(stack_settings, [old, order(marker, 1, T0)])
    api.wait_profile(marker, by="user_id")
    time.sleep(1)
    assert api.profile(user, by="user_id") is None
    # Something new from the same person afterwards starts a fresh profile with only that.
    produce(stack_settings, [order(user, 99, T0 + timedelta(days=400))])
    fresh = api.wait_profile(user, lambda p: p["orders_count"] == 1, by="user_id")
    assert fresh["revenue_total"] == 99 and fresh["email"] is None


def test_api_errors_are_clear(api: ProfileClient) -> None:
    assert api.client.get("/v1/profiles/x").status_code == 401
    resp = api.get("/v1/profiles/nobody-at-all", by="user_id")
    assert resp.status_code == 404 and resp.json()["code"] == "profile_not_found"
    assert api.get("/v1/profiles/x", by="email").json()["code"] == "invalid_identifier"
    assert api.get("/v1/profiles/x", by="nonsense").status_code == 422
    wait_for(lambda: True)


def test_an_api_only_process_serves_what_the_workers_fold(stack_settings: Settings, api: ProfileClient,
                                                           start_service: Any, api_headers: dict[str, str]) -> None:
    """LOYALIST_PROFILE_API_ONLY: a second profile process with no stream processing answers the API from what
    the worker folded, follows merge redirects, and hands erasures to the workers."""
    replica = start_service("profile", LOYALIST_PROFILE_API_ONLY="true")
    with replica.client() as client:
        ready = client.get("/readyz").json()
        assert "consumers" not in ready.get("checks", {}), ready
        read_only = ProfileClient(client, api_headers)
        anon, user = uid("anon"), uid("user")
        produce(stack_settings, [make_event("page", anonymousId=anon, at=T0, properties={"url": "https://shop/a"})])
        anon_doc = read_only.wait_profile(anon, lambda p: p["page_views_count"] == 1, by="anonymous_id")
        produce(stack_settings, [make_event("identify", userId=user, anonymousId=anon, at=T0 + timedelta(minutes=1),
                                            traits={"email": f"{user}@example.com"})])
        doc = read_only.wait_profile(user, lambda p: p["email"] is not None, by="user_id")
        assert doc == api.must(user, by="user_id")
        assert read_only.must(anon_doc["profile_id"])["profile_id"] == doc["profile_id"]  # the merged id redirects
        resp = client.delete(f"/v1/profiles/{doc['profile_id']}", headers=api_headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "erased"
        assert read_only.profile(user, by="user_id") is None and api.profile(user, by="user_id") is None


def test_the_fast_read_path_answers_like_the_documented_route(stack_settings: Settings, api: ProfileClient) -> None:
    """``GET /v1/profiles/{id}`` (optionally ``?by=``) is answered by a short ASGI path; with any other query
    parameter FastAPI's route answers. Both give the same documents, errors and metrics."""
    user = uid()
    produce(stack_settings, [order(user, 42, T0, email=f"{user}@example.com")])
    fast = api.wait_profile(user, lambda p: p["orders_count"] == 1, by="user_id")
    today = datetime.now(UTC).date().isoformat()
    routed = api.get(f"/v1/profiles/{user}", by="user_id", observation_date=today)
    assert routed.status_code == 200 and routed.json() == fast
    assert api.get(f"/v1/profiles/{fast['profile_id']}").json() == fast
    assert api.get(f"/v1/profiles/{user}@example.com", by="email").json() == fast
    for params in ({}, {"observation_date": today}):  # the fast path, then the route
        missing = api.client.get(f"/v1/profiles/{user}", params=params)
        assert (missing.status_code, missing.json()["code"]) == (401, "missing_token")
        wrong = api.client.get(f"/v1/profiles/{user}", params=params, headers={"Authorization": "Bearer nope"})
        assert (wrong.status_code, wrong.json()["code"]) == (401, "invalid_token")
        unknown = api.get(f"/v1/profiles/{uid('nobody')}", by="user_id", **params)
        assert (unknown.status_code, unknown.json()["code"]) == (404, "profile_not_found")
    assert api.get(f"/v1/profiles/{user}", by="nonsense").status_code == 422  # left to FastAPI's validation
    metrics = api.client.get("/metrics").text
    for status in ("200", "401", "404"):
        assert ('loyalist_http_requests_total{method="GET",route="/v1/profiles/{identifier}",service="profile",'
                f'status="{status}"}}') in metrics
