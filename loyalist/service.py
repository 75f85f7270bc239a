"""What every service process shares: connecting its adapters in the FastAPI lifespan, readiness
checks, an embedded faust app for its stream agents, and running under uvicorn.

A service's ``app.py`` looks like::

    def create_app(settings: Settings | None = None) -> FastAPI:
        settings = settings or Settings()
        resources = Resources(settings, "profile", cassandra=True, redis=True, producer=True)
        app = create_service_app("profile", title=..., description=..., lifespan=resources.lifespan)
        app.include_router(...)
        return app

and its ``__main__.py`` is ``run_service("profile", create_app)``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import faust
import uvicorn
from aiokafka import AIOKafkaProducer
from cassandra.cluster import Cluster, Session
from fastapi import FastAPI, Request
from redis.asyncio import Redis

from loyalist.auth import CredentialStore
from loyalist.cassandra import execute, make_cluster
from loyalist.heap import settle_heap
from loyalist.http import failing_live_checks
from loyalist.kafka import make_producer
from loyalist.logging import configure_logging
from loyalist.redis import make_redis, redis_ready
from loyalist.settings import Settings

if TYPE_CHECKING:
    from loyalist.consumer import BatchConsumer

log = logging.getLogger(__name__)

Hook = Callable[["Resources", FastAPI], Awaitable[None]]


def make_stream_app(settings: Settings, service: str, **overrides: Any) -> faust.App:
    """The faust app of a service's stream agents, embedded in the service process (started in the
    lifespan). Offsets are committed by faust only after an agent finished with an event, so every
    effect must be idempotent; producers wait for all in-sync replicas."""
    # faust's default data dir is ``<app id>-data`` in the working directory; keep it under the home (faust
    # creates only the last directory level itself).
    datadir = settings.state_dir / "faust" / f"{settings.namespace}-{service}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "broker": f"kafka://{settings.kafka_bootstrap}",
        "web_enabled": False,
        "datadir": str(datadir),
        "store": "memory://",
        "topic_partitions": settings.kafka_partitions,
        "topic_replication_factor": 1,
        "producer_acks": -1,
        "consumer_auto_offset_reset": "earliest",
        "broker_commit_every": 200,
        "broker_commit_interval": 1.0,
        "stream_wait_empty": False,
        "table_cleanup_interval": 30.0,
    }
    config.update(overrides)
    return faust.App(f"{settings.namespace}-{service}", **config)


class Resources:
    """The adapters a service uses, opened in the app's lifespan and closed on shutdown.

    Readiness (``/readyz``) checks each opened adapter with a real round trip.
    """

    def __init__(
        self,
        settings: Settings,
        service: str,
        *,
        cassandra: bool = True,
        redis: bool = False,
        producer: bool = False,
        stream_app: faust.App | None = None,
        on_start: Hook | None = None,
        on_stop: Hook | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self._want_cassandra = cassandra
        self._want_redis = redis
        self._want_producer = producer
        self.stream_app = stream_app
        self._on_start = on_start
        self._on_stop = on_stop
        self.cluster: Cluster | None = None
        self._session: Session | None = None
        self._redis: Redis | None = None
        self._producer: AIOKafkaProducer | None = None
        self.credentials: CredentialStore | None = None
        self._exit_watch: asyncio.Task[None] | None = None

    @property
    def session(self) -> Session:
        assert self._session is not None, "cassandra not opened for this service"
        return self._session

    @property
    def redis(self) -> Redis:
        assert self._redis is not None, "redis not opened for this service"
        return self._redis

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "kafka producer not opened for this service"
        return self._producer

    async def open(self, app: FastAPI) -> None:
        install_task_dump()
        checks = app.state.ready_checks
        if self._want_cassandra:
            self.cluster = make_cluster(self.settings)
            self._session = await asyncio.to_thread(self.cluster.connect, self.settings.keyspace)
            self.credentials = CredentialStore(self._session)
            app.state.credentials = self.credentials

            async def cassandra_check() -> bool:
                await execute(self.session, "SELECT now() FROM system.local")
                return True

            checks["cassandra"] = cassandra_check
        if self._want_redis:
            self._redis = make_redis(self.settings)

            async def redis_check() -> bool:
                return await redis_ready(self.redis)

            checks["redis"] = redis_check
        if self._want_producer:
            self._producer = make_producer(self.settings, client_id=f"{self.settings.namespace}-{self.service}")
            await self._producer.start()

            async def kafka_check() -> bool:
                assert self._producer is not None
                # A metadata round trip to the broker.
                await asyncio.wait_for(self._producer.client.fetch_all_metadata(), 3)
                return True

            checks["kafka"] = kafka_check
        if self._on_start is not None:
            await self._on_start(self, app)
        if self.stream_app is not None:
            await self.stream_app.start()
            stream_app = self.stream_app
            # A crashed faust app has stopped its agents for good while the process lives on: the liveness
            # check fails, so the orchestrator restarts the process instead of leaving its partitions unconsumed.
            app.state.live_checks["stream_app"] = lambda: not stream_app.crashed
        app.state.resources = self
        app.state.started = True
        if self.settings.exit_when_dead_s > 0:
            self._exit_watch = asyncio.create_task(
                exit_when_dead(app, self.service, self.settings.exit_when_dead_s), name=f"{self.service}-exit-watch")
        settle_heap()

    async def close(self, app: FastAPI) -> None:
        app.state.started = False
        if self._exit_watch is not None:
            self._exit_watch.cancel()
        if self.stream_app is not None:
            try:
                await self.stream_app.stop()
            except Exception:
                log.exception("stopping the stream app")
        if self._on_stop is not None:
            await self._on_stop(self, app)
        if self._producer is not None:
            await self._producer.stop()
        if self._redis is not None:
            await self._redis.aclose()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.shutdown)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.open(app)
        try:
            yield
        finally:
            await self.close(app)


def resources(request: Request) -> Resources:
    """FastAPI dependency: the service's opened adapters."""
    return request.app.state.resources  # type: ignore[no-any-return]


def run_service(service: str, create_app: Callable[[Settings], FastAPI], *,
                wrap: Callable[[FastAPI], Any] | None = None) -> None:
    """Serve the app under uvicorn. ``wrap`` puts an ASGI layer in front of the whole FastAPI app (e.g. a
    short path for a service's hot endpoints)."""
    settings = Settings()
    configure_logging(settings, service)
    app = create_app(settings)
    global _server
    _server = uvicorn.Server(uvicorn.Config(
        wrap(app) if wrap is not None else app,
        host=settings.host,
        port=settings.service_port(service),
        log_level=settings.log_level.lower(),
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
    ))
    _server.run()
    if _ended_dead.is_set():
        raise SystemExit(EXIT_DEAD)


def dump_tasks() -> str:
    """Where every asyncio task of the running loop is waiting: the answer to "what is this worker stuck on?"."""
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out.write(f"{len(tasks)} asyncio tasks\n")
    for task in tasks:
        task.print_stack(limit=12, file=out)
    return out.getvalue()


def install_task_dump() -> None:
    """``kill -USR1 <pid>`` logs where every task of the service waits (a worker that stopped consuming)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.warning("task dump on SIGUSR1:\n%s", dump_tasks()))
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # no signals here (another thread's loop, Windows): nothing to install


EXIT_DEAD = 70  # EX_SOFTWARE: the exit code of a process that ended itself because it was no longer alive
_ended_dead = threading.Event()
_server: uvicorn.Server | None = None  # the server run_service runs, if any


def terminate_process(grace_s: float = 30.0) -> None:
    """End this process with ``EXIT_DEAD``, a failure for supervisors: under :func:`run_service`, uvicorn shuts
    down gracefully (consumers stop, producers flush) and the process then exits with it; elsewhere, SIGTERM. If
    that has not ended it within ``grace_s`` (a shutdown waiting on what is stuck), exit at once."""
    _ended_dead.set()
    timer = threading.Timer(grace_s, os._exit, (EXIT_DEAD,))
    timer.daemon = True
    timer.start()
    if _server is not None:
        _server.should_exit = True
    else:
        os.kill(os.getpid(), signal.SIGTERM)


async def exit_when_dead(app: FastAPI, service: str, after_s: float, *, check_every_s: float = 5.0,
                         terminate: Callable[[], None] = terminate_process) -> None:
    """End the process once a liveness check has failed for ``after_s`` in a row: a stuck or ended consume loop
    or a crashed faust app does not come back by itself, and only Kubernetes restarts a process that is up but
    failing ``/healthz``; docker compose and systemd restart processes that exited. Records are redone from the
    committed offsets by the restarted process, and every effect is idempotent."""
    dead_since: float | None = None
    while True:
        await asyncio.sleep(check_every_s)
        dead = failing_live_checks(app)
        if not dead:
            dead_since = None
            continue
        now = time.monotonic()
        dead_since = now if dead_since is None else dead_since
        if now - dead_since >= after_s:
            log.error("%s: liveness checks %s failed for %.0f s; ending the process so that it is restarted",
                      service, ", ".join(dead), now - dead_since)
            terminate()
            return


def watch_consumers(app: FastAPI, service: str, consumers: Callable[[], Sequence[BatchConsumer]]) -> None:
    """Liveness of a service's consume loops: ``/healthz`` fails when one has ended or has been stuck in one
    await for minutes (:meth:`BatchConsumer.stalled`): neither comes back by itself, a restart redoes its records
    from the committed offsets. The first time, the service logs where every task waits, to find out why."""
    reported: set[str] = set()

    def consumers_alive() -> bool:
        current = consumers()
        stuck = [c for c in current if c.stalled()]
        for c in stuck:
            if c.stage not in reported:
                reported.add(c.stage)
                log.error("%s/%s: the consume loop has not come round for %.0f s; tasks:\n%s",
                          service, c.stage, time.monotonic() - c.last_turn, dump_tasks())
        return not stuck and all(c.running for c in current)

    app.state.live_checks["consumers"] = consumers_alive

