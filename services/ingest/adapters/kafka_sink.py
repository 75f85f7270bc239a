"""Publishing events to ``events.raw``: an idempotent acks=all producer that ingest keeps running even
when Kafka is down at startup (it reconnects in the background and requests get 503 meanwhile)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from loyalist.kafka import make_producer
from loyalist.metrics import KAFKA_PRODUCE_DURATION, KAFKA_PRODUCE_ERRORS, KAFKA_PRODUCED
from loyalist.settings import Settings

log = logging.getLogger(__name__)

# From this many records per call on, records are grouped into per-partition batches by hand: several times
# less CPU per record for a /v1/batch request's hundreds of records. Below it, one ``send`` per record lets
# the producer's accumulator merge them with other calls' records into the same batches (linger): a
# hand-built batch is a batch of its own, and with the idempotent producer's one batch in flight per
# partition, many small ones cost a produce request each (measured: ~120 µs of CPU per record in groups of
# 6 against ~20 µs with ``send``; 3 against 12-15 µs per record in groups of 500).
BATCH_THRESHOLD = 100


# key → murmur2 hash: aiokafka's murmur2 is pure Python (a few µs per key) and customers come back.
_KEY_HASHES_MAX = 200_000


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge in time; ``acked`` tells which records of the call were written."""

    def __init__(self, message: str, acked: list[bool]) -> None:
        super().__init__(message)
        self.acked = acked


class EventSink:
    def __init__(self, settings: Settings, topic: str, *, timeout_s: float, linger_ms: int) -> None:
        self.settings = settings
        self.topic = topic
        self.timeout_s = timeout_s
        self.linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        self._connector: asyncio.Task[None] | None = None
        self._produce_latency = KAFKA_PRODUCE_DURATION.labels("ingest", topic)
        self._produced = KAFKA_PRODUCED.labels("ingest", topic)
        self._key_hashes: dict[bytes, int] = {}

    @property
    def connected(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        self._connector = asyncio.create_task(self._connect_forever())

    async def _connect_forever(self) -> None:
        delay = 0.5
        while True:
            producer = make_producer(
                self.settings, client_id=f"{self.settings.namespace}-ingest", linger_ms=self.linger_ms
            )
            try:
                await producer.start()
            except Exception as exc:
                log.warning("kafka not reachable (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self._producer = producer
            log.info("kafka producer connected to %s", self.settings.kafka_bootstrap)
            return

    async def stop(self) -> None:
        if self._connector is not None and not self._connector.done():
            self._connector.cancel()
            with contextlib.suppress(BaseException):
                await self._connector
        if self._producer is not None:
            # Flushes what is in flight.
            await self._producer.stop()
            self._producer = None

    async def check(self) -> bool:
        if self._producer is None:
            return False
        await asyncio.wait_for(self._producer.client.fetch_all_metadata(), 3)
        return True

    def _partition(self, key: bytes, partitions: Sequence[int]) -> int:
        """The partition ``send`` would choose for ``key`` (Kafka's default partitioner: murmur2 of the key,
        made positive, modulo the number of partitions, over the sorted partition ids)."""
        hashed = self._key_hashes.get(key)
        if hashed is None:
            if len(self._key_hashes) >= _KEY_HASHES_MAX:
                self._key_hashes.clear()
            hashed = self._key_hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]

    async def _send_batches(self, producer: AIOKafkaProducer, records: Sequence[tuple[bytes, bytes]],
                             partitions: Sequence[int], futures: list[asyncio.Future[object]]) -> list[int]:
        """Many records: build one record batch per partition ourselves (several times faster than one
        ``send`` per record), partitioned by key exactly as ``send`` would."""
        by_partition: dict[int, list[int]] = {}
        for index, (key, _) in enumerate(records):
            by_partition.setdefault(self._partition(key, partitions), []).append(index)
        owner = [0] * len(records)
        for partition, indices in by_partition.items():
            batch = producer.create_batch()
            members: list[int] = []
            for index in indices:
                key, value = records[index]
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full: ship it
                    futures.append(await producer.send_batch(batch, self.topic, partition=partition))
                    for m in members:
                        owner[m] = len(futures) - 1
                    batch, members = producer.create_batch(), []
                    batch.append(key=key, value=value, timestamp=None)
                members.append(index)
            futures.append(await producer.send_batch(batch, self.topic, partition=partition))
            for m in members:
                owner[m] = len(futures) - 1
        return owner

    async def publish(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Write (key, value) records and wait until Kafka acknowledged every one of them.

        Raises :class:`KafkaUnavailable` (with which records were acknowledged) when the broker is
        unreachable or slower than the timeout; the caller answers 503 and the client retries.
        """
        producer = self._producer
        if producer is None:
            KAFKA_PRODUCE_ERRORS.labels("ingest", self.topic, "not_connected").inc()
            raise KafkaUnavailable("kafka is not connected", [False] * len(records))
        started = time.perf_counter()
        futures: list[asyncio.Future[object]] = []
        owner: list[int] = []  # index into futures of each record's delivery
        try:
            async with asyncio.timeout(self.timeout_s):
                partitions = sorted(await producer.partitions_for(self.topic))
                if len(records) < BATCH_THRESHOLD:
                    # Few records (single calls, coalesced or not): the accumulator merges them with other
                    # calls' records (linger).
                    for key, value in records:
                        owner.append(len(futures))
                        futures.append(await producer.send(self.topic, value, key=key,
                                                           partition=self._partition(key, partitions)))
                else:
                    owner = await self._send_batches(producer, records, partitions, futures)
                await asyncio.gather(*futures)
        except Exception as exc:
            delivered = [f.done() and not f.cancelled() and f.exception() is None for f in futures]
            acked = [i < len(owner) and delivered[owner[i]] for i in range(len(records))]
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            KAFKA_PRODUCE_ERRORS.labels("ingest", self.topic, reason).inc()
            log.warning("produce failed (%s): %d of %d acknowledged", reason, sum(acked), len(records))
            raise KafkaUnavailable(f"kafka did not acknowledge: {reason}", acked) from exc
        self._produce_latency.observe(time.perf_counter() - started)
        self._produced.inc(len(records))
