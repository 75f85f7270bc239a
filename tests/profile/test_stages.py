"""Pure wiring of the profile pipeline: which consumers a worker runs for its stages, and the fold message form."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from loyalist.settings import Settings
from services.profile.processor import fold_message, parse_fold_message
from services.profile.streams import Runtime, build_consumers


@pytest.mark.parametrize(("stages", "expected"), [
    ("resolve,fold,loyalty", ["resolve", "fold", "membership"]),
    ("resolve", ["resolve"]),
    ("fold", ["fold", "membership"]),
    ("loyalty", []),  # the loyalty consumers are the extension's, added by the app
])
def test_a_worker_runs_the_consumers_of_its_stages(stages: str, expected: list[str]) -> None:
    settings = Settings(namespace="stages", profile_stages=stages)
    consumers = build_consumers(settings, Runtime())
    assert [c.stage for c in consumers] == expected
    assert {c.group_id for c in consumers} <= {"stages-profile-resolve", "stages-profile-fold",
                                               "stages-profile-membership"}


@pytest.mark.parametrize("stages", ["", "resolve,index", "fold;loyalty"])
def test_unknown_stages_are_refused(stages: str) -> None:
    with pytest.raises(ValidationError):
        Settings(profile_stages=stages)


def test_an_event_travels_as_its_own_bytes_after_a_header() -> None:
    raw = b'{"type":"track","event":"Line\\nBreak","messageId":"m1"}'  # an escaped newline inside the event
    key, value = fold_message("event", "p1", body=raw)
    op = parse_fold_message(value)
    assert key == "p1" and op["op"] == "event" and op["profileId"] == "p1" and op["raw"] == raw


def test_operations_without_an_event_have_no_body() -> None:
    _key, value = fold_message("merge_out", "p2", into="p1", reason="email", cause="m1")
    assert b"\n" not in value
    assert parse_fold_message(value) == {"op": "merge_out", "profileId": "p2", "into": "p1", "reason": "email",
                                         "cause": "m1"}


def test_the_older_form_with_the_event_inside_the_header_is_still_read() -> None:
    # Messages written before the header/body form may still be on the topic during an upgrade.
    event = {"type": "track", "event": "Product Viewed", "messageId": "m9"}
    op = parse_fold_message(orjson.dumps({"op": "event", "profileId": "p3", "event": event}))
    assert orjson.loads(op["raw"]) == event and "event" not in op
