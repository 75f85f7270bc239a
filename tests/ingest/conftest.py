"""Fixtures of the ingest tests: one ingest process for the session, and a tap on ``events.raw``."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loyalist.devstack import REPO
from loyalist.events import Event, decode_event
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@pytest.fixture(scope="session")
def ingest(start_service: Callable[..., Any]) -> Any:
    return start_service("ingest")


@pytest.fixture()
def track_client(ingest: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ingest.url, timeout=30, headers=basic(ingest.settings.dev_write_key)) as client:
        yield client


async def _read_raw(settings: Settings, until: Callable[[list[tuple[bytes, Event]]], bool],
                    timeout_s: float) -> list[tuple[bytes, Event]]:
    topic = settings.topic(EVENTS_RAW.name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    seen: list[tuple[bytes, Event]] = []
    try:
        partitions = [TopicPartition(topic, p) for p in range(EVENTS_RAW.partitions or settings.kafka_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        # Everything acknowledged before now is below these offsets: read at least that far, so "exactly
        # one copy" assertions see every copy.
        end = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300, max_records=5000)
            for records in batches.values():
                seen.extend((r.key or b"", decode_event(r.value)) for r in records)
            caught_up = all([await consumer.position(tp) >= end[tp] for tp in partitions])
            if caught_up and until(seen):
                break
    finally:
        await consumer.stop()
    return seen


def raw_events(settings: Settings, message_ids: Iterable[str],
               timeout_s: float = 20) -> dict[str, list[tuple[bytes, Event]]]:
    """Every ``events.raw`` record whose messageId is in ``message_ids`` (waits until each appeared once
    or the deadline passes). Values are lists so tests can assert there is exactly one copy."""
    wanted = set(message_ids)

    def complete(seen: list[tuple[bytes, Event]]) -> bool:
        return wanted <= {e.message_id for _, e in seen}

    seen = asyncio.run(_read_raw(settings, complete, timeout_s))
    found: dict[str, list[tuple[bytes, Event]]] = {}
    for key, event in seen:
        if event.message_id in wanted:
            found.setdefault(event.message_id, []).append((key, event))
    return found


def raw_events_where(settings: Settings, predicate: Callable[[Event], bool], count: int,
                     timeout_s: float = 20) -> list[Event]:
    """Events matching ``predicate``; waits until at least ``count`` were seen or the deadline."""
    seen = asyncio.run(_read_raw(settings, lambda s: sum(1 for _, e in s if predicate(e)) >= count, timeout_s))
    return [e for _, e in seen if predicate(e)]


class IngestProcess:
    """A private ingest process with extra environment (fault tests); waits for /healthz, not /readyz,
    because a process pointed at a dead Kafka is deliberately not ready."""

    def __init__(self, settings: Settings, port: int, log_path: str, **env: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        settings_env = {f"LOYALIST_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None}
        full_env = {**os.environ, **settings_env, "PYTHONUNBUFFERED": "1",
                    "LOYALIST_INGEST_PORT": str(port), **env}
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "services.ingest"], cwd=REPO, env=full_env,
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_live(self, timeout_s: float = 60) -> IngestProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingest exited; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"ingest not live in {timeout_s}s; see {self.log_path}")

    def wait_ready(self, timeout_s: float = 60) -> IngestProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"ingest not ready in {timeout_s}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture()
def private_ingest(stack_settings: Settings) -> Iterator[Callable[..., IngestProcess]]:
    started: list[IngestProcess] = []
    log_dir = stack_settings.state_dir / "test-logs" / stack_settings.namespace
    log_dir.mkdir(parents=True, exist_ok=True)

    def start(**env: str) -> IngestProcess:
        proc = IngestProcess(stack_settings, _free_port(), str(log_dir / f"ingest-private-{len(started)}.log"), **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


class RawTap:
    """Reads this session's ``events.raw`` from the beginning (the namespace is fresh, so it is small)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def by_ids(self, message_ids: Iterable[str], timeout_s: float = 20) -> dict[str, list[tuple[bytes, Event]]]:
        return raw_events(self.settings, message_ids, timeout_s)

    def where(self, predicate: Callable[[Event], bool], count: int, timeout_s: float = 20) -> list[Event]:
        return raw_events_where(self.settings, predicate, count, timeout_s)


@pytest.fixture(scope="session")
def kafka_raw(stack_settings: Settings) -> RawTap:
    return RawTap(stack_settings)


@pytest.fixture(scope="session")
def basic_auth() -> Callable[[str], dict[str, str]]:
    return basic
