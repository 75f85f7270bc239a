"""Delivering one message request exactly once where it can be, and honestly otherwise.

The delivery log row of an idempotency key moves through ``claimed → sending → sent`` with Cassandra
lightweight transactions (``IF NOT EXISTS`` / ``IF status = ? AND owner = ?``), so exactly one worker holds a
message at a time and a redelivered or replayed request finds the outcome instead of sending again.

Crash windows (see docs/notify.md):
- before ``sending`` is recorded: nothing was sent; the next owner sends.
- after ``sent`` is recorded (history, feedback events, Kafka commit still pending): redelivery finds ``sent``
  and only completes the follow-ups — never a second email.
- between the provider's acceptance and the ``sent`` record (one LWT round trip, a few ms): the outcome is
  unknown. The next owner finds ``sending`` with an expired lease and, by ``ambiguous_policy``, resends with
  the same Message-ID (default; at least once) or gives up (at most once). Either way the row says
  ``ambiguousRecovery: true``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from loyalist.events import utcnow
from loyalist.queues import not_before
from loyalist.settings import Settings
from services.notify.adapters import Delivered, DeliveryError
from services.notify.adapters.email import OutgoingEmail, SmtpSender
from services.notify.adapters.profiles import ProfileReader
from services.notify.adapters.sms import SmsSender
from services.notify.adapters.webhook import WebhookSender
from services.notify.config import NotifyConfig
from services.notify.domain.messages import (
    MessageRequest,
    address_subject,
    group_of,
    iso,
    merge_consent,
    recipient_for,
)
from services.notify.domain.policy import Defer, MessageFacts, PolicyConfig, SentRecord, Skip, decide
from services.notify.domain.retry import backoff_delay
from services.notify.domain.templates import (
    Rendered,
    RenderError,
    Template,
    add_open_pixel,
    build_context,
    render,
    track_links,
)
from services.notify.faults import CrashInjector
from services.notify.feedback import SENT_EVENT, Feedback
from services.notify.links import LinkSigner
from services.notify.metrics import (
    AMBIGUOUS,
    DEFERRED,
    DELIVERY_LATENCY,
    DUPLICATES,
    FAILED,
    RETRIES,
    SEND_DURATION,
    SENT,
    SKIPPED,
)
from services.notify.store import LogRow, NotifyStore, lease

log = logging.getLogger(__name__)


async def _no_history() -> list[SentRecord]:
    return []


async def _nothing() -> None:
    return None


class TemplateCache:
    """Templates change rarely and are read per message: a short in-process cache."""

    def __init__(self, store: NotifyStore, ttl_s: float = 2.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, str], tuple[float, Template | None]] = {}

    async def get(self, template_id: str, channel: str) -> Template | None:
        now = time.monotonic()
        hit = self._cache.get((template_id, channel))
        if hit and hit[0] > now:
            return hit[1]
        template = await self.store.template(template_id, channel)
        self._cache[(template_id, channel)] = (now + self.ttl_s, template)
        return template

    def invalidate(self, template_id: str, channel: str) -> None:
        self._cache.pop((template_id, channel), None)


class Notifier:
    def __init__(
        self,
        settings: Settings,
        config: NotifyConfig,
        store: NotifyStore,
        profiles: ProfileReader,
        feedback: Feedback,
        links: LinkSigner,
        *,
        email: SmtpSender,
        sms: SmsSender,
        webhook: WebhookSender,
        owner: str,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.config = config
        self.store = store
        self.profiles = profiles
        self.feedback = feedback
        self.links = links
        self.email = email
        self.sms = sms
        self.webhook = webhook
        self.owner = owner
        self.clock = clock
        self.templates = TemplateCache(store)
        self.policy: PolicyConfig = config.policy()
        self.retry = config.retry_plan()
        self.crash = CrashInjector(config.crash_point, config.crash_probability, config.crash_every)
        self._cap_horizon = max((c.window for c in self.policy.caps), default=timedelta(0))

    # ---- entry point -----------------------------------------------------------------------------------
    async def handle(self, req: MessageRequest, *, from_schedule: bool = False) -> str:
        """Process one request; returns what happened (for logs and tests).

        A request from the stream is decided first and claimed with its first write — for a send, the claim
        *is* the ``sending`` record (one lightweight transaction instead of two); a request that turns out to
        have a row already goes through :meth:`_resume` exactly as if it had been claimed first. A scheduled
        request always has its row: claimed (taken over) first."""
        now = self.clock()
        if not from_schedule:
            return await self._process(req, 0, now, claimed=False)
        return await self._claim_first(req, now, from_schedule)

    async def _claim_first(self, req: MessageRequest, now: datetime, from_schedule: bool) -> str:
        claimed, existing = await self.store.claim(req, self.owner, lease(now, self.config.lease_s), now)
        attempts = 0
        if not claimed:
            assert existing is not None
            outcome = await self._resume(req, existing, now, from_schedule)
            if outcome is not None:
                return outcome
            attempts = existing.attempts
        return await self._process(req, attempts, now, claimed=True)

    async def _claim_late(self, req: MessageRequest, now: datetime,
                          sending: tuple[str, str, str | None] | None = None) -> str | None:
        """Claim a request whose decision was made before its claim. None: the claim is ours (as ``claimed``,
        or as ``sending`` with ``sending``), go on with that decision; else the request's outcome — the row of
        an earlier delivery resumed, or (taken over) the whole pipeline run again as the new owner."""
        claimed, existing = await self.store.claim(req, self.owner, lease(now, self.config.lease_s), now,
                                                   sending=sending)
        if claimed:
            return None
        assert existing is not None
        outcome = await self._resume(req, existing, now, False)
        if outcome is not None:
            return outcome
        return await self._process(req, existing.attempts, now, claimed=True)

    async def _resume(self, req: MessageRequest, row: LogRow, now: datetime, from_schedule: bool) -> str | None:
        """A row exists: finish it, leave it, or take it over. None means "we own it now, go on"."""
        status = row.status
        if status == "sent":
            if not row.feedback_done:
                await self._after_sent(req, row.raw.get("user_id"), row.raw.get("recipient"),
                                       row.raw.get("sent_at"), first_time=False)
            DUPLICATES.labels(status).inc()
            return "duplicate"
        if status in ("skipped", "failed"):
            DUPLICATES.labels(status).inc()
            return "duplicate"
        if status in ("deferred", "retrying"):
            due = row.raw.get("due_at")
            if not from_schedule:
                DUPLICATES.labels(status).inc()
                return "duplicate"
            if due is not None and due.replace(tzinfo=now.tzinfo) > now:
                return "not_due"
            taken = await self.store.takeover(req.idempotency_key, status, row.owner, self.owner,
                                              lease(now, self.config.lease_s), now, ambiguous=row.ambiguous)
            return None if taken else "lost_race"
        # claimed or sending by someone else (or by a previous incarnation of this process)
        if row.lease_until is not None and row.lease_until > now:
            await self.store.schedule(req.idempotency_key, row.lease_until + timedelta(milliseconds=200), self.clock())
            return "busy"
        ambiguous = status == "sending"
        taken = await self.store.takeover(req.idempotency_key, status, row.owner, self.owner,
                                          lease(now, self.config.lease_s), now, ambiguous=ambiguous or row.ambiguous)
        if not taken:
            return "lost_race"
        if ambiguous:
            AMBIGUOUS.labels(req.channel, self.config.ambiguous_policy).inc()
            log.warning("message %s found in 'sending' after a crash; policy %s", req.idempotency_key,
                        self.config.ambiguous_policy)
            if self.config.ambiguous_policy == "give_up":
                await self._fail(req, "claimed", "ambiguous_delivery",
                                 "the provider may or may not have accepted it before a crash", row.attempts,
                                 user_id=row.raw.get("user_id"))
                return "failed"
        return None

    # ---- the pipeline ----------------------------------------------------------------------------------
    async def _process(self, req: MessageRequest, attempts: int, now: datetime, *, claimed: bool) -> str:
        # Round trips that do not depend on each other go together: the profile with the template, then the
        # delivery log's lookup rows with the policy's reads.
        profile, template = await asyncio.gather(
            self.profiles.get(req.profile_id) if req.profile_id else _nothing(),
            self.templates.get(req.template_id, req.channel))
        user_id = str(profile["user_id"]) if profile and profile.get("user_id") else None
        known = template is not None or req.channel == "webhook"
        recipient = recipient_for(req, profile) if known else None
        if not (known and recipient):
            await self.store.index(req, user_id, req.requested_at)
        if not known:
            if not claimed and (outcome := await self._claim_late(req, now)) is not None:
                return outcome
            return await self._fail(req, "claimed", "unknown_template",
                                    f"no {req.channel} template {req.template_id!r}", attempts, user_id=user_id)
        if not recipient:
            return await self._skip(req, "no_address", user_id, now, claimed=claimed)

        consent_key = req.profile_id or address_subject(req.channel, recipient)
        _, suppression, rows, history = await asyncio.gather(
            self.store.index(req, user_id, req.requested_at),
            self.store.suppression(req.channel, recipient), self.store.consent_rows(consent_key),
            self.store.history(req.profile_id, req.channel, now - self._cap_horizon)
            if req.profile_id and self._cap_horizon else _no_history())
        consent = merge_consent(profile, rows, {req.channel: suppression} if suppression else None)
        group = group_of(req, template.group if template else None)
        facts = MessageFacts(channel=req.channel, category=req.category, group=group,
                             timezone=(profile or {}).get("timezone"), expires_at=req.expires_at)
        decision = decide(facts, consent, history, now, self.policy)
        if isinstance(decision, Skip):
            return await self._skip(req, decision.reason, user_id, now, claimed=claimed)
        if isinstance(decision, Defer) and not claimed and (outcome := await self._claim_late(req, now)) is not None:
            return outcome
        if isinstance(decision, Defer):
            # The row's due time as the schedule stores it (never before our clock): the schedule entry must not
            # be earlier than the row's due_at, or it would fire, find the row "not_due" and be dropped.
            until = not_before(decision.until, self.clock())
            ok = await self.store.transition(req.idempotency_key, "claimed", self.owner, "deferred", now,
                                             due_at=until, reason=decision.reason, user_id=user_id,
                                             recipient=recipient)
            if ok:
                await self.store.schedule(req.idempotency_key, until, self.clock())
                DEFERRED.labels(req.channel, decision.reason).inc()
            return "deferred" if ok else "lost_race"

        try:
            content = self._render(req, template, profile, group, recipient)
        except RenderError as exc:
            if not claimed and (outcome := await self._claim_late(req, now)) is not None:
                return outcome
            return await self._fail(req, "claimed", "template_error", str(exc), attempts, user_id=user_id)

        # Fencing: only the owner of the claim may move it to "sending" (or, not claimed yet, whoever creates the
        # row as "sending").
        if claimed:
            if not await self.store.transition(req.idempotency_key, "claimed", self.owner, "sending", now,
                                               recipient=recipient, subject=content.subject, user_id=user_id,
                                               lease_until=lease(now, self.config.lease_s)):
                return "lost_race"
        elif (outcome := await self._claim_late(req, now, sending=(recipient, content.subject, user_id))) is not None:
            return outcome
        self.crash.maybe_crash("before_send")
        immediate = self.retry.immediate
        while True:
            started = time.perf_counter()
            try:
                delivered = await self._deliver(req, content, recipient, profile, group)
                break
            except DeliveryError as exc:
                attempts += 1
                if exc.permanent:
                    return await self._fail(req, "sending", exc.reason, exc.detail, attempts, user_id=user_id,
                                            bounce=exc.bounce, recipient=recipient)
                RETRIES.labels(req.channel, exc.reason).inc()
                if self.retry.exhausted(attempts):
                    return await self._fail(req, "sending", exc.reason, exc.detail, attempts, user_id=user_id)
                delay = backoff_delay(attempts, base_s=self.retry.base_s, cap_s=self.retry.cap_s)
                if immediate > 0:
                    immediate -= 1
                    await asyncio.sleep(min(delay, 1.0))
                    continue
                due = self.clock() + timedelta(seconds=delay)
                if await self.store.transition(req.idempotency_key, "sending", self.owner, "retrying", self.clock(),
                                               due_at=due, attempts=attempts, reason=exc.reason, detail=exc.detail):
                    await self.store.schedule(req.idempotency_key, due, self.clock())
                return "retrying"
            finally:
                SEND_DURATION.labels(req.channel).observe(time.perf_counter() - started)
        self.crash.maybe_crash("after_send")
        sent_at = self.clock()
        # The sent record and the follow-ups (history, `Email Sent`) go together: the follow-ups are idempotent
        # and tell of a send that happened either way; only the flag that they are done waits for both.
        recorded, _ = await asyncio.gather(
            self.store.transition(req.idempotency_key, "sending", self.owner, "sent", sent_at,
                                  sent_at=sent_at, provider_id=delivered.provider_id,
                                  attempts=attempts + 1, reason=None, detail=None),
            self._follow_ups(req, user_id, recipient, sent_at))
        if not recorded:
            # Our lease expired mid-send and another worker took the message over: it may send it again.
            log.error("message %s was sent but its claim had been taken over; a duplicate is possible",
                      req.idempotency_key)
        self.crash.maybe_crash("after_record")
        SENT.labels(req.channel, req.category).inc()
        started_at = req.event_accepted_at or req.requested_at
        DELIVERY_LATENCY.labels(req.channel).observe(max(0.0, (sent_at - started_at).total_seconds()))
        await self.store.mark_feedback_done(req.idempotency_key)
        return "sent"

    def _render(self, req: MessageRequest, template: Template | None, profile: Mapping[str, Any] | None,
                group: str, recipient: str) -> Rendered:
        token = self.links.unsubscribe_token(profile_id=req.profile_id, channel=req.channel, group=group,
                                             message_id=req.message_id, address=recipient)
        unsubscribe_url = self.links.unsubscribe_url(token)
        if template is None:  # a webhook without a template sends the request data as is
            return Rendered(subject="", html="", text="")
        context = build_context(profile, req.data, unsubscribe_url, req.message_id)
        content = render(template, context)
        if req.channel == "email" and content.html:
            base = self.links.base + "/u/"
            html = track_links(content.html, lambda url: self.links.click_url(message_id=req.message_id, url=url),
                               lambda url: url.startswith(base))
            content = Rendered(content.subject, add_open_pixel(html, self.links.open_url(message_id=req.message_id)),
                               content.text)
        return content

    async def _deliver(self, req: MessageRequest, content: Rendered, recipient: str,
                       profile: Mapping[str, Any] | None, group: str) -> Delivered:
        if req.channel == "email":
            token = self.links.unsubscribe_token(profile_id=req.profile_id, channel="email",
                                                 group=group, message_id=req.message_id,
                                                 address=recipient)
            marketing = req.category == "marketing"
            mail = OutgoingEmail(
                message_id=req.message_id, sender=self.config.from_email, to=recipient, subject=content.subject,
                text=content.text, html=content.html,
                unsubscribe_https=self.links.unsubscribe_url(token) if marketing else None,
                unsubscribe_mailto=(f"mailto:unsubscribe@{self.config.mail_domain}?subject=unsubscribe%20{token}"
                                    if marketing else None),
                headers=(("X-Loyalist-Message-Id", req.message_id), ("X-Loyalist-Category", req.category),
                         ("X-Loyalist-Template", req.template_id)),
            )
            return await self.email.send(mail)
        if req.channel == "sms":
            return await self.sms.send(to=recipient, body=content.text.strip(), idempotency_key=req.idempotency_key)
        method = str(req.data.get("method") or "POST").upper()
        if method not in ("POST", "PUT", "PATCH"):
            raise DeliveryError("webhook_invalid", f"unsupported method {method}", permanent=True)
        if isinstance(req.data.get("body"), dict):
            # A journey's webhook node: the configured body is the payload; ids travel in the headers.
            return await self.webhook.send(url=recipient, payload=req.data["body"], method=method,
                                           idempotency_key=req.idempotency_key, message_id=req.message_id)
        payload: dict[str, Any] = {
            "id": req.message_id, "idempotencyKey": req.idempotency_key, "templateId": req.template_id,
            "category": req.category, "profileId": req.profile_id, "data": dict(req.data),
            "profile": dict(profile) if profile else None, "requestedAt": iso(req.requested_at),
        }
        if content.text:
            payload["text"] = content.text
        return await self.webhook.send(url=recipient, payload=payload, method=method,
                                       idempotency_key=req.idempotency_key, message_id=req.message_id)

    # ---- outcomes --------------------------------------------------------------------------------------
    async def _after_sent(self, req: MessageRequest, user_id: str | None, recipient: str | None,
                          sent_at: datetime | None, *, first_time: bool) -> None:
        """History for caps and the feedback event; both idempotent, redone after a crash until flagged done."""
        await self._follow_ups(req, user_id, recipient, sent_at)
        await self.store.mark_feedback_done(req.idempotency_key)

    async def _follow_ups(self, req: MessageRequest, user_id: str | None, recipient: str | None,
                          sent_at: datetime | None) -> None:
        at = sent_at.replace(tzinfo=self.clock().tzinfo) if sent_at and sent_at.tzinfo is None else sent_at
        at = at or self.clock()
        follow_ups: list[Awaitable[Any]] = [self.feedback.emit(
            SENT_EVENT[req.channel], profile_id=req.profile_id, user_id=user_id, dedup_key=req.idempotency_key,
            timestamp=at, properties=self._event_properties(req, recipient),
        )]
        if req.profile_id:
            follow_ups.append(self.store.record_sent(req.profile_id, req.channel, at, req.idempotency_key,
                                                     req.category))
        await asyncio.gather(*follow_ups)

    def _event_properties(self, req: MessageRequest, recipient: str | None, **extra: Any) -> dict[str, Any]:
        props: dict[str, Any] = {
            "channel": req.channel, "category": req.category, "message_id": req.message_id,
            "idempotency_key": req.idempotency_key, "template_id": req.template_id,
            "journey_id": req.journey.get("journeyId"), "node_id": req.journey.get("nodeId"),
            "instance_id": req.journey.get("instanceId"),
        }
        if recipient and req.channel == "email":
            props["email"] = recipient
        elif recipient and req.channel == "sms":
            props["phone"] = recipient
        props.update(extra)
        return props

    async def _skip(self, req: MessageRequest, reason: str, user_id: str | None, now: datetime, *,
                    claimed: bool) -> str:
        if claimed:
            ok = await self.store.transition(req.idempotency_key, "claimed", self.owner, "skipped", self.clock(),
                                             reason=reason, user_id=user_id)
        else:
            # Not claimed yet: the claim itself records the skip (one lightweight transaction, not two); a row
            # that exists already is resumed like any other claim that lost.
            ok, existing = await self.store.claim(req, self.owner, lease(now, self.config.lease_s), now,
                                                  skipped=(reason, user_id))
            if not ok:
                assert existing is not None
                outcome = await self._resume(req, existing, now, False)
                if outcome is not None:
                    return outcome
                return await self._process(req, existing.attempts, now, claimed=True)
        if ok:
            SKIPPED.labels(req.channel, reason.split(":")[0]).inc()
        return f"skipped:{reason}" if ok else "lost_race"

    async def _fail(self, req: MessageRequest, from_status: str, reason: str, detail: str, attempts: int, *,
                    user_id: str | None, bounce: bool = False, recipient: str | None = None) -> str:
        ok = await self.store.transition(req.idempotency_key, from_status, self.owner, "failed", self.clock(),
                                         reason=reason, detail=detail[:2000], attempts=attempts, user_id=user_id)
        if not ok:
            return "lost_race"
        FAILED.labels(req.channel, reason).inc()
        if bounce and recipient:
            await self.store.suppress(req.channel, recipient, reason, self.clock())
            if req.channel == "email":
                await self.feedback.emit("Email Bounced", profile_id=req.profile_id, user_id=user_id,
                                         dedup_key=req.idempotency_key,
                                         properties=self._event_properties(req, recipient, bounce_type="hard",
                                                                           reason=detail[:500]))
        await self.feedback.emit("Message Failed", profile_id=req.profile_id, user_id=user_id,
                                 dedup_key=req.idempotency_key,
                                 properties=self._event_properties(req, recipient, reason=reason,
                                                                   detail=detail[:500], attempts=attempts))
        await self.feedback.dead_letter(req.raw, key=req.kafka_key, reason=reason, detail=detail, attempts=attempts)
        return f"failed:{reason}"
