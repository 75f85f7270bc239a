"""One journeys process per test session (a second one would join the same consumer group and take half of
the partitions, which would hide what a kill -9 of the first does)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(scope="session")
def journeys(start_service: Callable[..., Any]) -> Any:
    return start_service("journeys")
