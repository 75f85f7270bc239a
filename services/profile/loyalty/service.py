"""The loyalty application service: load the ledger, decide, commit with a compare-and-set, publish.

Every path that changes a ledger (the ``events.resolved`` agent, the redemption and adjustment API, the
schedule) goes through ``LoyaltyService.handle``, so they all share one concurrency control and one
outbox: committed lines are produced to ``events.raw`` as canonical track events with deterministic
messageIds, and a line whose produce failed is produced again by the next command or the schedule.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from cassandra import OperationTimedOut, Unavailable, WriteTimeout
from cassandra.cluster import NoHostAvailable

from loyalist.consumer import TimeSlice
from loyalist.events import Event, as_utc, decode_event, encode_event
from loyalist.kafka import produce_many
from loyalist.metrics import KAFKA_PRODUCED
from loyalist.queues import FloorStore, ReadFloors
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW
from services.profile.loyalty import metrics
from services.profile.loyalty.domain import (
    LOYALTY_SOURCE,
    ORDER_EVENT_NAMES,
    TIER_CHANGED,
    AbsorbLedger,
    CloseLedger,
    Command,
    Ledger,
    LedgerEvent,
    LoyaltyError,
    Program,
    ProgramDefinition,
    Redeem,
    Tick,
    birthday_from_traits,
    command_for,
    decide,
    effective_program,
    expiring_summary,
    fold,
    next_birthday,
    next_review_at,
)
from services.profile.loyalty.domain.ledger import redemption_to_dict
from services.profile.loyalty.example_program import EXAMPLE_PROGRAM
from services.profile.loyalty.settings import LoyaltySettings
from services.profile.loyalty.store import DUE_QUEUE, LedgerLine, LedgerStore, ProgramStore

log = logging.getLogger(__name__)

_MESSAGE_NAMESPACE = uuid.UUID("6f1c2b0e-4c55-4a55-9a53-6c6f79616c74")
_PUBLISH_RETRY = timedelta(seconds=30)
_UNCERTAIN = (WriteTimeout, Unavailable, OperationTimedOut, NoHostAvailable)
# Commands of one customer committed by one compare-and-set (their lines go in one conditional batch).
COMMANDS_PER_COMMIT = 25


# A decision: the new ledger, its new lines, each command's (name, outcome) and the last command's program.
Decision = tuple[Ledger, list[LedgerLine], list[tuple[str, str]], Program | None]


@dataclass(frozen=True)
class _Merge:
    merged: list[str]
    at: datetime


def _earlier(current: datetime | None, candidate: datetime) -> datetime:
    return candidate if current is None else min(current, candidate)


class Contended(Exception):
    """The ledger kept changing under us for every attempt."""


@dataclass
class Outcome:
    ledger: Ledger
    program: Program | None
    events: list[LedgerEvent] = field(default_factory=list)
    lines: list[LedgerLine] = field(default_factory=list)
    attempts: int = 1


def message_id(profile_id: str, event_id: str) -> str:
    """The deterministic messageId of a ledger event: producing it twice is a duplicate, never a new fact."""
    return f"loyalty-{uuid.uuid5(_MESSAGE_NAMESPACE, f'{profile_id}|{event_id}')}"


def track_properties(event: LedgerEvent, state: Ledger, program: Program | None) -> dict[str, Any]:
    """The properties of the canonical track event (what the profile folds into ``loyalty``)."""
    entry_tier = program.tiers[0].name if program is not None else None
    props: dict[str, Any] = {
        "points": event.points,
        "balance_after": state.balance,
        "lifetime_points": state.lifetime_points,
        "tier": state.tier or entry_tier,
        "expiring": expiring_summary(state),
        "ledger_seq": state.seq,
        "ledger_event_id": event.event_id,
        "reason": event.reason,
        "program_version": event.program_version,
    }
    if event.order is not None:
        props["order_id"] = event.order.order_id
    if event.new_lot is not None and event.new_lot.expires_at is not None:
        props["expires_at"] = event.new_lot.expires_at.isoformat().replace("+00:00", "Z")
    if event.kind == TIER_CHANGED:
        props["tier_from"], props["tier_to"] = event.tier_from, event.tier_to
    if event.redemption is not None:
        reward = redemption_to_dict(event.redemption)
        props["reward"] = {k: reward[k] for k in ("reward_id", "reward_name", "kind", "code", "value", "currency")}
    if event.actor is not None:
        props["actor"] = event.actor
    if event.note is not None:
        props["note"] = event.note
    if event.unrecovered:
        props["unrecovered_points"] = event.unrecovered
    if event.details.get("action"):
        props["action"] = event.details["action"]
    return props


def reward_code(secret: str, prefix: str, profile_id: str, idempotency_key: str) -> str:
    """A unique, unguessable reward code; the same for a retried request (same idempotency key).

    >>> reward_code("s", "LOY", "p1", "k1") == reward_code("s", "LOY", "p1", "k1")
    True
    >>> len(reward_code("s", "LOY", "p1", "k1"))
    18
    """
    digest = hmac.new(secret.encode(), f"{profile_id}|{idempotency_key}".encode(), hashlib.sha256).digest()
    body = base64.b32encode(digest).decode()[:12]
    return f"{prefix}-{body[:4]}-{body[4:8]}-{body[8:]}"


class LoyaltyService:
    def __init__(
        self,
        settings: Settings,
        loyalty_settings: LoyaltySettings,
        store: LedgerStore,
        programs: ProgramStore,
        producer: AIOKafkaProducer | None,
        clock: Callable[[], datetime],
        *,
        due_floor_store: FloorStore | None = None,
    ) -> None:
        self.settings = settings
        self.config = loyalty_settings
        self.store = store
        self.programs = programs
        self.producer = producer
        self.clock = clock
        self.raw_topic = settings.topic(EVENTS_RAW.name)
        # Where each run of the schedule reads each shard from (loyalist/queues.py): past the tombstones of the
        # entries earlier runs handled.
        self.due_floors = ReadFloors()
        self.due_floor_store = due_floor_store or FloorStore(store.session, DUE_QUEUE)
        self._due_floors_loaded = False

    async def program_at(self, at: datetime) -> Program | None:
        return effective_program(await self.programs.versions(), at)

    async def current_program(self) -> Program | None:
        return await self.program_at(self.clock())

    # ---- the one write path ---------------------------------------------------------------------
    async def handle(self, profile_id: str, command: Command, now: datetime | None = None) -> Outcome:
        """Decide ``command`` on the customer's ledger and commit it atomically, retrying on contention.

        Raises ``LoyaltyError`` when the domain refuses the command and ``Contended`` after
        ``max_attempts`` lost races.
        """
        return await self._decide_and_commit(profile_id, [command], now, refuse=True)

    async def handle_many(self, profile_id: str, commands: list[Command], now: datetime | None = None) -> Outcome:
        """Decide ``commands`` in order on one customer's ledger and commit them together: one read and one
        compare-and-set for all of them (the stream path, where a customer often has several facts in a batch).

        A command the domain refuses is skipped (counted by its reason), exactly as if it had been handled alone;
        the others still apply. Raises ``Contended`` after ``max_attempts`` lost races.
        """
        if not commands:
            ledger, _ = await self.store.load(profile_id)
            return Outcome(ledger, None)
        return await self._decide_and_commit(profile_id, commands, now, refuse=False)

    async def _decide_and_commit(self, profile_id: str, commands: list[Command], now: datetime | None, *,
                                 refuse: bool) -> Outcome:
        label = type(commands[0]).__name__ if len(commands) == 1 else "Batch"
        started = time.perf_counter()
        now = now or self.clock()
        try:
            for attempt in range(1, self.config.max_attempts + 1):
                ledger, version = await self.store.load(profile_id)
                state, lines, outcomes, program = self._decide(
                    profile_id, ledger, await self.programs.versions(), commands, now, refuse=refuse)
                if not lines:
                    if not await self.flush(profile_id, ledger.seq):
                        await self.store.schedule(profile_id, now + _PUBLISH_RETRY, self._writer_now(now))
                    self._count(outcomes)
                    return Outcome(ledger, program, attempts=attempt)
                try:
                    applied = await self.store.commit(profile_id, version, state, lines, now)
                except _UNCERTAIN:
                    # The outcome is unknown; deciding again on a fresh read is safe because every
                    # decision is idempotent (an applied write makes the retry a no-op).
                    log.warning("uncertain ledger write for %s; re-reading", profile_id, exc_info=True)
                    applied = False
                if applied:
                    await self._after_commit(profile_id, state, program, lines, now)
                    self._count(outcomes)
                    return Outcome(state, program, [line.event for line in lines], lines, attempt)
                metrics.CAS_CONFLICTS.inc()
                await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * attempt)))
            for command in commands:
                metrics.COMMANDS.labels(type(command).__name__, "contended").inc()
            raise Contended(f"the ledger of {profile_id} kept changing; retry later")
        finally:
            metrics.COMMAND_DURATION.labels(label).observe(time.perf_counter() - started)

    def _decide(self, profile_id: str, ledger: Ledger, versions: list[Program], commands: list[Command],
                now: datetime, *, refuse: bool) -> Decision:
        """Decide ``commands`` in order on ``ledger`` (pure): the new state, its lines, each command's outcome and
        the program of the last command. A refusal raises when ``refuse``, else the command is skipped."""
        state, lines = ledger, []
        program: Program | None = None
        outcomes: list[tuple[str, str]] = []
        for command in commands:
            name = type(command).__name__
            program = effective_program(versions, getattr(command, "at", now))
            try:
                events = decide(command, state, program, now)
            except LoyaltyError as refused:
                if refuse:
                    metrics.COMMANDS.labels(name, refused.code).inc()
                    raise
                # A refused fact is final (never transient): skipped like the stream skips it.
                metrics.STREAM_SKIPPED.labels(refused.code).inc()
                outcomes.append((name, refused.code))
                continue
            for event in events:
                state = fold(state, event)
                lines.append(LedgerLine(state.seq, event, track_properties(event, state, program), state.balance))
            outcomes.append((name, "committed" if events else "unchanged"))
        return state, lines, outcomes, program

    async def commit_stream_batch(self, work: dict[str, list[Command]], now: datetime | None = None) -> list[str]:
        """The stream path for many customers at once: their ledgers and published marks read with multi-key
        reads, every customer's commands decided in memory, one compare-and-set per changed customer (all in
        flight together), the new lines produced together and the schedule and published marks written together.

        Returns the customers whose compare-and-set lost (an API redemption raced it) or was uncertain: the caller
        hands those to the one-customer path, which re-reads and retries.
        """
        if not work:
            return []
        now = now or self.clock()
        pids = list(work)
        loaded, published, versions = await asyncio.gather(
            self.store.load_many(pids), self.store.published_many(pids), self.programs.versions())
        decided: dict[str, Decision] = {}
        turns = TimeSlice()
        for pid in pids:
            await turns.pause()
            decided[pid] = self._decide(pid, loaded[pid][0], versions, work[pid], now, refuse=False)
        changed = [pid for pid in pids if decided[pid][1]]
        limit = asyncio.Semaphore(self.config.concurrency)

        async def commit(pid: str) -> bool:
            state, lines = decided[pid][0], decided[pid][1]
            async with limit:
                try:
                    return await self.store.commit(pid, loaded[pid][1], state, lines, now)
                except _UNCERTAIN:
                    log.warning("uncertain ledger write for %s; retried alone", pid, exc_info=True)
                    return False

        applied = dict(zip(changed, await asyncio.gather(*(commit(pid) for pid in changed)), strict=True))
        retry = [pid for pid in changed if not applied[pid]]
        metrics.CAS_CONFLICTS.inc(len(retry))
        done = [pid for pid in pids if applied.get(pid, True)]
        for pid in done:
            self._count(decided[pid][2])
        # Lines committed earlier but never published (a crash or a Kafka outage in between) go first, in order:
        # those customers are flushed one at a time from the stored ledger.
        behind = {pid for pid in done if published[pid] < loaded[pid][0].seq}
        committed = [pid for pid in done if decided[pid][1]]
        for pid in committed:
            for line in decided[pid][1]:
                metrics.LEDGER_EVENTS.labels(line.event.kind, line.event.reason).inc()
                metrics.POINTS.labels(line.event.kind).inc(abs(line.event.points))
                if line.event.redemption is not None:
                    r = line.event.redemption
                    await self.store.put_code(r.code, pid, r.event_id, r.reward_id, r.points, r.at)
        produced = await self._produce_many({pid: decided[pid][1] for pid in committed if pid not in behind})
        rows = []
        writer_now = self._writer_now(now)
        for pid in committed:
            state, lines, _, program = decided[pid]
            due = self.next_due(state, program)
            if due is not None:
                rows.append(self.store.schedule_row(pid, due, writer_now))
            if pid not in behind:  # published, or due again soon: the schedule publishes them
                rows.append(self.store.published_row(pid, lines[-1].seq) if produced
                            else self.store.schedule_row(pid, now + _PUBLISH_RETRY, writer_now))
        await self.store.write_rows(rows)
        for pid in behind:
            if not await self.flush(pid, decided[pid][0].seq):
                await self.store.schedule(pid, now + _PUBLISH_RETRY, self._writer_now(now))
        return retry

    @staticmethod
    def _count(outcomes: list[tuple[str, str]]) -> None:
        for name, outcome in outcomes:
            metrics.COMMANDS.labels(name, outcome).inc()

    async def _after_commit(self, profile_id: str, state: Ledger, program: Program | None,
                            lines: list[LedgerLine], now: datetime) -> None:
        """Side effects of a committed change. The commit stands whatever happens here, so failures are
        logged, not raised: the outbox is retried by the next command or the schedule."""
        for line in lines:
            metrics.LEDGER_EVENTS.labels(line.event.kind, line.event.reason).inc()
            metrics.POINTS.labels(line.event.kind).inc(abs(line.event.points))
        try:
            for line in lines:
                if line.event.redemption is not None:
                    r = line.event.redemption
                    await self.store.put_code(r.code, profile_id, r.event_id, r.reward_id, r.points, r.at)
            due = self.next_due(state, program)

            async def scheduled() -> None:
                if due is not None:
                    await self.store.schedule(profile_id, due, self._writer_now(now))

            # Independent writes, so one round trip for both.
            _, produced = await asyncio.gather(scheduled(), self._produce(profile_id, lines))
            if produced:
                await self.store.mark_published(profile_id, lines[-1].seq)
            else:  # the schedule publishes the rest
                await self.store.schedule(profile_id, now + _PUBLISH_RETRY, self._writer_now(now))
        except Exception:
            log.warning("post-commit work for %s failed; the outbox retries it", profile_id, exc_info=True)

    @staticmethod
    def next_due(state: Ledger, program: Program | None) -> datetime | None:
        candidates = [lot.expires_at for lot in state.lots if lot.expires_at is not None]
        if program is not None and state.last_at is not None:
            review = next_review_at(state, program, state.last_at)
            if review is not None:
                candidates.append(review)
        return min(candidates) if candidates else None

    # ---- the outbox --------------------------------------------------------------------------------
    def track_event(self, profile_id: str, line: LedgerLine, received_at: datetime) -> Event:
        return Event(
            type="track", event=line.event.kind, message_id=message_id(profile_id, line.event.event_id),
            timestamp=line.event.at, received_at=received_at, properties=line.properties,
            context={"loyalist": {"profileId": profile_id}}, source=LOYALTY_SOURCE,
        )

    async def _produce(self, profile_id: str, lines: list[LedgerLine]) -> bool:
        if self.producer is None or not lines:
            return True  # no producer: publishing is disabled (ledger-only tools and tests)
        received_at = self.clock()
        producer = self.producer

        async def produce_all() -> None:
            futures = [
                await producer.send(
                    self.raw_topic, encode_event(self.track_event(profile_id, line, received_at)),
                    key=profile_id.encode(),
                )
                for line in lines
            ]
            await asyncio.gather(*futures)

        try:
            # Bounded: with Kafka unreachable a send can wait for metadata for a long time, and the caller
            # (an API request, the stream batch) must not hang; the outbox retries later.
            await asyncio.wait_for(produce_all(), self.config.publish_timeout_s)
        except Exception:
            metrics.PUBLISH_ERRORS.inc(len(lines))
            log.warning("producing %d ledger lines of %s failed; will retry", len(lines), profile_id, exc_info=True)
            return False
        KAFKA_PRODUCED.labels("profile", self.raw_topic).inc(len(lines))
        return True

    async def _produce_many(self, lines_of: dict[str, list[LedgerLine]]) -> bool:
        """Produce many customers' new lines together (each customer's in order on its partition)."""
        records = [(pid.encode(), encode_event(self.track_event(pid, line, self.clock())))
                   for pid, lines in lines_of.items() for line in lines]
        if self.producer is None or not records:
            return True
        producer = self.producer

        async def produce_all() -> None:
            await asyncio.gather(*await produce_many(producer, self.raw_topic, records))

        try:
            await asyncio.wait_for(produce_all(), self.config.publish_timeout_s)
        except Exception:
            metrics.PUBLISH_ERRORS.inc(len(records))
            log.warning("producing %d ledger lines failed; will retry", len(records), exc_info=True)
            return False
        KAFKA_PRODUCED.labels("profile", self.raw_topic).inc(len(records))
        return True

    async def flush(self, profile_id: str, ledger_seq: int) -> bool:
        """Produce committed lines that were never acknowledged by Kafka (after a crash or a Kafka outage).
        False when some are still unpublished."""
        if ledger_seq == 0:
            return True
        published = await self.store.published_seq(profile_id)
        while published < ledger_seq:
            lines = await self.store.lines_after(profile_id, published, 500)
            if not lines:
                return True
            if not await self._produce(profile_id, lines):
                return False
            published = lines[-1].seq
            await self.store.mark_published(profile_id, published)
        return True

    # ---- the stream path -----------------------------------------------------------------------------
    async def command_for_event(self, profile_id: str, event: Event) -> Command | None:
        """The ledger command a stream event causes (None for most events). An ``identify`` with a birthday
        is remembered here (a fact about the person for the yearly bonus, not a ledger change)."""
        if event.type == "identify":
            birthday = birthday_from_traits(event.traits or {})
            if birthday is not None:
                await self.store.set_birthday(profile_id, birthday, self.clock())
                now = self.clock()
                await self.store.schedule(profile_id, next_birthday(birthday, now), now)
            return None
        now = self.clock()
        if event.timestamp > now:
            # A fact dated in the future (a wrong clock upstream) must not move the ledger's time ahead:
            # it would expire points early.
            event = event.model_copy(update={"timestamp": now})
        return command_for(event, await self.program_at(event.timestamp))

    async def handle_event(self, profile_id: str, event: Event) -> Outcome | None:
        command = await self.command_for_event(profile_id, event)
        return None if command is None else await self.handle(profile_id, command)

    async def handle_events(self, profile_id: str, events: list[Event]) -> None:
        """A customer's consecutive stream events, in order: their commands are committed together, at most
        ``COMMANDS_PER_COMMIT`` per compare-and-set (a conditional batch must stay well under Cassandra's batch
        size limit)."""
        commands = [c for c in [await self.command_for_event(profile_id, e) for e in events] if c is not None]
        for start in range(0, len(commands), COMMANDS_PER_COMMIT):
            await self.handle_many(profile_id, commands[start:start + COMMANDS_PER_COMMIT])

    async def handle_merge(self, survivor: str, merged: list[str], at: datetime) -> None:
        """Move each merged profile's ledger to the survivor: absorb on the survivor, then close the other.
        Both steps are idempotent, so a crash between them is repaired by processing the merge again."""
        for other in merged:
            if other == survivor:
                continue
            snapshot, _ = await self.store.load(other)
            if snapshot.seq == 0:
                continue
            await self.handle(survivor, AbsorbLedger(snapshot, at))
            await self.handle(other, CloseLedger(survivor, snapshot, at))

    async def process_resolved(self, values: list[bytes]) -> int:
        """A batch from ``events.resolved``: per customer in order, customers concurrently.
        Transient failures are retried here until they succeed (the batch is acknowledged after)."""
        # Per customer: runs of consecutive events (committed together) and the merges between them, in order.
        per_profile: dict[str, list[list[Event] | _Merge]] = {}
        relevant = await self._relevant_event_names()
        for raw in values:
            try:
                message = orjson.loads(raw)
                profile_id = message["profileId"]
                wire = message.get("event")
                # Most events (views, carts, pages) can never move a ledger: skip them before decoding. Exactly
                # the events handle_event would turn into nothing (command_for and birthdays decide the rest).
                if isinstance(wire, dict) and (
                        wire.get("source") == LOYALTY_SOURCE or wire.get("type") not in ("track", "identify")
                        or (wire.get("type") == "track" and wire.get("event") not in relevant)):
                    metrics.STREAM_SKIPPED.labels("not_loyalty").inc()
                    continue
                if "merge" in message:
                    merge = message["merge"]
                    at = message.get("at") or message.get("resolvedAt")
                    when = datetime.fromisoformat(str(at).replace("Z", "+00:00")) if at else self.clock()
                    per_profile.setdefault(str(merge.get("survivor") or profile_id), []).append(
                        _Merge([str(m) for m in merge.get("merged", [])], as_utc(when)))
                    continue
                if "event" not in message:
                    metrics.STREAM_SKIPPED.labels("no_event").inc()
                    continue
                event = decode_event(message["event"])
            except Exception:
                metrics.STREAM_SKIPPED.labels("undecodable").inc()
                log.warning("skipping an undecodable events.resolved message", exc_info=True)
                continue
            if event.source == LOYALTY_SOURCE:
                metrics.STREAM_SKIPPED.labels("own_event").inc()
                continue
            items = per_profile.setdefault(str(profile_id), [])
            if items and isinstance(items[-1], list):
                items[-1].append(event)
            else:
                items.append([event])
        # Customers with only facts (no merge) and at most one commit's worth of commands: all at once.
        work: dict[str, list[Command]] = {}
        events: dict[str, list[Event]] = {}
        for pid, items in per_profile.items():
            run = items[0]
            if len(items) == 1 and isinstance(run, list):
                events[pid] = run
                commands = [c for c in [await self.command_for_event(pid, e) for e in run] if c is not None]
                if len(commands) <= COMMANDS_PER_COMMIT:
                    work[pid] = commands
        delay = 0.2
        while True:
            try:
                retry = set(await self.commit_stream_batch({p: c for p, c in work.items() if c}))
                break
            except Exception:
                log.exception("the loyalty batch failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        handled = sum(len(events[pid]) for pid in work if pid not in retry)
        per_profile = {pid: items for pid, items in per_profile.items() if pid not in work or pid in retry}
        limit = asyncio.Semaphore(self.config.concurrency)

        async def one_profile(profile_id: str, items: list[list[Event] | _Merge]) -> int:
            done = 0
            async with limit:
                for item in items:
                    await self._until_done(profile_id, item)
                    done += 1 if isinstance(item, _Merge) else len(item)
            return done

        counts = await asyncio.gather(*(one_profile(p, evs) for p, evs in per_profile.items()))
        return handled + sum(counts)

    async def _relevant_event_names(self) -> frozenset[str]:
        """Track events that can cause a ledger command under any program version."""
        names = set(ORDER_EVENT_NAMES)
        for program in await self.programs.versions():
            names.update(b.event for b in program.action_bonuses)
        return frozenset(names)

    async def _until_done(self, profile_id: str, item: list[Event] | _Merge) -> None:
        delay = 0.2
        while True:
            try:
                if isinstance(item, _Merge):
                    await self.handle_merge(profile_id, item.merged, item.at)
                else:
                    await self.handle_events(profile_id, item)
                return
            except Contended:
                log.warning("ledger of %s contended; retrying", profile_id)
            except Exception as exc:
                if isinstance(exc, LoyaltyError):  # a refused fact is final, not transient
                    metrics.STREAM_SKIPPED.labels(exc.code).inc()
                    return
                log.exception("loyalty processing for %s failed; retrying in %.1fs", profile_id, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    # ---- erasure ----------------------------------------------------------------------------------------
    async def erase(self, profile_id: str, *, depth: int = 0) -> None:
        """Erase a customer's ledger and the ledgers merged into it (their closed remains)."""
        ledger, _ = await self.store.load(profile_id)
        if depth < 5:
            for key in ledger.action_keys:
                if key.startswith("merge:"):
                    await self.erase(key.removeprefix("merge:"), depth=depth + 1)
        await self.store.erase(profile_id)
        log.info("loyalty ledger of %s erased", profile_id)

    async def process_profile_changes(self, values: list[bytes]) -> int:
        """Erasures on ``profile.changed`` (``{"profileId", "deleted": true}``). A deletion because of a merge
        (``mergedInto``) is not an erasure: the merge itself moves the ledger."""
        erased = 0
        for raw in values:
            if b'"deleted"' not in raw:  # cheap filter: almost every message is a profile update
                continue
            try:
                message = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if message.get("deleted") is True and not message.get("mergedInto") and message.get("profileId"):
                delay = 0.2
                while True:
                    try:
                        await self.erase(str(message["profileId"]))
                        break
                    except Exception:
                        log.exception("erasing the loyalty ledger failed; retrying in %.1fs", delay)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 10.0)
                erased += 1
        return erased

    # ---- the schedule --------------------------------------------------------------------------------
    def _writer_now(self, now: datetime) -> datetime:
        """The time a schedule entry written now must not be due before: the later of the operation's ``now``
        (a schedule run's, which its floors advance to) and the clock at the write (an operation retried under
        contention can outlast the floors' slack)."""
        return max(now, self.clock())

    async def load_due_floors(self) -> None:
        """The floors saved by every replica's runs, loaded before each run: the schedule moves between replicas
        (the faust leader changes, the API runs it anywhere), and this one's own may be far behind, which means
        reading through everything handled since. If loading fails, the floors already here are safe (older
        floors only read more); without any, the run would read every shard from its start, so it fails instead."""
        try:
            await self.due_floor_store.load(self.due_floors)
        except Exception:
            if not self._due_floors_loaded:
                raise
            log.warning("loading the schedule's read floors failed; this run reads from the older ones", exc_info=True)
            return
        self._due_floors_loaded = True

    def due_read_from(self, shard: int, now: datetime) -> datetime | None:
        """Where a run at ``now`` starts reading ``shard``: its floor, or the start when there is none or it is
        later than ``now`` (set by a clock ahead of this one, or by this one before it was set back: entries due
        by ``now`` may lie below it)."""
        floor = self.due_floors.floor(shard)
        return floor if floor is not None and floor <= now else None

    async def run_due(self, now: datetime | None = None, *, limit: int = 500) -> int:
        """Hold every expiry and tier review due by ``now`` (and publish leftovers). Returns accounts handled.

        A page of due accounts at a time, through the batch path (multi-key reads, compare-and-sets in flight
        together); an account whose compare-and-set lost is ticked alone, and one that still fails stays due (for
        the next run). Each shard is read from its floor, and each next page from where the last one ended: never
        through the tombstones of the entries handled before."""
        now = now or self.clock()
        await self.load_due_floors()
        handled = 0
        for shard in range(self.store.due_shards):
            since = self.due_read_from(shard, now)
            oldest_left: datetime | None = None  # the earliest entry this run leaves in the shard
            while True:
                rows = await self.store.due(shard, now, limit, since=since)
                if not rows:
                    break
                pids = list(dict.fromkeys(pid for _, pid in rows))
                failed: set[str] = set()
                try:
                    birthdays = await self.store.birthdays_many(pids)
                    retry = await self.commit_stream_batch({pid: [Tick(birthdays.get(pid))] for pid in pids}, now=now)
                except Exception:
                    log.exception("scheduled ticks of %d accounts failed; they stay due", len(pids))
                    oldest_left = _earlier(oldest_left, rows[0][0])
                    break  # the next run tries this page again
                for pid in retry:
                    try:
                        await self.handle(pid, Tick(birthdays.get(pid)), now)
                    except Exception:
                        log.exception("scheduled tick of %s failed; it stays due", pid)
                        failed.add(pid)
                writer_now = self._writer_now(now)
                writes = [self.store.schedule_row(pid, next_birthday(birthday, now), writer_now)
                          for pid, birthday in birthdays.items() if birthday is not None and pid not in failed]
                writes += [self.store.unschedule_row(shard, due_at, pid) for due_at, pid in rows if pid not in failed]
                await self.store.write_rows(writes)
                left = [due_at for due_at, pid in rows if pid in failed]  # in due order
                if left:
                    oldest_left = _earlier(oldest_left, left[0])
                done = len(pids) - len(failed)
                handled += done
                # A page of failures waits for the next run, and so does what lies beyond it (the page's first
                # entry, left, already holds the floor below them).
                if len(rows) < limit or done == 0:
                    break
                since = rows[-1][0]  # the next page starts where this one ended, past its tombstones
            self.due_floors.advance(shard, now, oldest_left)
            await self.due_floor_store.maybe_save(shard, self.due_floors)
        return handled

    async def bootstrap_program(self, source: str) -> Program | None:
        """Store ``source`` (``example`` or a JSON file) as version 1 when no program exists yet."""
        if await self.programs.versions(fresh=True):
            return None
        if source == "example":
            body = dict(EXAMPLE_PROGRAM)
        else:
            body = orjson.loads(await asyncio.to_thread(Path(source).read_bytes))
        effective_from = body.pop("effective_from", "1970-01-01T00:00:00Z")
        definition = ProgramDefinition.model_validate(body)
        return await self.programs.create_first(
            definition, effective_from=datetime.fromisoformat(effective_from.replace("Z", "+00:00")),
            actor="bootstrap", now=self.clock(),
        )

    # ---- redemption helper ------------------------------------------------------------------------------
    def redeem_command(self, profile_id: str, reward_id: str, idempotency_key: str) -> Redeem:
        code = reward_code(self.settings.signing_secret, self.config.code_prefix, profile_id, idempotency_key)
        return Redeem(reward_id, idempotency_key, code)
