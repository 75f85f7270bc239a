"""Fault injection under steady load, verified from the outside.

A ``ChaosRun`` drives a steady stream of events through ingest's public ``/v1/batch`` — resending a batch
with the *same* message ids until it is acknowledged, as a real SDK does — while it kill -9s and restarts,
in turn, each service process and (on a private stack) Kafka, Cassandra and Redis. Afterwards it checks,
without looking inside any service:

- the log: every event acknowledged with a 200 is in ``events.raw`` (lost = acknowledged minus logged);
- the event store: every acknowledged event is in the customer's timeline exactly once (profile API);
- the profiles: each customer's ``orders_count`` and ``revenue_total`` equal what was acknowledged for them
  (an effect applied twice or never shows up here), and equal the profile rebuilt from the event store
  (``?as_of=``), when the profile service offers it;
- the messages: no idempotency key delivered twice in notify's log, none requested and never handled.

Infrastructure faults never touch the shared servers: ``private_stack`` starts a second Kafka, Cassandra and
Redis on free ports with their own home directory (Cassandra's storage and JMX ports included).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.procs import Fleet, free_port
from bench.stream import group_progress
from loyalist.devstack import Stack
from loyalist.settings import Settings

JSON = dict[str, Any]
INFRA_FAULTS = ("kafka", "cassandra", "redis")


@contextlib.contextmanager
def private_stack(base: Settings | None = None) -> Iterator[tuple[Settings, Stack]]:
    """Kafka, Cassandra, Redis and an SMTP sink of our own, on free ports, in a temporary home (jars shared
    read-only): the run needs nothing of the shared stack (notify's emails go to this sink, which is counted)."""
    base = base or Settings()
    home = Path(tempfile.mkdtemp(prefix="loyalist-chaos-"))
    settings = base.model_copy(update={
        "home": home, "jars_dir": base.jars_dir or base.state_dir / "jars",
        "kafka_port": free_port(), "kafka_controller_port": free_port(),
        "cassandra_port": free_port(), "cassandra_storage_port": free_port(), "cassandra_jmx_port": free_port(),
        "redis_port": free_port(), "smtp_port": free_port(), "smtp_sink_http_port": free_port(),
        # The single node stands in for the replicas of a production cluster (RF 3): it must not forget what it
        # acknowledged when killed, which only a synced commit log gives one node.
        "cassandra_commitlog_sync": "batch",
    })
    stack = Stack(settings, quiet=True)
    components = [*INFRA_FAULTS, "smtp"]
    try:
        stack.up(components)
        yield settings, stack
    finally:
        stack.down(components)
        # The services' logs outlive the temporary home: .loyalist/chaos-logs/<namespace>/ of the base stack.
        for logs in home.rglob("chaos-logs"):
            shutil.copytree(logs, base.state_dir / "chaos-logs", dirs_exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Fault:
    target: str
    downtime_s: float = 0.0  # kill until the process answers its readiness check again
    recovery_s: float | None = None  # kill until ingest acknowledges again (the customer-visible outage)
    acked_during: int = 0
    note: str = ""
    killed_at: str = ""  # wall clock (UTC) of the kill, to find it in the services' logs


@dataclass
class Report:
    acknowledged: int = 0
    acknowledged_orders: int = 0
    in_log: int = 0
    lost_from_log: int = 0
    log_duplicates: int = 0
    stored: int | None = None
    stored_duplicates: int | None = None
    lost_from_store: int | None = None
    profiles_checked: int = 0
    profile_mismatches: list[str] = field(default_factory=list)
    replay_mismatches: list[str] = field(default_factory=list)
    messages_requested: int | None = None
    messages_duplicated: int | None = None
    messages_unhandled: int | None = None
    faults: list[Fault] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing_samples: list[str] = field(default_factory=list)  # acknowledged, not in the event store
    duplicate_samples: list[str] = field(default_factory=list)  # stored more than once
    resends: int = 0
    drained: bool = True  # every consumer group caught up before the checks

    @property
    def lost(self) -> int:
        return self.lost_from_log + (self.lost_from_store or 0)

    @property
    def duplicates(self) -> int:
        return (self.stored_duplicates or 0) + (self.messages_duplicated or 0)

    def render(self) -> str:
        lines = [
            f"acknowledged events     {self.acknowledged} ({self.acknowledged_orders} orders, {self.resends} resends)",
            f"in events.raw           {self.in_log} distinct  (lost {self.lost_from_log}, "
            f"duplicate records {self.log_duplicates}: resends deduplicated downstream)",
            f"in the event store      {_n(self.stored)}  (missing {_n(self.lost_from_store)}, "
            f"duplicates {_n(self.stored_duplicates)})"
            + ("" if self.drained else "  <- processors still behind: missing is not yet stored, or lost"),
            f"profiles checked        {self.profiles_checked}  (wrong counts {len(self.profile_mismatches)}, "
            f"differ from replay {len(self.replay_mismatches)})",
            f"messages requested      {_n(self.messages_requested)}  (sent twice {_n(self.messages_duplicated)}, "
            f"never handled {_n(self.messages_unhandled)})",
            "",
            f"{'fault':<12}{'down (s)':>10}{'recovery (s)':>14}{'acked while recovering':>24}  note",
        ]
        for f in self.faults:
            rec = f"{f.recovery_s:.1f}" if f.recovery_s is not None else "—"
            lines.append(f"{f.target:<12}{f.downtime_s:>10.1f}{rec:>14}{f.acked_during:>24}  "
                         f"killed {f.killed_at} {f.note}")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.extend(f"missing: {m}" for m in self.missing_samples)
        lines.extend(f"stored twice: {m}" for m in self.duplicate_samples)
        lines.append(f"\nLOST {self.lost}   DUPLICATED {self.duplicates}")
        return "\n".join(lines)


def _n(v: int | None) -> str:
    return "not checked" if v is None else str(v)


class SteadyLoad:
    """Batches of events at a steady rate; a batch is resent unchanged until a 200 acknowledges it."""

    def __init__(self, url: str, write_key: str, *, rate: float = 200, batch: int = 20, users: int = 60,
                 prefix: str | None = None) -> None:
        self.url = url
        self.auth = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
        self.rate = rate
        self.batch = batch
        self.users = users
        self.prefix = prefix or f"chaos{secrets.token_hex(3)}"
        self.acked: dict[str, JSON] = {}
        self.resends = 0
        self.last_ack = 0.0
        self.ack_times: list[float] = []
        self._stop = asyncio.Event()
        self._n = 0

    def user(self, i: int) -> str:
        return f"{self.prefix}-u{i % self.users}"

    def email(self, i: int) -> str:
        return f"{self.prefix}-u{i % self.users}@chaos.loyalist.test"

    def make_batch(self) -> list[JSON]:
        events = []
        for _ in range(self.batch):
            i = self._n
            self._n += 1
            uid = self.user(i)
            mid = f"{self.prefix}-{i}"
            if i < self.users:  # everyone is identified (with an email address) and opts in to marketing first
                events.append({"type": "identify", "userId": uid, "messageId": mid,
                               "traits": {"email": self.email(i), "first_name": f"Chaos {i}"}})
                events.append({"type": "track", "event": "Subscribed", "userId": uid, "messageId": f"{mid}-optin",
                               "properties": {"channel": "email", "category": "marketing"}})
            elif i % 10 == 5:  # a checkout that is never completed: the abandoned-checkout journey reminds once
                events.append({"type": "track", "event": "Checkout Started", "userId": uid, "messageId": mid,
                               "properties": {"checkout_id": mid, "value": 30.0, "currency": "USD",
                                              "products": [{"product_id": "p1", "price": 30.0, "quantity": 1}]}})
            elif i % 3 == 0:
                events.append({"type": "track", "event": "Order Completed", "userId": uid, "messageId": mid,
                               "properties": {"order_id": mid, "total": float(10 + i % 7), "revenue": float(10 + i % 7),
                                              "currency": "USD"}})
            else:
                events.append({"type": "track", "event": "Product Viewed", "userId": uid, "messageId": mid,
                               "properties": {"product_id": f"p{i % 11}", "price": 5.0}})
        return events

    async def run(self) -> None:
        interval = self.batch / self.rate
        async with httpx.AsyncClient(timeout=15, headers={"Authorization": self.auth}) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                events = self.make_batch()
                await self._deliver(client, events)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                else:
                    next_at = time.monotonic()  # behind after an outage: continue at the rate, no burst

    async def _deliver(self, client: httpx.AsyncClient, events: list[JSON]) -> None:
        backoff = 0.2
        attempts = 0
        while True:
            if attempts:
                self.resends += 1
            attempts += 1
            try:
                resp = await client.post(f"{self.url}/v1/batch", json={"batch": events})
                if resp.status_code == 200:
                    acked_at = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
                    for e in events:
                        self.acked[e["messageId"]] = {**e, "_acked_at": acked_at, "_attempts": attempts}
                    self.last_ack = time.monotonic()
                    self.ack_times.append(self.last_ack)
                    return
            except httpx.HTTPError:
                pass
            if self._stop.is_set() and backoff > 5:
                return  # shutting down: an unacknowledged batch is simply not acknowledged
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0) if not self._stop.is_set() else backoff * 2

    def stop(self) -> None:
        self._stop.set()


async def read_log(settings: Settings, topic: str = "events.raw", key: str = "messageId") -> Counter[str]:
    """``key`` field of each record → number of records in the topic, from the beginning to the current end."""
    name = settings.topic(topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="chaos-verify",
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    counts: Counter[str] = Counter()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000, max_records=10_000)
            for tp, records in batch.items():
                for rec in records:
                    with contextlib.suppress(Exception):
                        counts[str(orjson.loads(rec.value).get(key))] += 1
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return counts


async def wait_drained(settings: Settings, timeout_s: float) -> dict[str, int]:
    """Wait until every consumer group of the namespace has committed up to the end of its topics; returns the
    groups still behind (and by how many records) when ``timeout_s`` ran out, else nothing."""
    deadline = time.monotonic() + timeout_s
    behind: dict[str, int] = {}
    while time.monotonic() < deadline:
        progress = await group_progress(settings)
        behind = {g: end - done for g, (done, end) in progress.items() if done < end}
        if not behind:  # no group at all: nothing to wait for
            return {}
        await asyncio.sleep(1)
    return behind


class ChaosRun:
    def __init__(self, fleet: Fleet, *, stack: Stack | None = None, rate: float = 200,
                 gap_s: float = 5, settle_s: float = 60) -> None:
        self.fleet = fleet
        self.stack = stack
        self.rate = rate
        self.gap_s = gap_s
        self.settle_s = settle_s
        self.report = Report()
        self.journey_ready = False

    async def _fault(self, load: SteadyLoad, target: str) -> Fault:
        fault = Fault(target, killed_at=datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3])
        acked_before = len(load.acked)
        killed = time.monotonic()
        if target in INFRA_FAULTS:
            assert self.stack is not None, "infrastructure faults need a private stack"
            await asyncio.to_thread(self.stack.kill9, target)
            await asyncio.to_thread(self.stack.start, target)
            await asyncio.to_thread(self.stack.wait_ready, target)
        else:
            svc = self.fleet.services[target]
            await asyncio.to_thread(svc.restart)
        fault.downtime_s = time.monotonic() - killed
        # recovered when ingest acknowledges a batch sent after the kill
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if load.last_ack > killed:
                break
            await asyncio.sleep(0.1)
        first_ack = next((t for t in load.ack_times if t > killed), None)
        fault.recovery_s = first_ack - killed if first_ack is not None else None
        if fault.recovery_s is None:
            fault.note = "ingest did not acknowledge again within 120 s"
        fault.acked_during = len(load.acked) - acked_before
        return fault

    async def run(self, targets: list[str]) -> Report:
        ingest = self.fleet.url("ingest")
        assert ingest is not None, "the chaos suite drives load through ingest"
        await self.create_journey()
        load = SteadyLoad(ingest, self.fleet.settings.dev_write_key, rate=self.rate)
        runner = asyncio.create_task(load.run())
        try:
            await asyncio.sleep(self.gap_s)
            for target in targets:
                if target not in INFRA_FAULTS and target not in self.fleet.services:
                    self.report.notes.append(f"{target}: not running, not faulted")
                    continue
                self.report.faults.append(await self._fault(load, target))
                await asyncio.sleep(self.gap_s)
        finally:
            load.stop()
            await asyncio.wait_for(runner, 120)
        self.report.resends = load.resends
        liveness = asyncio.create_task(self.watch_liveness())
        try:
            behind = await wait_drained(self.fleet.settings, self.settle_s)
        finally:
            liveness.cancel()
            await asyncio.gather(liveness, return_exceptions=True)
        if behind:
            self.report.drained = False
            self.report.notes.append(f"consumer groups still behind {self.settle_s:.0f}s after the load stopped: "
                                     + ", ".join(f"{g} by {n}" for g, n in sorted(behind.items())))
        await self.verify(load)
        return self.report

    async def watch_liveness(self) -> None:
        """While the groups drain, ask every service's /healthz now and then, as an orchestrator's liveness
        probe would: a 503 (a consume loop stuck or ended) is noted in the report, and the service logs once
        where its tasks wait."""
        seen: set[str] = set()
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                for name in sorted(self.fleet.services):
                    url = self.fleet.url(name)
                    if url is None or name in seen:
                        continue
                    with contextlib.suppress(httpx.HTTPError):
                        resp = await client.get(f"{url}/healthz")
                        if resp.status_code == 503:
                            seen.add(name)
                            self.report.notes.append(f"{name} /healthz 503 while draining: {resp.text[:200]}")
                await asyncio.sleep(10)

    async def create_journey(self) -> None:
        """An abandoned-checkout journey with a short first reminder and no second one: every acknowledged
        ``Checkout Started`` must end in exactly one message."""
        url = self.fleet.url("journeys")
        if url is None or self.fleet.url("notify") is None:
            self.report.notes.append("journeys or notify not running: messages not checked")
            return
        headers = {"Authorization": f"Bearer {self.fleet.settings.dev_api_token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            made = await c.post("/v1/journeys/from-template/abandoned_checkout", json={
                "id": "chaos_abandoned", "first_reminder_after": "PT2S", "second_reminder_after": "P30D",
                "holdout_percent": 0})
            active = await c.post("/v1/journeys/chaos_abandoned/activate")
        if made.status_code >= 300 or active.status_code >= 300:
            self.report.notes.append(f"could not create the chaos journey ({made.status_code} {made.text[:200]}, "
                                     f"{active.status_code}): messages not checked")
        else:
            self.journey_ready = True

    # ---- verification from the outside ---------------------------------------------------------------------
    async def verify(self, load: SteadyLoad) -> None:
        r = self.report
        r.acknowledged = len(load.acked)
        r.acknowledged_orders = sum(1 for e in load.acked.values() if e.get("event") == "Order Completed")
        logged = await read_log(self.fleet.settings)
        ours = {m: c for m, c in logged.items() if m.startswith(load.prefix + "-")}
        r.in_log = len(ours)
        r.lost_from_log = sum(1 for m in load.acked if m not in ours)
        r.log_duplicates = sum(c - 1 for c in ours.values() if c > 1)
        profile = self.fleet.url("profile")
        if profile is None:
            r.notes.append("profile service not running: event store and profiles not checked")
        else:
            await self.verify_profiles(load, profile)
        notify = self.fleet.url("notify")
        if notify is not None and self.journey_ready:
            await self.verify_messages(load, notify)

    async def verify_profiles(self, load: SteadyLoad, url: str) -> None:
        r = self.report
        per_user: dict[str, list[JSON]] = defaultdict(list)
        for e in load.acked.values():
            per_user[e["userId"]].append(e)
        headers = {"Authorization": f"Bearer {self.fleet.settings.dev_api_token}"}
        stored = 0
        dups = 0
        lost = 0
        # the replay is rebuilt from the event store up to now, and both are measured to the same day
        now = datetime.now(UTC)
        as_of = (now + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
        day = now.date().isoformat()
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            for uid, events in sorted(per_user.items()):
                ids = await self.timeline_ids(client, uid)
                if ids is None:
                    r.notes.append("the profile API has no readable /v1/profiles/{id}/events: event store not checked")
                    stored = -1
                    break
                counts = Counter(i for i in ids if i.startswith(load.prefix + "-"))
                stored += len(counts)
                dups += sum(c - 1 for c in counts.values() if c > 1)
                twice = [m for m, c in counts.items() if c > 1]
                r.duplicate_samples.extend(
                    f"{uid} {m} {load.acked[m].get('event') or load.acked[m].get('type')} acked "
                    f"{load.acked[m].get('_acked_at')} after {load.acked[m].get('_attempts')} attempt(s)"
                    for m in twice[:3] if m in load.acked)
                missing = [e for e in events if e["messageId"] not in counts]
                lost += len(missing)
                r.missing_samples.extend(
                    f"{uid} {e['messageId']} {e.get('event') or e.get('type')} acked {e.get('_acked_at')} "
                    f"{'(resent)' if e.get('_attempts', 1) > 1 else ''}" for e in missing[:3])
            if stored >= 0:
                r.stored, r.stored_duplicates, r.lost_from_store = stored, dups, lost
            for uid, events in sorted(per_user.items()):
                resp = await client.get(f"/v1/profiles/{uid}", params={"observation_date": day})
                r.profiles_checked += 1
                if resp.status_code != 200:
                    r.profile_mismatches.append(f"{uid}: GET → {resp.status_code}")
                    continue
                doc = resp.json()
                orders = [e for e in events if e.get("event") == "Order Completed"]
                want_revenue = round(sum(e["properties"]["total"] for e in orders), 2)
                got_revenue = round(float(doc.get("revenue_total") or 0), 2)
                if doc.get("orders_count") != len(orders) or abs(got_revenue - want_revenue) > 0.005:
                    r.profile_mismatches.append(f"{uid}: orders {doc.get('orders_count')} revenue {got_revenue}, "
                                                f"acknowledged {len(orders)} / {want_revenue}")
                replay = await client.get(f"/v1/profiles/{uid}", params={"as_of": as_of, "observation_date": day})
                if replay.status_code == 200:
                    rebuilt = replay.json()
                    for key in ("orders_count", "revenue_total", "first_order_at", "last_order_at", "rfm"):
                        if rebuilt.get(key) != doc.get(key):
                            r.replay_mismatches.append(
                                f"{uid}.{key}: live {doc.get(key)!r} replay {rebuilt.get(key)!r}")
                elif not any("as_of" in n for n in r.notes):
                    r.notes.append(f"?as_of= replay not available ({replay.status_code}): replay equality not checked")

    @staticmethod
    async def timeline_ids(client: httpx.AsyncClient, uid: str) -> list[str] | None:
        """Every messageId in a customer's stored timeline, following the API's paging."""
        ids: list[str] = []
        params: dict[str, Any] = {"limit": 500}
        for _ in range(200):
            resp = await client.get(f"/v1/profiles/{uid}/events", params=params)
            if resp.status_code != 200:
                return None
            body = resp.json()
            items = body.get("events") if isinstance(body, dict) else body
            if not isinstance(items, list):
                return None
            ids.extend(str(e.get("messageId") or e.get("message_id")) for e in items)
            cursor = body.get("next_cursor") or body.get("next") if isinstance(body, dict) else None
            if not cursor or not items:
                return ids
            params = {"limit": 500, "cursor": cursor}
        return ids

    async def verify_messages(self, load: SteadyLoad, url: str) -> None:
        """Per customer: as many handled reminders (distinct idempotency keys, sent or skipped with a reason) as
        acknowledged abandoned checkouts, no key sent twice, and no more emails in the mail sink than notify
        says it sent."""
        r = self.report
        expected: Counter[str] = Counter(e["userId"] for e in load.acked.values()
                                         if e.get("event") == "Checkout Started")
        deadline = time.monotonic() + self.settle_s
        headers = {"Authorization": f"Bearer {self.fleet.settings.dev_api_token}"}
        keys: dict[str, set[str]] = {}
        sent: dict[str, Counter[str]] = {}
        statuses: Counter[str] = Counter()
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            while True:
                keys, sent = {}, {}
                statuses.clear()
                for i in range(load.users):
                    uid = load.user(i)
                    resp = await client.get("/v1/messages", params={"user_id": uid, "limit": 500})
                    if resp.status_code != 200:
                        r.notes.append(f"notify GET /v1/messages → {resp.status_code}: messages not checked")
                        return
                    for m in resp.json().get("messages", []):
                        if m.get("templateId") != "abandoned_checkout":
                            continue
                        key = str(m.get("idempotencyKey"))
                        keys.setdefault(uid, set()).add(key)
                        statuses[f"{m.get('status')}:{m.get('reason') or ''}".rstrip(":")] += 1
                        if m.get("status") in ("sent", "delivered"):
                            sent.setdefault(uid, Counter())[key] += 1
                if all(len(keys.get(u, ())) >= n for u, n in expected.items()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(2)
        r.messages_requested = sum(expected.values())
        r.messages_unhandled = sum(max(0, n - len(keys.get(u, ()))) for u, n in expected.items())
        r.messages_duplicated = (sum(max(0, len(keys.get(u, ())) - n) for u, n in expected.items())
                                 + sum(c - 1 for per in sent.values() for c in per.values() if c > 1))
        sink = f"http://127.0.0.1:{self.fleet.settings.smtp_sink_http_port}/messages"
        try:
            per_address: Counter[str] = Counter()
            async with httpx.AsyncClient(timeout=30) as client:
                for i in range(load.users):
                    mails = (await client.get(sink, params={"to": load.email(i)})).json()
                    per_address[load.email(i)] = len(mails)
            extra = sum(max(0, per_address[load.email(i)] - len(sent.get(load.user(i), {})))
                        for i in range(load.users))
            r.messages_duplicated += extra
            r.notes.append(f"mail sink: {sum(per_address.values())} emails to chaos customers; "
                           f"notify sent {sum(len(v) for v in sent.values())}; outcomes {dict(statuses)}")
        except (httpx.HTTPError, ValueError) as exc:
            r.notes.append(f"mail sink not readable ({type(exc).__name__}): emails not counted")
