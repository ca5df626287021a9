"""Helpers for the tests of the user bundle: dashboards, their PromQL, and the alerting rules."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

DASHBOARDS = ROOT / "grafana" / "dashboards"
OVERVIEW = DASHBOARDS / "exlogare-overview.json"
ALERTS = ROOT / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "prometheus" / "alerts_test.yml"
README = ROOT / "README.md"

# Series Prometheus makes itself, and functions that read no series.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "Inf", "NaN"}
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# An identifier that is not part of a number or duration (`5m`, `1e3`) nor a Grafana variable.
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def dashboards() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def is_prometheus_dashboard(dashboard: Mapping[str, Any]) -> bool:
    """Prometheus-backed: its `datasource` variable picks a Prometheus datasource."""
    ds = variables(dashboard).get("datasource")
    return bool(ds) and ds.get("type") == "datasource" and ds.get("query") == "prometheus"


def prometheus_dashboards() -> list[Path]:
    return [p for p in dashboards() if is_prometheus_dashboard(load_json(p))]


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def data_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(dashboard) if p.get("type") != "row"]


def queries(dashboard: Mapping[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel."""
    return [(p, t) for p in data_panels(dashboard) for t in p.get("targets", [])]


def variable_names(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(text)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables (`$x`, `${x}`, `${x:fmt}`, `[[x]]`) by the given values."""
    def one(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]
    return _VARIABLE.sub(one, expr)


# Values for the dashboard's variables as a test stack has them: job `exlogare`, tenant `acme`, and so on.
EXAMPLE_VALUES = {"job": "exlogare", "tenant": "acme", "window": "1d", "top_window": "7d",
                  "__rate_interval": "15s", "__interval": "5s", "__range": "5m"}


def example(expr: str) -> str:
    return substitute(expr, EXAMPLE_VALUES)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a lexical scan, good for the expressions here)."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end():].lstrip()
        if m.group() not in _KEYWORDS and not rest.startswith("("):
            names.add(m.group())
    return names


def selectors(expr: str, name: str) -> list[str]:
    """The label matchers (`{...}`, or "" when none) of every selector of metric `name` in `expr`."""
    found = []
    for m in re.finditer(rf"(?<![\w.$]){re.escape(name)}(?![\w:])\s*(\{{[^}}]*\}})?", expr):
        found.append(m.group(1) or "")
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def readme_anchors() -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", README.read_text(), re.MULTILINE)}
