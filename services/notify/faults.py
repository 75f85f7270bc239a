"""Test-only fault injection: ``LOYALIST_NOTIFY_CRASH_POINT=<point>`` (with
``LOYALIST_NOTIFY_CRASH_PROBABILITY``, or ``LOYALIST_NOTIFY_CRASH_EVERY=n`` for the n-th pass of this process)
makes the process kill itself with SIGKILL at that point — no cleanup,
no flush, exactly like a power cut. Points: ``before_send``, ``after_send`` (the provider accepted, nothing
recorded yet: the residual ambiguity window), ``after_record`` (recorded as sent, before the feedback events
and the Kafka offset commit)."""

from __future__ import annotations

import os
import random
import signal

POINTS = frozenset({"before_send", "after_send", "after_record"})


class CrashInjector:
    def __init__(self, point: str | None, probability: float, every: int | None = None) -> None:
        if point is not None and point not in POINTS:
            raise ValueError(f"unknown crash point {point!r}; use one of {sorted(POINTS)}")
        self.point = point
        self.probability = probability
        self.every = every
        self.passes = 0

    def maybe_crash(self, point: str) -> None:
        if point != self.point:
            return
        self.passes += 1
        # "every": deterministic, each incarnation gets n-1 passes through, so a test always makes progress.
        hit = self.passes >= self.every if self.every else random.random() < self.probability
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
