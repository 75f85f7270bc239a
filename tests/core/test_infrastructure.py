"""The shared adapters against the real local servers."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from loyalist.cassandra import connect, execute
from loyalist.events import Event, decode_event, encode_event, utcnow
from loyalist.kafka import make_consumer, make_producer
from loyalist.redis import make_redis
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW

pytestmark = pytest.mark.integration


async def test_kafka_roundtrip_keeps_every_field(stack_settings: Settings) -> None:
    event = Event(type="track", event="Product Viewed", message_id=str(uuid.uuid4()), timestamp=utcnow(),
                  received_at=utcnow(), anonymous_id="anon-1", properties={"sku": "A1", "price": 9.5},
                  source="test")
    topic = stack_settings.topic(EVENTS_RAW.name)
    producer = make_producer(stack_settings, client_id="test")
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, encode_event(event), key=event.partition_key.encode())
    finally:
        await producer.stop()
    consumer = make_consumer(stack_settings, group_id=f"test-{uuid.uuid4()}", client_id="test")
    await consumer.start()
    try:
        from aiokafka import TopicPartition

        tp = TopicPartition(topic, meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await asyncio.wait_for(consumer.getone(), 20)
    finally:
        await consumer.stop()
    assert record.key == b"anon-1"
    assert decode_event(record.value) == event


async def test_cassandra_migrations_and_async_execute(stack_settings: Settings) -> None:
    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    try:
        versions = [r["version"] for r in await execute(session, "SELECT version FROM schema_migrations")]
        assert "0001" in versions
        rows = await execute(session, "SELECT kind FROM credentials")
        assert {r["kind"] for r in rows} >= {"write_key", "api_token"}
    finally:
        cluster.shutdown()


def test_cassandra_connections_send_without_nagle_delay(stack_settings: Settings) -> None:
    """Every driver connection (control and request pools) has TCP_NODELAY: with Nagle's algorithm on, a request
    written while an earlier one on the same connection is unacknowledged waits for the node's (delayed) ACK."""
    import socket

    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    try:
        session.execute("SELECT version FROM schema_migrations LIMIT 1")
        sockets = [cluster.control_connection._connection._socket]
        for pool in session.get_pools():
            sockets.append(pool._connection._socket)
        assert len(sockets) >= 2
        assert [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets] == [1] * len(sockets)
    finally:
        cluster.shutdown()


def test_a_single_node_keyspace_purges_tombstones_and_paxos_state_after_3_hours(stack_settings: Settings) -> None:
    from loyalist.cassandra import migrate

    cluster, session = connect(stack_settings)
    single = stack_settings.model_copy(update={"namespace": f"gc1_{uuid.uuid4().hex[:8]}"})
    query = "SELECT table_name, gc_grace_seconds FROM system_schema.tables WHERE keyspace_name = %s"
    try:
        migrate(single, session)
        grace = {r["table_name"]: r["gc_grace_seconds"] for r in session.execute(query, (single.keyspace,))}
        # Every table of the migrations (schema_migrations itself excepted), the lightweight-transaction ones
        # (whose Paxos state lives max(3 h, gc_grace_seconds)) and the queues alike.
        assert {"identities", "notify_messages", "seg_outbox", "credentials"} <= set(grace)
        assert {t: g for t, g in grace.items() if t != "schema_migrations" and g != 10800} == {}
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {single.keyspace}")
        cluster.shutdown()


async def test_redis_namespaced_keys(stack_settings: Settings) -> None:
    client = make_redis(stack_settings)
    key = stack_settings.redis_key("probe", uuid.uuid4().hex)
    try:
        await client.set(key, b"1", ex=60)
        assert await client.get(key) == b"1"
        assert key.startswith(stack_settings.namespace + ":")
    finally:
        await client.delete(key)
        await client.aclose()
