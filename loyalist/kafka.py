"""Kafka adapter shared by every service: a safe producer, topic creation, a consumer factory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from loyalist.settings import Settings
from loyalist.topics import TOPICS, Topic

log = logging.getLogger(__name__)


def make_producer(settings: Settings, *, client_id: str, linger_ms: int = 2) -> AIOKafkaProducer:
    """A producer that never loses an acknowledged write: acks from all in-sync replicas and an
    idempotent session so retries cannot duplicate."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        request_timeout_ms=10_000,
        retry_backoff_ms=100,
    )


# key -> murmur2 hash (aiokafka's murmur2 is pure Python; the same customers' keys come back all the time).
_key_hashes: dict[bytes, int] = {}
_KEY_HASHES_MAX = 200_000


def _partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition ``producer.send`` would choose (Kafka's default: murmur2 of the key, positive, modulo)."""
    hashed = _key_hashes.get(key)
    if hashed is None:
        if len(_key_hashes) >= _KEY_HASHES_MAX:
            _key_hashes.clear()
        hashed = _key_hashes[key] = murmur2(key) & 0x7FFFFFFF
    return partitions[hashed % len(partitions)]


async def produce_many(producer: AIOKafkaProducer, topic: str,
                       records: Sequence[tuple[bytes, bytes]]) -> list[asyncio.Future[Any]]:
    """Queue many keyed records with one record batch per partition (partitioned by key exactly as
    ``producer.send`` would); returns the delivery futures to await. Several times less CPU than one ``send``
    per record, which matters for stages that emit thousands of records a second."""
    if not records:
        return []
    partitions = sorted(await producer.partitions_for(topic))
    by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, value in records:
        by_partition.setdefault(_partition_for(key, partitions), []).append((key, value))
    futures: list[asyncio.Future[Any]] = []
    for partition, items in by_partition.items():
        batch = producer.create_batch()
        for key, value in items:
            if batch.append(key=key, value=value, timestamp=None) is None:  # batch full: ship it, start another
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


def make_consumer(
    settings: Settings, *topics: str, group_id: str, client_id: str, **kwargs: object
) -> AIOKafkaConsumer:
    """A consumer that commits only what the caller says was processed (commit after the effect)."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        **kwargs,  # type: ignore[arg-type]
    )


async def ensure_topics(settings: Settings, topics: Iterable[Topic] = TOPICS, *, timeout_s: float = 30) -> list[str]:
    """Create the topics that do not exist yet (idempotent). Returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="loyalist-admin")
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=settings.topic(t.name),
                num_partitions=t.partitions or settings.kafka_partitions,
                replication_factor=1 if settings.env != "production" else 3,
                topic_configs=t.config(),
            )
            for t in topics
            if settings.topic(t.name) not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # a concurrent starter created them first; that is the state we want
            log.info("created topics %s", [t.name for t in wanted])
        return [t.name for t in wanted]
    finally:
        await admin.close()


async def delete_namespace_topics(settings: Settings) -> None:
    """Remove every topic of this namespace (test teardown): its own (``<namespace>.``) and those the faust
    apps of its services made (``<namespace>-<service>-...``: leader and changelog topics), which used to be
    left behind and piled up on a shared broker (116 of them after one session of bench runs)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="loyalist-admin")
    await admin.start()
    try:
        prefixes = (settings.namespace + ".", settings.namespace + "-")
        names = [n for n in await admin.list_topics() if n.startswith(prefixes)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def kafka_ready(settings: Settings, *, timeout_s: float = 5) -> bool:
    """True when the broker answers a metadata request."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, client_id="loyalist-ready", request_timeout_ms=3000
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.list_topics(), timeout_s)
        return True
    except Exception:
        return False
    finally:
        try:
            await admin.close()
        except Exception:
            pass
