"""The Helm chart renders valid, coherent manifests offline, and its schema and guards refuse bad values.

Needs the helm binary: `make lint-helm` (part of `make lint`, which `make test` runs first) installs it."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from loyalist.checks.helm import CHART, Rendered, check_chart, check_coherence, find_helm, validate_schemas
from loyalist.settings import Settings

PRODUCTION = CHART / "ci" / "production-values.yaml"


@pytest.fixture(scope="module")
def helm() -> str:
    found = find_helm()
    if found is None:
        pytest.fail("helm is not installed: run `make lint-helm` (go install helm.sh/helm/v3/cmd/helm@v3.19.0)")
    return found


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, Rendered]:
    return {out.name: out for out in check_chart(helm)}


def template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, "template", "t", str(CHART), "--kube-version", "1.31.0", *args],
                          capture_output=True, text=True, timeout=120)


def test_default_and_production_values_pass_lint_template_and_schema_validation(
    rendered: dict[str, Rendered],
) -> None:
    assert set(rendered) == {"default values", "production-values.yaml"}
    for out in rendered.values():
        assert out.problems == [], "\n".join(out.problems)
        # five services + the lag exporter, and the API-only profile deployment in production values
        assert len(out.of_kind("Deployment")) == (7 if out.name == "production-values.yaml" else 6)


def test_default_install_points_at_external_infrastructure_only(rendered: dict[str, Rendered]) -> None:
    out = rendered["default values"]
    kinds = {d["kind"] for d in out.docs}
    assert "StatefulSet" not in kinds  # no bundled Kafka/Cassandra/Redis
    config = next(c for c in out.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-config"))["data"]
    assert config["LOYALIST_KAFKA_HOST"] == "kafka" and config["LOYALIST_CASSANDRA_HOSTS"] == "cassandra"
    assert config["LOYALIST_PROFILE_URL"] == "http://loyalist-profile:8002"
    # The HTTP-only ingest scales on CPU by default; the stream services keep a fixed replica count.
    assert [h["spec"]["scaleTargetRef"]["name"] for h in out.of_kind("HorizontalPodAutoscaler")] == ["loyalist-ingest"]
    assert len(out.of_kind("PodDisruptionBudget")) == 5
    assert out.of_kind("Secret") and not out.of_kind("ServiceMonitor")


def test_production_values_enable_monitoring_and_autoscaling(rendered: dict[str, Rendered]) -> None:
    out = rendered["production-values.yaml"]
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"] for h in out.of_kind("HorizontalPodAutoscaler")}
    assert set(hpas) == {"loyalist-ingest", "loyalist-profile", "loyalist-segmenter", "loyalist-profile-api"}
    assert hpas["loyalist-profile"]["maxReplicas"] <= 24  # never more workers than partitions
    # The API-only profile deployment: the profile module in API-only mode, and every service queries it.
    api = next(d for d in out.of_kind("Deployment") if d["metadata"]["name"] == "loyalist-profile-api")
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "services.profile"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["LOYALIST_PROFILE_API_ONLY"] == "true" and env["LOYALIST_PROFILE_PORT"] == "8012"
    config = next(c for c in out.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-config"))["data"]
    assert config["LOYALIST_PROFILE_URL"] == "http://loyalist-profile-api:8012"
    assert not out.of_kind("Secret")  # existingSecret
    rules = out.of_kind("PrometheusRule")[0]["spec"]["groups"]
    files = sorted((CHART / "rules").glob("*.yml"))
    source = [g["name"] for f in files for g in yaml.safe_load(f.read_text())["groups"]]
    assert [g["name"] for g in rules] == source
    monitor = out.of_kind("ServiceMonitor")[0]["spec"]
    assert monitor["endpoints"][0]["path"] == "/metrics" and monitor["jobLabel"] == "loyalist.io/job"


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("services.profile.replicas=-1", "minimum"),
        ("config.namespace=Shop-1", "does not match pattern"),
        ("services.profile.replica=2", "additional properties"),
        ("config.env=staging", "value must be one of"),
        ("kafka.port=0", "minimum"),
    ],
)
def test_schema_rejects_bad_values(helm: str, flag: str, expected: str) -> None:
    result = template(helm, "--set", flag)
    assert result.returncode != 0
    assert expected in result.stderr.lower(), result.stderr


def test_stream_workers_beyond_the_partition_count_are_refused(helm: str) -> None:
    result = template(helm, "--set", "services.segmenter.autoscaling.enabled=true",
                      "--set", "services.segmenter.autoscaling.maxReplicas=13")
    assert result.returncode != 0 and "exceeds config.kafkaPartitions (12)" in result.stderr
    assert template(helm, "--set", "services.journeys.replicas=13").returncode != 0
    # Ingest consumes no partitions: it may scale past them.
    assert template(helm, "--set", "services.ingest.autoscaling.maxReplicas=40").returncode == 0


def broken(out: Rendered, edit: Any) -> Rendered:
    copy_ = Rendered(out.name, out.values, copy.deepcopy(out.docs))
    edit(copy_)
    return copy_


def deployment(out: Rendered, name: str) -> dict[str, Any]:
    return next(d for d in out.docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"loyalist-{name}")


def test_coherence_checks_catch_what_schemas_cannot(rendered: dict[str, Rendered]) -> None:
    base = rendered["production-values.yaml"]

    def no_readiness(out: Rendered) -> None:
        del deployment(out, "profile")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]

    def wrong_selector(out: Rendered) -> None:
        deployment(out, "notify")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "notifier"

    def bad_url(out: Rendered) -> None:
        config = next(c for c in out.docs if c["kind"] == "ConfigMap" and c["metadata"]["name"].endswith("-config"))
        config["data"]["LOYALIST_JOURNEYS_URL"] = "http://loyalist-journeys:9999"

    def unknown_setting(out: Rendered) -> None:
        config = next(c for c in out.docs if c["kind"] == "ConfigMap" and c["metadata"]["name"].endswith("-config"))
        config["data"]["LOYALIST_KAFKA_BROKERS"] = "kafka:9092"

    def replicas_under_hpa(out: Rendered) -> None:
        deployment(out, "ingest")["spec"]["replicas"] = 3

    def monitor_port(out: Rendered) -> None:
        next(d for d in out.docs if d["kind"] == "ServiceMonitor")["spec"]["endpoints"][0]["port"] = "metrics"

    cases = {
        "readinessProbe must GET /readyz": no_readiness,
        "selector does not match its pod labels": wrong_selector,
        "LOYALIST_JOURNEYS_URL=http://loyalist-journeys:9999 names no rendered Service port": bad_url,
        "not Loyalist settings: ['kafka_brokers']": unknown_setting,
        "sets replicas while an HPA manages it": replicas_under_hpa,
        "port 'metrics' not on": monitor_port,
    }
    for expected, edit in cases.items():
        out = broken(base, edit)
        check_coherence(out, "/usr/bin/promtool")
        assert any(expected in p for p in out.problems), f"{expected!r} not in {out.problems}"


def test_schema_validation_catches_unknown_and_mistyped_fields(rendered: dict[str, Rendered]) -> None:
    def edit(out: Rendered) -> None:
        deployment(out, "ingest")["spec"]["replicaz"] = 3
        deployment(out, "profile")["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8002"

    out = broken(rendered["default values"], edit)
    validate_schemas(out, "1.31.0")
    assert any("'replicaz' was unexpected" in p for p in out.problems), out.problems
    assert any("containerPort: '8002' is not of type 'integer'" in p for p in out.problems), out.problems


def test_rendered_yaml_with_duplicate_keys_is_refused() -> None:
    from loyalist.checks.helm import UniqueKeyLoader

    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        yaml.load("metadata:\n  labels:\n    a: 1\n    a: 2\n", Loader=UniqueKeyLoader)


def test_chart_links_dashboards_and_rules_to_their_single_source() -> None:
    assert (CHART / "dashboards").resolve() == (CHART.parents[1] / "grafana" / "dashboards").resolve()
    assert (CHART / "rules").resolve() == (CHART.parents[1] / "prometheus" / "rules").resolve()
    assert Path(PRODUCTION).is_file()


def test_the_fold_stage_can_run_in_workers_of_its_own(helm: str) -> None:
    result = template(helm, "--set", "services.profile-fold.enabled=true",
                      "--set-string", "services.profile.extraEnv.LOYALIST_PROFILE_STAGES=resolve\\,loyalty")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d and d.get("kind") == "Deployment"]

    def stages(name: str) -> str | None:
        container = next(d for d in docs if d["metadata"]["name"] == name)["spec"]["template"]["spec"][
            "containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert container["command"][-1] == "services.profile"
        return env.get("LOYALIST_PROFILE_STAGES")

    assert stages("t-loyalist-profile-fold") == "fold"
    assert stages("t-loyalist-profile") == "resolve,loyalty"
    # Both values are ones the service accepts.
    assert Settings(profile_stages="resolve,loyalty").profile_stage_set == {"resolve", "loyalty"}
