"""The consumer-lag check reads real committed and end offsets from the running Kafka."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from loyalist.checks.lag import LagChecker
from loyalist.kafka import make_consumer, make_producer
from loyalist.metrics import KAFKA_CONSUMER_LAG
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW

pytestmark = pytest.mark.integration


async def produce_and_commit(settings: Settings, group: str, counts: dict[int, int], committed: dict[int, int]) -> str:
    topic = settings.topic(EVENTS_RAW.name)
    producer = make_producer(settings, client_id="lag-test")
    await producer.start()
    try:
        for partition, count in counts.items():
            for i in range(count):
                await producer.send_and_wait(topic, b'{"test": true}', key=f"k{i}".encode(), partition=partition)
    finally:
        await producer.stop()
    consumer = make_consumer(settings, group_id=group, client_id="lag-test")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in committed])
        await consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "") for p, o in committed.items()})
    finally:
        await consumer.stop()
    return topic


async def test_lag_is_end_offset_minus_committed_offset_per_partition(stack_settings: Settings) -> None:
    group = f"{stack_settings.namespace}-lagcheck"
    checker = LagChecker(stack_settings)
    await checker.start()
    try:
        before = {(r.topic, r.partition): r.end for r in await checker.measure()}
        topic = await produce_and_commit(stack_settings, group, {0: 7, 1: 3}, {0: 2, 1: 3})
        rows = [r for r in await checker.export_once() if r.group == group]
    finally:
        await checker.stop()
    by_partition = {r.partition: r for r in rows}
    assert set(by_partition) == {0, 1}
    assert by_partition[0].end - before.get((topic, 0), 0) >= 7
    assert by_partition[0].lag == by_partition[0].end - 2
    assert by_partition[1].lag == by_partition[1].end - 3
    assert KAFKA_CONSUMER_LAG.labels(group, topic, "0")._value.get() == by_partition[0].lag
    # Only this namespace's groups: another session's groups on the shared broker are not reported.
    assert all(r.group.startswith(stack_settings.namespace) for r in rows)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exporter_process_serves_the_lag(stack_settings: Settings) -> None:
    group = f"{stack_settings.namespace}-lagproc"
    topic = asyncio.run(produce_and_commit(stack_settings, group, {2: 4}, {2: 1}))
    port = free_port()
    env = {**os.environ, "LOYALIST_NAMESPACE": stack_settings.namespace,
           "LOYALIST_KAFKA_HOST": stack_settings.kafka_host, "LOYALIST_KAFKA_PORT": str(stack_settings.kafka_port)}
    proc = subprocess.Popen([sys.executable, "-m", "loyalist.checks.lag", "--port", str(port), "--interval", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wanted = f'loyalist_kafka_consumer_lag_messages{{group="{group}",partition="2",topic="{topic}"}}'
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and wanted not in text:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    text = resp.read().decode()
            except OSError:
                pass
            time.sleep(0.5)
        assert wanted in text, text[-2000:]
        line = next(ln for ln in text.splitlines() if ln.startswith(wanted))
        end = next(float(ln.split()[-1]) for ln in text.splitlines()
                   if ln.startswith(f'loyalist_kafka_topic_end_offset{{partition="2",topic="{topic}"}}'))
        assert float(line.split()[-1]) == end - 1
    finally:
        proc.terminate()
        proc.wait(10)
