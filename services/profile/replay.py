"""Rebuild every profile from the Kafka log (``events.raw``) or from the Cassandra event store.

    python -m services.profile.replay --target-namespace rebuilt            # into a fresh namespace
    python -m services.profile.replay --in-place --yes                      # wipe and rebuild this one
    python -m services.profile.replay --from store --target-namespace x     # from the event store

The same resolver and fold as the live service run in this process, wired directly (no internal topic),
so a rebuilt profile equals the live one field for field. Erasure tombstones are carried over first:
erased people are not resurrected. Nothing is emitted downstream unless ``--emit`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from cassandra.cluster import Cluster, NoHostAvailable, Session
from tqdm import tqdm

from loyalist.cassandra import connect, execute, migrate
from loyalist.heap import settle_heap
from loyalist.kafka import ensure_topics, make_producer
from loyalist.redis import make_redis
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW
from services.profile.processor import Emitter, Folder, Resolver, Tombstones
from services.profile.store import HotProfiles, ProfileStore

log = logging.getLogger("services.profile.replay")

# Tables rebuilt by a replay (erasure tombstones and segment memberships are kept).
DERIVED_TABLES = ("profile_events", "profile_processed", "profile_event_index", "identities", "profile_identities",
                  "profiles", "profile_merges")


async def connect_with_retries(settings: Settings, attempts: int = 5) -> tuple[Cluster, Session]:
    """Connect to Cassandra, retrying: a busy node can time out a first control connection."""
    for attempt in range(1, attempts + 1):
        try:
            return await asyncio.to_thread(connect, settings, keyspace=settings.keyspace)
        except NoHostAvailable:
            if attempt == attempts:
                raise
            log.warning("Cassandra did not answer (attempt %d/%d); retrying", attempt, attempts)
            await asyncio.sleep(2 * attempt)
    raise AssertionError("unreachable")


async def kafka_batches(settings: Settings, batch_size: int, progress: tqdm) -> AsyncIterator[list[bytes]]:
    """Every message of events.raw up to the end offsets seen at the start, in batches."""
    topic = settings.topic(EVENTS_RAW.name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", client_id="profile-replay",
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        partitions = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or [])]
        if not partitions:
            return
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        progress.total = sum(ends[tp] - starts[tp] for tp in partitions)
        remaining = {tp for tp in partitions if ends[tp] > starts[tp]}
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=1000, max_records=batch_size)
            batch: list[bytes] = []
            for tp, records in fetched.items():
                for record in records:
                    if record.offset < ends[tp] and record.value is not None:
                        batch.append(record.value)
                if records and records[-1].offset >= ends[tp] - 1:
                    remaining.discard(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            if batch:
                yield batch
    finally:
        await consumer.stop()


async def store_batches(session: Session, batch_size: int, progress: tqdm) -> AsyncIterator[list[bytes]]:
    """Every event of a source event store (any order: the fold does not depend on it)."""
    count = await execute(session, "SELECT count(*) AS n FROM profile_events")
    progress.total = int(count[0]["n"]) if count else None
    statement = session.prepare("SELECT body FROM profile_events")
    statement.fetch_size = batch_size
    result = await asyncio.to_thread(session.execute, statement)
    batch: list[bytes] = []
    while True:
        page = list(result.current_rows)
        batch.extend(r["body"] for r in page)
        if len(batch) >= batch_size or not result.has_more_pages:
            if batch:
                yield batch
            batch = []
        if not result.has_more_pages:
            return
        await asyncio.to_thread(result.fetch_next_page)


async def wipe(settings: Settings, session: Session) -> None:
    for table in DERIVED_TABLES:
        await execute(session, f"TRUNCATE {table}")
    redis = make_redis(settings)
    try:
        for pattern in (settings.redis_key("profile", "*"), settings.redis_key("ident", "*")):
            async for key in redis.scan_iter(match=pattern, count=1000):
                await redis.delete(key)
    finally:
        await redis.aclose()


async def replay(source: Settings, target: Settings, *, source_kind: str, in_place: bool, emit: bool,
                 batch_size: int = 500, quiet: bool = False) -> dict[str, float]:
    """Rebuild ``target``'s profiles from ``source``'s log or event store. Returns counts and the rate."""
    if not in_place:  # a live namespace is migrated already
        await asyncio.to_thread(migrate, target)
    if emit:
        await ensure_topics(target)
    source_cluster, source_session = await connect_with_retries(source)
    target_cluster, target_session = await connect_with_retries(target)
    redis = make_redis(target)
    producer = make_producer(target, client_id="profile-replay") if emit else None
    if producer is not None:
        await producer.start()
    try:
        tombstones_rows = await execute(source_session, "SELECT subject, erased_at FROM erasures")
        if in_place:
            await wipe(target, target_session)
        else:
            insert = target_session.prepare("INSERT INTO erasures (subject, erased_at) VALUES (?, ?)")
            for row in tombstones_rows:
                await execute(target_session, insert, (row["subject"], row["erased_at"]))
        store = ProfileStore(target_session)
        hot = HotProfiles(redis, target)
        tombstones = Tombstones(store)
        await tombstones.refresh()
        folder: Folder

        async def dispatch(messages: Sequence[tuple[str, bytes]]) -> None:
            await folder.fold_batch([value for _key, value in messages])

        folder = Folder(store, hot, Emitter(producer, target), tombstones, dispatch)
        resolver = Resolver(store, hot, tombstones, dispatch)
        progress = tqdm(desc=f"replaying {source.namespace} -> {target.namespace}", unit="event", disable=quiet,
                        file=sys.stderr, smoothing=0.1)
        started = time.monotonic()
        events = 0
        batches = (kafka_batches(source, batch_size, progress) if source_kind == "kafka"
                   else store_batches(source_session, batch_size, progress))
        async for batch in batches:
            await resolver.resolve_batch(batch)
            events += len(batch)
            progress.update(len(batch))
        progress.close()
        elapsed = time.monotonic() - started
        return {"events": events, "seconds": elapsed, "events_per_second": events / elapsed if elapsed else 0.0}
    finally:
        if producer is not None:
            await producer.stop()
        await redis.aclose()
        source_cluster.shutdown()
        target_cluster.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.profile.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source_kind", choices=("kafka", "store"), default="kafka",
                        help="read the events.raw log (default) or the source namespace's event store")
    parser.add_argument("--source-namespace", help="namespace to read (default: LOYALIST_NAMESPACE)")
    parser.add_argument("--target-namespace", help="fresh namespace to build into")
    parser.add_argument("--in-place", action="store_true", help="wipe this namespace's profiles and rebuild them")
    parser.add_argument("--yes", action="store_true", help="confirm --in-place")
    parser.add_argument("--emit", action="store_true", help="send events.resolved/profile.changed while rebuilding")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    base = Settings()
    source = base.model_copy(update={"namespace": args.source_namespace or base.namespace})
    if args.in_place == bool(args.target_namespace):
        parser.error("give exactly one of --target-namespace or --in-place")
    if args.in_place and not args.yes:
        parser.error("--in-place deletes every profile of the namespace first; add --yes")
    if args.in_place and args.source_kind == "store":
        parser.error("--from store needs a different --target-namespace (the store is the source)")
    target = source if args.in_place else Settings(**{**base.model_dump(), "namespace": args.target_namespace})
    settle_heap()  # full collections would walk every module and client on each pass over the growing cache
    result = asyncio.run(replay(source, target, source_kind=args.source_kind, in_place=args.in_place,
                                emit=args.emit, batch_size=args.batch_size))
    print(f"rebuilt from {result['events']:.0f} events in {result['seconds']:.1f}s "
          f"({result['events_per_second']:.0f} events/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
