"""Schemathesis against ingest's own OpenAPI document, on the live process: no 5xx, and every answer
matches the documented status codes, content types and schemas (a bounded number of examples per
operation)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = int(__import__("os").environ.get("INGEST_FUZZ_EXAMPLES", "30"))


def _exercise(operation: Any, base_url: str, auth: str) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def exercise(case: Any) -> None:
        case.call_and_validate(base_url=base_url, headers={"Authorization": auth})

    exercise()


def test_openapi_contract(ingest: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{ingest.url}/openapi.json")
    basic = "Basic " + base64.b64encode(f"{ingest.settings.dev_write_key}:".encode()).decode()
    bearer = f"Bearer {ingest.settings.dev_api_token}"
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an invalid schema raises here, failing the test
        operations += 1
        auth = bearer if operation.path.startswith("/v1/sources") else basic

        try:
            _exercise(operation, ingest.url, auth)
        except Exception as exc:  # collect every operation's failure, then report them together
            failures[operation.label] = str(exc)[:2000]
    assert operations >= 15
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
