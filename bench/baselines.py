"""Raw baselines measured in the same run, on the same machine, with the same client libraries the services
use — the ceiling each Loyalist figure is read against:

- Kafka produce rate with ``loyalist.kafka.make_producer`` (acks=all, idempotent) of event-sized records;
- Kafka produce → consume round trip (one hop through the broker), p50/p99;
- Redis GET of a profile-sized JSON document, p50/p99 sequentially and GETs/s with concurrency;
- Cassandra prepared inserts, rows/s with concurrency and p99.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.loadgen import make_event, percentiles
from loyalist.cassandra import connect
from loyalist.kafka import make_consumer, make_producer
from loyalist.redis import make_redis
from loyalist.settings import Settings

JSON = dict[str, Any]


def event_payload(i: int) -> bytes:
    """An event as ingest writes it (envelope with server timestamps), ~450 bytes."""
    ev = make_event({"events": ["Product Viewed"], "prefix": "base"}, i)
    ev.update({"timestamp": "2026-01-01T00:00:00Z", "receivedAt": "2026-01-01T00:00:00Z", "source": "bench"})
    return orjson.dumps(ev)


async def _bench_topic(settings: Settings) -> str:
    """A topic only the baseline writes to, inside the namespace (removed with it)."""
    name = settings.topic("bench.baseline")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bench-admin")
    await admin.start()
    try:
        if name not in set(await admin.list_topics()):
            await admin.create_topics([NewTopic(name, settings.kafka_partitions, 1)])
    finally:
        await admin.close()
    return name


async def kafka_produce(settings: Settings, *, n: int = 100_000) -> JSON:
    topic = await _bench_topic(settings)
    payloads = [event_payload(i) for i in range(1000)]
    producer = make_producer(settings, client_id="bench-baseline", linger_ms=5)
    await producer.start()
    try:
        # warm up metadata and the idempotent session
        await producer.send_and_wait(topic, payloads[0], key=b"warm")
        started = time.perf_counter()
        futures = []
        for i in range(n):
            futures.append(await producer.send(topic, payloads[i % 1000], key=f"u{i % 5000}".encode()))
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
    finally:
        await producer.stop()
    return {"events_per_s": round(n / elapsed, 1), "events": n, "record_bytes": len(payloads[0]),
            "elapsed_s": round(elapsed, 2)}


async def kafka_roundtrip(settings: Settings, *, n: int = 400, rate: float = 200) -> JSON:
    """Latency of one hop: produce (acks=all) → a consumer polling the partition receives it."""
    topic = await _bench_topic(settings)
    producer = make_producer(settings, client_id="bench-roundtrip")
    consumer = make_consumer(settings, group_id=None, client_id="bench-roundtrip", fetch_max_wait_ms=5)  # type: ignore[arg-type]
    await producer.start()
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        sent: dict[bytes, float] = {}
        latencies: list[float] = []

        async def receive() -> None:
            while len(latencies) < n:
                batch = await consumer.getmany(tp, timeout_ms=200)
                now = time.perf_counter()
                for records in batch.values():
                    for rec in records:
                        if rec.key in sent:
                            latencies.append(now - sent.pop(rec.key))

        receiver = asyncio.create_task(receive())
        for i in range(n):
            key = f"rt-{i}".encode()
            sent[key] = time.perf_counter()
            await producer.send(topic, event_payload(i), key=key, partition=0)
            await asyncio.sleep(1 / rate)
        await asyncio.wait_for(receiver, 30)
    finally:
        await consumer.stop()
        await producer.stop()
    return percentiles(latencies)


async def redis_get(settings: Settings, *, n: int = 5000, duration_s: float = 3, concurrency: int = 32) -> JSON:
    client = make_redis(settings)
    key = settings.redis_key("bench", "baseline", uuid.uuid4().hex)
    doc = orjson.dumps({"profile_id": "p1", "traits": {f"t{i}": "x" * 20 for i in range(40)},
                        "orders_count": 3, "revenue_total": 120.5, "segments": ["a", "b"]})
    try:
        await client.set(key, doc, ex=600)
        latencies = []
        for _ in range(n):
            t = time.perf_counter()
            await client.get(key)
            latencies.append(time.perf_counter() - t)
        count = 0
        end = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < end:
                await client.get(key)
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rate = count / (time.perf_counter() - started)
    finally:
        await client.delete(key)
        await client.aclose()
    return {**percentiles(latencies), "gets_per_s": round(rate, 1), "value_bytes": len(doc)}


def cassandra_write(settings: Settings, *, n: int = 20_000, concurrency: int = 128) -> JSON:
    """Prepared single-row inserts with ``concurrency`` requests in flight (the driver's own event loop)."""
    from cassandra.concurrent import execute_concurrent_with_args

    cluster, session = connect(settings, keyspace=settings.keyspace)
    try:
        session.execute(
            "CREATE TABLE IF NOT EXISTS bench_baseline (k text, seq int, payload blob, PRIMARY KEY (k, seq))",
            timeout=60,
        )
        insert = session.prepare("INSERT INTO bench_baseline (k, seq, payload) VALUES (?, ?, ?)")
        payload = event_payload(0)
        args = [(f"u{i % 5000}", i, payload) for i in range(n)]
        # warm-up: connections and the prepared statement on the node
        execute_concurrent_with_args(session, insert, args[:500], concurrency=concurrency)
        started = time.perf_counter()
        results = execute_concurrent_with_args(session, insert, args, concurrency=concurrency,
                                               raise_on_first_error=False)
        elapsed = time.perf_counter() - started
        failed = sum(1 for ok, _ in results if not ok)
        # latency of single writes, sequential, for a floor
        latencies = []
        for i in range(500):
            t = time.perf_counter()
            session.execute(insert, (f"lat{i}", i, payload))
            latencies.append(time.perf_counter() - t)
        session.execute("DROP TABLE IF EXISTS bench_baseline", timeout=60)
    finally:
        cluster.shutdown()
    return {"writes_per_s": round((n - failed) / elapsed, 1), "writes": n, "failed": failed,
            "concurrency": concurrency, "single_write": percentiles(latencies)}


async def measure_all(settings: Settings, say: Any = print) -> JSON:
    out: JSON = {}
    say("baseline: raw Kafka produce (acks=all, idempotent) ...")
    out["kafka_produce"] = await kafka_produce(settings)
    say("baseline: raw Kafka produce → consume round trip ...")
    out["kafka_roundtrip"] = await kafka_roundtrip(settings)
    say("baseline: raw Redis GET ...")
    out["redis_get"] = await redis_get(settings)
    say("baseline: raw Cassandra prepared inserts ...")
    out["cassandra_write"] = await asyncio.to_thread(cassandra_write, settings)
    out["cpus"] = os.cpu_count()
    return out
