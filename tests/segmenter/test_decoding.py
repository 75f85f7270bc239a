"""The fast reader of resolved track events agrees with the full event model (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from loyalist.events import decode_event
from services.segmenter.engine import fast_track

BASE = {"type": "track", "event": "Order Completed", "messageId": "m1", "timestamp": "2024-01-02T03:04:05Z",
        "receivedAt": "2024-01-02T03:04:06.123Z", "properties": {"total": 20}}


@pytest.mark.parametrize("change", [
    {},
    {"timestamp": "2024-01-02T03:04:05+02:00", "receivedAt": "2024-01-02T03:04:06"},
    {"timestamp": "2024-01-02T03:04:05.123456Z"},
    {"properties": {}},
    {"userId": "u1", "context": {"ip": "1.2.3.4"}, "source": "shop"},
])
def test_well_formed_track_events_read_like_the_model(change: dict[str, Any]) -> None:
    raw = {**BASE, **change}
    fast, full = fast_track(raw), decode_event(raw)
    assert fast is not None
    assert (fast.event, fast.timestamp, fast.properties, fast.message_id, fast.received_at) == (
        full.event, full.timestamp, full.properties, full.message_id, full.received_at)


@pytest.mark.parametrize("change", [
    {"type": "page", "name": "Home"}, {"type": "identify"}, {"event": ""}, {"event": None}, {"messageId": ""},
    {"messageId": "x" * 201}, {"properties": None}, {"timestamp": 1704164645}, {"timestamp": "yesterday"},
    {"receivedAt": None},
])
def test_anything_else_goes_to_the_full_decoder(change: dict[str, Any]) -> None:
    assert fast_track({**BASE, **change}) is None
