"""``python -m demo`` (``make demo``): the whole story on real data, against the running stack.

1. replays the CDNOW order history (lifetimes package; 69,659 orders of 23,570 customers) through the public
   ingest API, moved in time so it ends today;
2. waits until the stream processors have folded it, then asks the segmenter to refit the CLV model;
3. creates journeys from the shipped templates (abandoned checkout, win-back, post-purchase review request)
   and activates them;
4. simulates storefront sessions for a sample of the same customers (browsing, carts, completed and abandoned
   checkouts, support tickets, unsubscribes) and lets the journeys run;
5. prints the report from the services' APIs and writes it as HTML with charts.

``--private`` runs everything in a private namespace with its own service processes (the running stack's data is
untouched); ``--customers N`` replays only the first N customers for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.procs import Fleet, available_services, http_ok
from bench.stream import group_progress
from demo.cdnow import EMAIL_DOMAIN, history_events, load_orders, shift_to_end_today, user_id
from demo.client import JSON, Unavailable, post_json, send_events
from demo.report import gather, render_html, render_text
from demo.storefront import SessionMix, storefront_events, summarize
from loyalist.settings import SERVICE_NAMES, Settings

JOURNEY_TEMPLATES: dict[str, tuple[str, JSON]] = {
    # name in the report: (template id, parameters) — short delays so the demo sees them fire
    "abandoned checkout": ("abandoned_checkout", {"first_reminder_after": "PT20S", "second_reminder_after": "PT40S",
                                                  "holdout_percent": 20}),
    "win-back": ("win_back", {"churn_threshold": 0.6, "holdout_percent": 20}),
    "post-purchase review": ("review_request", {"review_after": "PT30S"}),
}


STAGES = ("prospect", "first_time_buyer", "repeat", "vip", "at_risk", "lapsed", "won_back")
RFM_NAMES = ("Champions", "Loyal", "Potential Loyalist", "New", "Promising", "Need Attention", "About to Sleep",
             "At Risk", "Can't Lose Them", "Hibernating", "Lost")


def demo_segments() -> dict[str, JSON]:
    """Segments the report reads its sizes from, created before the replay so the segmenter keeps them live."""
    out: dict[str, JSON] = {
        "demo_buyers": {"name": "Buyers", "rule": {"field": "orders_count", "op": "gte", "value": 1}},
        "demo_repeat": {"name": "Repeat buyers", "rule": {"field": "orders_count", "op": "gte", "value": 2}},
        "demo_high_churn": {"name": "High churn risk",
                            "rule": {"prediction": "churn_probability", "op": "gte", "value": 0.7}},
    }
    for stage in STAGES:
        out[f"demo_stage_{stage}"] = {"name": f"Lifecycle: {stage}", "rule": {"lifecycle_stage": [stage]}}
    for name in RFM_NAMES:
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower())
        out[f"demo_rfm_{slug}"] = {"name": f"RFM: {name}", "rule": {"rfm_segment": [name]}}
    return out


async def create_segments(url: str, token: str) -> tuple[list[str], list[str]]:
    made: list[str] = []
    problems: list[str] = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        for sid, body in demo_segments().items():
            try:
                await post_json(c, "/v1/segments", {"id": sid, **body}, ok=(201, 409))
                made.append(sid)
            except (Unavailable, httpx.HTTPError) as exc:
                problems.append(f"{sid}: {exc}")
    return made, problems


def say(msg: str) -> None:
    tqdm.write(msg)


async def wait_for_processing(settings: Settings, timeout_s: float, desc: str,
                              services: tuple[str, ...] = ("profile", "segmenter")) -> bool:
    """Progress of the services' consumer groups (``<namespace>-<service>`` and ``<namespace>-<service>-<stage>``)
    until each has processed what its topics held when the wait began, and then (2 s later, so downstream
    stages see the last outputs) what they held at that moment; or the timeout. A running stack always has a
    trickle of new records (schedules, predictions), so "no lag at all" may never come."""
    prefixes = tuple(f"{settings.namespace}-{s}" for s in services)

    def wanted(group: str) -> bool:
        return any(group == p or group.startswith(p + "-") for p in prefixes)

    bar = tqdm(desc=desc, unit="ev", unit_scale=True, dynamic_ncols=True)
    deadline = time.monotonic() + timeout_s
    caught_up = False
    targets: dict[str, int] | None = None
    rounds = 0
    progress: dict[str, tuple[int, int]] = {}
    try:
        while time.monotonic() < deadline:
            progress = {g: v for g, v in (await group_progress(settings)).items() if wanted(g)}
            if targets is None:
                targets = {g: end for g, (_, end) in progress.items()}
            done = sum(d for d, _ in progress.values())
            end = sum(e for _, e in progress.values())
            bar.total = max(end, 1)
            bar.n = done
            bar.refresh()
            if progress and all(d >= targets.get(g, e) for g, (d, e) in progress.items()):
                rounds += 1
                if rounds == 2:
                    caught_up = True
                    break
                await asyncio.sleep(2)
                targets = None  # the second round: what the topics hold now
                continue
            await asyncio.sleep(1)
    finally:
        bar.close()
    if not caught_up:
        behind = {g: e - d for g, (d, e) in progress.items() if e > d}
        say(f"    still behind: {behind}")
    return caught_up


async def create_journeys(url: str, token: str) -> tuple[dict[str, str], list[str]]:
    """Journeys from templates, activated; an existing demo journey (second run) is reused."""
    created: dict[str, str] = {}
    problems: list[str] = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        for name, (template, params) in JOURNEY_TEMPLATES.items():
            jid = f"demo_{template}"
            try:
                existing = await c.get(f"/v1/journeys/{jid}")
                if existing.status_code == 404:
                    await post_json(c, f"/v1/journeys/from-template/{template}",
                                    {"id": jid, "name": f"Demo: {name}", **params})
                status = (await c.get(f"/v1/journeys/{jid}")).json().get("status")
                if status != "active":
                    await post_json(c, f"/v1/journeys/{jid}/activate")
                created[name] = jid
            except (Unavailable, httpx.HTTPError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
    return created, problems


async def run(args: argparse.Namespace, settings: Settings, urls: dict[str, str | None]) -> JSON:
    token = settings.dev_api_token
    setup: JSON = {"links": {
        "Prometheus": f"http://127.0.0.1:{settings.prometheus_port}",
        "mail sink (JSON)": f"http://127.0.0.1:{settings.smtp_sink_http_port}/messages?to=customer1@{EMAIL_DOMAIN}",
    }}
    ingest = urls["ingest"]
    assert ingest is not None

    # 0. the segments the report reads (kept live by the segmenter from the first event on)
    if urls.get("segmenter"):
        made, problems = await create_segments(urls["segmenter"] or "", token)
        setup["segments_created"] = made
        if problems:
            setup["segments_missing"] = "; ".join(problems[:3])
        say(f"segments for the report: {len(made)} defined in the segmenter" + (f" ({len(problems)} failed: "
            f"{problems[0][:160]})" if problems else ""))

    # 1. history
    orders = load_orders()
    if args.customers:
        keep = sorted({o.customer for o in orders})[: args.customers]
        keep_set = set(keep)
        orders = [o for o in orders if o.customer in keep_set]
    customers = sorted({o.customer for o in orders})
    shift = shift_to_end_today(datetime.now(UTC).date())
    history = list(history_events(orders, shift))
    setup.update(history_events=len(history), orders=len(orders), customers=len(customers), shift_days=shift)
    say(f"\n1/5 replaying CDNOW: {len(orders):,} orders of {len(customers):,} customers through {ingest}/v1/batch")
    started = time.monotonic()
    sent = await send_events(ingest, settings.dev_write_key, history, desc="CDNOW history → ingest")
    took = time.monotonic() - started
    setup["history_ingest"] = {**sent, "seconds": round(took, 1), "events_per_s": round(len(history) / took)}
    say(f"    accepted {sent['accepted']:,} ({sent['duplicates']:,} already there from an earlier run), "
        f"{len(history) / took:,.0f} events/s")

    # 2. folding, then CLV
    say("\n2/5 waiting for profiles, segments and models to catch up")
    caught_up = await wait_for_processing(settings, args.fold_timeout_s, "stream processors")
    setup["caught_up"] = caught_up
    if not caught_up:
        say(f"    not fully caught up after {args.fold_timeout_s:.0f}s; the report shows the state reached")
    if urls.get("segmenter"):
        try:
            async with httpx.AsyncClient(base_url=urls["segmenter"] or "",
                                         headers={"Authorization": f"Bearer {token}"}, timeout=300) as c:
                refit = await post_json(c, "/v1/models/clv/refit")
            setup["clv_refit"] = refit
            say(f"    CLV model refitted: {json.dumps(refit)[:200]}")
            await wait_for_processing(settings, 120, "predictions → profiles")
        except Unavailable as exc:
            setup["clv_refit_missing"] = str(exc)
            say(f"    CLV refit not available: {exc}")

    # 3. journeys
    journeys: dict[str, str] = {}
    if urls.get("journeys"):
        say("\n3/5 creating journeys from templates")
        journeys, problems = await create_journeys(urls["journeys"] or "", token)
        for name, jid in journeys.items():
            say(f"    {name}: {jid} active")
        if problems:
            setup["journeys_missing"] = "; ".join(problems)
            for p in problems:
                say(f"    could not create {p}")
    else:
        setup["journeys_missing"] = "the journeys service is not running"
        say("\n3/5 journeys service not running: no journeys")

    # 4. storefront
    rng = random.Random(7)
    sample = sorted(rng.sample(customers, min(args.sessions, len(customers))))
    run_id = f"sf{int(time.time())}"
    now = datetime.now(UTC)
    mix = SessionMix()
    sessions = list(storefront_events(sample, mix, now - timedelta(minutes=5), run_id, seed=7))
    counts = summarize(sessions)
    setup["storefront_events"] = len(sessions)
    setup["storefront_mix"] = ", ".join(f"{k} {v:,}" for k, v in counts.most_common())
    say(f"\n4/5 storefront: {len(sample):,} customers visit the shop ({len(sessions):,} events)")
    await send_events(ingest, settings.dev_write_key, sessions, desc="storefront sessions → ingest", batch_size=200)
    wait = args.journey_wait_s
    for _ in tqdm(range(int(wait)), desc="letting journeys run", unit="s", dynamic_ncols=True):
        await asyncio.sleep(1)
    await wait_for_processing(settings, 60, "stream processors",
                              ("profile", "segmenter", "journeys", "notify"))

    # 5. report
    say("\n5/5 report (read from the services' APIs)")
    return await gather(urls, token, [user_id(c) for c in customers], journeys,
                        f"http://127.0.0.1:{settings.smtp_sink_http_port}", EMAIL_DOMAIN, setup)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=0, help="replay only the first N customers (0: all 23,570)")
    p.add_argument("--sessions", type=int, default=2000, help="customers visiting the storefront")
    p.add_argument("--journey-wait-s", type=float, default=75, help="seconds to let journeys run")
    p.add_argument("--fold-timeout-s", type=float, default=900,
                   help="how long to wait for every consumer group to catch up before the report")
    p.add_argument("--private", action="store_true",
                   help="own namespace and service processes instead of the running stack")
    p.add_argument("--out", type=Path, default=None, help="report directory (default .loyalist/demo)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    fleet: Fleet | None = None
    if args.private:
        print("starting a private namespace and its service processes ...", flush=True)
        fleet = Fleet.create(settings, prefix="demo")
        fleet.start(available_services())
        settings = fleet.settings
        for name, why in fleet.failures.items():
            print(f"  {name}: {why.splitlines()[0][:200]}")
    urls: dict[str, str | None] = {}
    for name in SERVICE_NAMES:
        url = fleet.url(name) if fleet else settings.service_url(name)
        urls[name] = url if url and http_ok(f"{url}/readyz") else None
    print("services: " + ", ".join(f"{n} {'ready' if u else 'NOT RUNNING'}" for n, u in urls.items()), flush=True)
    try:
        if urls["ingest"] is None:
            print("error: ingest is not answering; start the stack with `make up` (or use --private)")
            return 1
        report = asyncio.run(run(args, settings, urls))
    finally:
        if fleet is not None:
            fleet.stop()
    text = render_text(report)
    print(text)
    out = args.out or (Settings().state_dir / "demo")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(render_html(report, text))
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nHTML report with charts: {(out / 'report.html').resolve()}")
    print(f"raw figures:             {(out / 'report.json').resolve()}")
    return 0
