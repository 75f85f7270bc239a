"""Loyalty against the real servers: concurrent redemptions from two API processes, the stream path from
``events.resolved`` to ledger events in ``events.raw``, expiry on a controllable clock, the statement and
API errors, replay of the stored ledger."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loyalist.auth import CredentialStore
from loyalist.cassandra import connect
from loyalist.events import Event, encode_event, utcnow
from loyalist.kafka import make_producer
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW, EVENTS_RESOLVED, PROFILE_CHANGED
from services.profile.loyalty.domain import POINTS_EXPIRED, CompleteOrder, replay
from services.profile.loyalty.service import LoyaltyService, message_id
from services.profile.loyalty.settings import LoyaltySettings
from services.profile.loyalty.store import LedgerStore, ProgramStore

pytestmark = pytest.mark.integration

PROGRAM: dict[str, Any] = {
    "name": "Test rewards", "base_currency": "USD", "points_per_unit": 1,
    "currency_rates": {"EUR": "1.10", "GBP": "1.25"},
    "action_bonuses": [{"event": "Product Reviewed", "points": 50, "once_per": "lifetime",
                        "key_property": "product_id"}],
    "tiers": [{"name": "member", "threshold": 0}, {"name": "gold", "threshold": 1000, "multiplier": 2}],
    "expiry_months": 12, "point_value": "0.01",
    "rewards": [{"reward_id": "off5", "name": "$5 off", "kind": "discount_code", "points_price": 100, "value": 5,
                 "currency": "USD"}],
    # Far in the past so facts of any test date are judged by this version.
    "effective_from": "2000-01-01T00:00:00Z",
}


@dataclass
class Replica:
    url: str
    kind: str = "profile"  # loyalty runs inside the profile service


@pytest.fixture(scope="module")
def replicas(stack_settings: Settings, start_service: Callable[..., Any]) -> Iterator[list[Replica]]:
    """Two replicas of the real profile service, which hosts loyalty."""
    first = start_service("profile")
    second = start_service("profile")
    yield [Replica(first.url), Replica(second.url)]


@pytest.fixture(scope="module")
def program_defined(replicas: list[Replica], stack_settings: Settings) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {stack_settings.dev_api_token}"}
    with httpx.Client(base_url=replicas[0].url, headers=headers, timeout=30) as client:
        response = client.put("/v1/loyalty/program", json=PROGRAM)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def store_pair(stack_settings: Settings) -> Iterator[tuple[LedgerStore, LedgerStore]]:
    """Two independent Cassandra sessions (two clusters) on the test keyspace, shared by the module."""
    c1, s1 = connect(stack_settings, keyspace=stack_settings.keyspace)
    c2, s2 = connect(stack_settings, keyspace=stack_settings.keyspace)
    try:
        yield LedgerStore(s1), LedgerStore(s2)
    finally:
        c1.shutdown()
        c2.shutdown()


def _headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.dev_api_token}"}


# ---- concurrency ---------------------------------------------------------------------------------


async def test_fifty_concurrent_redemptions_across_two_processes_never_overspend(
    replicas: list[Replica], program_defined: dict[str, Any], stack_settings: Settings,
    store_pair: tuple[LedgerStore, LedgerStore],
) -> None:
    profile_id = f"p-{uuid.uuid4().hex[:10]}"
    headers = _headers(stack_settings)
    clients = [httpx.AsyncClient(base_url=r.url, headers=headers, timeout=60) for r in replicas]
    try:
        seed = await clients[0].post(f"/v1/loyalty/accounts/{profile_id}/adjustments",
                                     json={"points": 2550, "reason": "test credit", "idempotency_key": "seed"})
        assert seed.status_code == 201, seed.text
        # 2,550 points afford exactly 25 rewards of 100; 50 requests would spend 5,000 unchecked.
        keys = [f"redeem-{i}" for i in range(50)]

        async def redeem(i: int, key: str) -> httpx.Response:
            return await clients[i % 2].post(f"/v1/loyalty/accounts/{profile_id}/redemptions",
                                             json={"reward_id": "off5", "idempotency_key": key})

        started = time.perf_counter()
        responses = await asyncio.gather(*(redeem(i, k) for i, k in enumerate(keys)))
        elapsed = time.perf_counter() - started
        conflicts = 0.0
        for client in clients:  # informational: how much contention the compare-and-set absorbed
            for line in (await client.get("/metrics")).text.splitlines():
                if line.startswith("loyalist_loyalty_cas_conflicts_total "):
                    conflicts += float(line.split()[1])
        print(f"50 concurrent redemptions over {replicas[0].kind} x2: {elapsed:.2f}s, {conflicts:.0f} CAS conflicts")
        statuses = [r.status_code for r in responses]
        assert sorted(set(statuses)) == [201, 409], [r.text for r in responses if r.status_code not in (201, 409)]
        won = [r.json() for r in responses if r.status_code == 201]
        assert len(won) == 25
        assert all(r.json()["code"] == "insufficient_points" for r in responses if r.status_code == 409)
        codes = {w["redemption"]["code"] for w in won}
        assert len(codes) == 25
        assert {r.status_code for i, r in enumerate(responses) if i % 2 == 0} >= {201}  # both replicas won some
        assert {r.status_code for i, r in enumerate(responses) if i % 2 == 1} >= {201}

        account = (await clients[1].get(f"/v1/loyalty/accounts/{profile_id}")).json()
        assert account["balance"] == 50 and account["redemptions"] == 25

        # Retrying every request: the winners get their first answer (same code), the losers still lose.
        retried = await asyncio.gather(*(redeem(i + 1, k) for i, k in enumerate(keys)))
        by_key = {k: r for k, r in zip(keys, responses, strict=True)}
        for key, again in zip(keys, retried, strict=True):
            if by_key[key].status_code == 201:
                assert again.status_code == 200
                assert again.json()["redemption"]["code"] == by_key[key].json()["redemption"]["code"]
            else:
                assert again.status_code == 409
        assert (await clients[0].get(f"/v1/loyalty/accounts/{profile_id}")).json()["balance"] == 50

        # The stored ledger replays to the stored snapshot; the running balance never dipped below zero.
        store = store_pair[0]
        snapshot, _ = await store.load(profile_id)
        events = await store.all_events(profile_id)
        assert replay(events, profile_id) == snapshot
        running = 0
        for event in events:
            running += event.points
            assert running >= 0
        assert running == 50 and len(events) == 26
    finally:
        for client in clients:
            await client.aclose()


async def test_fifty_concurrent_redemptions_through_two_independent_sessions(
    stack_settings: Settings, store_pair: tuple[LedgerStore, LedgerStore], program_defined: dict[str, Any],
) -> None:
    config = LoyaltySettings()
    services = [
        LoyaltyService(stack_settings, config, store, ProgramStore(store.session), None, lambda: utcnow())
        for store in store_pair
    ]
    profile_id = f"p-{uuid.uuid4().hex[:10]}"
    from services.profile.loyalty.domain import Adjust, InsufficientPoints

    await services[0].handle(profile_id, Adjust(730, "test credit", "test", "seed"))  # affords 7

    async def redeem(i: int) -> str:
        service = services[i % 2]
        try:
            await service.handle(profile_id, service.redeem_command(profile_id, "off5", f"k{i}"))
            return "won"
        except InsufficientPoints:
            return "refused"

    outcomes = await asyncio.gather(*(redeem(i) for i in range(50)))
    assert outcomes.count("won") == 7 and outcomes.count("refused") == 43
    ledger, _ = await store_pair[1].load(profile_id)
    assert ledger.balance == 30 and len(ledger.redemptions) == 7


# ---- the stream path ------------------------------------------------------------------------------


def _event(name: str, props: dict[str, Any], *, message: str, at: datetime, source: str = "web",
           context: dict[str, Any] | None = None) -> Event:
    return Event(type="track", event=name, message_id=message, timestamp=at, received_at=at, user_id="u-stream",
                 properties=props, source=source, context=context or {})


async def _loyalty_events(settings: Settings, profile_id: str, want: int, timeout_s: float = 60) -> list[Event]:
    """Ledger events of ``profile_id`` in events.raw (keyed by the profile id)."""
    topic = settings.topic(EVENTS_RAW.name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    found: dict[str, Event] = {}
    try:
        partitions = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or set())]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or set())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(found) < want:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    if record.key != profile_id.encode():
                        continue
                    event = Event.model_validate_json(record.value)
                    if event.source == "loyalty":
                        found[event.message_id] = event
    finally:
        await consumer.stop()
    return sorted(found.values(), key=lambda e: e.properties["ledger_seq"])


async def _wait_account(client: httpx.AsyncClient, profile_id: str, seq: int, timeout_s: float = 60
                        ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    account: dict[str, Any] = {}
    while time.monotonic() < deadline:
        account = (await client.get(f"/v1/loyalty/accounts/{profile_id}")).json()
        if account.get("ledger_seq", 0) >= seq:
            return account
        await asyncio.sleep(0.3)
    raise AssertionError(f"ledger of {profile_id} did not reach seq {seq}: {account}")


async def test_resolved_events_earn_and_claw_back_and_ledger_events_reach_events_raw(
    replicas: list[Replica], program_defined: dict[str, Any], stack_settings: Settings,
) -> None:
    profile_id = f"p-{uuid.uuid4().hex[:10]}"
    t = utcnow() - timedelta(days=1)
    facts = [
        _event("Order Completed", {"order_id": f"{profile_id}-1", "revenue": 100, "currency": "EUR"},
               message="m1", at=t),
        _event("Order Completed", {"order_id": f"{profile_id}-2", "subtotal": "40", "tax": 8, "currency": "GBP"},
               message="m2", at=t + timedelta(minutes=1)),
        # A duplicate delivery of the first order (same message) and the same order under a new message id.
        _event("Order Completed", {"order_id": f"{profile_id}-1", "revenue": 100, "currency": "EUR"},
               message="m1", at=t),
        _event("Order Completed", {"order_id": f"{profile_id}-1", "revenue": 100, "currency": "EUR"},
               message="m1-resent", at=t),
        _event("Order Refunded", {"order_id": f"{profile_id}-2"}, message="m3", at=t + timedelta(minutes=2)),
        _event("Product Reviewed", {"product_id": "sku-1"}, message="m4", at=t + timedelta(minutes=3)),
        # Loyalty's own event coming back through events.resolved must not loop.
        _event("Points Earned", {"points": 999, "balance_after": 999}, message="m5", at=t + timedelta(minutes=4),
               source="loyalty", context={"loyalist": {"profileId": profile_id}}),
    ]
    producer = make_producer(stack_settings, client_id="loyalty-test")
    await producer.start()
    try:
        for fact in facts:
            value = orjson.dumps({"profileId": profile_id, "event": orjson.Fragment(encode_event(fact)),
                                  "resolvedAt": utcnow().isoformat()})
            await producer.send_and_wait(stack_settings.topic(EVENTS_RESOLVED.name), value,
                                         key=profile_id.encode())
    finally:
        await producer.stop()

    async with httpx.AsyncClient(base_url=replicas[0].url, headers=_headers(stack_settings), timeout=30) as client:
        account = await _wait_account(client, profile_id, 4)
        # EUR 100 → 110; GBP 40 → 50 then refunded; review bonus 50.
        assert account["balance"] == 160 and account["lifetime_points"] == 160
        statement = (await client.get(f"/v1/loyalty/accounts/{profile_id}/statement",
                                      params={"order": "asc"})).json()
        assert [(line["kind"], line["points"], line["balance_after"]) for line in statement["lines"]] == [
            ("Points Earned", 110, 110), ("Points Earned", 50, 160), ("Points Adjusted", -50, 110),
            ("Points Earned", 50, 160)]

    published = await _loyalty_events(stack_settings, profile_id, want=4)
    assert [e.event for e in published] == ["Points Earned", "Points Earned", "Points Adjusted", "Points Earned"]
    first = published[0]
    assert first.context == {"loyalist": {"profileId": profile_id}}
    assert first.message_id == message_id(profile_id, f"earn:{profile_id}-1")
    assert first.properties["points"] == 110 and first.properties["balance_after"] == 110
    assert first.properties["tier"] == "member" and first.properties["order_id"] == f"{profile_id}-1"
    assert first.properties["expiring"][0]["points"] == 110
    assert published[-1].properties["lifetime_points"] == 160
    # Nothing more arrives (the duplicate deliveries and the looped-back event changed nothing).
    async with httpx.AsyncClient(base_url=replicas[1].url, headers=_headers(stack_settings), timeout=30) as client:
        await asyncio.sleep(2)
        assert (await client.get(f"/v1/loyalty/accounts/{profile_id}")).json()["ledger_seq"] == 4


async def test_profile_document_shows_the_loyalty_section(
    replicas: list[Replica], program_defined: dict[str, Any], stack_settings: Settings,
) -> None:
    """The whole loop through the real profile service: an order in events.raw → profile → events.resolved →
    loyalty → Points Earned in events.raw → the profile's ``loyalty`` section."""
    user_id = f"u-{uuid.uuid4().hex[:10]}"
    order = Event(type="track", event="Order Completed", message_id=f"m-{user_id}", timestamp=utcnow(),
                  received_at=utcnow(), user_id=user_id, source="web",
                  properties={"order_id": f"o-{user_id}", "revenue": 42, "currency": "USD"})
    producer = make_producer(stack_settings, client_id="loyalty-test")
    await producer.start()
    try:
        await producer.send_and_wait(stack_settings.topic(EVENTS_RAW.name), encode_event(order),
                                     key=user_id.encode())
    finally:
        await producer.stop()
    async with httpx.AsyncClient(base_url=replicas[0].url, headers=_headers(stack_settings), timeout=30) as client:
        deadline = time.monotonic() + 60
        loyalty: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            response = await client.get(f"/v1/profiles/{user_id}", params={"by": "user_id"})
            if response.status_code == 200:
                loyalty = response.json().get("loyalty")
                if loyalty and loyalty.get("balance") == 42:
                    break
            await asyncio.sleep(0.5)
        assert loyalty is not None and loyalty["balance"] == 42, loyalty
        assert loyalty["lifetime_points"] == 42 and loyalty["tier"] == "member"
        assert loyalty["expiring"][0]["points"] == 42


# ---- expiry on a controllable clock ----------------------------------------------------------------------


async def test_scheduled_expiry_at_the_right_moment(
    stack_settings: Settings, store_pair: tuple[LedgerStore, LedgerStore], program_defined: dict[str, Any],
) -> None:
    store = store_pair[0]
    earned_at = datetime(2020, 1, 10, 9, 30, tzinfo=UTC)
    # The orders are taken when the second one happens: the schedule never stores a due time before the clock of
    # its writer (loyalist/queues.py), so the writer's clock must not be ahead of the runs below.
    clock_now = earned_at + timedelta(days=40)
    service = LoyaltyService(stack_settings, LoyaltySettings(), store, ProgramStore(store.session), None,
                             lambda: clock_now)
    profile_id = f"p-{uuid.uuid4().hex[:10]}"
    await service.handle(profile_id, CompleteOrder("m1", "o1", Decimal(80), Decimal(80), "USD", earned_at))
    await service.handle(profile_id, CompleteOrder("m2", "o2", Decimal(20), Decimal(20), "USD",
                                                   earned_at + timedelta(days=40)))
    expires = datetime(2021, 1, 10, 9, 30, tzinfo=UTC)

    await service.run_due(expires - timedelta(seconds=1))
    ledger, _ = await store.load(profile_id)
    assert ledger.balance == 100

    await service.run_due(expires)
    ledger, _ = await store.load(profile_id)
    assert ledger.balance == 20
    lines = await store.lines_after(profile_id, 0, 10)
    assert [(line.event.kind, line.event.points, line.event.at) for line in lines][-1] == (
        POINTS_EXPIRED, -80, expires)
    # The second lot is due 40 days later; the schedule holds it then, and only once.
    assert await service.run_due(expires + timedelta(days=41)) >= 1
    assert await service.run_due(expires + timedelta(days=42)) == 0
    ledger, _ = await store.load(profile_id)
    assert ledger.balance == 0 and ledger.lifetime_points == 100


# ---- statement, adjustments, errors ----------------------------------------------------------------------


async def test_statement_pages_with_running_balance_and_api_errors(
    replicas: list[Replica], program_defined: dict[str, Any], stack_settings: Settings,
) -> None:
    profile_id = f"p-{uuid.uuid4().hex[:10]}"
    async with httpx.AsyncClient(base_url=replicas[0].url, headers=_headers(stack_settings), timeout=30) as client:
        for i, points in enumerate([300, -20, 45, -100, 75, 10, -5]):
            r = await client.post(f"/v1/loyalty/accounts/{profile_id}/adjustments",
                                  json={"points": points, "reason": f"correction {i}"},
                                  headers={"Idempotency-Key": f"adj-{i}"})
            assert r.status_code == 201, r.text
        lines: list[dict[str, Any]] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 3} if cursor is None else {"limit": 3, "cursor": cursor}
            page = (await client.get(f"/v1/loyalty/accounts/{profile_id}/statement", params=params)).json()
            lines.extend(page["lines"])
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3 and [line["seq"] for line in lines] == [7, 6, 5, 4, 3, 2, 1]
        oldest_first = list(reversed(lines))
        running = 0
        for line in oldest_first:
            running += line["points"]
            assert line["balance_after"] == running
            assert line["actor"] == "dev" and line["note"].startswith("correction")
        assert running == 305

        base = f"/v1/loyalty/accounts/{profile_id}"
        no_reason = await client.post(f"{base}/adjustments", json={"points": 5, "idempotency_key": "x"})
        assert no_reason.status_code == 422 and no_reason.json()["code"] == "validation_error"
        zero = await client.post(f"{base}/adjustments", json={"points": 0, "reason": "nothing", "idempotency_key": "z"})
        assert zero.status_code == 422
        overdraw = await client.post(f"{base}/adjustments",
                                     json={"points": -306, "reason": "too much", "idempotency_key": "o"})
        assert overdraw.status_code == 409 and overdraw.json()["code"] == "insufficient_points"
        unknown = await client.post(f"{base}/redemptions", json={"reward_id": "nope", "idempotency_key": "u"})
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_reward"
        no_key = await client.post(f"{base}/redemptions", json={"reward_id": "off5"})
        assert no_key.status_code == 422 and no_key.json()["code"] == "missing_idempotency_key"
        won = await client.post(f"{base}/redemptions", json={"reward_id": "off5", "idempotency_key": "r1"})
        assert won.status_code == 201
        conflict = await client.post(f"{base}/redemptions", json={"reward_id": "other", "idempotency_key": "r1"})
        assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
        code = won.json()["redemption"]["code"]
        looked_up = (await client.get(f"/v1/loyalty/codes/{code}")).json()
        assert looked_up["profile_id"] == profile_id and looked_up["reward_id"] == "off5"
        # The reward also travels as an event (7 adjustments + 1 redemption in events.raw).
        published = await _loyalty_events(stack_settings, profile_id, want=8)
        redeemed = [e for e in published if e.event == "Points Redeemed"]
        assert len(redeemed) == 1 and redeemed[0].properties["reward"]["code"] == code
        assert redeemed[0].properties["balance_after"] == 205
        assert next(e.properties["note"] for e in published if e.event == "Points Adjusted") == "correction 0"

    # Scopes: no token → 401; a read-only token reads but cannot write.
    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    try:
        CredentialStore(session).create("loyalty-reader-token", "api_token", "reader", scopes={"loyalty:read"})
    finally:
        cluster.shutdown()
    async with httpx.AsyncClient(base_url=replicas[1].url, timeout=30) as anonymous:
        assert (await anonymous.get(f"/v1/loyalty/accounts/{profile_id}")).status_code == 401
        reader = {"Authorization": "Bearer loyalty-reader-token"}
        assert (await anonymous.get(f"/v1/loyalty/accounts/{profile_id}", headers=reader)).status_code == 200
        denied = await anonymous.post(f"/v1/loyalty/accounts/{profile_id}/adjustments", headers=reader,
                                      json={"points": 5, "reason": "sneaky", "idempotency_key": "s"})
        assert denied.status_code == 403


async def test_program_versions_and_report(
    replicas: list[Replica], program_defined: dict[str, Any], stack_settings: Settings,
) -> None:
    async with httpx.AsyncClient(base_url=replicas[1].url, headers=_headers(stack_settings), timeout=30) as client:
        bad = await client.put("/v1/loyalty/program", json={**PROGRAM, "tiers": [{"name": "x", "threshold": 5}]})
        assert bad.status_code == 422 and "threshold 0" in bad.json()["message"]
        newer = {**PROGRAM, "points_per_unit": 2, "effective_from": "2999-01-01T00:00:00Z"}
        stored = await client.put("/v1/loyalty/program", json=newer)
        assert stored.status_code == 201
        version = stored.json()["version"]
        assert version > program_defined["version"]
        versions = (await client.get("/v1/loyalty/program/versions")).json()["versions"]
        assert [v["version"] for v in versions][-1] == version
        old = (await client.get(f"/v1/loyalty/program/versions/{program_defined['version']}")).json()
        assert old["points_per_unit"] == "1"
        assert (await client.get("/v1/loyalty/program/versions/9999")).status_code == 404
        rewards = (await client.get("/v1/loyalty/rewards")).json()
        assert [r["reward_id"] for r in rewards["rewards"]] == ["off5"]
        report = (await client.get("/v1/loyalty/report")).json()
        assert report["accounts"] >= 1 and report["points_liability"] >= 0
        assert sum(report["tier_distribution"].values()) == report["accounts"]
        assert report["currency"] == "USD"


async def test_a_merge_on_events_resolved_moves_the_points_to_the_survivor(
    replicas: list[Replica], program_defined: dict[str, Any], stack_settings: Settings,
) -> None:
    survivor, other = f"p-{uuid.uuid4().hex[:10]}", f"p-{uuid.uuid4().hex[:10]}"
    async with httpx.AsyncClient(base_url=replicas[0].url, headers=_headers(stack_settings), timeout=30) as client:
        for pid, points in ((survivor, 40), (other, 300)):
            r = await client.post(f"/v1/loyalty/accounts/{pid}/adjustments",
                                  json={"points": points, "reason": "before merge", "idempotency_key": "m"})
            assert r.status_code == 201
        producer = make_producer(stack_settings, client_id="loyalty-test")
        await producer.start()
        try:
            message = {"profileId": survivor, "merge": {"survivor": survivor, "merged": [other], "reason": "email"},
                       "resolvedAt": utcnow().isoformat(), "at": utcnow().isoformat()}
            for _ in range(2):  # delivered twice: moved once
                await producer.send_and_wait(stack_settings.topic(EVENTS_RESOLVED.name), orjson.dumps(message),
                                             key=survivor.encode())
        finally:
            await producer.stop()
        account = await _wait_account(client, survivor, 2)
        assert account["balance"] == 340
        closed = await _wait_account(client, other, 2)
        assert closed["balance"] == 0
        await asyncio.sleep(1)
        assert (await client.get(f"/v1/loyalty/accounts/{survivor}")).json()["balance"] == 340


async def test_birthday_from_identify_traits_pays_the_bonus_on_schedule(
    stack_settings: Settings, store_pair: tuple[LedgerStore, LedgerStore], program_defined: dict[str, Any],
) -> None:
    store = store_pair[0]
    programs = ProgramStore(store.session)
    learned_at = datetime(2022, 3, 1, tzinfo=UTC)
    service = LoyaltyService(stack_settings, LoyaltySettings(), store, programs, None, lambda: learned_at)
    # This test's own program version (effective in 2022 only for this test's timeline) adds the bonus.
    definition = {k: v for k, v in PROGRAM.items() if k != "effective_from"}
    definition["action_bonuses"] = [*PROGRAM["action_bonuses"], {"event": "Birthday", "points": 200,
                                                                  "once_per": "year"}]
    from services.profile.loyalty.domain import ProgramDefinition

    await programs.create(ProgramDefinition.model_validate(definition), effective_from=datetime(2022, 1, 1, tzinfo=UTC),
                          actor="test", now=learned_at)
    await programs.create(ProgramDefinition.model_validate({k: v for k, v in PROGRAM.items() if k != "effective_from"}),
                          effective_from=datetime(2023, 1, 1, tzinfo=UTC), actor="test", now=learned_at)
    profile_id = f"p-{uuid.uuid4().hex[:10]}"
    identify = Event(type="identify", message_id=f"i-{profile_id}", timestamp=learned_at, received_at=learned_at,
                     user_id="u-bday", traits={"birthday": "1990-04-02", "email": "b@example.com"})
    await service.handle_event(profile_id, identify)
    assert await store.birthday(profile_id) == (4, 2)
    birthday = datetime(2022, 4, 2, tzinfo=UTC)
    await service.run_due(birthday - timedelta(seconds=1))
    assert (await store.load(profile_id))[0].balance == 0
    await service.run_due(birthday + timedelta(hours=3))
    ledger, _ = await store.load(profile_id)
    assert ledger.balance == 200
    await service.run_due(birthday + timedelta(hours=4))
    assert (await store.load(profile_id))[0].balance == 200


async def test_profile_erasure_deletes_the_ledger_and_its_codes(
    replicas: list[Replica], program_defined: dict[str, Any], stack_settings: Settings,
    store_pair: tuple[LedgerStore, LedgerStore],
) -> None:
    profile_id, merged_in = f"p-{uuid.uuid4().hex[:10]}", f"p-{uuid.uuid4().hex[:10]}"
    store = store_pair[0]
    service = LoyaltyService(stack_settings, LoyaltySettings(), store, ProgramStore(store.session), None,
                             lambda: utcnow())
    from services.profile.loyalty.domain import Adjust

    await service.handle(merged_in, Adjust(50, "before merge", "test", "a"))
    await service.handle_merge(profile_id, [merged_in], utcnow())
    await service.handle(profile_id, Adjust(150, "credit", "test", "b"))
    outcome = await service.handle(profile_id, service.redeem_command(profile_id, "off5", "r"))
    code = outcome.ledger.redemptions["r"].code
    assert await store.get_code(code) is not None

    producer = make_producer(stack_settings, client_id="loyalty-test")
    await producer.start()
    try:
        topic = stack_settings.topic(PROFILE_CHANGED.name)
        # A deletion caused by a merge is not an erasure; a real erasure is.
        await producer.send_and_wait(topic, orjson.dumps({"profileId": merged_in, "deleted": True,
                                                          "mergedInto": profile_id, "at": utcnow().isoformat()}),
                                     key=merged_in.encode())
        await producer.send_and_wait(topic, orjson.dumps({"profileId": profile_id, "deleted": True,
                                                          "at": utcnow().isoformat()}), key=profile_id.encode())
    finally:
        await producer.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ledger, version = await store.load(profile_id)
        if version == 0:
            break
        await asyncio.sleep(0.3)
    assert version == 0 and ledger.balance == 0
    assert await store.lines_after(profile_id, 0, 10) == []
    assert await store.get_code(code) is None
    assert (await store.load(merged_in))[1] == 0  # the merged-in remains are erased with it


async def test_lines_committed_while_kafka_is_unreachable_are_published_later(
    stack_settings: Settings, store_pair: tuple[LedgerStore, LedgerStore], program_defined: dict[str, Any],
) -> None:
    """The outbox: a committed line whose produce failed is produced by the next command for the customer."""
    from services.profile.loyalty.domain import Adjust

    profile_id = f"p-{uuid.uuid4().hex[:10]}"
    store = store_pair[0]
    # A producer that lost its broker connection for good (stopped): every produce fails.
    dead = make_producer(stack_settings, client_id="loyalty-dead")
    await dead.start()
    await dead.stop()
    offline = LoyaltyService(stack_settings, LoyaltySettings(publish_timeout_s=1), store,
                             ProgramStore(store.session), dead, lambda: utcnow())
    committed = await offline.handle(profile_id, Adjust(70, "during the outage", "test", "a1"))
    assert committed.ledger.balance == 70  # the commit stands
    assert await store.published_seq(profile_id) == 0

    live_producer = make_producer(stack_settings, client_id="loyalty-test")
    await live_producer.start()
    try:
        online = LoyaltyService(stack_settings, LoyaltySettings(), store_pair[1], ProgramStore(store.session),
                                live_producer, lambda: utcnow())
        # A retried command (no new ledger events) flushes what was never produced.
        await online.handle(profile_id, Adjust(70, "during the outage", "test", "a1"))
        assert await store.published_seq(profile_id) == 1
    finally:
        await live_producer.stop()
    published = await _loyalty_events(stack_settings, profile_id, want=1)
    assert [(e.event, e.properties["points"], e.properties["note"]) for e in published] == [
        ("Points Adjusted", 70, "during the outage")]


# ---- the batched stream path -------------------------------------------------------------------------------


async def test_a_batch_of_many_facts_of_one_customer_commits_like_one_fact_at_a_time(
    stack_settings: Settings, store_pair: tuple[LedgerStore, LedgerStore], program_defined: dict[str, Any],
) -> None:
    """``process_resolved`` commits a customer's facts of a batch together (several compare-and-sets of at most
    ``COMMANDS_PER_COMMIT`` commands); the ledger must be exactly the one handling each fact alone gives."""
    store = store_pair[0]
    clock_now = datetime(2022, 1, 1, tzinfo=UTC)
    service = LoyaltyService(stack_settings, LoyaltySettings(), store, ProgramStore(store.session), None,
                             lambda: clock_now)
    batched, alone = f"p-{uuid.uuid4().hex[:10]}", f"p-{uuid.uuid4().hex[:10]}"
    start = datetime(2021, 1, 1, tzinfo=UTC)
    facts: list[Event] = []
    for i in range(70):  # more than two commits' worth, crossing the gold threshold (1,000 points)
        at = start + timedelta(days=i)
        facts.append(_event("Order Completed", {"order_id": f"o{i}", "revenue": 20 + i, "currency": "USD"},
                            message=f"m{i}", at=at))
        if i % 10 == 3:  # a redelivery and a refund now and then
            facts.append(_event("Order Completed", {"order_id": f"o{i}", "revenue": 20 + i, "currency": "USD"},
                                message=f"m{i}", at=at))
            facts.append(_event("Order Refunded", {"order_id": f"o{i}"}, message=f"r{i}",
                                at=at + timedelta(hours=1)))
        if i == 30:
            facts.append(_event("Product Reviewed", {"product_id": "sku-1"}, message="rev", at=at))
            facts.append(_event("Product Viewed", {"product_id": "sku-1"}, message="view", at=at))

    def resolved(profile_id: str, fact: Event) -> bytes:
        return orjson.dumps({"profileId": profile_id, "event": orjson.Fragment(encode_event(fact)),
                             "resolvedAt": utcnow().isoformat()})

    assert await service.process_resolved([resolved(batched, f) for f in facts]) == len(facts) - 1  # the view
    for fact in facts:
        await service.handle_event(alone, fact)

    ledger_batched, _ = await store.load(batched)
    ledger_alone, _ = await store.load(alone)
    assert ledger_batched.balance == ledger_alone.balance > 0
    assert ledger_batched.tier == ledger_alone.tier == "gold"
    lines_batched = await store.lines_after(batched, 0, 1000)
    lines_alone = await store.lines_after(alone, 0, 1000)
    assert [(x.seq, x.event.kind, x.event.points, x.balance_after, x.event.at) for x in lines_batched] == [
        (x.seq, x.event.kind, x.event.points, x.balance_after, x.event.at) for x in lines_alone]
    # The same batch delivered again changes nothing; the stored lines replay to the stored snapshot.
    await service.process_resolved([resolved(batched, f) for f in facts])
    again, _ = await store.load(batched)
    assert again == ledger_batched
    assert replay(await store.all_events(batched), batched) == ledger_batched
