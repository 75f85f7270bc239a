"""HTTP load generator, run in its own process so its CPU does not count against the service measured:
``python -m bench.loadgen '<json spec>'`` prints one JSON result line.

Two shapes:
- ``closed``: ``concurrency`` workers send back to back for ``duration_s`` (maximum throughput);
- ``open``: requests start at a fixed ``rate`` whatever the answers do, and each latency is measured from the
  moment the request was *due* — so a stalled server shows up in the percentiles instead of silently lowering
  the offered load (no coordinated omission).

Requests are built from a ``body`` spec: ``batch`` (``batch_size`` events per ``/v1/batch``), ``track`` (one
event) or ``get`` (cycling through ``paths``).

>>> percentiles([0.001 * i for i in range(1, 101)])["p99_ms"]
99.0
>>> ev = make_event({"events": ["Order Completed"], "users": 10, "prefix": "b"}, 3)
>>> (ev["userId"], ev["messageId"], ev["event"])
('b-u3', 'b-3', 'Order Completed')
"""

from __future__ import annotations

import asyncio
import base64
import math
import sys
import time
from collections import Counter
from typing import Any

import orjson

JSON = dict[str, Any]


def percentiles(latencies_s: list[float]) -> JSON:
    """p50/p90/p99/max in milliseconds (nearest-rank)."""
    if not latencies_s:
        return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    xs = sorted(latencies_s)

    def rank(q: float) -> float:
        idx = max(0, min(len(xs) - 1, math.ceil(q * len(xs)) - 1))  # the ⌈q·n⌉-th smallest
        return round(xs[idx] * 1000, 3)

    return {"count": len(xs), "p50_ms": rank(0.50), "p90_ms": rank(0.90), "p99_ms": rank(0.99),
            "max_ms": round(xs[-1] * 1000, 3)}


def make_event(spec: JSON, i: int) -> JSON:
    """Event number ``i`` of a run: users cycle through a pool, names through the mix; message ids carry the
    run prefix so results can be told apart from anyone else's traffic."""
    names: list[str] = spec.get("events") or ["Product Viewed"]
    prefix = spec.get("prefix", "bench")
    users = int(spec.get("users", 1000))
    per_user = int(spec.get("events_per_user", 0))
    # events_per_user > 0: a growing population, each user sending that many events (fresh profiles keep
    # entering segments and journeys); otherwise a fixed pool.
    user = i // per_user if per_user else i % users
    name = names[i % len(names)]
    event: JSON = {
        "type": "track", "event": name, "userId": f"{prefix}-u{user}", "messageId": f"{prefix}-{i}",
        "properties": {"sku": f"SKU-{i % 97}", "price": 10 + i % 50, "currency": "USD"},
        "context": {"library": {"name": "bench.loadgen"}},
    }
    if name == "Order Completed":
        event["properties"] = {"order_id": f"{prefix}-o{i}", "total": 20 + i % 80, "revenue": 20 + i % 80,
                               "currency": "USD", "products": [{"sku": f"SKU-{i % 97}", "price": 20, "quantity": 1}]}
    if name == "Checkout Started":
        event["properties"] = {"checkout_id": f"{prefix}-c{user}", "value": 42.0, "currency": "USD",
                               "products": [{"product_id": "p1", "sku": "SKU-1", "price": 42.0, "quantity": 1}]}
    return event


class Requests:
    """Builds request ``n`` of a run from the body spec."""

    def __init__(self, spec: JSON) -> None:
        self.spec = spec
        self.base = spec["url"].rstrip("/")
        self.kind = spec["body"]["kind"]
        self.headers = dict(spec.get("headers", {}))
        if "write_key" in spec:
            token = base64.b64encode(f"{spec['write_key']}:".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        if self.kind != "get":
            self.headers["Content-Type"] = "application/json"
        self.batch_size = int(spec["body"].get("batch_size", 1))

    def events_per_request(self) -> int:
        return self.batch_size if self.kind == "batch" else (1 if self.kind == "track" else 0)

    def build(self, n: int) -> tuple[str, str, bytes | None]:
        body = self.spec["body"]
        if self.kind == "batch":
            events = [make_event(body, n * self.batch_size + k) for k in range(self.batch_size)]
            return "POST", f"{self.base}/v1/batch", orjson.dumps({"batch": events})
        if self.kind == "track":
            ev = make_event(body, n)
            ev.pop("type")
            return "POST", f"{self.base}/v1/track", orjson.dumps(ev)
        paths: list[str] = body["paths"]
        return "GET", f"{self.base}{paths[n % len(paths)]}", None


async def run(spec: JSON) -> JSON:
    import aiohttp

    reqs = Requests(spec)
    duration = float(spec["duration_s"])
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    ok_requests = 0
    counter = 0
    warm_sent = 0
    warm_ok = 0
    concurrency = int(spec.get("concurrency", 32))
    connector = aiohttp.TCPConnector(limit=max(concurrency, int(spec.get("max_in_flight", 256))), force_close=False)
    timeout = aiohttp.ClientTimeout(total=float(spec.get("timeout_s", 30)))
    first_error: str | None = None

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=reqs.headers) as session:

        async def one(n: int, due: float) -> None:
            nonlocal ok_requests, first_error, warm_ok
            method, url, data = reqs.build(n)
            try:
                async with session.request(method, url, data=data) as resp:
                    text = await resp.read()
                    if due < measured_from:
                        warm_ok += resp.status == 200
                        return  # a warm-up request
                    statuses[str(resp.status)] += 1
                    if resp.status == 200:
                        ok_requests += 1
                        latencies.append(time.perf_counter() - due)
                    elif first_error is None:
                        first_error = f"{resp.status} {text[:300].decode(errors='replace')}"
            except Exception as exc:
                errors[type(exc).__name__] += 1
                if first_error is None:
                    first_error = f"{type(exc).__name__}: {exc}"

        # A run may start with a warm-up under the same load whose requests are not counted: the client opens its
        # connections then (hundreds at once at the start of a paced run), and a freshly started server or broker
        # (the JVM's JIT, the first produce to a new topic) reaches its steady speed, instead of in the window.
        warmup = float(spec.get("warmup_s", 0))
        started = time.perf_counter()
        measured_from = started + warmup
        end = started + warmup + duration
        if spec["shape"] == "closed":

            async def worker() -> None:
                nonlocal counter, warm_sent
                while (now := time.perf_counter()) < end:
                    n = counter
                    counter += 1
                    warm_sent += now < measured_from
                    await one(n, now)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rate = float(spec["rate"])
            max_in_flight = int(spec.get("max_in_flight", 256))
            in_flight: set[asyncio.Task[None]] = set()
            dropped = 0
            while True:
                due = started + counter / rate
                if due >= end:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                warm_sent += due < measured_from
                if len(in_flight) >= max_in_flight:
                    if due >= measured_from:
                        dropped += 1  # the server is this far behind: count it, do not queue unboundedly
                    counter += 1
                    continue
                task = asyncio.create_task(one(counter, due))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                counter += 1
            if in_flight:
                await asyncio.wait(in_flight)
            if dropped:
                errors["not_sent_server_behind"] += dropped
        elapsed = time.perf_counter() - measured_from

    return {
        "requests": counter - warm_sent, "ok_requests": ok_requests, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(ok_requests / elapsed, 1) if elapsed else 0.0,
        "events_acknowledged": ok_requests * reqs.events_per_request(),
        "events_per_s": round(ok_requests * reqs.events_per_request() / elapsed, 1) if elapsed else 0.0,
        "warmup_s": warmup, "warmup_events_acknowledged": warm_ok * reqs.events_per_request(),
        "statuses": dict(statuses), "errors": dict(errors), "first_error": first_error,
        "latency": percentiles(latencies),
    }


async def run_in_process(spec: JSON, timeout_s: float | None = None) -> JSON:
    """Run a load spec in a child ``python -m bench.loadgen`` process and return its result."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", orjson.dumps(spec).decode(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    limit = timeout_s or float(spec["duration_s"]) + 60
    out, err = await asyncio.wait_for(proc.communicate(), limit)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return orjson.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(spec))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
