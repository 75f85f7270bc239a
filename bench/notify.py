"""Notify's SMTP path: messages/s from ``message.requests`` to a mail server, and the latency from a request being
produced to its email arriving (p50/p99).

A private SMTP server (aiosmtpd, in this process, on a free port) records when each email arrives and which request
it belongs to (the deterministic ``Message-ID`` notify derives from the request's idempotency key). Notify runs as a
real service process of a private namespace, pointed at that server.

What is sent (``--smtp-kind``):

- ``marketing`` (default): the abandoned-checkout email (cart items with images and prices, tracked links, open
  pixel, List-Unsubscribe headers) to a customer who opted in to marketing email, one customer per request. The
  customers' profile documents are written to Redis as the profile service writes them after a ``Subscribed``
  event (``consent.email.subscribed = true``), in a time zone where it is midday, so the whole policy runs —
  suppression, consent, the frequency cap's history read, quiet hours — and lets every request through.
- ``transactional``: the review-request email to an explicit ``to`` address, no profile (no opt-in needed; the
  shortest path).

1. throughput: ``--smtp-burst`` requests produced at once; rate = emails / (last arrival - first produce);
2. latency: ``--smtp-rate`` requests/s for ``--smtp-s`` seconds; latency = arrival - produce time of each request.

``python -m bench.notify`` runs it alone (its own namespace on the running infrastructure).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiosmtpd.controller import Controller

from bench.loadgen import percentiles
from bench.procs import Fleet, free_port
from loyalist.kafka import make_producer
from loyalist.redis import make_redis
from loyalist.settings import Settings
from loyalist.topics import MESSAGE_REQUESTS
from services.notify.domain.messages import message_id_for

JSON = dict[str, Any]


_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*<([^@>\r\n]+)@", re.MULTILINE | re.IGNORECASE)


class ArrivalLog:
    """An aiosmtpd handler that notes the arrival time of every message by its Message-ID."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.duplicates = 0
        self._lock = threading.Lock()
        self.changed = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # aiosmtpd's hook name
        now = time.time()
        content = envelope.original_content or envelope.content
        head = content[:content.find(b"\r\n\r\n")] if isinstance(content, bytes) else b""
        found = _MESSAGE_ID.search(head)  # the header only: a full parse per email would load this process
        local = found.group(1).decode() if found else ""
        with self._lock:
            if local in self.arrived:
                self.duplicates += 1
            else:
                self.arrived[local] = now
        self.changed.set()
        return "250 OK"


def midday_zone(now: datetime) -> str:
    """An IANA zone where it is about noon now (``Etc/GMT-3`` is UTC+3), so quiet hours hold nothing back."""
    offset = (12 - now.hour + 12) % 24 - 12  # -12 .. +11
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"


def customer(run: str, n: int, timezone: str) -> JSON:
    """A profile document as the profile service stores it, for a customer who opted in to marketing email."""
    pid = f"{run}-c{n}"
    return {
        "profile_id": pid, "user_id": f"user-{pid}", "email": f"{pid}@bench.loyalist.test", "phone": None,
        "timezone": timezone, "locale": "en-US", "traits": {"first_name": "Ada"},
        "consent": {"email": {"subscribed": True, "updated_at": "2024-01-01T00:00:00Z", "source": "bench"}},
        "cart": None, "engagement": {}, "segments": [], "orders_count": 1, "revenue_total": 59.0, "currency": "USD",
        "loyalty": {"balance": 0, "lifetime_points": 0, "tier": None, "expiring": []},
    }


async def put_customers(settings: Settings, run: str, numbers: range) -> None:
    timezone = midday_zone(datetime.now(UTC))
    client = make_redis(settings)
    try:
        for start in range(numbers.start, numbers.stop, 500):
            async with client.pipeline(transaction=False) as pipe:
                for n in range(start, min(start + 500, numbers.stop)):
                    doc = customer(run, n, timezone)
                    pipe.set(settings.redis_key("profile", doc["profile_id"]), orjson.dumps(doc), ex=3600)
                await pipe.execute()
    finally:
        await client.aclose()


def request(run: str, n: int, kind: str = "transactional") -> JSON:
    if kind == "marketing":
        return {
            "idempotencyKey": f"{run}-{n}", "profileId": f"{run}-c{n}", "channel": "email", "category": "marketing",
            "templateId": "abandoned_checkout", "journeyId": "bench", "nodeId": "n1", "requestedAt": None,
            "data": {"checkout_id": f"{run}-chk{n}", "currency": "USD",
                     "recovery_url": f"https://shop.example/cart/recover/{run}-chk{n}",
                     "items": [{"name": "Linen shirt", "image_url": "https://shop.example/i/1.jpg", "price": 59.0,
                                "quantity": 1},
                               {"name": "Canvas tote", "image_url": "https://shop.example/i/2.jpg", "price": 24.5,
                                "quantity": 2}]},
        }
    return {
        "idempotencyKey": f"{run}-{n}", "channel": "email", "category": "transactional",
        "templateId": "review_request", "to": {"email": f"bench-{n % 500}@bench.loyalist.test"},
        "data": {"order_id": f"{run}-o{n}"}, "requestedAt": None,
    }


async def produce(settings: Settings, run: str, numbers: range, rate: float | None,
                  kind: str = "transactional") -> dict[str, float]:
    """Produce requests (all at once, or paced at ``rate``/s); returns message id → produce time."""
    producer = make_producer(settings, client_id="bench-notify")
    await producer.start()
    sent: dict[str, float] = {}
    try:
        topic = settings.topic(MESSAGE_REQUESTS.name)
        started = time.monotonic()
        pending = []
        for i, n in enumerate(numbers):
            if rate:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            doc = request(run, n, kind)
            doc["requestedAt"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            sent[message_id_for(doc["idempotencyKey"])] = time.time()
            key = doc.get("profileId") or doc["to"]["email"]
            pending.append(await producer.send(topic, orjson.dumps(doc), key=key.encode()))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


async def wait_arrivals(log: ArrivalLog, wanted: dict[str, float], timeout_s: float) -> None:
    """Until every wanted message arrived or the timeout (the SMTP server runs in its own thread)."""
    deadline = time.monotonic() + timeout_s
    missing = set(wanted)
    while missing and time.monotonic() < deadline:
        log.changed.clear()
        missing = {m for m in missing if m not in log.arrived}
        if missing:
            await asyncio.to_thread(log.changed.wait, min(0.5, max(0.0, deadline - time.monotonic())))


async def measure(settings: Settings, log: ArrivalLog, args: argparse.Namespace,
                  say: Any = print) -> JSON:
    run = f"bn{int(time.time())}"
    kind = args.smtp_kind
    n_paced = int(args.smtp_rate * args.smtp_s)
    out: JSON = {"kind": kind}
    if kind == "marketing":  # one opted-in customer per request (the cap allows one marketing email per customer)
        await put_customers(settings, f"{run}w", range(20))
        await put_customers(settings, run, range(args.smtp_burst + n_paced))
    # warm-up: connections, templates, prepared statements
    warm = await produce(settings, f"{run}w", range(20), None, kind)
    await wait_arrivals(log, warm, 60)
    missing = len([m for m in warm if m not in log.arrived])
    if missing:
        return {"kind": kind, "not_measured": f"{missing} of {len(warm)} warm-up emails did not arrive in 60 s "
                                              "(notify skipped or failed them? see its delivery log)"}

    say(f"notify: {args.smtp_burst} {kind} emails produced at once ...")
    burst = await produce(settings, run, range(args.smtp_burst), None, kind)
    await wait_arrivals(log, burst, args.smtp_timeout_s)
    arrived = [log.arrived[m] for m in burst if m in log.arrived]
    if arrived:
        span = max(arrived) - min(burst.values())
        out["messages_per_s"] = round(len(arrived) / span, 1) if span > 0 else None
    else:
        out["messages_per_s"] = None
    out["burst"] = {"requests": len(burst), "delivered": len(arrived)}

    say(f"notify: {args.smtp_rate} emails/s for {args.smtp_s}s, request → SMTP server latency ...")
    n0 = args.smtp_burst
    paced = await produce(settings, run, range(n0, n0 + n_paced), args.smtp_rate, kind)
    await wait_arrivals(log, paced, args.smtp_timeout_s)
    latencies = [log.arrived[m] - t for m, t in paced.items() if m in log.arrived]
    out["latency"] = {**percentiles(latencies), "requests": len(paced), "offered_per_s": args.smtp_rate}
    out["p50_ms"] = out["latency"]["p50_ms"] if latencies else None
    out["p99_ms"] = out["latency"]["p99_ms"] if len(latencies) >= 0.99 * len(paced) else None
    if len(latencies) < len(paced):
        out["note"] = f"{len(paced) - len(latencies)} of {len(paced)} paced emails did not arrive in time"
    out["duplicates"] = log.duplicates
    return out


async def notify_phase(base: Settings, args: argparse.Namespace, say: Any = print) -> JSON:
    """Own namespace, own SMTP server, notify alone."""
    log = ArrivalLog()
    port = free_port()
    controller = Controller(log, hostname="127.0.0.1", port=port)
    controller.start()
    fleet = await asyncio.to_thread(Fleet.create, base, prefix="benchn", extra={"smtp_port": port})
    try:
        await asyncio.to_thread(fleet.start, ["notify"])
        if "notify" not in fleet.services:
            return {"not_measured": f"notify did not start: {fleet.failures.get('notify', '')[:300]}"}
        return await measure(fleet.settings, log, args, say)
    finally:
        fleet.stop()
        controller.stop()
        if not args.keep:
            try:
                await asyncio.to_thread(fleet.drop)
            except Exception as exc:  # the figures stand; a leftover namespace is only disk
                say(f"notify: could not drop {fleet.settings.namespace}: {exc}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smtp-kind", choices=("marketing", "transactional"), default="marketing",
                   help="marketing: abandoned-checkout email to opted-in customers; transactional: to an address")
    p.add_argument("--smtp-burst", type=int, default=2000, help="emails produced at once for the rate")
    p.add_argument("--smtp-rate", type=float, default=50, help="emails/s for the latency figure")
    p.add_argument("--smtp-s", type=float, default=10)
    p.add_argument("--smtp-timeout-s", type=float, default=120)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.notify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    result = asyncio.run(notify_phase(Settings(), args))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
