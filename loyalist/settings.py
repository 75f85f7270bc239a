"""One settings class for every service and tool, read from ``LOYALIST_*`` environment variables.

>>> s = Settings(namespace="shop1", kafka_port=19092)
>>> s.kafka_bootstrap
'127.0.0.1:19092'
>>> s.topic("events.raw")
'shop1.events.raw'
>>> s.keyspace
'shop1'
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_NAMES = ("ingest", "profile", "segmenter", "journeys", "notify")
PROFILE_STAGES = ("resolve", "fold", "loyalty")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALIST_", extra="ignore")

    # Namespace isolates one deployment (or one test session) from another on shared servers:
    # it prefixes every Kafka topic and Redis key and names the Cassandra keyspace.
    namespace: str = "loyalist"
    env: str = "development"
    home: Path = Path(".loyalist")
    # Where the Maven-fetched server jars are copied (default: <home>/jars); private fault-test stacks
    # point it at the main stack's copy.
    jars_dir: Path | None = None
    log_level: str = "INFO"
    log_json: bool = False

    host: str = "127.0.0.1"
    kafka_host: str = "127.0.0.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_partitions: int = 6
    # A stream stage takes a batch at most this often (0: as soon as records are there). Quicker than its input,
    # a stage would take a few records at a time, and each batch costs a fetch, round trips and a commit: at
    # 1,000 events/s on 2 cores, 50 ms cut the machine's busy share from 95% to 77% (funnel mix) and 96% to 94%
    # (stress mix), one run each; 25 ms saved nothing, 100 ms added more latency than it saved
    # (docs/operations.md, "Stream batch pacing").
    consumer_min_batch_interval_ms: int = Field(default=50, ge=0, le=1000)
    # A stream stage commits its offsets at most this often while records keep coming, and as soon as its input
    # runs dry (0: after every batch). Offsets only ever cover finished effects, and every effect is idempotent,
    # so a crash redoes at most this much more. A commit per batch was a coordinator request and a write to
    # __consumer_offsets every batch, 1.4-3% of the py-spy samples of stages that were 16-25% busy
    # (docs/operations.md, "Offset commits").
    consumer_commit_interval_ms: int = Field(default=1000, ge=0, le=60_000)
    cassandra_hosts: str = "127.0.0.1"
    cassandra_port: int = 9042
    # Inter-node and JMX ports of the local Cassandra (a second, private node needs its own).
    cassandra_storage_port: int = 7000
    cassandra_jmx_port: int = 7199
    # Heap of the local Cassandra (devstack). With 1 GiB, on-heap memtables and caches left G1 a young generation
    # of 16-32 MiB and young pauses of 200-300 ms under load; 2 GiB fits the 24 GiB machine comfortably.
    cassandra_heap: str = Field(default="2g", pattern=r"^[0-9]+[mgMG]$")
    cassandra_replication_factor: int = 1
    # Commit log sync of the local Cassandra (devstack). "periodic" (Cassandra's default, what clusters with RF 3
    # run) acknowledges a write before its commit log is synced: a kill -9 of this single node lost its last
    # ~50 ms of acknowledged writes. "batch" acknowledges only synced writes: nothing acknowledged is lost, at
    # about half the write throughput here (docs/operations.md, "Commit log durability").
    cassandra_commitlog_sync: Literal["periodic", "batch"] = "periodic"
    # Timer slack of the local Cassandra's threads (devstack), in microseconds; 0 keeps the kernel's 50 us. Its
    # idle request workers wait for work in sleeps of 10 us to 1 ms before parking: at 200 writes/s those
    # wake-ups cost 42% of a core here, with 1 ms of slack 11%, for +0.6 ms per request (docs/operations.md,
    # "Cassandra's idle workers").
    cassandra_timer_slack_us: int = Field(default=1000, ge=0, le=100_000)
    # A process whose liveness check (/healthz) has failed this long shuts down and exits with 70, so a
    # supervisor that only restarts exited processes (docker compose's restart policy, systemd) restarts it, as
    # Kubernetes's liveness probe does. 0 keeps it running (and failing /healthz).
    exit_when_dead_s: float = Field(default=120.0, ge=0)
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    prometheus_port: int = 9090
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_sink_http_port: int = 1080

    ingest_port: int = 8001
    profile_port: int = 8002
    segmenter_port: int = 8003
    journeys_port: int = 8004
    notify_port: int = 8005
    # Consumer-lag exporter (loyalist.checks.lag), scraped by Prometheus.
    lag_exporter_port: int = 8009
    # A profile process that only serves the profile API (no stream processing): read replicas for the services
    # that query profiles, scaled apart from the workers, whose batches then never hold up a request.
    profile_api_only: bool = False
    # Which stages a profile worker runs (comma-separated): "resolve" (identity resolution of events.raw),
    # "fold" (profile.fold: store, fold, publish; segment memberships too) and "loyalty" (the loyalty ledger's
    # consumers of events.resolved). Each is its own consumer group, so a deployment can run them in separate
    # processes and scale them apart.
    profile_stages: str = "resolve,fold,loyalty"

    # Base URLs other services use to reach each other (defaults follow the ports above).
    ingest_url: str | None = None
    profile_url: str | None = None
    segmenter_url: str | None = None
    journeys_url: str | None = None
    notify_url: str | None = None

    # Secret used to sign links (unsubscribe, click tracking) and webhook payloads.
    signing_secret: str = Field(default="dev-signing-secret-change-me", repr=False)
    # Development credentials; only the local stack creates them (see loyalist.auth).
    dev_write_key: str = "dev_write_key"
    dev_api_token: str = Field(default="dev_api_token", repr=False)

    @field_validator("namespace")
    @classmethod
    def _namespace_is_identifier(cls, value: str) -> str:
        # The namespace doubles as a Cassandra keyspace name: letters, digits, underscore.
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", value):
            raise ValueError("namespace must match [a-z][a-z0-9_]{0,40}")
        return value

    @field_validator("profile_stages")
    @classmethod
    def _known_stages(cls, value: str) -> str:
        stages = [s.strip() for s in value.split(",") if s.strip()]
        if not stages or any(s not in PROFILE_STAGES for s in stages):
            raise ValueError(f"profile_stages must be a comma-separated subset of {', '.join(PROFILE_STAGES)}")
        return ",".join(stages)

    @property
    def profile_stage_set(self) -> frozenset[str]:
        """
        >>> sorted(Settings(profile_stages="fold").profile_stage_set)
        ['fold']
        """
        return frozenset(self.profile_stages.split(","))

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.kafka_host}:{self.kafka_port}"

    @property
    def keyspace(self) -> str:
        return self.namespace

    @property
    def cassandra_contact_points(self) -> list[str]:
        return [h.strip() for h in self.cassandra_hosts.split(",") if h.strip()]

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    def topic(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def redis_key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def service_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_port"))

    def service_url(self, service: str) -> str:
        explicit = getattr(self, f"{service}_url")
        return explicit or f"http://{self.host}:{self.service_port(service)}"

    @property
    def state_dir(self) -> Path:
        return self.home.resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
