"""Notify's SMTP path: messages/s from ``message.requests`` to a mail server, and the latency from a request being
produced to its email arriving (p50/p99).

A private SMTP server (aiosmtpd, in this process, on a free port) records when each email arrives and which request
it belongs to (the deterministic ``Message-ID`` notify derives from the request's idempotency key). Notify runs as a
real service process of a private namespace, pointed at that server. Requests are transactional emails with an explicit
``to`` address, so consent, caps and quiet hours (which only shape marketing mail) do not hold any back: what is
measured is the delivery path itself — consume, delivery log, render, SMTP, outcome, commit.

1. throughput: ``--smtp-burst`` requests produced at once; rate = emails / (last arrival - first produce);
2. latency: ``--smtp-rate`` requests/s for ``--smtp-s`` seconds; latency = arrival - produce time of each request.

``python -m bench.notify`` runs it alone (its own namespace on the running infrastructure).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from email import message_from_bytes
from typing import Any

import orjson
from aiosmtpd.controller import Controller

from bench.loadgen import percentiles
from bench.procs import Fleet, free_port
from loyalist.kafka import make_producer
from loyalist.settings import Settings
from loyalist.topics import MESSAGE_REQUESTS
from services.notify.domain.messages import message_id_for

JSON = dict[str, Any]


class ArrivalLog:
    """An aiosmtpd handler that notes the arrival time of every message by its Message-ID."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.duplicates = 0
        self._lock = threading.Lock()
        self.changed = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # aiosmtpd's hook name
        now = time.time()
        message_id = str(message_from_bytes(envelope.original_content or envelope.content).get("Message-ID", ""))
        local = message_id.strip("<>").split("@", 1)[0]
        with self._lock:
            if local in self.arrived:
                self.duplicates += 1
            else:
                self.arrived[local] = now
        self.changed.set()
        return "250 OK"


def request(run: str, n: int) -> JSON:
    return {
        "idempotencyKey": f"{run}-{n}", "channel": "email", "category": "transactional",
        "templateId": "review_request", "to": {"email": f"bench-{n % 500}@bench.loyalist.test"},
        "data": {"order_id": f"{run}-o{n}"}, "requestedAt": None,
    }


async def produce(settings: Settings, run: str, numbers: range, rate: float | None) -> dict[str, float]:
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
            doc = request(run, n)
            doc["requestedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            sent[message_id_for(doc["idempotencyKey"])] = time.time()
            pending.append(await producer.send(topic, orjson.dumps(doc), key=doc["to"]["email"].encode()))
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
    out: JSON = {}
    # warm-up: connections, templates, prepared statements
    warm = await produce(settings, f"{run}w", range(20), None)
    await wait_arrivals(log, warm, 60)

    say(f"notify: {args.smtp_burst} transactional emails produced at once ...")
    burst = await produce(settings, run, range(args.smtp_burst), None)
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
    paced = await produce(settings, run, range(n0, n0 + int(args.smtp_rate * args.smtp_s)), args.smtp_rate)
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
