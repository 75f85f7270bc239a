"""loyalist.js in a real headless Chromium (Debian /usr/bin/chromium via playwright-core) on the demo
storefront served by ingest: the events arrive in Kafka with one anonymous id, later tied by identify."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "browser" / "tracker.mjs"
TRACKER = REPO / "services" / "ingest" / "static" / "loyalist.js"


@pytest.fixture(scope="module")
def browser_run(ingest: Any) -> dict[str, Any]:
    # `make deps` installs both; a run that lacks them (e.g. bare pytest) says so, CI never skips.
    missing = "needs /usr/bin/chromium and node (make deps)" if (
        not Path("/usr/bin/chromium").exists() or shutil.which("node") is None) else (
        "needs npm playwright-core (npm ci)" if not (REPO / "node_modules" / "playwright-core").exists() else None)
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(missing)
    done = subprocess.run(["node", str(SCRIPT), ingest.url], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_storefront_journey_keeps_one_anonymous_id_then_identify_ties_it(browser_run: dict[str, Any],
                                                                         kafka_raw: Any) -> None:
    run = browser_run["journey"]
    anon = run["anonymousId"]
    assert anon and run["cookie"] == anon and run["stored"] == anon
    assert run["afterSignIn"] == {"userId": "demo-ada@example.com", "anonymousId": anon,
                                  "traits": {"email": "ada@example.com"}}
    events = kafka_raw.where(lambda e: e.anonymous_id == anon, 6)
    labels = [e.name if e.type == "page" else e.event if e.type == "track" else e.type for e in events]
    assert {"Home", "Product", "Product Viewed", "Product Added", "Checkout Started", "identify"} <= set(labels)
    assert all(e.source == "web" for e in events)
    by_label = {label: e for label, e in zip(labels, events, strict=True)}
    added = by_label["Product Added"]
    assert added.properties["sku"] == "MUG-01" and added.properties["price"] == 12.5
    assert added.context["library"]["name"] == "loyalist.js"
    assert added.context["page"]["path"] == "/demo/store"
    checkout = by_label["Checkout Started"]
    assert checkout.properties["value"] == 12.5 and checkout.properties["products"][0]["sku"] == "MUG-01"
    assert checkout.user_id is None  # before sign-in
    identify = by_label["identify"]
    assert identify.user_id == "demo-ada@example.com" and identify.traits == {"email": "ada@example.com"}
    # Exactly one copy of each call, even though pagehide beacons and later fetches may both send it.
    assert len({e.message_id for e in events}) == len(events)


def test_offline_queue_retries_when_back_online(browser_run: dict[str, Any], kafka_raw: Any) -> None:
    run = browser_run["offline"]
    assert run["queuedWhileOffline"] >= 1
    [event] = kafka_raw.where(lambda e: e.anonymous_id == run["anonymousId"] and e.event == "Offline Event", 1)
    assert event.properties == {"n": 1}


def test_pagehide_beacon_delivers_the_last_call(browser_run: dict[str, Any], kafka_raw: Any) -> None:
    anon = browser_run["beacon"]["anonymousId"]
    [event] = kafka_raw.where(lambda e: e.anonymous_id == anon and e.event == "Beacon Event", 1)
    assert event.properties == {"last": True}


def test_no_tracking_before_consent(browser_run: dict[str, Any], kafka_raw: Any) -> None:
    run = browser_run["consent"]
    assert run["before"] == {"requests": 0, "cookie": None, "anonymousId": None, "queue": None}
    assert run["requestsAfter"] >= 1
    [home] = kafka_raw.where(lambda e: e.anonymous_id == run["anonymousId"], 1)
    assert home.type == "page" and home.name == "Home"
    declined = browser_run["declined"]
    assert declined == {"requests": 0, "cookie": None}


def test_tracker_is_small() -> None:
    size = len(gzip.compress(TRACKER.read_bytes(), 9))
    print(f"loyalist.js: {TRACKER.stat().st_size} bytes, {size} bytes gzipped")
    assert size < 5 * 1024
