"""Kafka consumer lag, checked from outside the consumers and exported for Prometheus.

Lag measured inside a worker disappears exactly when it matters — when the worker is dead, stuck or
rebalancing — so it is read here from the broker instead: for every consumer group of the namespace (faust
apps are named ``<namespace>-<service>``), committed offsets against the partitions' end offsets.

    python -m loyalist.checks.lag [--port 8009] [--interval 10]     # serve /metrics
    python -m loyalist.checks.lag --once                            # print the lag table and exit

Series: ``loyalist_kafka_consumer_lag_messages{group,topic,partition}`` (the shared family),
``loyalist_kafka_consumer_committed_offset`` and ``loyalist_kafka_topic_end_offset`` (whose rates give the
consume and produce rates per partition), ``loyalist_kafka_lag_check_errors_total``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import Counter, Gauge, start_http_server

from loyalist.metrics import KAFKA_CONSUMER_LAG
from loyalist.settings import Settings

log = logging.getLogger("loyalist.checks.lag")

COMMITTED = Gauge(
    "loyalist_kafka_consumer_committed_offset", "Offset committed by a consumer group", ["group", "topic", "partition"]
)
END_OFFSET = Gauge(
    "loyalist_kafka_topic_end_offset", "Next offset to be written to a partition", ["topic", "partition"]
)
CHECK_ERRORS = Counter("loyalist_kafka_lag_check_errors_total", "Lag checks that failed", ["reason"])


@dataclass(frozen=True, slots=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


def compute_lag(
    committed: dict[str, dict[TopicPartition, int]], ends: dict[TopicPartition, int]
) -> list[PartitionLag]:
    """Lag per group and partition from committed offsets and end offsets (pure).

    >>> tp = TopicPartition("shop.events.raw", 0)
    >>> [r.lag for r in compute_lag({"shop-profile": {tp: 40}}, {tp: 100})]
    [60]
    >>> compute_lag({"shop-profile": {tp: 40}}, {})  # end offset unknown: no claim
    []
    """
    rows = []
    for group, offsets in sorted(committed.items()):
        for tp, offset in sorted(offsets.items(), key=lambda item: (item[0].topic, item[0].partition)):
            if tp in ends and offset >= 0:
                rows.append(PartitionLag(group, tp.topic, tp.partition, offset, ends[tp]))
    return rows


class LagChecker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = settings.namespace
        self.admin: AIOKafkaAdminClient | None = None
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                         client_id=f"{self.prefix}-lag-check", request_timeout_ms=10_000)
        await self.admin.start()
        # No group: this consumer only asks for end offsets and never joins or commits anything.
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                         client_id=f"{self.prefix}-lag-check", enable_auto_commit=False,
                                         isolation_level="read_committed")
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.admin is not None:
            await self.admin.close()

    def _ours(self, group: str) -> bool:
        return group == self.prefix or group.startswith(f"{self.prefix}-") or group.startswith(f"{self.prefix}.")

    async def measure(self) -> list[PartitionLag]:
        assert self.admin is not None and self.consumer is not None
        groups = [g[0] for g in await self.admin.list_consumer_groups() if self._ours(g[0])]
        committed: dict[str, dict[TopicPartition, int]] = {}
        for group in groups:
            offsets = await self.admin.list_consumer_group_offsets(group)
            # Only the namespace's own topics (faust's internal changelogs are not consumed through the group).
            committed[group] = {tp: meta.offset for tp, meta in offsets.items()
                                if tp.topic.startswith(f"{self.prefix}.")}
        tps = sorted({tp for offsets in committed.values() for tp in offsets})
        ends = await self.consumer.end_offsets(tps) if tps else {}
        return compute_lag(committed, ends)

    async def export_once(self) -> list[PartitionLag]:
        rows = await self.measure()
        # Replace the whole picture: groups that went away must not keep their last lag forever.
        KAFKA_CONSUMER_LAG.clear()
        COMMITTED.clear()
        END_OFFSET.clear()
        for row in rows:
            labels = (row.group, row.topic, str(row.partition))
            KAFKA_CONSUMER_LAG.labels(*labels).set(row.lag)
            COMMITTED.labels(*labels).set(row.committed)
            END_OFFSET.labels(row.topic, str(row.partition)).set(row.end)
        return rows


async def run(settings: Settings, *, port: int, interval_s: float, host: str) -> None:
    start_http_server(port, addr=host)
    log.info("consumer lag of namespace %s on http://%s:%d/metrics every %.0fs",
             settings.namespace, host, port, interval_s)
    checker = LagChecker(settings)
    while True:
        try:
            if checker.admin is None:
                await checker.start()
            await checker.export_once()
        except Exception as exc:
            CHECK_ERRORS.labels(type(exc).__name__).inc()
            log.warning("lag check failed: %s", exc)
            await checker.stop()
            checker = LagChecker(settings)
        await asyncio.sleep(interval_s)


async def print_once(settings: Settings) -> None:
    checker = LagChecker(settings)
    await checker.start()
    try:
        rows = await checker.measure()
    finally:
        await checker.stop()
    print(f"{'group':<32} {'topic':<40} {'part':>4} {'committed':>10} {'end':>10} {'lag':>8}")
    for row in rows:
        print(f"{row.group:<32} {row.topic:<40} {row.partition:>4} {row.committed:>10} {row.end:>10} {row.lag:>8}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loyalist.checks.lag", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8009)
    parser.add_argument("--host", default=None, help="listen address (default: LOYALIST_HOST)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between checks")
    parser.add_argument("--once", action="store_true", help="print the lag table and exit")
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.once:
        asyncio.run(print_once(settings))
        return 0
    try:
        asyncio.run(run(settings, port=args.port, interval_s=args.interval, host=args.host or settings.host))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
