"""Test infrastructure: one real stack per test session, one isolated namespace per session.

Infrastructure comes from one fixture, ``stack_settings``:
- by default the local processes of ``loyalist.devstack`` (Kafka, Cassandra, Redis, the SMTP sink),
  started if they are not running and reused if they are;
- with ``LOYALIST_TEST_INFRA=docker``, containers started by testcontainers.

Each test session gets its own namespace (``t_<random>``): its own topics, Cassandra keyspace and Redis
key prefix, so sessions never see each other's data even on shared servers.

Services under test run as real processes (``python -m services.<name>``) on free ports, started by the
``start_service`` fixture and stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from loyalist.devstack import REPO, Stack, bootstrap
from loyalist.settings import SERVICE_NAMES, Settings

INFRA_FOR_TESTS = ("kafka", "cassandra", "redis", "smtp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _docker_infra() -> tuple[dict[str, Any], Callable[[], None]]:
    """Containers for hosts with a Docker engine (not this CI machine)."""
    from testcontainers.cassandra import CassandraContainer
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    kafka = KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft()
    cassandra = CassandraContainer("cassandra:5.0")
    redis = RedisContainer("redis:7")
    for c in (kafka, cassandra, redis):
        c.start()
    host, port = kafka.get_bootstrap_server().split(":")
    overrides = {
        "kafka_host": host, "kafka_port": int(port),
        "cassandra_hosts": cassandra.get_container_host_ip(),
        "cassandra_port": int(cassandra.get_exposed_port(9042)),
        "redis_host": redis.get_container_host_ip(), "redis_port": int(redis.get_exposed_port(6379)),
    }

    def stop() -> None:
        for c in (kafka, cassandra, redis):
            c.stop()

    return overrides, stop


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    """Settings of a fresh namespace on running infrastructure (topics and keyspace created)."""
    def stop() -> None:
        return None
    overrides: dict[str, Any] = {}
    if os.environ.get("LOYALIST_TEST_INFRA", "local") == "docker":
        overrides, stop = _docker_infra()
    else:
        # The session bootstraps its own namespace below; the default one is not needed.
        Stack(Settings(), quiet=True).up(list(INFRA_FOR_TESTS), bootstrap_namespace=False)
    settings = Settings(namespace=f"t_{secrets.token_hex(4)}", **overrides)
    bootstrap(settings, dev_credentials=True)
    yield settings
    try:
        from loyalist.cassandra import drop_keyspace
        from loyalist.kafka import delete_namespace_topics
        from loyalist.redis import delete_namespace_keys

        drop_keyspace(settings)
        asyncio.run(delete_namespace_topics(settings))
        delete_namespace_keys(settings)
    finally:
        stop()


@pytest.fixture(scope="module")
def cassandra_session(stack_settings: Settings) -> Iterator[Any]:
    """A driver session on the test session's keyspace, for a test module that reads or writes Cassandra
    directly."""
    from loyalist.cassandra import connect

    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    try:
        yield session
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def api_headers(stack_settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack_settings.dev_api_token}"}


def settings_env(settings: Settings) -> dict[str, str]:
    """The LOYALIST_* environment that reproduces ``settings`` in a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"LOYALIST_{name.upper()}"] = str(value)
    return env


@dataclass
class ServiceProcess:
    name: str
    settings: Settings
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = field(default=0)

    @property
    def port(self) -> int:
        return self.settings.service_port(self.name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"], cwd=REPO, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except Exception:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready in {timeout_s}s; log {self.log_path}:\n" + self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, hard: bool = True) -> None:
        if self.proc and self.proc.poll() is None:
            if hard:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self, timeout_s: float = 90) -> ServiceProcess:
        self.kill()
        self.restarts += 1
        return self.start(timeout_s)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


@pytest.fixture(scope="session")
def start_service(stack_settings: Settings) -> Iterator[Callable[..., ServiceProcess]]:
    """Start a service as a real process: ``start_service("profile", LOYALIST_X="y")``.

    Each service gets a free port; every started service knows the others' URLs through settings.
    """
    started: list[ServiceProcess] = []
    log_dir = stack_settings.state_dir / "test-logs" / stack_settings.namespace
    log_dir.mkdir(parents=True, exist_ok=True)
    # Ports are fixed up front so every service knows where the others will listen.
    settings = stack_settings.model_copy(update={f"{svc}_port": free_port() for svc in SERVICE_NAMES})

    def start(name: str, **extra_env: str) -> ServiceProcess:
        own = settings
        # A second live instance of the same service (a replica, or one pointed elsewhere) gets its own
        # port; the others keep reaching the first one.
        if any(s.name == name and s.proc is not None and s.proc.poll() is None for s in started):
            own = settings.model_copy(update={f"{name}_port": free_port()})
        env = {**os.environ, **settings_env(own), "PYTHONUNBUFFERED": "1", **extra_env}
        svc = ServiceProcess(name, own, env, log_dir / f"{name}-{len(started)}.log")
        started.append(svc)
        return svc.start()

    yield start
    for svc in started:
        svc.kill(hard=False)
