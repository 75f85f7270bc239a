"""Real service processes in a private namespace, for the benchmark, the demo and the chaos suite.

A ``Fleet`` creates a fresh namespace on running infrastructure (its own topics, Cassandra keyspace and
dev credentials, exactly like the test fixtures do), starts ``python -m services.<name>`` processes on free
ports — each knowing where the others listen — and can kill -9, restart and measure them.

>>> env = settings_env(Settings(namespace="x1", ingest_port=1))
>>> env["LOYALIST_NAMESPACE"], env["LOYALIST_INGEST_PORT"]
('x1', '1')
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from loyalist.devstack import REPO, bootstrap, pid_alive
from loyalist.settings import SERVICE_NAMES, Settings

# Order that respects the data flow: a consumer of a topic starts after its producer is importable.
SERVICE_ORDER = ("ingest", "profile", "segmenter", "journeys", "notify")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The LOYALIST_* environment that reproduces ``settings`` in a child process."""
    return {f"LOYALIST_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None}


def service_exists(name: str) -> bool:
    """A service can run once its engineer landed ``__main__.py`` and ``app.py``."""
    pkg = REPO / "services" / name
    return (pkg / "__main__.py").exists() and (pkg / "app.py").exists()


def available_services() -> list[str]:
    return [n for n in SERVICE_ORDER if service_exists(n)]


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float | None:
    """CPU time (user + system) a process has used so far, from /proc (None when it is gone); with
    ``reaped_children`` also that of its children that ended and were waited for (the bench's load generators)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat (iowait counts as idle)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


class CpuMeter:
    """Where the machine's CPU went between :meth:`start` and :meth:`stop`: each named process's share of one
    core, and how busy all cores were (the load generator and the bench itself included)."""

    def __init__(self, pids: dict[str, int], *, with_reaped_children: frozenset[str] = frozenset()) -> None:
        self.pids = pids
        self.with_reaped_children = with_reaped_children
        self._start: dict[str, float] = {}
        self._machine: tuple[int, int] = (0, 0)
        self._t0 = 0.0

    def start(self) -> None:
        self._start = {name: c for name, pid in self.pids.items() if (c := self._cpu(name, pid)) is not None}
        self._machine = machine_ticks()
        self._t0 = time.monotonic()

    def _cpu(self, name: str, pid: int) -> float | None:
        return cpu_seconds(pid, reaped_children=name in self.with_reaped_children)

    def stop(self) -> dict[str, object]:
        elapsed = max(1e-6, time.monotonic() - self._t0)
        busy, total = machine_ticks()
        by_process: dict[str, float] = {}
        for name, pid in self.pids.items():
            end = self._cpu(name, pid)
            if end is not None and name in self._start:
                by_process[name] = round((end - self._start[name]) / elapsed * 100, 1)
        return {
            "seconds": round(elapsed, 1),
            "cores": os.cpu_count(),
            "machine_busy_pct": round((busy - self._machine[0]) / max(1, total - self._machine[1]) * 100, 1),
            "pct_of_a_core": dict(sorted(by_process.items(), key=lambda kv: -kv[1])),
        }


def http_ok(url: str, timeout_s: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except Exception:
        return False


@dataclass
class ServiceProc:
    name: str
    settings: Settings
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def port(self) -> int:
        return self.settings.service_port(self.name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def spawn(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"], cwd=REPO, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

    def start(self, timeout_s: float = 120) -> float:
        """Start and wait for /readyz; returns the seconds it took."""
        started = time.monotonic()
        self.spawn()
        self.wait_ready(timeout_s)
        return time.monotonic() - started

    def ready(self) -> bool:
        return http_ok(f"{self.url}/readyz")

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                                   + self.log_tail())
            if self.ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready in {timeout_s:.0f}s; log {self.log_path}:\n" + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, hard: bool = True) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout_s: float = 120) -> float:
        self.kill()
        self.restarts += 1
        return self.start(timeout_s)

    def rss(self) -> int | None:
        return rss_bytes(self.pid) if self.pid else None


@dataclass
class Fleet:
    """A private namespace and the service processes started in it."""

    settings: Settings
    log_dir: Path
    services: dict[str, ServiceProc] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    replicas: list[ServiceProc] = field(default_factory=list)

    @classmethod
    def create(cls, base: Settings | None = None, *, prefix: str = "bench", extra: dict[str, object] | None = None,
               ) -> Fleet:
        """A fresh namespace ``<prefix>_<hex>`` on the infrastructure ``base`` points at; every service gets a
        free port up front so each knows where the others will listen."""
        base = base or Settings()
        update: dict[str, object] = {"namespace": f"{prefix}_{secrets.token_hex(4)}"}
        update.update({f"{svc}_port": free_port() for svc in SERVICE_NAMES})
        update.update(extra or {})
        settings = base.model_copy(update=update)
        bootstrap(settings, dev_credentials=True)
        log_dir = settings.state_dir / f"{prefix}-logs" / settings.namespace
        log_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings, log_dir)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1", **extra}

    def start(self, names: Iterable[str], timeout_s: float = 120, **extra_env: str) -> dict[str, float]:
        """Start the named services that exist; a service that fails is recorded in ``failures``.

        All are spawned first and then waited for, so their start-up overlaps. Returns start seconds."""
        started = time.monotonic()
        spawned: list[ServiceProc] = []
        for name in names:
            if not service_exists(name):
                self.failures[name] = f"services/{name} has no __main__.py/app.py yet"
                continue
            svc = ServiceProc(name, self.settings, self.env(**extra_env), self.log_dir / f"{name}.log")
            svc.spawn()
            spawned.append(svc)
        took: dict[str, float] = {}
        for svc in spawned:
            try:
                svc.wait_ready(max(5.0, timeout_s - (time.monotonic() - started)))
                self.services[svc.name] = svc
                took[svc.name] = time.monotonic() - started
            except RuntimeError as exc:
                svc.kill()
                self.failures[svc.name] = str(exc)
        return took

    def url(self, name: str) -> str | None:
        svc = self.services.get(name)
        return svc.url if svc else None

    def start_replica(self, name: str, timeout_s: float = 120, **extra_env: str) -> ServiceProc:
        """One more process of a service, on a port of its own, with extra settings (e.g. the profile API alone:
        ``LOYALIST_PROFILE_API_ONLY="true"``); waits for /readyz."""
        settings = self.settings.model_copy(update={f"{name}_port": free_port()})
        env = {**self.env(), **settings_env(settings), **extra_env}
        svc = ServiceProc(name, settings, env, self.log_dir / f"{name}-replica{len(self.replicas) + 1}.log")
        self.replicas.append(svc)
        svc.start(timeout_s)
        return svc

    def stop(self) -> None:
        for svc in [*self.replicas, *reversed(list(self.services.values()))]:
            svc.kill(hard=False)

    def drop(self) -> None:
        """Remove the namespace's topics, keyspace and Redis keys (after ``stop``)."""
        from loyalist.cassandra import drop_keyspace
        from loyalist.kafka import delete_namespace_topics
        from loyalist.redis import delete_namespace_keys

        try:
            drop_keyspace(self.settings)
        finally:
            try:
                asyncio.run(delete_namespace_topics(self.settings))
            finally:
                delete_namespace_keys(self.settings)


def fleet_pids(fleet: Fleet) -> dict[str, int]:
    """Pids of a fleet's service processes by role (``profile fold``, ``profile api`` ...)."""
    out: dict[str, int] = {}
    for svc in [*fleet.services.values(), *fleet.replicas]:
        if not svc.pid:
            continue
        role = None
        if svc.name == "profile":
            api_only = svc.env.get("LOYALIST_PROFILE_API_ONLY") == "true"
            role = "api" if api_only else svc.env.get("LOYALIST_PROFILE_STAGES")
        name = f"{svc.name} {role}" if role else svc.name
        while name in out:
            name += "'"
        out[name] = svc.pid
    return out


def infra_pids(settings: Settings) -> dict[str, int]:
    """Pids of the local stack's servers (from devstack's pid files) for memory figures."""
    out: dict[str, int] = {}
    run_dir = settings.state_dir / "run"
    for name in ("kafka", "cassandra", "redis", "prometheus", "smtp", *SERVICE_NAMES):
        try:
            pid = int((run_dir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if pid_alive(pid):
            out[name] = pid
    return out
