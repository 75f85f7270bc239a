"""Which metric names the code declares, and which ones a PromQL expression reads: so alert rules and
dashboards can be checked to only use series that some service really exports.

>>> sorted(metric_names_in('sum by (service) (rate(loyalist_http_requests_total{status=~"5.."}[5m])) / up'))
['loyalist_http_requests_total', 'up']
>>> sorted(sample_names("Histogram", "loyalist_x_seconds"))
['loyalist_x_seconds_bucket', 'loyalist_x_seconds_count', 'loyalist_x_seconds_sum']
"""

from __future__ import annotations

import re
from pathlib import Path

DECLARATION = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"'](loyalist_[a-z0-9_]+)[\"']")
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan", "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group",
}
# Series Prometheus itself adds to every scraped target.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}


def sample_names(kind: str, name: str) -> set[str]:
    if kind == "Counter":
        base = name.removesuffix("_total")
        return {f"{base}_total", f"{base}_created"}
    if kind == "Histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    if kind == "Summary":
        return {name, f"{name}_count", f"{name}_sum"}
    if kind == "Info":
        return {f"{name}_info"}
    return {name}


def declared_metric_names(repo: Path) -> dict[str, Path]:
    """Every sample name a ``loyalist_*`` family declared under loyalist/ or services/ exports → its file."""
    out: dict[str, Path] = {}
    for top in ("loyalist", "services"):
        for file in sorted((repo / top).rglob("*.py")):
            for kind, name in DECLARATION.findall(file.read_text(errors="replace")):
                for sample in sample_names(kind, name):
                    out.setdefault(sample, file)
    return out


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression selects (recording-rule names, with a colon, excluded)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    # Label lists of grouping and matching clauses name labels, not metrics.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_][a-zA-Z0-9_]*)(?![\w:])\s*(\()?", text):
        token, call = match.group(1), match.group(2)
        if call or token.lower() in PROMQL_KEYWORDS or re.fullmatch(r"\d+[smhdwy]?|e\d+", token):
            continue
        names.add(token)
    return names
