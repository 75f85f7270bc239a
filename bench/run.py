"""``python -m bench``: every Loyalist figure next to a raw baseline measured in the same run.

The run never touches the stack's own data: it creates private namespaces (topics, keyspace, Redis prefix)
on the running servers, starts its own service processes on free ports, and removes the namespaces after.

Phases (a few minutes in total):
1. ingest alone (namespace A): ``/v1/batch`` events/s and ``/v1/track`` req/s with p50/p99 from a load
   generator process, each after a warm-up under the same load that is not counted; then the processors are
   started on the backlog this left and their events/s measured from their consumer groups' committed offsets;
2. ingest and profile only (namespace A2): the steady load and the API run of phase 3, to tell the profile
   processor's own latency apart from what sharing two cores with every other service costs it;
3. the whole pipeline (namespace B): a steady 1,000 events/s for ``--steady-s`` seconds while taps on
   ``profile.changed``, ``segment.membership`` and ``message.requests`` time every output against the moment
   ingest accepted its event; then the profile API at 1,000 req/s; replay; memory of every process;
4. notify's SMTP path alone (namespace C);
5. baselines — raw Kafka produce, Kafka round trip, Redis GET, Cassandra writes (``bench.baselines``), last
   because the load they put on Kafka and Cassandra would slow whatever came right after them.

A section whose service is not there (yet) or fails says why instead of a number.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.baselines import measure_all
from bench.loadgen import percentiles, run_in_process
from bench.notify import add_arguments as add_notify_arguments
from bench.notify import notify_phase
from bench.procs import (
    REPO,
    CpuMeter,
    Fleet,
    available_services,
    fleet_pids,
    infra_pids,
    rss_bytes,
    service_exists,
)
from bench.stream import Tap, group_progress, topic_size
from loyalist.settings import Settings

JSON = dict[str, Any]

TARGETS: dict[str, tuple[str, float, str]] = {
    # key: (figure, target, comparison)
    "ingest.batch_events_per_s": ("ingest /v1/batch events/s", 20_000, ">="),
    "ingest.track_requests_per_s": ("ingest /v1/track req/s", 3_000, ">="),
    "ingest.track_p99_ms": ("ingest /v1/track p99 ms", 25, "<="),
    "funnel.freshness.p99_ms": ("event → profile p99 ms, funnel mix", 500, "<="),
    "funnel.segment.p99_ms": ("event → segment.entered p99 ms, funnel mix", 1_000, "<="),
    "funnel.trigger.p99_ms": ("event → message request p99 ms, funnel mix", 1_000, "<="),
    "freshness.p99_ms": ("event → profile p99 ms, stress mix", 500, "<="),
    "segment.p99_ms": ("event → segment.entered p99 ms, stress mix", 1_000, "<="),
    "trigger.p99_ms": ("event → message request p99 ms, stress mix", 1_000, "<="),
    "timers.lateness_p99_ms": ("journey timer lateness p99 ms, funnel mix", 1_000, "<="),
    "profile_api.p99_ms": ("profile API p99 ms @1k req/s", 10, "<="),
    "processor.profile_events_per_s": ("profile processor events/s", 5_000, ">="),
}

# The stress mix: every user views, adds, starts a checkout and orders (4 events), so every user enters the
# bench segment and gets a message: 250 orders and 250 messages a second at 1,000 events/s.
STEADY_EVENTS = ["Product Viewed", "Product Added", "Checkout Started", "Order Completed"]
# The funnel mix: 20 events per user, two users per cycle. One browses, starts a checkout and orders; the other
# browses and abandons a checkout. At 1,000 events/s: 50 checkouts and 25 orders a second (90,000 orders an
# hour), still more buying per event than most shops' trackers see.
FUNNEL_EVENTS_PER_USER = 20
FUNNEL_EVENTS = (["Product Viewed"] * 13 + ["Product Added"] * 3 + ["Product Viewed"] * 2
                 + ["Checkout Started", "Order Completed"]
                 + ["Product Viewed"] * 16 + ["Product Added"] * 3 + ["Checkout Started"])


def not_measured(why: str) -> JSON:
    return {"not_measured": why}


def missing(fleet: Fleet, service: str) -> str:
    """Why a service is not running in a fleet, in one line."""
    why = fleet.failures.get(service) or f"services/{service} is not there yet"
    return f"{service} is not running: {why[:300]}"


def say(msg: str) -> None:
    print(msg, flush=True)


def basic_auth(write_key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()}


# ---- phase 2: ingest alone, then processor throughput on its backlog --------------------------------------------
async def ingest_phase(settings: Settings, fleet: Fleet, args: argparse.Namespace) -> JSON:
    url = fleet.url("ingest")
    if url is None:
        return not_measured(missing(fleet, "ingest"))
    out: JSON = {}
    say(f"ingest: /v1/batch, {args.batch_size} events per request, {args.batch_concurrency} connections, "
        f"{args.ingest_s}s ...")
    batch = await run_in_process({
        "shape": "closed", "url": url, "write_key": settings.dev_write_key, "concurrency": args.batch_concurrency,
        "duration_s": args.ingest_s, "warmup_s": args.warmup_s,
        "body": {"kind": "batch", "batch_size": args.batch_size, "events": STEADY_EVENTS, "users": 20_000,
                 "prefix": "ib"},
    })
    out["batch"] = batch
    out["batch_events_per_s"] = batch["events_per_s"] if batch["ok_requests"] else None
    say(f"ingest: /v1/track, {args.track_concurrency} connections, {args.ingest_s}s ...")
    track = await run_in_process({
        "shape": "closed", "url": url, "write_key": settings.dev_write_key, "concurrency": args.track_concurrency,
        "duration_s": args.ingest_s, "warmup_s": args.warmup_s,
        "body": {"kind": "track", "events": STEADY_EVENTS, "users": 20_000, "prefix": "it"},
    })
    out["track"] = track
    out["track_requests_per_s"] = track["requests_per_s"] if track["ok_requests"] else None
    out["track_p50_ms"] = track["latency"]["p50_ms"]
    out["track_p99_ms"] = track["latency"]["p99_ms"]
    out["events_in_log"] = await topic_size(settings, "events.raw")
    out["acknowledged"] = sum(run["events_acknowledged"] + run["warmup_events_acknowledged"] for run in (batch, track))
    if out["batch_events_per_s"] is None:
        out["note"] = f"no batch request succeeded: {batch['first_error']}"
    return out


async def drain_rates(settings: Settings, prefixes: tuple[str, ...], seconds: float) -> JSON:
    """Watch the namespace's consumer groups whose name starts with one of ``prefixes`` for up to ``seconds``
    (or until none is behind) and give each one's rate: records committed per second from its first progress
    to the moment it caught up (or the window closed)."""
    def wanted(group: str) -> bool:
        return any(group.startswith(f"{settings.namespace}-{p}") for p in prefixes)

    samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        progress = {g: v for g, v in (await group_progress(settings)).items() if wanted(g)}
        samples.append((time.monotonic(), progress))
        if len(samples) > 2 and progress and all(done >= end for done, end in progress.values()):
            break
        await asyncio.sleep(1)
    groups: JSON = {}
    for group in sorted({g for _, p in samples for g in p}):
        series = [(t, p[group][0], p[group][1]) for t, p in samples if group in p]
        first = next((i for i in range(1, len(series)) if series[i][1] > series[0][1]), None)
        done, end = series[-1][1], series[-1][2]
        if first is None:
            groups[group] = {"events_per_s": None, "committed": done, "end": end, "lag": end - done}
            continue
        t_start, c_start = series[first - 1][0], series[first - 1][1]
        last = next((i for i in range(first, len(series)) if series[i][1] >= series[i][2]), len(series) - 1)
        t_last, c_last = series[last][0], series[last][1]
        rate = (c_last - c_start) / (t_last - t_start) if t_last > t_start else None
        groups[group] = {"events_per_s": round(rate, 1) if rate is not None else None, "committed": done,
                         "end": end, "lag": end - done, "caught_up": series[last][1] >= series[last][2]}
    return groups


async def start_profile(fleet: Fleet, layout: str) -> None:
    """The profile service as one process, or (``split``) one worker process per stage
    (``LOYALIST_PROFILE_STAGES``), as a deployment scales them: each stage's rate is then its own, and one stage's
    CPU work does not delay the other's I/O on a shared event loop (identity lookups took ~17 ms in a process that
    also folds, ~2 ms in one of their own)."""
    if layout != "split":
        await asyncio.to_thread(fleet.start, ["profile"])
        return
    await asyncio.to_thread(fleet.start, ["profile"], LOYALIST_PROFILE_STAGES="resolve")
    if "profile" in fleet.services:
        for stage in ("fold", "loyalty"):
            await asyncio.to_thread(fleet.start_replica, "profile", LOYALIST_PROFILE_STAGES=stage)


async def processor_phase(settings: Settings, fleet: Fleet, args: argparse.Namespace) -> JSON:
    """The profile processor alone on the backlog ingest left (each processor's own rate, not shared cores),
    then the downstream processors on what it emitted; rates from the consumer groups' committed offsets."""
    if not service_exists("profile"):
        return not_measured("services/profile is not there yet")
    say(f"processors: profile alone on a backlog of {await topic_size(settings, 'events.raw')} events "
        f"({'one process per stage' if args.profile_layout == 'split' else 'one process'}), "
        f"measuring for up to {args.drain_s}s ...")
    await start_profile(fleet, args.profile_layout)
    if "profile" not in fleet.services:
        return not_measured(f"profile did not start: {fleet.failures.get('profile', '')[:400]}")
    meter = cpu_meter(fleet)
    meter.start()
    out: JSON = {"groups": await drain_rates(settings, ("profile",), args.drain_s)}
    out["cpu"] = meter.stop()
    downstream = [n for n in ("segmenter", "journeys", "notify") if service_exists(n)]
    if downstream:
        say(f"processors: {', '.join(downstream)} on what profile emitted, measuring for up to {args.drain_s}s ...")
        await asyncio.to_thread(fleet.start, downstream)
        out["groups"].update(await drain_rates(settings, tuple(downstream), args.drain_s))
    # The profile processor is two stages: the resolver (events.raw) and the folder (profile.fold); an event is
    # processed once folded, so the folder's rate is the processor's.
    profile_group = f"{settings.namespace}-profile-fold"
    rate = out["groups"].get(profile_group, {}).get("events_per_s")
    out["profile_events_per_s"] = rate
    out["profile_layout"] = args.profile_layout
    out["profile_resolve_events_per_s"] = out["groups"].get(f"{settings.namespace}-profile-resolve", {}).get(
        "events_per_s")
    if rate is None:
        out["note"] = f"no committed offsets seen for group {profile_group}: groups {sorted(out['groups'])}"
    return out


# ---- phase 3: the whole pipeline at a steady rate -------------------------------------------------------------
async def create_bench_segment(client: httpx.AsyncClient) -> str:
    """A rule segment every bench customer enters with their first order."""
    resp = await client.post("/v1/segments", json={
        "name": "bench buyers", "description": "customers with an order (bench)",
        "rule": {"field": "orders_count", "op": "gte", "value": 1},
    })
    if resp.status_code >= 300:
        raise RuntimeError(f"POST /v1/segments → {resp.status_code} {resp.text[:300]}")
    return str(resp.json().get("id") or resp.json().get("segment_id"))


async def create_active_journey(client: httpx.AsyncClient, definition: JSON) -> str:
    resp = await client.post("/v1/journeys", json=definition)
    if resp.status_code >= 300:
        raise RuntimeError(f"POST /v1/journeys → {resp.status_code} {resp.text[:300]}")
    journey_id = str(resp.json().get("id") or resp.json().get("journey_id"))
    act = await client.post(f"/v1/journeys/{journey_id}/activate")
    if act.status_code >= 300:
        raise RuntimeError(f"activate → {act.status_code} {act.text[:300]}")
    return journey_id


async def create_bench_journey(client: httpx.AsyncClient) -> str:
    """A journey that requests a message as soon as a checkout starts (no delay node)."""
    return await create_active_journey(client, {
        "name": "bench trigger", "description": "a message request as soon as a checkout starts (bench)",
        "entry": {"type": "event", "event": "Checkout Started", "key": "checkout_id"},
        "reentry": {"policy": "always"}, "start": "send",
        "nodes": [{"id": "send", "type": "send", "channel": "email", "template": "abandoned_checkout",
                   "data": {"checkout_id": "$entry.properties.checkout_id"}, "next": "end"},
                  {"id": "end", "type": "exit"}],
    })


TIMER_DELAY_S = 5


async def create_bench_timer_journey(client: httpx.AsyncClient) -> str:
    """A journey that waits ``TIMER_DELAY_S`` after each checkout starts and then ends: a durable timer per
    checkout and nothing downstream, so the timers' own lateness is measured."""
    return await create_active_journey(client, {
        "name": "bench timers", "description": f"a {TIMER_DELAY_S}-second timer per checkout (bench)",
        "entry": {"type": "event", "event": "Checkout Started", "key": "checkout_id"},
        "reentry": {"policy": "always"}, "start": "wait",
        "nodes": [{"id": "wait", "type": "delay", "duration": f"PT{TIMER_DELAY_S}S", "next": "end"},
                  {"id": "end", "type": "exit"}],
    })


def timer_metrics(text: str) -> JSON:
    """Timer wake-ups fired and the lateness histogram (due → step) from the journeys service's /metrics.

    >>> timer_metrics('loyalist_journey_timers_fired_total{kind="delay"} 3.0\\n'
    ...               'loyalist_journey_timer_lateness_seconds_bucket{le="0.5"} 2.0\\n'
    ...               'loyalist_journey_timer_lateness_seconds_bucket{le="+Inf"} 3.0\\n')
    {'fired': 3.0, 'buckets': [(0.5, 2.0), (inf, 3.0)]}
    """
    from prometheus_client.parser import text_string_to_metric_families

    fired = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loyalist_journey_timers_fired_total":
                fired += sample.value
            elif sample.name == "loyalist_journey_timer_lateness_seconds_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return {"fired": fired, "buckets": sorted(buckets.items())}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile``: linear interpolation inside the bucket holding the quantile.

    >>> histogram_quantile(0.5, [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (float("inf"), 20.0)])
    0.5
    >>> histogram_quantile(0.99, [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (float("inf"), 20.0)])
    0.99
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_le  # beyond the last finite bound: that bound is what is known
            width = count - lower_count
            return round(lower_le + (le - lower_le) * ((rank - lower_count) / width if width else 1.0), 4)
        lower_le, lower_count = le, count
    return None


class TimerWatch:
    """Samples the journeys service's timer metrics every half second from before a load until its timers have
    fired: the rate is taken between the first and the last wake-up seen, not over the wait."""

    def __init__(self, journeys_url: str, headers: dict[str, str]) -> None:
        self.client = httpx.AsyncClient(base_url=journeys_url, headers=headers, timeout=10)
        self.samples: list[tuple[float, JSON]] = []
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> JSON:
        metrics = timer_metrics((await self.client.get("/metrics")).text)
        self.samples.append((time.monotonic(), metrics))
        return metrics

    async def start(self) -> None:
        await self.sample()

        async def loop() -> None:
            while True:
                await asyncio.sleep(0.5)
                with contextlib.suppress(httpx.HTTPError):
                    await self.sample()

        self._task = asyncio.create_task(loop())

    async def finish(self, expected: int, wait_s: float) -> JSON:
        """Wait until ``expected`` timers fired since :meth:`start` (or ``wait_s`` passed); rate and lateness."""
        deadline = time.monotonic() + wait_s
        before = self.samples[0][1]
        while time.monotonic() < deadline:
            if self.samples[-1][1]["fired"] - before["fired"] >= expected:
                break
            await asyncio.sleep(0.5)
        if self._task is not None:
            self._task.cancel()
        await self.client.aclose()
        fired = self.samples[-1][1]["fired"] - before["fired"]
        moving = [(t, m["fired"]) for t, m in self.samples if m["fired"] > before["fired"]]
        first = next(((t, f) for t, f in moving), None)
        last = next(((t, f) for t, f in moving if f == moving[-1][1]), None) if moving else None
        rate = None
        if first and last and last[0] > first[0]:
            rate = round((last[1] - first[1]) / (last[0] - first[0]), 1)
        base = dict(before["buckets"])
        delta = [(le, count - base.get(le, 0.0)) for le, count in self.samples[-1][1]["buckets"]]
        within_1s = next((count for le, count in delta if le == 1.0), None)
        total = delta[-1][1] if delta else 0.0
        out: JSON = {
            "fired": int(fired), "expected": expected, "delay_s": TIMER_DELAY_S, "fired_per_s": rate,
            "lateness_p50_ms": _ms(histogram_quantile(0.5, delta)),
            "lateness_p99_ms": _ms(histogram_quantile(0.99, delta)),
            "share_within_1s": round(within_1s / total, 4) if within_1s is not None and total else None,
            "source": "the journeys service's loyalist_journey_timer_lateness_seconds histogram (due → step), "
                      "quantiles interpolated within its buckets",
        }
        if expected and fired < 0.99 * expected:
            out["note"] = f"only {int(fired)} of {expected} timers fired within {wait_s:.0f}s after the load"
            out["lateness_p99_ms"] = None
        return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def freshness_stamp(prefix: str) -> Any:
    """A ``profile.changed`` update folds one or more new events of a profile: each of them counts, with the
    latency of the oldest (when ingest accepted it) — an upper bound for the others."""
    def stamp(v: JSON) -> tuple[str, int] | None:
        cause = v.get("cause") or {}
        if not str(cause.get("messageId", "")).startswith(prefix):
            return None
        first = cause.get("firstReceivedAt") or cause.get("receivedAt")
        return (str(first), int(cause.get("events") or 1)) if first else None
    return stamp


def tap_result(tap: Tap, expected: int, window_s: float) -> JSON:
    res: JSON = {**percentiles(tap.latencies), "expected": expected, "records_on_topic": tap.records}
    seen = len(tap.latencies)
    if expected and seen < 0.99 * expected:
        # the missing outputs are slower than the window: p99 is not known, only that it is beyond it
        res["note"] = (f"only {seen} of {expected} outputs arrived within {window_s:.0f}s after the load; "
                       f"p99 is above {window_s * 1000:.0f} ms")
        res["p99_ms"] = None
    return res


def describe_mix(names: list[str], per_user: int) -> JSON:
    """What a mix sends, per user and per 1,000 events.

    >>> describe_mix(STEADY_EVENTS, 4)["per_1000_events"]["Order Completed"]
    250.0
    """
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    return {"events_per_user": per_user, "users_per_cycle": len(names) // per_user,
            "per_1000_events": {n: round(1000 * c / len(names), 1) for n, c in counts.items()}}


def expected_outputs(names: list[str], acknowledged: int) -> JSON:
    """Outputs the first ``acknowledged`` events of a mix must cause: a profile update counted per event, a
    segment entry per order (the bench segment is *orders_count >= 1*; one order per ordering user), a message
    request per checkout (the bench journey sends on every ``Checkout Started``).

    >>> expected_outputs(STEADY_EVENTS, 10)
    {'freshness': 10, 'segment': 2, 'trigger': 2}
    """
    def count(name: str) -> int:
        return sum(1 for i in range(acknowledged) if names[i % len(names)] == name)

    return {"freshness": acknowledged, "segment": count("Order Completed"), "trigger": count("Checkout Started")}


async def steady_run(settings: Settings, fleet: Fleet, args: argparse.Namespace, results: JSON,
                     setup_notes: dict[str, str], *, mix: list[str], events_per_user: int, prefix: str,
                     label: str) -> JSON:
    """``args.rate`` events/s of ``mix`` for ``args.steady_s`` s through ingest; fills ``results`` with the
    freshness, segment and trigger latencies (``eventAcceptedAt`` → output on the topic) and returns the load
    generator's result."""
    taps: dict[str, Tap] = {}
    if fleet.url("profile"):
        taps["freshness"] = Tap(settings, "profile.changed", freshness_stamp(prefix))
    if fleet.url("segmenter"):
        taps["segment"] = Tap(settings, "segment.membership",
                              lambda v: v.get("eventAcceptedAt") if v.get("change") == "entered" else None)
    if fleet.url("journeys"):
        taps["trigger"] = Tap(settings, "message.requests", lambda v: v.get("eventAcceptedAt"))
    for tap in taps.values():
        await tap.start()
    per_request = 20
    say(f"pipeline ({label}): steady {args.rate} events/s ({per_request} per /v1/batch) for {args.steady_s}s, "
        f"timing outputs on {', '.join(t.topic for t in taps.values()) or 'no topic (no processor)'} ...")
    meter = cpu_meter(fleet)
    meter.start()
    try:
        steady: JSON = await run_in_process({
            "shape": "open", "url": fleet.url("ingest"), "write_key": settings.dev_write_key,
            "rate": args.rate / per_request, "duration_s": args.steady_s, "max_in_flight": 64,
            "body": {"kind": "batch", "batch_size": per_request, "events": mix, "events_per_user": events_per_user,
                     "prefix": prefix},
        })
        acknowledged = steady["events_acknowledged"]
        expected = expected_outputs(mix, acknowledged)
        # let the tail arrive: stop when every tap has what it expects or the window closes
        deadline = time.monotonic() + args.tail_s

        def waiting() -> bool:
            return any(len(t.latencies) < expected[k] for k, t in taps.items() if k not in setup_notes)

        while time.monotonic() < deadline:
            if not waiting():
                break
            await asyncio.sleep(0.5)
        steady["cpu"] = meter.stop()
        for key in ("freshness", "segment", "trigger"):
            if key in setup_notes:
                results[key] = not_measured(setup_notes[key])
            elif key in taps:
                results[key] = tap_result(taps[key], expected[key], args.tail_s)
                results[key]["offered_events_per_s"] = args.rate
                results[key]["ingest_acknowledged"] = acknowledged
                results[key]["ingest_p99_ms"] = steady["latency"]["p99_ms"]
            else:
                service = {"freshness": "profile", "segment": "segmenter", "trigger": "journeys"}[key]
                results[key] = not_measured(missing(fleet, service))
        if taps.get("segment") is not None and not taps["segment"].latencies and "segment" not in setup_notes:
            results["segment"]["note"] = "no segment.entered carried eventAcceptedAt"
    finally:
        for tap in taps.values():
            await tap.stop()
    return steady


async def pipeline_phase(settings: Settings, fleet: Fleet, args: argparse.Namespace, results: JSON,
                         *, replay: bool = True, funnel: bool = True) -> None:
    ingest = fleet.url("ingest")
    headers = {"Authorization": f"Bearer {settings.dev_api_token}"}
    why_no_ingest = missing(fleet, "ingest")
    setup_notes: dict[str, str] = {}
    if fleet.url("segmenter"):
        async with httpx.AsyncClient(base_url=fleet.url("segmenter") or "", headers=headers, timeout=20) as c:
            try:
                await create_bench_segment(c)
            except Exception as exc:
                setup_notes["segment"] = f"could not create the bench segment: {exc}"
    if fleet.url("journeys"):
        async with httpx.AsyncClient(base_url=fleet.url("journeys") or "", headers=headers, timeout=20) as c:
            try:
                await create_bench_journey(c)
            except Exception as exc:
                setup_notes["trigger"] = f"could not create the bench journey: {exc}"

    if ingest is None:
        for key in ("freshness", "segment", "trigger"):
            results[key] = not_measured(why_no_ingest)
        steady: JSON | None = None
    else:
        if funnel:  # first: it leaves (almost) no backlog behind for the stress mix measured next
            results["funnel"] = {"mix": describe_mix(FUNNEL_EVENTS, FUNNEL_EVENTS_PER_USER)}
            # Freshly started processes join their consumer groups, open connections and fill caches during
            # their first seconds of load: a short run of the same load first, not counted.
            warmup = argparse.Namespace(**{**vars(args), "steady_s": args.pipeline_warmup_s})
            await steady_run(settings, fleet, warmup, {}, setup_notes, mix=FUNNEL_EVENTS,
                             events_per_user=FUNNEL_EVENTS_PER_USER, prefix="bw", label="warm-up, not counted")
            timer_journey, watch = None, None
            journeys = fleet.url("journeys")
            if journeys:
                try:
                    async with httpx.AsyncClient(base_url=journeys, headers=headers, timeout=20) as c:
                        timer_journey = await create_bench_timer_journey(c)
                    watch = TimerWatch(journeys, headers)
                    await watch.start()
                except Exception as exc:
                    results["timers"] = not_measured(f"could not create the bench timer journey: {exc}")
            funnel_load = await steady_run(settings, fleet, args, results["funnel"], setup_notes, mix=FUNNEL_EVENTS,
                                           events_per_user=FUNNEL_EVENTS_PER_USER, prefix="bf", label="funnel mix")
            results["funnel"]["cpu"] = funnel_load["cpu"]
            if journeys and timer_journey and watch is not None:
                checkouts = expected_outputs(FUNNEL_EVENTS, funnel_load["events_acknowledged"])["trigger"]
                say(f"timers: waiting for the {checkouts} {TIMER_DELAY_S}-second timers of the funnel's checkouts ...")
                results["timers"] = await watch.finish(checkouts, TIMER_DELAY_S + args.tail_s)
                async with httpx.AsyncClient(base_url=journeys, headers=headers, timeout=20) as c:
                    await c.post(f"/v1/journeys/{timer_journey}/pause")  # no timers under the stress mix
        steady = await steady_run(settings, fleet, args, results, setup_notes, mix=STEADY_EVENTS,
                                  events_per_user=len(STEADY_EVENTS), prefix="bs", label="stress mix")
        results["stress_mix"] = {**describe_mix(STEADY_EVENTS, len(STEADY_EVENTS)), "cpu": steady["cpu"]}
    prefix = "bs"

    # profile API
    profile = fleet.url("profile")
    if profile is None:
        results["profile_api"] = not_measured(missing(fleet, "profile"))
    elif steady is None or not steady["events_acknowledged"]:
        results["profile_api"] = not_measured("no profiles to read: the steady load was not accepted")
    else:
        users = max(1, steady["events_acknowledged"] // len(STEADY_EVENTS))
        paths = [f"/v1/profiles/{prefix}-u{i}" for i in range(min(users, 5000))]
        # The API is measured on an API-only profile process (LOYALIST_PROFILE_API_ONLY), the deployment docs
        # recommend for services that query profiles; then on the stream-processing process, for comparison.
        served_by = "an API-only profile process"
        try:
            replica = await asyncio.to_thread(fleet.start_replica, "profile", LOYALIST_PROFILE_API_ONLY="true")
            api_url = replica.url
        except RuntimeError as exc:
            api_url, served_by = profile, f"the stream-processing process (the API-only one did not start: {exc})"
        say(f"profile API ({served_by}): GET /v1/profiles/{{id}} at {args.api_rate} req/s for {args.api_s}s, "
            "then max rate ...")
        paced = await run_in_process({"shape": "open", "url": api_url, "headers": headers, "rate": args.api_rate,
                                      "duration_s": args.api_s, "warmup_s": 1.0,
                                      "body": {"kind": "get", "paths": paths}})
        closed = await run_in_process({"shape": "closed", "url": api_url, "headers": headers, "concurrency": 16,
                                       "duration_s": 5, "body": {"kind": "get", "paths": paths}})
        results["profile_api"] = {
            "p50_ms": paced["latency"]["p50_ms"], "p99_ms": paced["latency"]["p99_ms"], "served_by": served_by,
            "offered_requests_per_s": args.api_rate, "at_rate": paced,
            "max_requests_per_s": closed["requests_per_s"], "max_rate": closed,
        }
        if api_url != profile:
            say(f"profile API (the stream-processing process): {args.api_rate} req/s for {args.api_s}s ...")
            combined = await run_in_process({"shape": "open", "url": profile, "headers": headers,
                                             "rate": args.api_rate, "duration_s": args.api_s, "warmup_s": 1.0,
                                             "body": {"kind": "get", "paths": paths}})
            results["profile_api"]["stream_process_p99_ms"] = combined["latency"]["p99_ms"]
            results["profile_api"]["stream_process_at_rate"] = combined
        if not paced["ok_requests"]:
            results["profile_api"]["p99_ms"] = None
            results["profile_api"]["note"] = f"no GET succeeded: {paced['first_error']}"

    if replay:
        results["replay"] = replay_phase(settings, fleet, args)


def settle_cassandra(settings: Settings, *, quiet_polls: int = 3, max_s: float = 90) -> JSON:
    """Wait until Cassandra has no flush or compaction running or queued for ``quiet_polls`` polls in a row (at
    most ``max_s``): the hundreds of thousands of writes of a phase keep it compacting for a while, and a phase
    started meanwhile measures that too."""
    from loyalist.cassandra import connect

    cluster, session = connect(settings)
    started = time.monotonic()
    quiet = polls = 0
    try:
        while time.monotonic() - started < max_s:
            rows = session.execute("SELECT name, active_tasks, pending_tasks FROM system_views.thread_pools")
            busy = sum(r["active_tasks"] + r["pending_tasks"] for r in rows
                       if r["name"] in ("CompactionExecutor", "MemtableFlushWriter", "MemtablePostFlush"))
            polls += 1
            quiet = quiet + 1 if busy == 0 else 0
            if quiet >= quiet_polls:
                break
            time.sleep(1)
    finally:
        cluster.shutdown()
    return {"waited_s": round(time.monotonic() - started, 1), "settled": quiet >= quiet_polls}


async def settle(settings: Settings, label: str, waits: JSON) -> None:
    say(f"waiting for Cassandra's flushes and compactions to finish before {label} ...")
    waits[label] = await asyncio.to_thread(settle_cassandra, settings)
    say(f"  {waits[label]['waited_s']}s" + ("" if waits[label]["settled"] else " (still busy: going on anyway)"))


async def profile_alone_phase(base: Settings, args: argparse.Namespace, fleets: list[Fleet]) -> JSON:
    """The same steady load and API run with only ingest and profile running: what the profile processor does
    when it does not share the two cores with segmenter, journeys and notify (the whole-pipeline figures are
    the targets; this one tells the processor's own latency apart from the machine's)."""
    if not (service_exists("ingest") and service_exists("profile")):
        return not_measured("needs services/ingest and services/profile")
    fleet = await asyncio.to_thread(Fleet.create, base, prefix="bench")
    fleets.append(fleet)
    await asyncio.to_thread(fleet.start, ["ingest"])
    await start_profile(fleet, args.profile_layout)
    section: JSON = {}
    try:
        await pipeline_phase(fleet.settings, fleet, args, section, replay=False, funnel=False)
    finally:
        fleet.stop()
    fresh, api = section.get("freshness") or {}, section.get("profile_api") or {}
    return {"freshness_p50_ms": fresh.get("p50_ms"), "freshness_p99_ms": fresh.get("p99_ms"),
            "api_p50_ms": api.get("p50_ms"), "api_p99_ms": api.get("p99_ms"),
            "api_max_requests_per_s": api.get("max_requests_per_s"), "offered_events_per_s": args.rate,
            "services": sorted(fleet.services), "freshness": fresh, "profile_api": api,
            "cpu": (section.get("stress_mix") or {}).get("cpu")}


def replay_phase(settings: Settings, fleet: Fleet, args: argparse.Namespace) -> JSON:
    """The profile service's replay command (``python -m services.profile.replay``) rebuilding this
    namespace's profiles from its Kafka log into a fresh namespace, timed from the outside."""
    if not (REPO / "services" / "profile" / "replay.py").exists():
        return not_measured("services/profile has no replay command (services/profile/replay.py)")
    target = f"{settings.namespace}_rp"
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "services.profile.replay", "--target-namespace", target],
                              cwd=REPO, env=fleet.env(), capture_output=True, text=True,
                              timeout=args.replay_timeout_s)
    except subprocess.TimeoutExpired:
        return not_measured(f"replay did not finish within {args.replay_timeout_s:.0f}s")
    finally:
        _drop_replay_target(settings.model_copy(update={"namespace": target}))
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        return not_measured(f"replay exited {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}")
    found = re.search(r"rebuilt from (\d+) events in ([\d.]+)s \((\d+) events/s\)", proc.stdout)
    if not found:
        return not_measured(f"replay output not understood: {proc.stdout[-300:]}")
    return {"events": int(found.group(1)), "seconds": float(found.group(2)),
            "events_per_s": float(found.group(3)), "wall_s_with_startup": round(elapsed, 1)}


def _drop_replay_target(target: Settings) -> None:
    from loyalist.cassandra import drop_keyspace

    with contextlib.suppress(Exception):
        drop_keyspace(target)
    with contextlib.suppress(Exception):
        from loyalist.redis import delete_namespace_keys

        delete_namespace_keys(target)


def server_pids(base: Settings) -> dict[str, int]:
    """The local stack's servers (not the services devstack may also run outside the bench's namespaces)."""
    return {n: pid for n, pid in infra_pids(base).items() if n in ("kafka", "cassandra", "redis", "prometheus", "smtp")}


BENCH_PROCESS = "bench + load generator"


def cpu_meter(fleet: Fleet) -> CpuMeter:
    """CPU of the fleet's services, the servers they share, and the bench itself with its load generator (a
    child process, counted once it ended): the bench's ``cpu`` sections. What limits a figure is often the
    machine's two cores, and this shows who used them."""
    return CpuMeter({**fleet_pids(fleet), **server_pids(Settings()), BENCH_PROCESS: os.getpid()},
                    with_reaped_children=frozenset({BENCH_PROCESS}))


def memory_phase(fleets: list[Fleet], base: Settings) -> JSON:
    procs: JSON = {}
    for fleet in fleets:
        for name, pid in fleet_pids(fleet).items():
            procs[f"{name} ({fleet.settings.namespace})"] = rss_bytes(pid)
    for name, pid in server_pids(base).items():
        procs[name] = rss_bytes(pid)
    return {"rss_mb": {k: round(v / 2**20, 1) for k, v in procs.items() if v}}


# ---- report ------------------------------------------------------------------------------------------------------
def flat_figures(results: JSON) -> JSON:
    def get(section: str, key: str) -> Any:
        sec = results.get(section) or {}
        return sec.get(key)

    return {
        "ingest.batch_events_per_s": get("ingest", "batch_events_per_s"),
        "ingest.track_requests_per_s": get("ingest", "track_requests_per_s"),
        "ingest.track_p99_ms": get("ingest", "track_p99_ms"),
        **{f"funnel.{k}.{q}": ((results.get("funnel") or {}).get(k) or {}).get(q)
           for k in ("freshness", "segment", "trigger") for q in ("p50_ms", "p99_ms")},
        "freshness.p50_ms": get("freshness", "p50_ms"),
        "freshness.p99_ms": get("freshness", "p99_ms"),
        "segment.p99_ms": get("segment", "p99_ms"),
        "trigger.p99_ms": get("trigger", "p99_ms"),
        "timers.lateness_p99_ms": get("timers", "lateness_p99_ms"),
        "timers.lateness_p50_ms": get("timers", "lateness_p50_ms"),
        "timers.fired_per_s": get("timers", "fired_per_s"),
        "profile_api.p99_ms": get("profile_api", "p99_ms"),
        "profile_api.max_requests_per_s": get("profile_api", "max_requests_per_s"),
        "profile_api.stream_process_p99_ms": get("profile_api", "stream_process_p99_ms"),
        "processor.profile_events_per_s": get("processor", "profile_events_per_s"),
        "processor.profile_resolve_events_per_s": get("processor", "profile_resolve_events_per_s"),
        **{f"processor.{stage}_events_per_s": group_rate(results, stage) for stage in ("segmenter", "journeys")},
        "replay.events_per_s": get("replay", "events_per_s"),
        "profile_alone.freshness_p99_ms": get("profile_alone", "freshness_p99_ms"),
        "profile_alone.api_p99_ms": get("profile_alone", "api_p99_ms"),
        "notify.messages_per_s": get("notify", "messages_per_s"),
        "notify.p50_ms": get("notify", "p50_ms"),
        "notify.p99_ms": get("notify", "p99_ms"),
    }


def group_rate(results: JSON, service: str) -> Any:
    """The backlog rate of a downstream processor's consumer group(s) (the busiest one)."""
    groups = (results.get("processor") or {}).get("groups") or {}
    rates = [g.get("events_per_s") for name, g in groups.items()
             if name.split("-", 1)[-1].startswith(service) and g.get("events_per_s") is not None]
    return max(rates) if rates else None


def attach_baselines(results: JSON, base: JSON) -> None:
    kp, rt, rg, cw = base["kafka_produce"], base["kafka_roundtrip"], base["redis_get"], base["cassandra_write"]
    pairs = {
        "ingest": {"raw_kafka_produce_events_per_s": kp["events_per_s"]},
        "freshness": {"raw_kafka_roundtrip_p50_ms": rt["p50_ms"], "raw_kafka_roundtrip_p99_ms": rt["p99_ms"]},
        "segment": {"raw_kafka_roundtrip_p99_ms": rt["p99_ms"]},
        "trigger": {"raw_kafka_roundtrip_p99_ms": rt["p99_ms"]},
        "profile_api": {"raw_redis_get_p50_ms": rg["p50_ms"], "raw_redis_get_p99_ms": rg["p99_ms"],
                        "raw_redis_gets_per_s": rg["gets_per_s"]},
        "processor": {"raw_cassandra_writes_per_s": cw["writes_per_s"],
                      "raw_kafka_produce_events_per_s": kp["events_per_s"]},
        "replay": {"raw_cassandra_writes_per_s": cw["writes_per_s"]},
        "funnel": {"raw_kafka_roundtrip_p99_ms": rt["p99_ms"]},
    }
    for section, baseline in pairs.items():
        results.setdefault(section, {})
        results[section]["baseline"] = baseline


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_cpu(results: JSON, top: int = 7) -> str:
    """Who used the cores during the runs that have targets: a figure missed with the machine near 100% busy
    is limited by the machine's cores, not by one stage."""
    runs = (("profile drain on a backlog", (results.get("processor") or {}).get("cpu")),
            ("funnel mix, whole pipeline", (results.get("funnel") or {}).get("cpu")),
            ("stress mix, whole pipeline", (results.get("stress_mix") or {}).get("cpu")),
            ("stress mix, ingest + profile only", (results.get("profile_alone") or {}).get("cpu")))
    lines = []
    for label, cpu in runs:
        if not cpu:
            continue
        shares = ", ".join(f"{name} {pct:.0f}" for name, pct in list(cpu["pct_of_a_core"].items())[:top])
        lines.append(f"  {label:<34} {cpu['machine_busy_pct']:>5.1f}% of {cpu['cores']} cores busy; "
                     f"% of a core: {shares}")
    if not lines:
        return ""
    return "CPU during the runs (machine busy includes the load generator and the bench itself):\n" + "\n".join(lines)


def render_table(results: JSON) -> str:
    figs = flat_figures(results)
    rows = [("figure", "measured", "baseline (same run)", "target", "")]
    baseline_text = {
        "ingest": lambda b: f"raw produce {fmt(b['raw_kafka_produce_events_per_s'])} ev/s",
        "freshness": lambda b: f"kafka hop p99 {fmt(b['raw_kafka_roundtrip_p99_ms'])} ms",
        "segment": lambda b: f"kafka hop p99 {fmt(b['raw_kafka_roundtrip_p99_ms'])} ms",
        "trigger": lambda b: f"kafka hop p99 {fmt(b['raw_kafka_roundtrip_p99_ms'])} ms",
        "profile_api": lambda b: f"redis GET p99 {fmt(b['raw_redis_get_p99_ms'])} ms",
        "processor": lambda b: f"cassandra {fmt(b['raw_cassandra_writes_per_s'])} writes/s",
        "replay": lambda b: f"cassandra {fmt(b['raw_cassandra_writes_per_s'])} writes/s",
        "funnel": lambda b: f"kafka hop p99 {fmt(b['raw_kafka_roundtrip_p99_ms'])} ms",
    }
    for key, (label, target, cmp) in TARGETS.items():
        section = key.split(".")[0]
        value = figs.get(key)
        sec = results.get(section) or {}
        base = sec.get("baseline")
        btxt = baseline_text[section](base) if base and section in baseline_text else "—"
        if section == "funnel":
            sec = {**sec, **(sec.get(key.split(".")[1]) or {})}
        if value is None:
            why = sec.get("not_measured") or sec.get("note") or "not measured"
            verdict = f"not measured: {why}"[:140]
        else:
            met = value >= target if cmp == ">=" else value <= target
            verdict = "meets target" if met else "MISSES target"
        rows.append((label, fmt(value), btxt, f"{cmp} {fmt(target)}", verdict))
    replay = results.get("replay") or {}
    replay_base = (replay.get("baseline") or {}).get("raw_cassandra_writes_per_s")
    for label, key, base_text in (
            ("event → profile p50 ms, funnel mix", "funnel.freshness.p50_ms", ""),
            ("event → profile p50 ms, stress mix", "freshness.p50_ms", ""),
            ("event → profile p99 ms, ingest + profile only (stress)", "profile_alone.freshness_p99_ms",
             "the same steady rate, other services stopped"),
            ("profile API p99 ms @1k req/s, ingest + profile only", "profile_alone.api_p99_ms", ""),
            ("profile resolver events/s (stage 1 of 2)", "processor.profile_resolve_events_per_s", ""),
            ("journey timers fired/s, funnel mix", "timers.fired_per_s",
             f"one {TIMER_DELAY_S}-second timer per checkout"),
            ("journey timer lateness p50 ms, funnel mix", "timers.lateness_p50_ms", ""),
            ("segmenter events/s on a backlog", "processor.segmenter_events_per_s", ""),
            ("journeys events/s on a backlog", "processor.journeys_events_per_s", ""),
            ("notify SMTP path messages/s", "notify.messages_per_s", "opted-in marketing, private SMTP server"),
            ("notify request → SMTP server p50 ms", "notify.p50_ms", ""),
            ("notify request → SMTP server p99 ms", "notify.p99_ms", ""),
            ("profile API max req/s", "profile_api.max_requests_per_s", ""),
            ("profile API p99 ms @1k req/s, stream-processing process", "profile_api.stream_process_p99_ms",
             "the API of the process that also runs the pipeline"),
            ("replay events/s (rebuild)", "replay.events_per_s",
             f"cassandra {fmt(replay_base)} writes/s" if replay_base else "")):
        value = figs.get(key)
        sec = results.get(key.split(".")[0]) or {}
        why = sec.get("not_measured") or sec.get("note") or ""
        note = f"not measured: {why}"[:140] if value is None and why else ""
        rows.append((label, fmt(value), base_text, "(no target)", note))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i < 4 else c for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> JSON:
    base = Settings()
    started = time.monotonic()
    results: JSON = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "services_present": available_services(),
                     # other work on the machine shares the cores with everything measured here
                     "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}}
    fleets: list[Fleet] = []
    try:
        waits: JSON = {}
        results["settle_waits"] = waits
        await settle(base, "namespace A", waits)
        say("namespace A (ingest alone, then processors on its backlog) ...")
        fleet_a = await asyncio.to_thread(Fleet.create, base, prefix="bench")
        fleets.append(fleet_a)
        await asyncio.to_thread(fleet_a.start, ["ingest"])
        results["ingest"] = await ingest_phase(fleet_a.settings, fleet_a, args)
        results["processor"] = await processor_phase(fleet_a.settings, fleet_a, args)
        memory_a = memory_phase([fleet_a], base)
        fleet_a.stop()

        await settle(base, "namespace A2", waits)
        say("namespace A2 (ingest and profile only, the same steady rate) ...")
        results["profile_alone"] = await profile_alone_phase(base, args, fleets)

        await settle(base, "namespace B", waits)
        say("namespace B (the whole pipeline at a steady rate) ...")
        fleet_b = await asyncio.to_thread(Fleet.create, base, prefix="bench")
        fleets.append(fleet_b)
        await asyncio.to_thread(fleet_b.start, [n for n in available_services() if n != "profile"])
        if "profile" in available_services():
            await start_profile(fleet_b, args.profile_layout)
        results["failures"] = {**fleet_a.failures, **fleet_b.failures}
        await pipeline_phase(fleet_b.settings, fleet_b, args, results)
        results["memory"] = memory_phase([fleet_b], base)
        results["memory"]["after_backlog_rss_mb"] = memory_a["rss_mb"]
        fleet_b.stop()

        if service_exists("notify"):
            say("namespace C (notify's SMTP path alone, with a private SMTP server) ...")
            results["notify"] = await notify_phase(base, args, say)
        # The raw baselines last: their hundreds of thousands of writes leave Kafka and Cassandra flushing and
        # compacting for a while, which slowed whatever was measured right after them (ingest /v1/track: 2,910
        # req/s p99 27 ms right after them against 3,286 req/s p99 17 ms without, same machine).
        say("baselines (raw Kafka produce, Cassandra writes, Redis GET in namespace A) ...")
        baselines = await measure_all(fleet_a.settings, say)
        results["baselines"] = baselines
        attach_baselines(results, baselines)
    finally:
        for fleet in fleets:
            fleet.stop()
            if not args.keep:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(fleet.drop)
    results["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    results["took_s"] = round(time.monotonic() - started, 1)
    results["figures"] = flat_figures(results)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ingest-s", type=float, default=10, help="seconds per ingest load test")
    p.add_argument("--warmup-s", type=float, default=2,
                   help="seconds of the same load before each ingest load test, not counted")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--batch-concurrency", type=int, default=8)
    p.add_argument("--track-concurrency", type=int, default=32)
    p.add_argument("--drain-s", type=float, default=30, help="seconds to watch processors on the backlog")
    p.add_argument("--profile-layout", choices=("split", "single"), default="split",
                   help="the profile service in every phase: one process per stage (resolve, fold, loyalty) "
                        "or one process running all three")
    p.add_argument("--rate", type=int, default=1000, help="steady events/s for the latency figures")
    p.add_argument("--steady-s", type=float, default=20)
    p.add_argument("--pipeline-warmup-s", type=float, default=5,
                   help="seconds of the funnel load before the whole pipeline's runs, not counted")
    p.add_argument("--tail-s", type=float, default=10, help="seconds to wait for late outputs after the load")
    p.add_argument("--api-rate", type=int, default=1000)
    p.add_argument("--api-s", type=float, default=10)
    p.add_argument("--replay-timeout-s", type=float, default=180)
    add_notify_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default .loyalist/bench/latest.json)")
    p.add_argument("--keep", action="store_true", help="keep the bench namespaces (topics, keyspace) for study")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    out = args.out or (Settings().state_dir / "bench" / "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    stamped = out.parent / f"bench-{results['started_at'].replace(':', '')}.json"
    stamped.write_text(orjson.dumps(results, default=str).decode())
    print()
    print(render_table(results))
    mem = results.get("memory", {}).get("rss_mb", {})
    if mem:
        print("\nmemory (RSS MB): " + ", ".join(f"{k} {v:,.0f}" for k, v in mem.items()))
    cpu = render_cpu(results)
    if cpu:
        print()
        print(cpu)
    machine = results["machine"]
    # Only the load before the run tells of other work: at the end it is the run's own (the baselines come last).
    before = machine["loadavg_1m_at_start"]
    if before > (machine["cpus"] or 1):
        print(f"\nWARNING: load average {before} on {machine['cpus']} CPUs when the run started: other work competed "
              "for the cores, so these figures understate what this machine can do. Re-run on a quiet machine.")
    print(f"\nfull results: {out}  ({results['took_s']:.0f}s)")
    return 0
