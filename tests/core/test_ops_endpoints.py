"""/healthz and /readyz of every service app: a failing check answers 503 with what failed, by name."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loyalist.http import create_service_app
from loyalist.service import exit_when_dead


async def test_healthz_fails_when_a_part_of_the_process_died() -> None:
    app = create_service_app("opstest", title="t", description="t")
    alive = {"stream_app": True}
    app.state.live_checks["stream_app"] = lambda: alive["stream_app"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ok = await client.get("/healthz")
        assert ok.status_code == 200 and ok.json() == {"status": "ok", "service": "opstest"}
        alive["stream_app"] = False  # e.g. the faust app crashed: its agents will never run again
        dead = await client.get("/healthz")
        assert dead.status_code == 503
        assert dead.json() == {"status": "dead", "service": "opstest", "dead": ["stream_app"]}


async def test_readyz_names_the_dependency_that_does_not_answer() -> None:
    app = create_service_app("opstest", title="t", description="t")

    async def answers() -> bool:
        return True

    async def refuses() -> bool:
        raise ConnectionRefusedError("cassandra is down")

    app.state.ready_checks.update({"redis": answers, "cassandra": refuses})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        not_started = await client.get("/readyz")
        assert not_started.status_code == 503  # the lifespan has not finished starting
        app.state.started = True
        down = await client.get("/readyz")
        assert down.status_code == 503
        assert down.json()["checks"] == {"redis": True, "cassandra": False}
        app.state.ready_checks["cassandra"] = answers
        up = await client.get("/readyz")
        assert up.status_code == 200 and up.json()["status"] == "ready"


async def test_the_task_dump_shows_where_each_task_waits() -> None:
    import asyncio

    from loyalist.service import dump_tasks

    release = asyncio.Event()

    async def waiting_for_the_broker() -> None:
        await release.wait()

    task = asyncio.create_task(waiting_for_the_broker(), name="fold-consumer")
    await asyncio.sleep(0)
    dump = dump_tasks()
    release.set()
    await task
    assert "asyncio tasks" in dump and "waiting_for_the_broker" in dump and "release.wait()" in dump


async def test_a_consume_loop_stuck_in_one_await_is_reported_stalled() -> None:
    """Pure bookkeeping of BatchConsumer.stalled(): the loop task alive, its last turn long ago."""
    import asyncio
    import time

    from loyalist.consumer import BatchConsumer
    from loyalist.settings import Settings

    async def handler(_: object) -> None:
        return None

    consumer = BatchConsumer(Settings(), "t", group_id="g", handler=handler, service="test", stage="fold")
    assert not consumer.stalled()  # not started
    never = asyncio.Event()
    consumer._task = asyncio.create_task(never.wait())  # a loop stuck in one await
    consumer.last_turn = time.monotonic()
    assert not consumer.stalled(after_s=60)
    consumer.last_turn = time.monotonic() - 61
    assert consumer.stalled(after_s=60)
    consumer._task.cancel()
    await asyncio.gather(consumer._task, return_exceptions=True)
    assert not consumer.stalled(after_s=60)  # a dead loop is reported by `running`, not here


async def test_healthz_fails_while_a_consume_loop_is_stuck_or_ended() -> None:
    import asyncio
    import time

    from loyalist.consumer import STALL_S, BatchConsumer
    from loyalist.service import watch_consumers
    from loyalist.settings import Settings

    async def handler(_: object) -> None:
        return None

    app = create_service_app("opstest", title="t", description="t")
    consumer = BatchConsumer(Settings(), "t", group_id="g", handler=handler, service="opstest", stage="fold")
    never = asyncio.Event()
    consumer._task = asyncio.create_task(never.wait())
    watch_consumers(app, "opstest", lambda: [consumer])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/healthz")).status_code == 200
        consumer.last_turn = time.monotonic() - STALL_S - 1  # stuck in one await
        stuck = await client.get("/healthz")
        assert stuck.status_code == 503 and stuck.json()["dead"] == ["consumers"]
        consumer.last_turn = time.monotonic()
        assert (await client.get("/healthz")).status_code == 200
        consumer._task.cancel()  # the loop ended
        await asyncio.gather(consumer._task, return_exceptions=True)
        assert (await client.get("/healthz")).status_code == 503


async def test_a_process_failing_its_liveness_check_long_enough_ends_itself() -> None:
    app = create_service_app("opstest", title="t", description="t")
    app.state.live_checks["consumers"] = lambda: False  # a consume loop stuck for good
    ended = asyncio.Event()
    watch = asyncio.create_task(exit_when_dead(app, "opstest", 0.2, check_every_s=0.02, terminate=ended.set))
    await asyncio.wait_for(ended.wait(), 10)
    await asyncio.wait_for(watch, 1)  # it ends once it has asked for the exit


async def test_a_check_that_recovers_in_time_does_not_end_the_process() -> None:
    app = create_service_app("opstest", title="t", description="t")
    calls = {"n": 0}
    sixty_checks = asyncio.Event()

    def flapping() -> bool:
        # dead for 3 checks in every 4: a dead streak lasts 3 checks (~0.03 s), far from the 5 s that end it
        calls["n"] += 1
        if calls["n"] >= 60:
            sixty_checks.set()
        return calls["n"] % 4 == 0

    app.state.live_checks["consumers"] = flapping
    ended = asyncio.Event()
    watch = asyncio.create_task(exit_when_dead(app, "opstest", 5.0, check_every_s=0.01, terminate=ended.set))
    await asyncio.wait_for(sixty_checks.wait(), 30)
    watch.cancel()
    assert not ended.is_set()


@pytest.mark.parametrize(("ignore_sigterm", "expected"), [(False, -signal.SIGTERM), (True, 70)])
def test_terminate_process_signals_and_then_exits_hard(ignore_sigterm: bool, expected: int) -> None:
    # A shutdown that hangs (here: SIGTERM ignored) still ends the process, with 70, after the grace period.
    code = ("import signal, time\n"
            f"if {ignore_sigterm}: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "from loyalist.service import terminate_process\n"
            "terminate_process(grace_s=0.3)\n"
            "time.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert done.returncode == expected


def test_a_served_process_that_stays_dead_exits_with_a_failure_code(tmp_path: Path) -> None:
    # The whole path in a real process under uvicorn: the watcher's SIGTERM, uvicorn's graceful shutdown, then
    # exit code 70, which supervisors (systemd's Restart=on-failure) treat as a failure to restart.
    code = """
from fastapi import FastAPI
from loyalist.http import create_service_app
from loyalist.service import Resources, run_service
from loyalist.settings import Settings

def create_app(settings: Settings) -> FastAPI:
    resources = Resources(settings, "ingest", cassandra=False)
    app = create_service_app("ingest", title="t", description="t", lifespan=resources.lifespan)
    app.state.live_checks["consumers"] = lambda: False  # a consume loop that will never come round again
    return app

run_service("ingest", create_app)
"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LOYALIST_EXIT_WHEN_DEAD_S": "0.5", "LOYALIST_INGEST_PORT": str(port),
           "LOYALIST_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 70, done.stderr[-2000:]
    assert "failed for" in done.stderr and "ending the process" in done.stderr
