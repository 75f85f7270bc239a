"""Garbage-collector settings for long-running processes (services, the replay command).

CPython's full collections walk every tracked object. A service holds a million or so from start-up alone
(modules, schemas, clients) and then its caches, so each full collection paused it for tens to hundreds of
milliseconds while finding almost nothing to free.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Histogram

GC_PAUSE = Histogram(
    "loyalist_gc_pause_seconds", "Time the process stood still in one garbage collection, by generation",
    ["generation"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

# Young-generation threshold: a request's or a batch's short-lived objects are mostly freed by reference counting
# before a collection promotes them. With CPython's 700 they were promoted, and every promoted object brings the
# next full collection closer: the profile service ran one every ~2 s during a steady 1,000 events/s, each
# walking its whole cache of profiles (100-430 ms); with 20,000 none ran in the same 20 s.
GC_GEN0_THRESHOLD = 20_000


class _PauseTimer:
    """A ``gc.callbacks`` entry timing each collection: a full collection stops the process (its event loop, its
    API) for as long as it walks the heap, which no other metric shows."""

    def __init__(self) -> None:
        self.started = 0.0
        self.observe = [GC_PAUSE.labels(str(g)).observe for g in range(3)]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.observe[info["generation"]](time.perf_counter() - self.started)


def time_pauses() -> None:
    """Time every collection into ``loyalist_gc_pause_seconds`` (once per process).

    >>> from prometheus_client import REGISTRY
    >>> def full_collections() -> float:
    ...     return REGISTRY.get_sample_value("loyalist_gc_pause_seconds_count", {"generation": "2"}) or 0.0
    >>> time_pauses(); time_pauses()  # registered once
    >>> before = full_collections()
    >>> _ = gc.collect()
    >>> full_collections() - before
    1.0
    """
    if not any(isinstance(cb, _PauseTimer) for cb in gc.callbacks):
        gc.callbacks.append(_PauseTimer())


def settle_heap() -> None:
    """Once a service has started: collect, then move everything start-up allocated (modules, schemas, clients:
    most of a service's objects) out of the collector's reach, and collect the young generation less often.

    Full collections walk every tracked object: they paused the profile service for 80-100 ms each (and found
    nothing to free), which was its API's p99 under load.

    >>> settle_heap()
    >>> gc.get_threshold()[0], gc.get_freeze_count() > 0
    (20000, True)
    >>> gc.unfreeze()
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    time_pauses()
