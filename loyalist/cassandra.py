"""Cassandra adapter: cluster sessions, an asyncio bridge for the driver's futures, and idempotent
CQL migrations.

Migrations are files ``loyalist/migrations/NNNN_name.cql`` applied in order and recorded in
``schema_migrations``. Number ranges keep services apart: 0001-0099 core, 0100 ingest, 0200 profile,
0300 segmenter, 0400 journeys, 0500 notify, 0600 loyalty. Statements are separated by ``;`` at the end of
a line and must themselves be idempotent (``IF NOT EXISTS``) so a crash mid-file is safe to re-run.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, ResponseFuture, Session
from cassandra.policies import DCAwareRoundRobinPolicy, RetryPolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement, dict_factory

from loyalist.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Schema changes wait for agreement and are serialised by the node; under load they take seconds.
SCHEMA_TIMEOUT_S = 120.0
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.cql$")


def make_cluster(settings: Settings, *, request_timeout_s: float = 15) -> Cluster:
    profile = ExecutionProfile(
        load_balancing_policy=DCAwareRoundRobinPolicy(),
        retry_policy=RetryPolicy(),
        # LOCAL_QUORUM is the production choice; on one node it is the same as ONE.
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
        request_timeout=request_timeout_s,
        row_factory=dict_factory,
    )
    return Cluster(
        contact_points=settings.cassandra_contact_points,
        port=settings.cassandra_port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        # v4, not v5: v5 wraps every frame in checksummed segments that the driver builds in Python. With
        # v4 an unlogged-batch write costs the client ~11 us of CPU instead of ~14 (60k rows, same node);
        # TCP already checksums the bytes. Cassandra 5.0 speaks both.
        protocol_version=4,
        connect_timeout=10,
        # The driver leaves Nagle's algorithm on. Requests share a connection, so a request written while an
        # earlier one is still unacknowledged waits for that ACK, which the node may delay by up to 40 ms.
        sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


def connect(settings: Settings, *, keyspace: str | None = None) -> tuple[Cluster, Session]:
    cluster = make_cluster(settings)
    session = cluster.connect(keyspace)
    return cluster, session


async def execute(session: Session, statement: Any, params: Sequence[Any] | dict[str, Any] | None = None) -> list[Any]:
    """Run a statement without blocking the event loop; returns every row (none for a plain write)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[list[Any]] = loop.create_future()
    rf: ResponseFuture = session.execute_async(statement, params)
    rows: list[Any] = []

    def on_page(page: list[Any] | None) -> None:
        # Writes have no rows page: the driver hands the callback None.
        try:
            rows.extend(page or ())
            if rf.has_more_pages:
                rf.start_fetching_next_page()
                return
        except BaseException as exc:  # never leave the awaiting coroutine hanging
            loop.call_soon_threadsafe(_settle, fut, None, exc)
            return
        loop.call_soon_threadsafe(_settle, fut, rows, None)

    def on_error(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_settle, fut, None, exc)

    rf.add_callbacks(on_page, on_error)
    return await fut


# A write batch stays below Cassandra's default batch_size_fail_threshold (50 KiB), so the batched writes also
# work against a stock cluster configuration.
BATCH_MAX_BYTES = 40 * 1024
BATCH_MAX_STATEMENTS = 250
MIN_SPLIT_STATEMENTS = 16

Row = tuple[PreparedStatement, Sequence[Any]]
T = TypeVar("T")


IN_CHUNK = 100


def partition_chunks(keys: Sequence[T], *, largest: int = IN_CHUNK, spread: int = 8, smallest: int = 8
                     ) -> list[list[T]]:
    """Keys of a multi-partition ``IN`` read, split into requests the node reads in parallel. The node reads
    one request's partitions one after another (a 50-key identity lookup took ~16-27 ms under a steady load),
    so a few keys are spread over up to ``spread`` requests; many keys go ``largest`` at a time.

    >>> [len(c) for c in partition_chunks(list(range(50)))]
    [8, 8, 8, 8, 8, 8, 2]
    >>> [len(c) for c in partition_chunks(list(range(250)))]
    [32, 32, 32, 32, 32, 32, 32, 26]
    >>> [len(c) for c in partition_chunks(list(range(1000)))]
    [100, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    """
    size = min(largest, max(smallest, -(-len(keys) // spread)))
    return [list(keys[i:i + size]) for i in range(0, len(keys), size)]


async def select_in(session: Session, statement: Any, keys: Sequence[Any], *, chunk: int = IN_CHUNK
                    ) -> list[dict[str, Any]]:
    """Rows of a prepared ``... WHERE key IN ?`` read for many keys: multi-partition reads of at most ``chunk``
    keys each (fewer when there are few keys: see :func:`partition_chunks`), all requests concurrently."""
    chunks = partition_chunks(keys, largest=chunk)
    results = await asyncio.gather(*(execute(session, statement, (part,)) for part in chunks))
    return [row for rows in results for row in rows]


def _approx_size(params: Sequence[Any]) -> int:
    size = 16
    for value in params:
        size += len(value) + 4 if isinstance(value, bytes | str) else 12
    return size


def write_batches(rows: Sequence[Row], *, max_bytes: int = BATCH_MAX_BYTES,
                  max_statements: int = BATCH_MAX_STATEMENTS) -> list[BatchStatement]:
    """Group idempotent writes into UNLOGGED batches of bounded size.

    The Python driver spends far more CPU per request than per bound row, so a batch of many rows costs one
    request instead of many. The rows may span partitions: every write is an idempotent upsert, so a batch
    that fails is retried whole, and no atomicity is needed (hence UNLOGGED, no batch log).
    """
    batches: list[BatchStatement] = []
    batch: BatchStatement | None = None
    size = count = 0
    for statement, params in rows:
        row_size = _approx_size(params)
        if batch is None or count >= max_statements or (count and size + row_size > max_bytes):
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            batches.append(batch)
            size = count = 0
        batch.add(statement, params)
        size += row_size
        count += 1
    return batches


async def execute_writes(session: Session, rows: Sequence[Row], *, concurrency: int = 8,
                         max_bytes: int = BATCH_MAX_BYTES) -> int:
    """Run many idempotent writes as few unlogged batches, ``concurrency`` requests at a time. Returns the
    number of requests sent."""
    if not rows:
        return 0
    if len(rows) == 1:
        await execute(session, rows[0][0], rows[0][1])
        return 1
    semaphore = asyncio.Semaphore(concurrency)
    # A node applies one batch's mutations one after another in a single request thread: a few hundred rows in
    # one batch took ~40 ms under a steady load. A write of few rows is therefore split into ``concurrency``
    # smaller batches that the node applies in parallel; large writes keep full batches (fewer requests, less
    # driver CPU per row).
    per_batch = min(BATCH_MAX_STATEMENTS, max(MIN_SPLIT_STATEMENTS, -(-len(rows) // concurrency)))

    async def one(batch: BatchStatement) -> None:
        async with semaphore:
            await execute(session, batch)

    # Built and sent a slice at a time: binding thousands of rows is CPU work, and the event loop (HTTP
    # requests of the same process) must not wait for all of it; the first batches are on the wire meanwhile.
    tasks: list[asyncio.Task[None]] = []
    try:
        for start in range(0, len(rows), BATCH_MAX_STATEMENTS):
            for batch in write_batches(rows[start:start + BATCH_MAX_STATEMENTS], max_bytes=max_bytes,
                                       max_statements=per_batch):
                tasks.append(asyncio.ensure_future(one(batch)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return len(tasks)


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    files = sorted(p for p in directory.glob("*.cql") if _MIGRATION_NAME.match(p.name))
    versions = [p.name[:4] for p in files]
    duplicates = {v for v in versions if versions.count(v) > 1}
    if duplicates:
        raise RuntimeError(f"two migrations share a number: {sorted(duplicates)}")
    return files


def split_statements(cql: str) -> list[str]:
    """Split a migration file into statements (``;`` at line end), dropping ``--`` comments.

    >>> split_statements("-- c\\nCREATE TABLE a (x int PRIMARY KEY);\\nCREATE TABLE b (\\n y int PRIMARY KEY);")
    ['CREATE TABLE a (x int PRIMARY KEY)', 'CREATE TABLE b (\\n y int PRIMARY KEY)']
    """
    lines = [ln for ln in cql.splitlines() if not ln.strip().startswith("--")]
    parts = re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE)
    return [p.strip() for p in parts if p.strip()]


# One replica has no other replica that could miss a delete, so gc_grace_seconds only delays purging: tombstones,
# and the Paxos state of each lightweight transaction, which Cassandra keeps in system.paxos for
# max(3 hours, gc_grace_seconds) of the table. With the default 10 days, a single node held 181 MB of it after the
# tests and benchmarks of some days (dropped keyspaces included), and compacting that took up to 60% of a core
# in bursts during a benchmark's steady load. Clusters keep the default: repairs must run within it.
SINGLE_NODE_GC_GRACE_S = 3 * 3600


def single_node_options(statement: str) -> str:
    """``statement`` with the table options of a single-replica keyspace (a CREATE TABLE gets
    ``gc_grace_seconds``; anything else is unchanged).

    >>> single_node_options("CREATE TABLE t (k int PRIMARY KEY)")
    'CREATE TABLE t (k int PRIMARY KEY) WITH gc_grace_seconds = 10800'
    >>> single_node_options("CREATE TABLE t (k int, c int, PRIMARY KEY (k, c)) WITH CLUSTERING ORDER BY (c DESC)")
    'CREATE TABLE t (k int, c int, PRIMARY KEY (k, c)) WITH CLUSTERING ORDER BY (c DESC) AND gc_grace_seconds = 10800'
    >>> single_node_options("ALTER TABLE t ADD x int")
    'ALTER TABLE t ADD x int'
    """
    if not re.match(r"CREATE\s+TABLE\b", statement, flags=re.IGNORECASE) or "gc_grace_seconds" in statement:
        return statement
    joiner = " AND " if re.search(r"\)\s*WITH\s", statement, flags=re.IGNORECASE) else " WITH "
    return f"{statement}{joiner}gc_grace_seconds = {SINGLE_NODE_GC_GRACE_S}"


def migrate(settings: Settings, session: Session | None = None, *, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Create the keyspace and apply pending migrations. Returns the versions applied now."""
    own_cluster = None
    if session is None:
        own_cluster, session = connect(settings)
    try:
        ks = settings.keyspace
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = "
            f"{{'class': 'SimpleStrategy', 'replication_factor': {settings.cassandra_replication_factor}}}",
            timeout=SCHEMA_TIMEOUT_S,
        )
        session.set_keyspace(ks)
        session.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY, name text, applied_at timestamp)",
            timeout=SCHEMA_TIMEOUT_S,
        )
        done = {row["version"] for row in session.execute("SELECT version FROM schema_migrations")}
        applied: list[str] = []
        for path in migration_files(directory):
            version = path.name[:4]
            if version in done:
                continue
            started = time.monotonic()
            for statement in split_statements(path.read_text()):
                if settings.cassandra_replication_factor == 1:
                    statement = single_node_options(statement)
                session.execute(statement, timeout=SCHEMA_TIMEOUT_S)
            session.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, toTimestamp(now()))",
                (version, path.name),
            )
            log.info("applied migration %s in %.1fs", path.name, time.monotonic() - started)
            applied.append(version)
        return applied
    finally:
        if own_cluster is not None:
            own_cluster.shutdown()


def drop_keyspace(settings: Settings) -> None:
    cluster, session = connect(settings)
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace}", timeout=SCHEMA_TIMEOUT_S)
    finally:
        cluster.shutdown()


def cassandra_ready(settings: Settings) -> bool:
    try:
        cluster = make_cluster(settings, request_timeout_s=5)
        cluster.connect_timeout = 3
        try:
            session = cluster.connect()
            session.execute("SELECT release_version FROM system.local")
            return True
        finally:
            cluster.shutdown()
    except Exception:
        return False
