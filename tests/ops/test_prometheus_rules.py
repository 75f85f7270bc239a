"""Alert rules and scrape configs pass promtool, their unit tests pass, and they read only metrics the
code declares."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from loyalist.checks.promql import SCRAPE_SERIES, declared_metric_names, metric_names_in

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

REQUIRED_ALERTS = {
    "LoyalistServiceDown",             # a service down
    "LoyalistHighErrorRatio",          # error ratio
    "LoyalistConsumerLagGrowing",      # consumer lag growing
    "LoyalistDeadLetterQueueGrowing",  # DLQ growth
    "LoyalistFreshnessBudgetBurn",     # freshness SLO burn
    "LoyalistModelAucDrop",            # model quality
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool not installed: `make deps` installs the prometheus Debian package")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def rules() -> list[dict[str, object]]:
    return [rule for file in RULE_FILES for group in yaml.safe_load(file.read_text())["groups"]
            for rule in group["rules"]]


def test_rule_files_pass_promtool_check() -> None:
    assert RULE_FILES
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-compose.yml"])
def test_scrape_configs_pass_promtool_check(config: str) -> None:
    result = promtool("check", "config", str(PROM / config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_operations_needs_exist_and_each_is_unit_tested() -> None:
    alerts = {str(r["alert"]) for r in rules() if "alert" in r}
    assert alerts >= REQUIRED_ALERTS, f"missing: {REQUIRED_ALERTS - alerts}"
    tested = {str(case["alertname"]) for file in RULE_TESTS for test in yaml.safe_load(file.read_text())["tests"]
              for case in test.get("alert_rule_test") or [] if case.get("exp_alerts")}
    assert alerts <= tested, f"alerts never shown to fire in a promtool test: {sorted(alerts - tested)}"


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    operations = (REPO / "docs" / "operations.md").read_text().lower()
    for rule in rules():
        if "alert" not in rule:
            continue
        labels = rule.get("labels") or {}
        annotations = rule.get("annotations") or {}
        assert isinstance(labels, dict) and labels.get("severity") in {"warning", "critical"}, rule["alert"]
        assert isinstance(annotations, dict) and annotations.get("summary"), rule["alert"]
        anchor = str(annotations.get("runbook_url", "")).partition("#")[2]
        assert anchor and f"### {anchor}" in operations, f"{rule['alert']}: no runbook section '### {anchor}'"


def test_rules_read_only_metrics_that_the_code_declares() -> None:
    declared = declared_metric_names(REPO)
    unknown = {}
    for rule in rules():
        for name in metric_names_in(str(rule["expr"])) - SCRAPE_SERIES:
            if name not in declared:
                unknown[name] = rule.get("alert") or rule.get("record")
    assert not unknown, f"rules read metrics no service declares: {unknown}"
