"""Every Grafana panel shows data on a live stack.

The five services and the lag exporter run as real processes in a namespace of their own; traffic goes
through every API (tracking batches with duplicates and invalid messages, profile reads, a segment, a journey
from a template, transactional messages); a private Prometheus scrapes them with the repository's scrape
config (ports rewritten, 1 s interval, the alert rules loaded); then every query of every panel of
``deploy/grafana/dashboards/*.json`` is evaluated and must return at least one finite sample. The failure
message lists the empty panels.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loyalist.checks.compose import iter_panels
from loyalist.devstack import bootstrap
from loyalist.settings import SERVICE_NAMES, Settings
from tests.conftest import ServiceProcess, free_port, settings_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# Grafana's built-in variables, as Grafana would expand them for a short time range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${__rate_interval}": "1m", "$__interval": "15s",
                     "$__range": "5m", "${datasource}": "prometheus"}
EVALUATION_DEADLINE_S = 150


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    expr: str

    @property
    def promql(self) -> str:
        text = self.expr
        for var, value in GRAFANA_VARIABLES.items():
            text = text.replace(var, value)
        assert "$" not in text, f"unexpanded variable in {self.dashboard} / {self.panel}: {text}"
        return text


def panel_queries() -> list[PanelQuery]:
    out = []
    for file in DASHBOARDS:
        board = json.loads(file.read_text())
        for panel in iter_panels(board):
            for target in panel.get("targets") or []:
                out.append(PanelQuery(board["title"], panel["title"], target["expr"]))
    return out


@dataclass
class LiveStack:
    settings: Settings
    services: dict[str, ServiceProcess]
    lag_port: int
    prometheus_url: str
    headers: dict[str, str]


def _wait(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, OSError):
            result = None
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _prometheus_config(settings: Settings, lag_port: int, conf_dir: Path) -> Path:
    """The repository's scrape config with the test's ports, a 1 s interval and the alert rules."""
    text = (REPO / "deploy" / "prometheus" / "prometheus.yml").read_text()
    for svc in SERVICE_NAMES:
        default = Settings.model_fields[f"{svc}_port"].default
        text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{settings.service_port(svc)}")
    text = text.replace("127.0.0.1:8009", f"127.0.0.1:{lag_port}")
    config = yaml.safe_load(text)
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"})
    shutil.copytree(REPO / "deploy" / "prometheus" / "rules", conf_dir / "rules", dirs_exist_ok=True)
    path = conf_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start_with_retries(svc: ServiceProcess, attempts: int = 3) -> ServiceProcess:
    """Five services open their Cassandra sessions at once on a small, shared machine: a start that fails
    to connect to a dependency is retried, as a Kubernetes restart would."""
    for attempt in range(1, attempts + 1):
        try:
            return svc.start(timeout_s=120)
        except RuntimeError:
            svc.kill()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def live(stack_settings: Settings) -> Iterator[LiveStack]:
    # A namespace of its own: its consumer groups hold every partition, so all traffic reaches these processes.
    base = stack_settings.model_copy(update={"namespace": f"{stack_settings.namespace}_ops"[:41]})
    bootstrap(base, dev_credentials=True)
    settings = base.model_copy(update={f"{svc}_port": free_port() for svc in SERVICE_NAMES})
    home = settings.state_dir / "test-ops" / f"{settings.namespace}-{secrets.token_hex(3)}"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1",
           "LOYALIST_NOTIFY_PUBLIC_URL": settings.service_url("notify"),
           "LOYALIST_SEGMENTER_SCHEDULER_POLL_S": "0.5", "LOYALIST_NOTIFY_SCHEDULE_POLL_S": "0.2"}
    services = {name: ServiceProcess(name, settings, env, home / f"{name}.log") for name in SERVICE_NAMES}
    extra: list[subprocess.Popen[bytes]] = []
    try:
        # Three at a time: five simultaneous Cassandra handshakes overload a busy two-core machine.
        with ThreadPoolExecutor(3) as pool:
            for started in pool.map(_start_with_retries, services.values()):
                assert started.proc is not None
        lag_port = free_port()
        lag_log = (home / "lag.log").open("ab")
        extra.append(subprocess.Popen(
            [sys.executable, "-m", "loyalist.checks.lag", "--port", str(lag_port), "--interval", "1"],
            cwd=REPO, env=env, stdout=lag_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        prom_port = free_port()
        config = _prometheus_config(settings, lag_port, home)
        prom_log = (home / "prometheus.log").open("ab")
        extra.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={home / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h"],
            cwd=home, stdout=prom_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        prometheus_url = f"http://127.0.0.1:{prom_port}"
        _wait(lambda: httpx.get(f"{prometheus_url}/-/ready", timeout=2).status_code == 200, 60, "Prometheus ready")
        yield LiveStack(settings, services, lag_port, prometheus_url,
                        {"Authorization": f"Bearer {settings.dev_api_token}"})
    finally:
        # Stop everything at once, then wait: sequential graceful stops would cost one drain time each.
        procs = extra + [svc.proc for svc in services.values() if svc.proc is not None and svc.proc.poll() is None]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(home / "tsdb", ignore_errors=True)  # the logs stay, for a failure's post-mortem
        try:
            from loyalist.cassandra import drop_keyspace
            from loyalist.kafka import delete_namespace_topics

            drop_keyspace(base)
            asyncio.run(delete_namespace_topics(base))
        except Exception:  # cleanup of a test namespace must not hide the test's own result
            pass


def query(stack: LiveStack, promql: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    body = resp.json()
    assert body.get("status") == "success", f"{promql}: {body}"
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    return result  # type: ignore[no-any-return]


def finite(samples: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in samples)


class Traffic:
    """Drives every service's API; runs again and again in a background thread so rates stay non-zero."""

    def __init__(self, stack: LiveStack) -> None:
        self.stack = stack
        self.settings = stack.settings
        self.tag = uuid.uuid4().hex[:8]
        self.users = [f"ops-{self.tag}-{i}" for i in range(12)]
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.rounds = 0

    def url(self, service: str) -> str:
        return self.stack.services[service].url

    def setup(self) -> None:
        """Configuration traffic: a segment, an active journey from a template."""
        with httpx.Client(headers=self.stack.headers, timeout=30) as client:
            seg = client.post(f"{self.url('segmenter')}/v1/segments",
                              json={"name": f"buyers {self.tag}", "rule": {"field": "orders_count", "op": "gte",
                                                                         "value": 1}})
            assert seg.status_code == 201, seg.text
            journey = client.post(f"{self.url('journeys')}/v1/journeys/from-template/abandoned_checkout",
                                  json={"first_reminder_after": "PT2S", "second_reminder_after": "P1D"})
            assert journey.status_code == 201, journey.text
            activated = client.post(f"{self.url('journeys')}/v1/journeys/{journey.json()['id']}/activate")
            assert activated.status_code == 200, activated.text
            # A journey that sends as soon as its trigger arrives (trigger-to-message latency).
            welcome = client.post(f"{self.url('journeys')}/v1/journeys/from-template/welcome_series",
                                  json={"holdout_percent": 0})
            assert welcome.status_code == 201, welcome.text
            activated = client.post(f"{self.url('journeys')}/v1/journeys/{welcome.json()['id']}/activate")
            assert activated.status_code == 200, activated.text

    def batch(self, round_no: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for i, user in enumerate(self.users):
            checkout = f"chk-{self.tag}-{round_no}-{i}"
            products = [{"product_id": f"sku-{i}", "name": "Linen shirt", "price": 59.0, "quantity": 1}]
            messages += [
                {"type": "identify", "userId": user, "traits": {"email": f"{user}@example.test", "first_name": "Ada"}},
                {"type": "track", "userId": user, "event": "Product Added", "properties": products[0]},
                {"type": "track", "userId": user, "event": "Checkout Started",
                 "properties": {"checkout_id": checkout, "products": products, "value": 59.0, "currency": "USD",
                                "recovery_url": f"https://shop.example/cart/{checkout}"}},
            ]
            if i % 2 == 0:  # half the customers buy; the others abandon their checkout
                messages.append({"type": "track", "userId": user, "event": "Order Completed",
                                 "properties": {"checkout_id": checkout, "order_id": f"o-{checkout}",
                                                "revenue": 59.0, "currency": "USD", "products": products}})
        newcomer = f"ops-{self.tag}-new-{round_no}"
        messages += [
            {"type": "identify", "userId": newcomer, "traits": {"email": f"{newcomer}@example.test"}},
            {"type": "track", "userId": newcomer, "event": "Signed Up", "properties": {"method": "email"}},
        ]
        for m in messages:
            m["messageId"] = str(uuid.uuid4())
        return messages

    def one_round(self) -> None:
        auth = (self.settings.dev_write_key, "")
        with httpx.Client(timeout=30) as client:
            batch = self.batch(self.rounds)
            resp = client.post(f"{self.url('ingest')}/v1/batch", json={"batch": batch}, auth=auth)
            self.check("ingest batch", resp, 200)
            # An SDK retry of the same batch (deduplicated) and a message missing its event name (rejected).
            client.post(f"{self.url('ingest')}/v1/batch", json={"batch": batch[:5]}, auth=auth)
            client.post(f"{self.url('ingest')}/v1/track", json={"userId": self.users[0]}, auth=auth)
            for user in self.users[:4]:
                client.get(f"{self.url('profile')}/v1/profiles/{user}", headers=self.stack.headers)
            client.get(f"{self.url('profile')}/v1/profiles/nobody-{self.tag}", headers=self.stack.headers)
            email = f"ops-{self.tag}-{self.rounds}@example.test"
            sent = client.post(f"{self.url('notify')}/v1/messages", headers=self.stack.headers,
                               json={"to": {"email": email}, "templateId": "welcome_1", "data": {},
                                     "idempotencyKey": f"ops-{self.tag}-{self.rounds}"})
            self.check("notify message", sent, 202, 200)
            client.get(f"{self.url('segmenter')}/v1/segments", headers=self.stack.headers)
            client.get(f"{self.url('journeys')}/v1/journeys", headers=self.stack.headers)
        self.rounds += 1

    def check(self, what: str, resp: httpx.Response, *ok: int) -> None:
        if resp.status_code not in ok and len(self.errors) < 20:
            self.errors.append(f"{what}: {resp.status_code} {resp.text[:200]}")

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.one_round()
            except httpx.HTTPError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(1.0)


def test_every_dashboard_panel_returns_data(live: LiveStack) -> None:
    queries = panel_queries()
    assert len(DASHBOARDS) >= 7 and queries
    up = _wait(lambda: len(query(live, 'up{job=~"loyalist|loyalist-lag"} == 1')) == 6 or None, 60,
               "all six scrape targets up")
    assert up
    traffic = Traffic(live)
    traffic.setup()
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    pending = {q: "not evaluated" for q in queries}
    deadline = time.monotonic() + EVALUATION_DEADLINE_S
    try:
        while pending and time.monotonic() < deadline:
            for item in list(pending):
                samples = query(live, item.promql)
                if samples and finite(samples):
                    del pending[item]
                else:
                    pending[item] = "no series" if not samples else "only NaN/Inf samples"
            if pending:
                time.sleep(2)
    finally:
        traffic.stop.set()
        thread.join(60)
    assert traffic.rounds >= 3, traffic.errors
    empty = "\n".join(f"  {q.dashboard} / {q.panel}: {why}\n      {q.promql}" for q, why in pending.items())
    assert not pending, (f"{len(pending)} of {len(queries)} panel queries returned no data after "
                         f"{traffic.rounds} traffic rounds:\n{empty}\ntraffic errors: {traffic.errors}")


def test_panels_select_only_grafana_variables_the_test_knows() -> None:
    for q in panel_queries():
        leftovers = set(re.findall(r"\$\{?\w+\}?", q.expr)) - set(GRAFANA_VARIABLES)
        assert not leftovers, f"{q.dashboard} / {q.panel}: {leftovers}"
        assert urllib.parse.quote(q.promql)
