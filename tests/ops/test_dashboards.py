"""Dashboards as code: the committed JSON is what the generator writes, and every query reads only metrics
the code declares (the live test, test_dashboards_live.py, shows they also return data)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from loyalist.checks.compose import check_dashboard, iter_panels
from loyalist.checks.promql import SCRAPE_SERIES, declared_metric_names, metric_names_in

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
REQUIRED = {"overview", "ingest", "streams", "profile", "segments", "journeys", "notify"}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_committed_dashboards_are_the_generated_ones() -> None:
    rendered: dict[str, str] = generator().render_all()
    committed = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert {n.removesuffix(".json") for n in rendered} == REQUIRED
    assert committed == rendered, "run: python deploy/grafana/build_dashboards.py"


def test_dashboards_are_valid_with_unique_uids_and_panel_ids() -> None:
    uids = set()
    for file in sorted((GRAFANA / "dashboards").glob("*.json")):
        board = json.loads(file.read_text())
        assert check_dashboard(file, {"prometheus"}) == []
        assert board["uid"] not in uids
        uids.add(board["uid"])
        ids = [p["id"] for p in iter_panels(board)]
        assert len(ids) == len(set(ids))
        for panel in iter_panels(board):
            assert panel["description"] and panel["targets"], panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_queries_read_only_declared_metrics() -> None:
    declared = declared_metric_names(REPO)
    unknown = {}
    for file in sorted((GRAFANA / "dashboards").glob("*.json")):
        for panel in iter_panels(json.loads(file.read_text())):
            for target in panel["targets"]:
                missing = metric_names_in(target["expr"]) - SCRAPE_SERIES - set(declared)
                if missing:
                    unknown[f"{file.stem} / {panel['title']}"] = sorted(missing)
    assert not unknown, unknown
