"""The send policy: ``decide(message, consent, history, now) -> Send | Defer(until) | Skip(reason)``.

Rules, in order:

1. Suppression (hard bounce, invalid address, erased profile) stops every category.
2. Consent: a *marketing* message needs the customer subscribed to the channel (explicit opt-in by
   default) and not unsubscribed from the message's subscription group. A *transactional* message ignores
   marketing consent — a receipt still reaches someone who unsubscribed from promotions — but never the
   other way round.
3. Expiry: a message whose send time would pass ``expires_at`` is skipped (an abandoned-cart nudge three
   days late is worse than none).
4. Frequency caps (marketing only): at most ``max_count`` sends per channel per customer within
   ``window``; each cap either skips or defers to the moment the oldest counted send leaves the window.
5. Quiet hours (marketing only) in the customer's IANA timezone: defer to the end of the quiet period,
   computed with ``zoneinfo`` so DST transitions give the right instant.

Time is always injected (``now``), so the same inputs give the same decision.

>>> from datetime import datetime, UTC
>>> cfg = PolicyConfig()
>>> msg = MessageFacts(channel="email", category="marketing", group="marketing", timezone="Europe/Paris")
>>> yes = Consent(subscribed={"email": True})
>>> decide(msg, yes, [], datetime(2024, 1, 10, 12, 0, tzinfo=UTC), cfg)
Send()
>>> decide(msg, Consent(), [], datetime(2024, 1, 10, 12, 0, tzinfo=UTC), cfg)
Skip(reason='no_consent')
>>> decide(msg, yes, [], datetime(2024, 1, 10, 22, 30, tzinfo=UTC), cfg)  # 23:30 in Paris
Defer(until=datetime.datetime(2024, 1, 11, 7, 0, tzinfo=datetime.timezone.utc), reason='quiet_hours')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Channel = Literal["email", "sms", "webhook"]
Category = Literal["marketing", "transactional"]
CHANNELS: tuple[str, ...] = ("email", "sms", "webhook")
CATEGORIES: tuple[str, ...] = ("marketing", "transactional")
DEFAULT_GROUP = "marketing"


@dataclass(frozen=True, slots=True)
class Send:
    pass


@dataclass(frozen=True, slots=True)
class Defer:
    until: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str


Decision = Send | Defer | Skip


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What the policy needs to know about one message."""

    channel: str
    category: str
    group: str = DEFAULT_GROUP
    timezone: str | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Consent:
    """Merged consent of one customer.

    ``subscribed[channel]``: True opted in, False opted out, missing = never asked.
    ``unsubscribed_groups[channel]``: subscription groups the customer left on that channel.
    ``suppressed[channel]``: a reason (``hard_bounce``...) that stops every send on that channel.
    """

    subscribed: Mapping[str, bool] = field(default_factory=dict)
    unsubscribed_groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    suppressed: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SentRecord:
    channel: str
    category: str
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    channel: str
    max_count: int
    window: timedelta
    action: Literal["skip", "defer"] = "defer"


@dataclass(frozen=True, slots=True)
class QuietHours:
    """Local wall-clock window in which marketing on ``channel`` waits; may wrap midnight."""

    channel: str
    start: time
    end: time


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    caps: tuple[FrequencyCap, ...] = (
        FrequencyCap("email", 1, timedelta(hours=16), "defer"),
        FrequencyCap("sms", 1, timedelta(hours=24), "skip"),
    )
    quiet_hours: tuple[QuietHours, ...] = (
        QuietHours("email", time(21, 0), time(8, 0)),
        QuietHours("sms", time(21, 0), time(9, 0)),
    )
    # Channels whose marketing needs an explicit opt-in (True) or only the absence of an opt-out (False).
    requires_opt_in: Mapping[str, bool] = field(
        default_factory=lambda: {"email": True, "sms": True, "webhook": False}
    )
    default_timezone: str = "UTC"
    # A deferred marketing message never waits longer than this, even without an explicit expiry.
    max_defer: timedelta = timedelta(days=3)


def zone(name: str | None, default: str = "UTC") -> ZoneInfo:
    """The customer's zone; an unknown or missing name falls back to ``default``.

    >>> zone("Asia/Kolkata").key, zone("Mars/Olympus").key, zone(None).key
    ('Asia/Kolkata', 'UTC', 'UTC')
    """
    for candidate in (name, default, "UTC"):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def in_quiet_hours(local: time, quiet: QuietHours) -> bool:
    """Whether a local wall-clock time falls in [start, end) of a window that may wrap midnight.

    >>> q = QuietHours("email", time(21), time(8))
    >>> [in_quiet_hours(t, q) for t in (time(20, 59), time(21), time(3), time(7, 59), time(8))]
    [False, True, True, True, False]
    """
    if quiet.start == quiet.end:
        return False
    if quiet.start < quiet.end:
        return quiet.start <= local < quiet.end
    return local >= quiet.start or local < quiet.end


def _local_to_utc(day: datetime, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of wall-clock ``at`` on ``day``'s date in ``tz``.

    A wall time that does not exist (skipped by a spring-forward gap) maps, with fold=0, to the instant after
    the gap; an ambiguous one (repeated in autumn) to its first occurrence."""
    local = datetime(day.year, day.month, day.day, at.hour, at.minute, at.second, tzinfo=tz)
    return local.astimezone(UTC)


def quiet_until(now: datetime, quiet: QuietHours, tz: ZoneInfo) -> datetime | None:
    """None if ``now`` is outside the quiet window, else the first instant after it.

    >>> ny = ZoneInfo("America/New_York")
    >>> q = QuietHours("sms", time(21), time(9))
    >>> quiet_until(datetime(2024, 3, 10, 5, 0, tzinfo=UTC), q, ny)  # 00:00 EST, DST starts at 02:00
    datetime.datetime(2024, 3, 10, 13, 0, tzinfo=datetime.timezone.utc)
    >>> quiet_until(datetime(2024, 3, 9, 5, 0, tzinfo=UTC), q, ny)  # a normal winter night
    datetime.datetime(2024, 3, 9, 14, 0, tzinfo=datetime.timezone.utc)
    """
    local = now.astimezone(tz)
    if not in_quiet_hours(local.time().replace(tzinfo=None), quiet):
        return None
    # The end is today (local) if it is still ahead, else tomorrow.
    for days in (0, 1, 2):
        candidate_day = local + timedelta(days=days)
        end = _local_to_utc(candidate_day, quiet.end, tz)
        if end > now and not in_quiet_hours(end.astimezone(tz).time().replace(tzinfo=None), quiet):
            return end
    # Unreachable for real zones (a quiet window shorter than a day always ends within two days).
    return now + timedelta(days=1)


def cap_until(history: Sequence[SentRecord], cap: FrequencyCap, now: datetime) -> datetime | None:
    """None if another send fits under the cap, else when the oldest counted send leaves the window.

    >>> cap = FrequencyCap("email", 2, timedelta(hours=10))
    >>> t = datetime(2024, 1, 1, 12, tzinfo=UTC)
    >>> h = [SentRecord("email", "marketing", t - timedelta(hours=h)) for h in (1, 3, 12)]
    >>> cap_until(h, cap, t)
    datetime.datetime(2024, 1, 1, 19, 0, tzinfo=datetime.timezone.utc)
    >>> cap_until(h[1:], cap, t) is None
    True
    """
    since = now - cap.window
    counted = sorted(
        r.sent_at for r in history
        if r.channel == cap.channel and r.category == "marketing" and since < r.sent_at <= now
    )
    if len(counted) < cap.max_count:
        return None
    # Sends drop out oldest first; after the (n - max + 1)-th oldest leaves, one slot is free.
    return counted[len(counted) - cap.max_count] + cap.window


def consent_decision(message: MessageFacts, consent: Consent, config: PolicyConfig) -> Skip | None:
    suppressed = consent.suppressed.get(message.channel)
    if suppressed:
        return Skip(f"suppressed:{suppressed}")
    if message.category != "marketing":
        return None
    subscribed = consent.subscribed.get(message.channel)
    if subscribed is False:
        return Skip("unsubscribed")
    if subscribed is None and config.requires_opt_in.get(message.channel, True):
        return Skip("no_consent")
    if message.group in consent.unsubscribed_groups.get(message.channel, frozenset()):
        return Skip("unsubscribed_group")
    return None


def decide(
    message: MessageFacts,
    consent: Consent,
    history: Sequence[SentRecord],
    now: datetime,
    config: PolicyConfig = PolicyConfig(),
) -> Decision:
    """Send now, defer to a later instant, or skip with a reason (see the module docstring)."""
    if message.channel not in CHANNELS:
        return Skip("unknown_channel")
    refused = consent_decision(message, consent, config)
    if refused is not None:
        return refused
    if message.expires_at is not None and now >= message.expires_at:
        return Skip("expired")
    if message.category != "marketing":
        return Send()

    tz = zone(message.timezone, config.default_timezone)
    at = now
    reason = ""
    # Caps and quiet hours can push each other (a cap ends at 02:00, which is quiet): iterate to a fixpoint.
    # Each step only moves ``at`` forward, and history is fixed, so this ends within a few rounds.
    for _ in range(8):
        moved = False
        for cap in config.caps:
            if cap.channel != message.channel:
                continue
            until = cap_until(history, cap, at)
            if until is not None and until > at:
                if cap.action == "skip":
                    return Skip("frequency_cap")
                at, reason, moved = until, reason or "frequency_cap", True
        for quiet in config.quiet_hours:
            if quiet.channel != message.channel:
                continue
            until = quiet_until(at, quiet, tz)
            if until is not None:
                at, reason, moved = until, reason or "quiet_hours", True
        if not moved:
            break
    if at == now:
        return Send()
    deadline = message.expires_at or now + config.max_defer
    if at >= deadline:
        return Skip("expired")
    return Defer(at, reason)
