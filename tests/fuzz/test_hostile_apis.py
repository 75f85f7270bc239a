"""Bad input against the bearer-token APIs (segmenter, journeys, notify) and every service's OpenAPI, as
real processes on the real servers: clear 4xx ``{code, message}``, never a 500; template text is data, never
code; a refused definition is not stored.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bench.procs import service_exists
from loyalist.devstack import REPO
from loyalist.settings import Settings

pytestmark = pytest.mark.integration

SSTI = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ self._TemplateReference__context }}",
    "{{ config.items() }}",
    "{{ lipsum.__globals__['os'].system('touch /tmp/pwned') }}",
]


def needs(name: str) -> None:
    assert service_exists(name), f"services/{name} is missing"


@pytest.fixture(scope="module")
def api(start_service: Callable[..., Any], api_headers: dict[str, str]) -> Callable[[str], httpx.Client]:
    started: dict[str, Any] = {}

    def client(name: str) -> httpx.Client:
        needs(name)
        if name not in started:
            started[name] = start_service(name)
        return httpx.Client(base_url=started[name].url, headers=api_headers, timeout=30)

    return client


def clear_4xx(resp: httpx.Response) -> dict[str, Any]:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert isinstance(body.get("code"), str) and body["code"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    return body  # type: ignore[no-any-return]


# ---- notify: templates are sandboxed, variables are escaped data ---------------------------------------------
def test_template_injection_is_refused_or_inert(api: Callable[[str], httpx.Client]) -> None:
    notify = api("notify")
    for i, payload in enumerate(SSTI):
        tid = f"fuzz_ssti_{i}"
        body = {"channel": "email", "subject": "Hi", "html": f"<p>{payload}</p>", "text": payload}
        resp = notify.put(f"/v1/templates/{tid}", json=body)
        assert resp.status_code < 500, resp.text[:300]
        if resp.status_code >= 400:
            clear_4xx(resp)
            continue
        preview = notify.post(f"/v1/templates/{tid}/preview", json={"data": {}})
        assert preview.status_code < 500, preview.text[:300]
        if preview.status_code >= 400:
            clear_4xx(preview)
            continue
        rendered = preview.json()
        for part in ("subject", "html", "text"):
            assert "<class" not in str(rendered.get(part)), (payload, rendered)
            assert "uid=" not in str(rendered.get(part)), (payload, rendered)
    assert not os.path.exists("/tmp/pwned")


def test_hostile_variables_render_escaped_and_unevaluated(api: Callable[[str], httpx.Client]) -> None:
    notify = api("notify")
    resp = notify.put("/v1/templates/fuzz_escape", json={
        "channel": "email", "subject": "Hello {{ data.name }}", "html": "<p>Hello {{ data.name }}</p>",
        "text": "Hello {{ data.name }}", "sampleData": {"name": "Ann"}})
    assert resp.status_code == 200, resp.text[:300]
    for hostile in ("<script>alert(1)</script>", "{{ 7 * 7 }}", "{% if true %}x{% endif %}"):
        out = notify.post("/v1/templates/fuzz_escape/preview", json={"data": {"name": hostile}})
        assert out.status_code == 200, out.text[:300]
        html = out.json()["html"]
        assert "<script>" not in html, html
        assert "49" not in html, html  # the variable's text is shown, never evaluated
        if "{{" in hostile:
            assert "{{ 7 * 7 }}" in out.json()["text"], out.json()


def test_malformed_template_bodies(api: Callable[[str], httpx.Client]) -> None:
    notify = api("notify")
    for body in ({"html": "{% for %}"}, {"html": "{{ unclosed"}, {"channel": "pigeon"}, {"html": 5},
                 {"html": "x" * 600_000}):
        clear_4xx(notify.put("/v1/templates/fuzz_bad", json=body))
    assert notify.get("/v1/templates/fuzz_bad").status_code == 404  # nothing half-saved


# ---- segmenter: rules are validated with the offending path ------------------------------------------------------
def test_invalid_and_hostile_segment_rules(api: Callable[[str], httpx.Client]) -> None:
    seg = api("segmenter")
    deep: Any = {"field": "orders_count", "op": "gte", "value": 1}
    for _ in range(500):
        deep = {"not": deep}
    bad_rules = [
        {"field": "orders_count", "op": "gte", "value": "two"},
        {"and": "nope"},
        {"performed": {"event": "Order Completed", "at_least": -1}},
        {"rfm_segment": ["Royalty"]},
        {"trait": "__class__", "op": "eq"},
        {"in_segment": "does_not_exist"},
        deep,
        "{{ 7*7 }}",
        None,
    ]
    for i, rule in enumerate(bad_rules):
        resp = seg.post("/v1/segments", json={"id": f"fuzz_bad_{i}", "name": "bad", "rule": rule})
        body = clear_4xx(resp)
        if isinstance(rule, dict) and rule is not deep:
            assert body.get("path", "$").startswith("$"), body
        assert seg.get(f"/v1/segments/fuzz_bad_{i}").status_code == 404  # nothing stored half
    name = "<script>alert(1)</script>{{ 7*7 }}"
    ok = seg.post("/v1/segments", json={"id": "fuzz_named", "name": name,
                                        "rule": {"field": "orders_count", "op": "gte", "value": 1}})
    assert ok.status_code == 201, ok.text[:300]
    assert seg.get("/v1/segments/fuzz_named").json()["name"] == name  # stored verbatim, not evaluated


# ---- journeys: definitions are validated node by node --------------------------------------------------------------
def test_invalid_and_hostile_journeys(api: Callable[[str], httpx.Client]) -> None:
    jrn = api("journeys")
    bad = [
        {"name": "x"},
        {"name": "x", "entry": {"type": "event", "event": "E"}, "start": "missing", "nodes": []},
        {"name": "x", "entry": {"type": "teleport"}, "start": "a", "nodes": [{"id": "a", "type": "exit"}]},
        {"name": "x", "entry": {"type": "event", "event": "E"}, "start": "a",
         "nodes": [{"id": "a", "type": "delay", "duration": "forever", "next": "b"}, {"id": "b", "type": "exit"}]},
        {"name": "x", "entry": {"type": "event", "event": "E"}, "start": "a",
         "nodes": [{"id": "a", "type": "send", "channel": "email", "template": "t", "next": "a"}]},
    ]
    for i, definition in enumerate(bad):
        clear_4xx(jrn.post("/v1/journeys", json={"id": f"fuzz_bad_{i}", **definition}))
        assert jrn.get(f"/v1/journeys/fuzz_bad_{i}").status_code == 404
    clear_4xx(jrn.post("/v1/journeys/from-template/abandoned_checkout", json={"first_reminder_after": "{{ 7*7 }}"}))
    clear_4xx(jrn.post("/v1/journeys/from-template/../../etc/passwd", json={}))


# ---- every OpenAPI: Schemathesis finds no 5xx -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ingest", "profile", "segmenter", "journeys", "notify"])
def test_schemathesis_finds_no_server_error(name: str, start_service: Callable[..., Any],
                                            stack_settings: Settings) -> None:
    needs(name)
    svc = start_service(name)
    auth = (["--auth", f"{stack_settings.dev_write_key}:"] if name == "ingest"
            else ["--header", f"Authorization: Bearer {stack_settings.dev_api_token}"])
    proc = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{svc.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "10", "--max-time", "15", "--phases", "examples,fuzzing", "--seed", "1",
         "--request-timeout", "20", "--no-color", "--suppress-health-check", "all", *auth],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"schemathesis found problems in {name}:\n{proc.stdout[-4000:]}\n{proc.stderr[-1000:]}"
