"""Cassandra persistence for notify: the delivery log with its LWT state machine, send history, consent,
suppressions, the schedule of deferred sends and retries, and templates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType

from loyalist.cassandra import execute
from loyalist.queues import not_before
from services.notify.domain.messages import ConsentRow, MessageRequest, iso
from services.notify.domain.policy import SentRecord
from services.notify.domain.templates import Template

SCHEDULE_SHARD = 0
# The name of the schedule's read floors in ``queue_floors`` (loyalist/queues.py).
SCHEDULE_QUEUE = "notify_schedule"


_LOG_COLUMNS = (
    "idempotency_key, message_id, profile_id, user_id, channel, category, template_id, recipient, subject, "
    "status, reason, detail, attempts, owner, lease_until, due_at, request, provider_id, ambiguous, "
    "feedback_done, requested_at, created_at, updated_at, sent_at"
)


def _ts(value: datetime | None) -> datetime | None:
    # The driver writes naive datetimes as UTC and reads back naive UTC.
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LogRow:
    idempotency_key: str
    message_id: str
    status: str
    owner: str | None
    lease_until: datetime | None
    attempts: int
    request: dict[str, Any]
    ambiguous: bool
    feedback_done: bool
    raw: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> LogRow:
        return cls(
            idempotency_key=row["idempotency_key"], message_id=row.get("message_id") or "",
            status=row.get("status") or "", owner=row.get("owner"),
            lease_until=_aware(row.get("lease_until")), attempts=row.get("attempts") or 0,
            request=json.loads(row["request"]) if row.get("request") else {},
            ambiguous=bool(row.get("ambiguous")), feedback_done=bool(row.get("feedback_done")), raw=row,
        )

    def public(self) -> dict[str, Any]:
        r = self.raw
        out: dict[str, Any] = {
            "id": r.get("message_id"), "idempotencyKey": r["idempotency_key"], "profileId": r.get("profile_id"),
            "userId": r.get("user_id"), "channel": r.get("channel"), "category": r.get("category"),
            "templateId": r.get("template_id"), "recipient": r.get("recipient"), "subject": r.get("subject"),
            "status": r.get("status"), "reason": r.get("reason"), "detail": r.get("detail"),
            "attempts": r.get("attempts") or 0, "providerId": r.get("provider_id"),
            "ambiguousRecovery": bool(r.get("ambiguous")),
        }
        for name, col in (("requestedAt", "requested_at"), ("createdAt", "created_at"), ("updatedAt", "updated_at"),
                          ("sentAt", "sent_at"), ("dueAt", "due_at")):
            value = r.get(col)
            out[name] = iso(value.replace(tzinfo=UTC)) if value else None
        if self.request.get("journeyId"):
            out["journeyId"] = self.request.get("journeyId")
        return out


class NotifyStore:
    def __init__(self, session: Session) -> None:
        self.s = session
        self._transitions: dict[tuple[str, ...], Any] = {}
        p = session.prepare
        self._claim = p(
            "INSERT INTO notify_messages (idempotency_key, message_id, profile_id, channel, category, template_id, "
            "status, attempts, owner, lease_until, request, requested_at, created_at, updated_at, ambiguous, "
            "feedback_done) VALUES (?, ?, ?, ?, ?, ?, 'claimed', 0, ?, ?, ?, ?, ?, ?, false, false) IF NOT EXISTS"
        )
        self._claim_sending = p(
            "INSERT INTO notify_messages (idempotency_key, message_id, profile_id, channel, category, template_id, "
            "status, attempts, owner, lease_until, request, requested_at, created_at, updated_at, ambiguous, "
            "feedback_done, recipient, subject, user_id) "
            "VALUES (?, ?, ?, ?, ?, ?, 'sending', 0, ?, ?, ?, ?, ?, ?, false, false, ?, ?, ?) IF NOT EXISTS"
        )
        self._claim_skipped = p(
            "INSERT INTO notify_messages (idempotency_key, message_id, profile_id, channel, category, template_id, "
            "status, attempts, owner, lease_until, request, requested_at, created_at, updated_at, ambiguous, "
            "feedback_done, reason, user_id) "
            "VALUES (?, ?, ?, ?, ?, ?, 'skipped', 0, ?, ?, ?, ?, ?, ?, false, false, ?, ?) IF NOT EXISTS"
        )
        self._feedback_done = p("UPDATE notify_messages SET feedback_done = true WHERE idempotency_key = ?")
        self._get = p(f"SELECT {_LOG_COLUMNS} FROM notify_messages WHERE idempotency_key = ?")
        self._takeover = p(
            "UPDATE notify_messages SET status = 'claimed', owner = ?, lease_until = ?, updated_at = ?, ambiguous = ? "
            "WHERE idempotency_key = ? IF status = ? AND owner = ?"
        )
        self._index_id = p("INSERT INTO notify_message_ids (message_id, idempotency_key) VALUES (?, ?)")
        self._index_profile = p(
            "INSERT INTO notify_messages_by_profile (profile_id, created_at, idempotency_key) VALUES (?, ?, ?)")
        self._index_user = p(
            "INSERT INTO notify_messages_by_user (user_id, created_at, idempotency_key) VALUES (?, ?, ?)")
        self._by_id = p("SELECT idempotency_key FROM notify_message_ids WHERE message_id = ?")
        self._by_profile = p(
            "SELECT idempotency_key FROM notify_messages_by_profile WHERE profile_id = ? LIMIT ?")
        self._by_user = p("SELECT idempotency_key FROM notify_messages_by_user WHERE user_id = ? LIMIT ?")
        self._history_insert = p(
            "INSERT INTO notify_send_history (profile_id, channel, sent_at, idempotency_key, category) "
            "VALUES (?, ?, ?, ?, ?)")
        self._history = p(
            "SELECT sent_at, category FROM notify_send_history WHERE profile_id = ? AND channel = ? AND sent_at > ?")
        self._consent_get = p(
            "SELECT channel, grp, subscribed, updated_at, source FROM notify_consent WHERE profile_id = ?")
        self._consent_put = p(
            "INSERT INTO notify_consent (profile_id, channel, grp, subscribed, updated_at, source) "
            "VALUES (?, ?, ?, ?, ?, ?)")
        self._suppression_get = p("SELECT reason FROM notify_suppressions WHERE channel = ? AND address = ?")
        self._suppression_put = p(
            "INSERT INTO notify_suppressions (channel, address, reason, created_at) VALUES (?, ?, ?, ?)")
        self._schedule_add = p("INSERT INTO notify_schedule (shard, due_at, idempotency_key) VALUES (?, ?, ?)")
        self._schedule_due = p(
            "SELECT due_at, idempotency_key FROM notify_schedule WHERE shard = ? AND due_at <= ? LIMIT ?")
        # From a read floor: past the tombstones of the entries handled before it (loyalist/queues.py).
        self._schedule_due_since = p(
            "SELECT due_at, idempotency_key FROM notify_schedule WHERE shard = ? AND due_at >= ? AND due_at <= ? "
            "LIMIT ?")
        self._schedule_del = p("DELETE FROM notify_schedule WHERE shard = ? AND due_at = ? AND idempotency_key = ?")
        self._schedule_count = p("SELECT count(*) AS n FROM notify_schedule WHERE shard = ?")
        self._schedule_count_since = p("SELECT count(*) AS n FROM notify_schedule WHERE shard = ? AND due_at >= ?")
        self._tpl_get = p(
            "SELECT template_id, channel, name, subject, html, text, grp, sample_data, version, builtin "
            "FROM notify_templates WHERE template_id = ? AND channel = ?")
        self._tpl_all = p(
            "SELECT template_id, channel, name, subject, html, text, grp, sample_data, version, builtin "
            "FROM notify_templates")
        self._tpl_seed = p(
            "INSERT INTO notify_templates (template_id, channel, name, subject, html, text, grp, sample_data, "
            "version, builtin, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, true, ?) IF NOT EXISTS")
        self._tpl_put = p(
            "INSERT INTO notify_templates (template_id, channel, name, subject, html, text, grp, sample_data, "
            "version, builtin, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        self._tpl_del = p("DELETE FROM notify_templates WHERE template_id = ? AND channel = ?")

    # ---- the delivery log state machine -------------------------------------------------------------
    async def claim(self, req: MessageRequest, owner: str, lease_until: datetime, now: datetime, *,
                    sending: tuple[str, str, str | None] | None = None,
                    skipped: tuple[str, str | None] | None = None) -> tuple[bool, LogRow | None]:
        """``INSERT ... IF NOT EXISTS``: True for the first claimant, else the existing row.

        With ``sending`` (recipient, subject, user id) the row starts as ``sending`` rather than ``claimed``, with
        ``skipped`` (reason, user id) as ``skipped``: one lightweight transaction instead of two for a request
        whose decision was made before its claim."""
        values = [req.idempotency_key, req.message_id, req.profile_id, req.channel, req.category, req.template_id,
                  owner, _ts(lease_until), json.dumps(dict(req.raw), default=str), _ts(req.requested_at), _ts(now),
                  _ts(now)]
        if sending is not None:
            rows = await execute(self.s, self._claim_sending, [*values, *sending])
        elif skipped is not None:
            rows = await execute(self.s, self._claim_skipped, [*values, *skipped])
        else:
            rows = await execute(self.s, self._claim, values)
        row = rows[0]
        if row["[applied]"]:
            return True, None
        return False, LogRow.from_row(row)

    async def index(self, req: MessageRequest, user_id: str | None, created_at: datetime) -> None:
        """Lookup rows for the delivery log (idempotent; rewritten on every claim or takeover), as one unlogged
        batch: one request instead of up to three."""
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        batch.add(self._index_id, (req.message_id, req.idempotency_key))
        if req.profile_id:
            batch.add(self._index_profile, (req.profile_id, _ts(created_at), req.idempotency_key))
        if user_id:
            batch.add(self._index_user, (user_id, _ts(created_at), req.idempotency_key))
        await execute(self.s, batch)

    async def get(self, key: str) -> LogRow | None:
        rows = await execute(self.s, self._get, (key,))
        return LogRow.from_row(rows[0]) if rows else None

    async def takeover(self, key: str, expected_status: str, expected_owner: str | None, owner: str,
                       lease_until: datetime, now: datetime, *, ambiguous: bool) -> bool:
        rows = await execute(self.s, self._takeover, (
            owner, _ts(lease_until), _ts(now), ambiguous, key, expected_status, expected_owner))
        return bool(rows[0]["[applied]"])

    async def transition(self, key: str, expected_status: str, owner: str, new_status: str,
                         now: datetime, **fields: Any) -> bool:
        """Move ``key`` from ``expected_status`` (held by ``owner``) to ``new_status``, setting ``fields``."""
        columns = tuple(sorted(fields))
        statement = self._transitions.get(columns)
        if statement is None:
            assignments = ", ".join(["status = ?", "updated_at = ?", *(f"{c} = ?" for c in columns)])
            statement = self.s.prepare(f"UPDATE notify_messages SET {assignments} WHERE idempotency_key = ? "
                                       "IF status = ? AND owner = ?")
            self._transitions[columns] = statement
        values: list[Any] = [new_status, _ts(now)]
        values.extend(_ts(fields[c]) if isinstance(fields[c], datetime) else fields[c] for c in columns)
        values.extend([key, expected_status, owner])
        rows = await execute(self.s, statement, values)
        return bool(rows[0]["[applied]"])

    async def mark_feedback_done(self, key: str) -> None:
        # Not part of the state machine: a plain flag set after the feedback events were acknowledged, on a row
        # that is ``sent`` for good (no lightweight transaction writes it again). A plain write, not one more
        # LWT: should it ever lose to the claim's ``false`` (clock skew), a redelivery only redoes the
        # idempotent follow-ups.
        await execute(self.s, self._feedback_done, (key,))

    async def by_message_id(self, message_id: str) -> LogRow | None:
        rows = await execute(self.s, self._by_id, (message_id,))
        return await self.get(rows[0]["idempotency_key"]) if rows else None

    async def list_for(self, *, profile_id: str | None = None, user_id: str | None = None,
                       limit: int = 100) -> list[LogRow]:
        if profile_id:
            keys = await execute(self.s, self._by_profile, (profile_id, limit))
        else:
            keys = await execute(self.s, self._by_user, (user_id, limit))
        seen: list[str] = []
        for k in keys:
            if k["idempotency_key"] not in seen:
                seen.append(k["idempotency_key"])
        rows = [await self.get(k) for k in seen]
        return [r for r in rows if r is not None]

    # ---- history, consent, suppressions ---------------------------------------------------------------
    async def record_sent(self, profile_id: str, channel: str, sent_at: datetime, key: str, category: str) -> None:
        await execute(self.s, self._history_insert, (profile_id, channel, _ts(sent_at), key, category))

    async def history(self, profile_id: str, channel: str, since: datetime) -> list[SentRecord]:
        rows = await execute(self.s, self._history, (profile_id, channel, _ts(since)))
        return [SentRecord(channel, r["category"], r["sent_at"].replace(tzinfo=UTC)) for r in rows]

    async def consent_rows(self, profile_id: str) -> list[ConsentRow]:
        rows = await execute(self.s, self._consent_get, (profile_id,))
        return [ConsentRow(r["channel"], r["grp"], bool(r["subscribed"]), r["updated_at"].replace(tzinfo=UTC),
                           r["source"] or "") for r in rows]

    async def set_consent(self, profile_id: str, channel: str, group: str, subscribed: bool, at: datetime,
                          source: str) -> None:
        await execute(self.s, self._consent_put, (profile_id, channel, group, subscribed, _ts(at), source))

    async def suppression(self, channel: str, address: str) -> str | None:
        rows = await execute(self.s, self._suppression_get, (channel, address.lower()))
        return rows[0]["reason"] if rows else None

    async def suppress(self, channel: str, address: str, reason: str, at: datetime) -> None:
        await execute(self.s, self._suppression_put, (channel, address.lower(), reason, _ts(at)))

    # ---- schedule ----------------------------------------------------------------------------------------
    async def schedule(self, key: str, due_at: datetime, now: datetime) -> datetime:
        """Schedule ``key`` at ``due_at``, stored no earlier than the writer's ``now`` (a poll that already read
        up to ``now`` would never find an earlier entry). Returns the due time stored."""
        stored = not_before(due_at, now)
        await execute(self.s, self._schedule_add, (SCHEDULE_SHARD, _ts(stored), key))
        return stored

    async def due(self, now: datetime, limit: int = 200, *,
                  since: datetime | None = None) -> list[tuple[datetime, str]]:
        """Entries due by ``now``, in due order; from ``since`` on (a read floor), else from the start."""
        if since is None:
            rows = await execute(self.s, self._schedule_due, (SCHEDULE_SHARD, _ts(now), limit))
        else:
            rows = await execute(self.s, self._schedule_due_since, (SCHEDULE_SHARD, _ts(since), _ts(now), limit))
        return [(r["due_at"].replace(tzinfo=UTC), r["idempotency_key"]) for r in rows]

    async def unschedule(self, due_at: datetime, key: str) -> None:
        # ``due_at`` as read from the schedule: the exact key of the stored entry.
        await execute(self.s, self._schedule_del, (SCHEDULE_SHARD, _ts(due_at), key))

    async def scheduled_count(self, since: datetime | None = None) -> int:
        """Entries waiting (from ``since`` on: a count from the start scans every tombstone too)."""
        if since is None:
            rows = await execute(self.s, self._schedule_count, (SCHEDULE_SHARD,))
        else:
            rows = await execute(self.s, self._schedule_count_since, (SCHEDULE_SHARD, _ts(since)))
        return int(rows[0]["n"]) if rows else 0

    # ---- templates --------------------------------------------------------------------------------------
    @staticmethod
    def _template(row: dict[str, Any]) -> Template:
        return Template(
            id=row["template_id"], channel=row["channel"], name=row.get("name") or "", subject=row.get("subject") or "",
            html=row.get("html") or "", text=row.get("text") or "", group=row.get("grp") or "marketing",
            sample_data=json.loads(row["sample_data"]) if row.get("sample_data") else {},
            version=row.get("version") or 1, builtin=bool(row.get("builtin")),
        )

    async def template(self, template_id: str, channel: str) -> Template | None:
        rows = await execute(self.s, self._tpl_get, (template_id, channel))
        return self._template(rows[0]) if rows else None

    async def templates(self) -> list[Template]:
        rows = await execute(self.s, self._tpl_all)
        return sorted((self._template(r) for r in rows), key=lambda t: (t.id, t.channel))

    async def seed_template(self, t: Template, now: datetime) -> None:
        await execute(self.s, self._tpl_seed, (t.id, t.channel, t.name, t.subject, t.html, t.text, t.group,
                                               json.dumps(dict(t.sample_data)), _ts(now)))

    async def put_template(self, t: Template, now: datetime) -> None:
        await execute(self.s, self._tpl_put, (t.id, t.channel, t.name, t.subject, t.html, t.text, t.group,
                                              json.dumps(dict(t.sample_data)), t.version, t.builtin, _ts(now)))

    async def delete_template(self, template_id: str, channel: str) -> None:
        await execute(self.s, self._tpl_del, (template_id, channel))


def lease(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)
