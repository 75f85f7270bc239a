"""The local stack manager: idempotent start, readiness with real clients, clear failures, exact stop."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from loyalist.devstack import Stack, StackError, _pid_alive
from loyalist.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def private_settings(tmp_path: Path, **ports: int) -> Settings:
    return Settings(home=tmp_path / "stack", redis_port=free_port(), **ports)


def test_redis_start_is_idempotent_and_down_stops_exactly_it(tmp_path: Path) -> None:
    stack = Stack(private_settings(tmp_path), quiet=True)
    stack.up(["redis"])
    pid = stack.pid_of("redis")
    assert pid is not None and stack.components["redis"].ready()
    # A second start reuses the running server instead of starting another.
    assert stack.start("redis") == f"reused (pid {pid})"
    assert stack.status(["redis"]) == [("redis", f"ready (pid {pid})")]
    stack.down(["redis"])
    assert not _pid_alive(pid)
    assert not stack.pid_file("redis").exists()
    assert not stack.components["redis"].ready()


def test_a_foreign_process_on_the_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        stack = Stack(Settings(home=tmp_path / "stack", redis_port=port), quiet=True)
        with pytest.raises(StackError, match=rf"redis: port {port} is taken.*LOYALIST_REDIS_PORT"):
            stack.start("redis")


def test_a_server_that_dies_at_start_names_itself_and_its_log(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "stack", redis_port=free_port())
    stack = Stack(settings, quiet=True)
    comp = stack.components["redis"]
    # An invalid option makes redis-server exit at once, as a broken install or config would.
    original = comp.command
    comp.command = lambda: [*original(), "--no-such-option", "x"]
    stack.start("redis")
    with pytest.raises(StackError) as failure:
        stack.wait_ready("redis")
    message = str(failure.value)
    assert "redis exited during start" in message
    assert str(stack.log_file("redis")) in message


@pytest.mark.parametrize("mode", ["periodic", "batch"])
def test_the_local_cassandra_gets_the_commit_log_sync_asked_for(tmp_path: Path, mode: str) -> None:
    import yaml

    stack = Stack(Settings(home=tmp_path / "stack", cassandra_commitlog_sync=mode), quiet=True)
    stack._cassandra_prepare()
    config = yaml.safe_load((tmp_path / "stack" / "cassandra" / "cassandra.yaml").read_text())
    assert config["commitlog_sync"] == mode
    # Cassandra refuses a batch commit log with a sync period, and a periodic one without it.
    assert ("commitlog_sync_period" in config) == (mode == "periodic")


THREAD_SLACKS = """
import threading
def read():
    with open(f"/proc/{threading.get_native_id()}/timerslack_ns") as f:
        return f.read().strip()
seen = []
def worker():
    seen.append(read())
    inner = threading.Thread(target=lambda: seen.append(read()))
    inner.start(); inner.join()
t = threading.Thread(target=worker); t.start(); t.join()
print(read(), *seen)
"""


@pytest.mark.skipif(not Path("/proc/self/timerslack_ns").exists(), reason="the kernel has no per-thread slack")
def test_a_command_with_timer_slack_has_it_on_every_thread_it_creates(tmp_path: Path) -> None:
    import subprocess
    import sys

    from loyalist.devstack import with_timer_slack

    command = [sys.executable, "-c", THREAD_SLACKS]
    out = subprocess.run(with_timer_slack(command, 750), capture_output=True, text=True, check=True).stdout
    # The main thread, a thread it started and a thread that one started: all inherit the slack.
    assert out.split() == ["750000"] * 3
    default = subprocess.run(with_timer_slack(command, 0), capture_output=True, text=True, check=True).stdout
    assert set(default.split()) != {"750000"}


def test_the_local_cassandra_runs_with_the_timer_slack_asked_for(tmp_path: Path) -> None:
    stack = Stack(Settings(home=tmp_path / "stack", cassandra_timer_slack_us=1000), quiet=True)
    command = stack._cassandra_cmd()
    assert command[-1] == "org.apache.cassandra.service.CassandraDaemon"
    if Path("/proc/self/timerslack_ns").exists():
        assert command[:2] == ["/bin/sh", "-c"] and "echo 1000000" in command[2]
    off = Stack(Settings(home=tmp_path / "stack", cassandra_timer_slack_us=0), quiet=True)._cassandra_cmd()
    assert off[0].endswith("java")
