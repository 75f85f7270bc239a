"""The static docker-compose validator: the shipped file passes, and each kind of incoherence is caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from loyalist.checks.compose import ComposeCheck, check_dockerfile, main

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def load() -> dict[str, Any]:
    # A JSON round trip unshares the objects YAML aliases share, so one mutation touches one service.
    return json.loads(json.dumps(yaml.safe_load(COMPOSE.read_text())))  # type: ignore[no-any-return]


def problems_of(doc: dict[str, Any], tmp_path: Path) -> list[str]:
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return [str(p) for p in ComposeCheck(path, root=REPO).run()]


def test_shipped_compose_file_is_coherent(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(COMPOSE)]) == 0, capsys.readouterr().err
    assert "OK (" in capsys.readouterr().out


def test_shipped_file_runs_every_service_from_one_dockerfile() -> None:
    services = load()["services"]
    for name in ("ingest", "profile", "segmenter", "journeys", "notify"):
        assert services[name]["command"] == ["python", "-m", f"services.{name}"]
        assert services[name]["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert services["bootstrap"]["command"] == ["python", "-m", "loyalist.devstack", "bootstrap"]


def mutate(path: str, value: Any) -> dict[str, Any]:
    doc = load()
    node: Any = doc
    keys = path.split("/")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last: Any = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()

CASES = [
    ("unknown dependency", "services/profile/depends_on/kafak", {"condition": "service_started"},
     "unknown service 'kafak'"),
    ("healthy without healthcheck", "services/notify/depends_on/smtp", {"condition": "service_healthy"},
     "smtp defines no healthcheck"),
    ("host port collision", "services/notify/ports", ["8001:8005"], "host port 8001/tcp also published by ingest"),
    ("container port not published", "services/notify/ports", ["8015:8015"], "notify listens on 8005"),
    ("undeclared named volume", "services/redis/volumes", ["redis-state:/data"], "'redis-state' is not declared"),
    ("missing bind source", "services/prometheus/volumes/1", "./deploy/prometheus/rulez:/etc/prometheus/rules:ro",
     "bind source ./deploy/prometheus/rulez does not exist"),
    ("bind source outside the repo", "services/prometheus/volumes/1", "/etc/rules:/etc/prometheus/rules:ro",
     "outside the repository"),
    ("unknown setting", "services/bootstrap/environment/LOYALIST_KAFKA_BOOTSTRAP", "kafka:29092",
     "not a Loyalist setting"),
    ("invalid setting value", "services/bootstrap/environment/LOYALIST_KAFKA_PORT", "ninety",
     "LOYALIST_KAFKA_PORT"),
    ("URL to a port nobody listens on", "services/bootstrap/environment/LOYALIST_PROFILE_URL", "http://profile:9999",
     "profile neither publishes nor exposes port 9999"),
    ("URL to an unknown service", "services/bootstrap/environment/LOYALIST_NOTIFY_URL", "http://notifier:8005",
     "no service named 'notifier'"),
    ("kafka address not advertised", "services/bootstrap/environment/LOYALIST_KAFKA_PORT", "9092",
     "connects to kafka:9092, which kafka does not advertise"),
    ("service bound to loopback", "services/bootstrap/environment/LOYALIST_HOST", "127.0.0.1", None),
    ("no bootstrap before the stream services", "services/segmenter/depends_on/bootstrap", DELETE,
     "must wait for the bootstrap one-shot"),
    ("waiting for a service that never completes", "services/bootstrap/restart", "always", "restarts forever"),
    ("unpinned image", "services/redis/image", "redis:latest", "uses 'latest'"),
    ("untagged image", "services/grafana/image", "grafana/grafana", "has no tag"),
    ("bad KRaft cluster id", "services/kafka/environment/CLUSTER_ID", "my-cluster", "KRaft cluster id"),
    ("healthcheck on the wrong port", "services/journeys/healthcheck/test",
     ["CMD", "curl", "-fsS", "http://127.0.0.1:8003/readyz"], "probes port 8003"),
    ("typo in a service key", "services/journeys/depend_on", ["kafka"], "unknown service key"),
    ("invalid restart policy", "services/redis/restart", "sometimes", "invalid policy"),
    ("invalid duration", "services/redis/healthcheck/interval", "5 seconds", "invalid duration"),
    ("obsolete version key", "version", "3.9", "obsolete top-level key"),
]


@pytest.mark.parametrize(("path", "value", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_incoherence_is_reported(tmp_path: Path, path: str, value: Any, expected: str | None) -> None:
    problems = problems_of(mutate(path, value), tmp_path)
    if expected is None:
        # A loopback LOYALIST_HOST only matters for the services that listen: bootstrap is a client.
        assert not any("LOYALIST_HOST" in p for p in problems), problems
        problems = problems_of(mutate("services/ingest/environment", {
            **load()["services"]["bootstrap"]["environment"], "LOYALIST_HOST": "127.0.0.1"}), tmp_path)
        expected = "unreachable from other containers"
    assert any(expected in p for p in problems), f"expected {expected!r} in {problems}"


def test_dependency_cycle_is_reported(tmp_path: Path) -> None:
    doc = mutate("services/kafka/depends_on", ["prometheus"])
    assert any("cycle:" in p for p in problems_of(doc, tmp_path))


def test_unused_volume_is_reported(tmp_path: Path) -> None:
    doc = mutate("volumes/orphan-data", None)
    assert any("volumes.orphan-data: declared but no service mounts it" in p for p in problems_of(doc, tmp_path))


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    """A copy of the repository's compose-relevant files whose mounted config can be broken freely."""
    root = tmp_path / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name in {"deploy", ".git", ".loyalist", ".venv", "node_modules"}:
            continue
        (root / entry.name).symlink_to(entry)
    for sub in ("prometheus", "grafana"):
        shutil.copytree(REPO / "deploy" / sub, root / "deploy" / sub)
    return root


def run_mirror(root: Path) -> list[str]:
    return [str(p) for p in ComposeCheck(root / "docker-compose.yml").run()]


def test_prometheus_target_must_be_a_listening_service(mirror: Path) -> None:
    config_file = mirror / "deploy/prometheus/prometheus-compose.yml"
    config = yaml.safe_load(config_file.read_text())
    config["scrape_configs"][0]["static_configs"][1]["targets"] = ["profile:9102"]
    config["scrape_configs"][0]["static_configs"][2]["targets"] = ["segmentr:8003"]
    config_file.write_text(yaml.safe_dump(config))
    problems = run_mirror(mirror)
    assert any("profile:9102: profile neither publishes nor exposes port 9102" in p for p in problems), problems
    assert any("segmentr:8003: no service named 'segmentr'" in p for p in problems), problems


def test_prometheus_rule_files_must_exist_and_hold_groups(mirror: Path) -> None:
    rules = mirror / "deploy/prometheus/rules"
    for file in rules.glob("*.yml"):
        file.unlink()
    assert any("rules/*.yml matches no mounted file" in p for p in run_mirror(mirror))
    (rules / "broken.yml").write_text("alerts: []\n")
    assert any("a rule file needs a 'groups' list" in p for p in run_mirror(mirror))


def test_grafana_datasource_and_dashboards_are_checked(mirror: Path) -> None:
    ds_file = mirror / "deploy/grafana/provisioning/datasources/prometheus.yml"
    ds_file.write_text(ds_file.read_text().replace("http://prometheus:9090", "http://prometheus:9091"))
    dashboards = mirror / "deploy/grafana/dashboards"
    (dashboards / "bad.json").write_text(json.dumps({
        "uid": "x", "title": "Bad",
        "panels": [{"title": "p", "type": "timeseries", "datasource": {"type": "prometheus", "uid": "elsewhere"},
                    "targets": [{"expr": ""}]}],
    }))
    problems = run_mirror(mirror)
    assert any("prometheus:9091" in p for p in problems), problems
    assert any("datasource uid 'elsewhere' is not provisioned" in p for p in problems), problems
    assert any("a target without a PromQL expr" in p for p in problems), problems


def test_dockerfile_copy_sources_must_exist_and_not_be_ignored(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "secret.env").write_text("x")
    (tmp_path / ".dockerignore").write_text("*.env\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM python:3.11-slim AS build\nCOPY app ./app\nCOPY missing ./missing\nCOPY secret.env /x\n"
        "FROM build\nCOPY --from=build /app /app\nFROM debian\n"
    )
    problems = check_dockerfile(tmp_path / "Dockerfile", tmp_path)
    assert problems == [
        "COPY missing: not in the build context",
        "COPY secret.env: excluded by .dockerignore",
        "FROM debian: pin a version tag",
    ]
