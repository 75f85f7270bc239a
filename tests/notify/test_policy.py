"""The send policy, exhaustively, with a controllable clock: consent and groups, transactional vs
marketing, frequency caps (skip/defer), quiet hours across time zones and DST transitions, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.notify.domain.messages import ConsentRow, merge_consent
from services.notify.domain.policy import (
    Consent,
    Defer,
    FrequencyCap,
    MessageFacts,
    PolicyConfig,
    QuietHours,
    Send,
    SentRecord,
    Skip,
    decide,
    in_quiet_hours,
    quiet_until,
)

ZONES = ["UTC", "America/New_York", "America/Los_Angeles", "Europe/London", "Europe/Paris", "Asia/Kolkata",
         "Asia/Kathmandu", "Australia/Sydney", "Australia/Lord_Howe", "Pacific/Chatham", "America/St_Johns",
         "Pacific/Apia", "America/Sao_Paulo", "Africa/Casablanca"]
SUBSCRIBED = Consent(subscribed={"email": True, "sms": True, "webhook": True})
NOON = datetime(2024, 6, 12, 12, 0, tzinfo=UTC)
NO_QUIET = PolicyConfig(quiet_hours=())
NO_CAPS = PolicyConfig(caps=())


def email(category: str = "marketing", tz: str = "UTC", group: str = "marketing",
          expires_at: datetime | None = None) -> MessageFacts:
    return MessageFacts("email", category, group, tz, expires_at)


def sent(hours_ago: float, category: str = "marketing", channel: str = "email", now: datetime = NOON) -> SentRecord:
    return SentRecord(channel, category, now - timedelta(hours=hours_ago))


# ---- consent ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("subscribed", "category", "expected"), [
    (True, "marketing", Send()),
    (False, "marketing", Skip("unsubscribed")),
    (None, "marketing", Skip("no_consent")),
    (True, "transactional", Send()),
    (False, "transactional", Send()),
    (None, "transactional", Send()),
])
def test_consent_matrix(subscribed: bool | None, category: str, expected: object) -> None:
    consent = Consent(subscribed={} if subscribed is None else {"email": subscribed})
    assert decide(email(category), consent, [], NOON, NO_QUIET) == expected


def test_opt_in_not_required_when_configured() -> None:
    config = PolicyConfig(quiet_hours=(), requires_opt_in={"email": False})
    assert decide(email(), Consent(), [], NOON, config) == Send()
    assert decide(email(), Consent(subscribed={"email": False}), [], NOON, config) == Skip("unsubscribed")


def test_consent_is_per_channel() -> None:
    consent = Consent(subscribed={"email": False, "sms": True})
    assert decide(MessageFacts("sms", "marketing"), consent, [], NOON, NO_QUIET) == Send()
    assert decide(email(), consent, [], NOON, NO_QUIET) == Skip("unsubscribed")


def test_subscription_groups() -> None:
    consent = Consent(subscribed={"email": True}, unsubscribed_groups={"email": frozenset({"newsletter"})})
    assert decide(email(group="newsletter"), consent, [], NOON, NO_QUIET) == Skip("unsubscribed_group")
    assert decide(email(group="marketing"), consent, [], NOON, NO_QUIET) == Send()
    # groups are a marketing notion: a receipt is not part of a newsletter
    assert decide(email("transactional", group="newsletter"), consent, [], NOON, NO_QUIET) == Send()


def test_suppression_stops_every_category() -> None:
    consent = Consent(subscribed={"email": True}, suppressed={"email": "hard_bounce"})
    for category in ("marketing", "transactional"):
        assert decide(email(category), consent, [], NOON) == Skip("suppressed:hard_bounce")


def test_unknown_channel() -> None:
    assert decide(MessageFacts("fax", "transactional"), SUBSCRIBED, [], NOON) == Skip("unknown_channel")


@given(st.booleans(), st.sampled_from(["email", "sms", "webhook"]), st.sampled_from(ZONES),
       st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
       st.lists(st.floats(min_value=0, max_value=48), max_size=5))
def test_marketing_never_reaches_an_unsubscribed_customer(
    profile_says: bool, channel: str, tz: str, now: datetime, hours_ago: list[float]
) -> None:
    # whatever the profile said, a later unsubscribe in notify's table wins ...
    profile = {"consent": {channel: {"subscribed": profile_says, "updated_at": "2019-01-01T00:00:00Z"}}}
    consent = merge_consent(profile, [ConsentRow(channel, "*", False, datetime(2019, 6, 1, tzinfo=UTC))])
    history = [SentRecord(channel, "marketing", now - timedelta(hours=h)) for h in hours_ago]
    decision = decide(MessageFacts(channel, "marketing", timezone=tz), consent, history, now)
    # ... and no marketing is ever sent or even deferred (deferring would send it later).
    assert decision == Skip("unsubscribed")
    # while a transactional message always goes out at once
    assert decide(MessageFacts(channel, "transactional", timezone=tz), consent, history, now) == Send()


# ---- frequency caps ----------------------------------------------------------------------------------------
def test_one_marketing_email_per_16_hours_defers() -> None:
    config = PolicyConfig(quiet_hours=(), caps=(FrequencyCap("email", 1, timedelta(hours=16), "defer"),))
    decision = decide(email(), SUBSCRIBED, [sent(10)], NOON, config)
    assert decision == Defer(NOON + timedelta(hours=6), "frequency_cap")
    assert decide(email(), SUBSCRIBED, [sent(16.01)], NOON, config) == Send()


def test_cap_with_skip_action() -> None:
    config = PolicyConfig(quiet_hours=(), caps=(FrequencyCap("email", 2, timedelta(days=1), "skip"),))
    assert decide(email(), SUBSCRIBED, [sent(1)], NOON, config) == Send()
    assert decide(email(), SUBSCRIBED, [sent(1), sent(2)], NOON, config) == Skip("frequency_cap")


def test_caps_count_marketing_on_the_same_channel_only() -> None:
    config = PolicyConfig(quiet_hours=(), caps=(FrequencyCap("email", 1, timedelta(hours=16), "skip"),))
    history = [sent(1, "transactional"), sent(1, channel="sms")]
    assert decide(email(), SUBSCRIBED, history, NOON, config) == Send()


def test_transactional_bypasses_caps_and_quiet_hours() -> None:
    config = PolicyConfig(caps=(FrequencyCap("email", 1, timedelta(hours=16), "skip"),),
                          quiet_hours=(QuietHours("email", time(0), time(23, 59)),))
    assert decide(email("transactional"), SUBSCRIBED, [sent(1), sent(2)], NOON, config) == Send()


@settings(max_examples=300)
@given(st.integers(min_value=1, max_value=5), st.integers(min_value=1, max_value=72),
       st.lists(st.floats(min_value=0, max_value=100), max_size=12))
def test_a_deferred_send_respects_the_cap_at_its_new_time(max_count: int, window_h: int, ages: list[float]) -> None:
    cap = FrequencyCap("email", max_count, timedelta(hours=window_h), "defer")
    config = PolicyConfig(quiet_hours=(), caps=(cap,), max_defer=timedelta(days=30))
    history = [sent(a) for a in ages]
    decision = decide(email(), SUBSCRIBED, history, NOON, config)
    in_window = [r for r in history if NOON - cap.window < r.sent_at <= NOON]
    if len(in_window) < max_count:
        assert decision == Send()
    else:
        assert isinstance(decision, Defer) and decision.until > NOON
        # at the new time the cap has room, and it had none just before: the earliest possible moment
        assert decide(email(), SUBSCRIBED, history, decision.until, config) == Send()
        before = decision.until - timedelta(seconds=1)
        assert decide(email(), SUBSCRIBED, history, before, config) != Send()


# ---- quiet hours ---------------------------------------------------------------------------------------------
def test_quiet_hours_defer_to_the_local_morning() -> None:
    config = PolicyConfig(caps=(), quiet_hours=(QuietHours("email", time(21), time(8)),))
    # 03:00 UTC is 23:00 in New York (EDT, UTC-4): wait until 08:00 EDT = 12:00 UTC
    now = datetime(2024, 6, 12, 3, 0, tzinfo=UTC)
    assert decide(email(tz="America/New_York"), SUBSCRIBED, [], now, config) == Defer(
        datetime(2024, 6, 12, 12, 0, tzinfo=UTC), "quiet_hours")
    # the same instant is 08:30 in Kolkata: send now
    assert decide(email(tz="Asia/Kolkata"), SUBSCRIBED, [], now, config) == Send()


def test_quiet_hours_across_dst_spring_forward() -> None:
    # Europe/Paris jumps 02:00 → 03:00 on 2024-03-31. Quiet 21:00-08:00; at 01:30 CET (00:30 UTC) the next
    # allowed moment is 08:00 CEST = 06:00 UTC (not 07:00, which a fixed offset would give).
    config = PolicyConfig(caps=(), quiet_hours=(QuietHours("email", time(21), time(8)),))
    now = datetime(2024, 3, 31, 0, 30, tzinfo=UTC)
    assert decide(email(tz="Europe/Paris"), SUBSCRIBED, [], now, config) == Defer(
        datetime(2024, 3, 31, 6, 0, tzinfo=UTC), "quiet_hours")


def test_quiet_hours_across_dst_fall_back() -> None:
    # America/New_York falls back 02:00 → 01:00 on 2024-11-03: 08:00 EST is 13:00 UTC.
    config = PolicyConfig(caps=(), quiet_hours=(QuietHours("email", time(21), time(8)),))
    now = datetime(2024, 11, 3, 5, 30, tzinfo=UTC)  # 01:30 EDT, the first of two 01:30s
    assert decide(email(tz="America/New_York"), SUBSCRIBED, [], now, config) == Defer(
        datetime(2024, 11, 3, 13, 0, tzinfo=UTC), "quiet_hours")


def test_quiet_window_ending_inside_a_dst_gap() -> None:
    # The end (02:30) does not exist on the spring-forward night: the first real instant after it is 03:30 EDT.
    q = QuietHours("email", time(22), time(2, 30))
    ny = ZoneInfo("America/New_York")
    until = quiet_until(datetime(2024, 3, 10, 5, 0, tzinfo=UTC), q, ny)  # 00:00 EST
    assert until is not None and until == datetime(2024, 3, 10, 7, 30, tzinfo=UTC)
    assert not in_quiet_hours(until.astimezone(ny).time(), q)


def test_unknown_timezone_falls_back_to_the_default() -> None:
    config = PolicyConfig(caps=(), quiet_hours=(QuietHours("email", time(21), time(8)),), default_timezone="UTC")
    now = datetime(2024, 6, 12, 23, 0, tzinfo=UTC)
    assert decide(email(tz="Not/AZone"), SUBSCRIBED, [], now, config) == Defer(
        datetime(2024, 6, 13, 8, 0, tzinfo=UTC), "quiet_hours")


@settings(max_examples=500)
@given(st.sampled_from(ZONES),
       st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)),
       st.times(), st.times())
def test_quiet_hours_property(tz: str, now: datetime, start: time, end: time) -> None:
    """Across zones and DST: a deferral lands outside the quiet window, after now, within two days, and no
    earlier whole minute in between would have been allowed."""
    start, end = start.replace(microsecond=0, second=0), end.replace(microsecond=0, second=0)
    quiet = QuietHours("email", start, end)
    config = PolicyConfig(caps=(), quiet_hours=(quiet,), max_defer=timedelta(days=5))
    zone = ZoneInfo(tz)
    decision = decide(email(tz=tz), SUBSCRIBED, [], now, config)
    local_now = now.astimezone(zone).time().replace(tzinfo=None)
    if not in_quiet_hours(local_now, quiet):
        assert decision == Send()
        return
    assert isinstance(decision, Defer) and decision.reason == "quiet_hours"
    assert now < decision.until <= now + timedelta(days=2)
    assert not in_quiet_hours(decision.until.astimezone(zone).time().replace(tzinfo=None), quiet)
    # sample the interval: every instant strictly before `until` is still quiet
    step = max((decision.until - now) / 40, timedelta(seconds=1))
    probe = now
    while probe < decision.until - timedelta(seconds=60):
        assert in_quiet_hours(probe.astimezone(zone).time().replace(tzinfo=None), quiet), probe
        probe += step


def test_caps_and_quiet_hours_combine() -> None:
    # the cap frees a slot at 23:00 local, which is quiet: wait for the morning
    config = PolicyConfig(caps=(FrequencyCap("email", 1, timedelta(hours=16), "defer"),),
                          quiet_hours=(QuietHours("email", time(21), time(8)),))
    now = datetime(2024, 6, 12, 12, 0, tzinfo=UTC)
    history = [SentRecord("email", "marketing", datetime(2024, 6, 12, 7, 0, tzinfo=UTC))]  # frees at 23:00 UTC
    assert decide(email(tz="UTC"), SUBSCRIBED, history, now, config) == Defer(
        datetime(2024, 6, 13, 8, 0, tzinfo=UTC), "frequency_cap")


# ---- expiry ------------------------------------------------------------------------------------------------
def test_expired_and_too_late() -> None:
    config = PolicyConfig(caps=(), quiet_hours=(QuietHours("email", time(21), time(8)),))
    late = datetime(2024, 6, 12, 22, 0, tzinfo=UTC)
    assert decide(email(expires_at=late - timedelta(minutes=1)), SUBSCRIBED, [], late, config) == Skip("expired")
    # the morning would be after the expiry: skip instead of sending stale content
    assert decide(email(expires_at=late + timedelta(hours=2)), SUBSCRIBED, [], late, config) == Skip("expired")
    assert isinstance(decide(email(expires_at=late + timedelta(hours=12)), SUBSCRIBED, [], late, config), Defer)


def test_max_defer_bounds_waiting() -> None:
    config = PolicyConfig(quiet_hours=(), caps=(FrequencyCap("email", 1, timedelta(days=10), "defer"),),
                          max_defer=timedelta(days=3))
    assert decide(email(), SUBSCRIBED, [sent(1)], NOON, config) == Skip("expired")


@given(st.sampled_from(ZONES), st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1),
                                            timezones=st.just(UTC)))
def test_decide_is_deterministic(tz: str, now: datetime) -> None:
    facts = email(tz=tz)
    history = [sent(3, now=now)]
    assert decide(facts, SUBSCRIBED, history, now) == decide(facts, SUBSCRIBED, history, now)
