"""A clock a test sets by hand: services that take a ``clock`` callable read ``now`` from it."""

from __future__ import annotations

from datetime import datetime


class SettableClock:
    """>>> from datetime import UTC
    >>> clock = SettableClock(datetime(2026, 1, 1, tzinfo=UTC))
    >>> clock().year
    2026
    """

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
