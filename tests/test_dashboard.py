"""The Grafana bundle, in the spirit of grafana's dashboard-linter, plus: no query points at nothing.

Only Prometheus-backed dashboards are linted (the RCA explorer reads the proxy through Infinity).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests import bundle
from tests.support import (
    ROOT,
    parse_metrics,
    require_tool,
    start_exporter,
    start_simulator,
    wait_until,
)

PROM_DS = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's core panels: nothing to install beyond Grafana itself.
CORE_PANELS = {"row", "stat", "timeseries", "table", "bargauge", "piechart", "barchart", "gauge", "text",
               "heatmap", "histogram", "state-timeline", "status-history", "xychart", "trend", "dashlist",
               "alertlist", "annolist", "news", "logs", "nodeGraph", "geomap", "canvas", "candlestick",
               "flamegraph", "traces", "datagrid"}
INSTANT_PANELS = {"stat", "table", "bargauge", "piechart", "barchart", "gauge"}
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}
COUNTER = re.compile(r"_(total|bucket|count|sum)$")
RATE_FUNCTIONS = ("rate", "irate", "increase")

DASHBOARD_IDS = [p.name for p in bundle.prometheus_dashboards()]


@pytest.fixture(params=bundle.prometheus_dashboards(), ids=DASHBOARD_IDS)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return bundle.load_json(request.param)


def test_the_overview_is_a_prometheus_dashboard() -> None:
    assert bundle.OVERVIEW in bundle.prometheus_dashboards()


def test_overview_identity() -> None:
    d = bundle.load_json(bundle.OVERVIEW)
    assert d["uid"] == "exlogare-overview"  # stable: links and provisioning survive re-imports
    assert d["schemaVersion"] == 41
    assert d["title"] and d["description"]
    assert d.get("id") is None  # an id would clash on import into another Grafana
    assert "__requires" not in d and "__inputs" not in d  # no plugins, no import-time datasource prompt
    assert "exlogare" in d["tags"]


def test_datasource_variable(dashboard: dict) -> None:
    ds = bundle.variables(dashboard)["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    assert next(iter(bundle.variables(dashboard))) == "datasource", "the datasource variable comes first"


def test_template_variables(dashboard: dict) -> None:
    """tenant and window (and the rest) come from label_values() on the chosen datasource."""
    found = bundle.variables(dashboard)
    assert {"tenant", "window"} <= set(found)
    for name, var in found.items():
        if var["type"] == "datasource":
            continue
        assert var["type"] == "query", name
        assert var["datasource"] == PROM_DS, name
        query = var["query"]  # a string: Grafana's Prometheus editor parses label_values() itself
        assert isinstance(query, str) and query.startswith("label_values("), name
        assert var["definition"] == query, name
        assert var["refresh"] == 2, f"{name}: reload on time range change"
        assert var.get("description"), name


def test_every_panel_uses_the_datasource_variable(dashboard: dict) -> None:
    for panel in bundle.data_panels(dashboard):
        assert panel["datasource"] == PROM_DS, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == PROM_DS, panel["title"]
    grafana_builtin = {"type": "grafana", "uid": "-- Grafana --"}  # the built-in annotations
    found = list(datasource_refs(dashboard))
    assert found and all(ref in (PROM_DS, grafana_builtin) for ref in found), "a hard-coded datasource"


def datasource_refs(node: Any) -> Iterator[Any]:
    """Every `datasource` value anywhere in the dashboard JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def test_titles_descriptions_units(dashboard: dict) -> None:
    for panel in bundle.panels(dashboard):
        assert panel.get("title", "").strip(), panel.get("id")
        if panel["type"] == "row":
            continue
        assert panel.get("description", "").strip(), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


def test_core_panels_only(dashboard: dict) -> None:
    assert {p["type"] for p in bundle.panels(dashboard)} <= CORE_PANELS


def test_instant_queries_where_one_value_is_shown(dashboard: dict) -> None:
    for panel, target in bundle.queries(dashboard):
        instant = panel["type"] in INSTANT_PANELS
        assert (target.get("instant"), target.get("range")) == (instant, not instant), panel["title"]


def test_counters_only_inside_rate_or_increase(dashboard: dict) -> None:
    for panel, target in bundle.queries(dashboard):
        expr = target["expr"]
        for name in bundle.metric_names(expr):
            if not COUNTER.search(name):
                continue
            for m in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", expr):
                before = expr[:m.start()].rstrip()
                assert any(re.search(rf"\b{f}\s*\($", before) for f in RATE_FUNCTIONS), \
                    f"{panel['title']}: counter {name} outside rate()/increase()"


def test_rate_uses_rate_interval(dashboard: dict) -> None:
    for panel, target in bundle.queries(dashboard):
        for m in re.finditer(r"\b(i?rate)\s*\([^\[]*\[([^\]]*)\]", target["expr"]):
            assert m.group(2) == "$__rate_interval", f"{panel['title']}: {m.group(0)}"


def test_every_selector_has_the_job_matcher(dashboard: dict) -> None:
    for panel, target in bundle.queries(dashboard):
        expr = target["expr"]
        for name in bundle.metric_names(expr):
            for matchers in bundle.selectors(expr, name):
                assert 'job=~"$job"' in matchers, f"{panel['title']}: {name}{matchers}"


def test_variables_used_are_defined(dashboard: dict) -> None:
    defined = set(bundle.variables(dashboard)) | BUILTIN_VARIABLES
    for panel in bundle.panels(dashboard):
        used = bundle.variable_names(panel.get("title", ""))
        for target in panel.get("targets", []):
            used |= bundle.variable_names(target["expr"]) - {"datasource"}
        assert used <= defined, f"{panel['title']}: {used - defined}"
    for var in bundle.variables(dashboard).values():
        assert bundle.variable_names(var.get("definition", "")) <= defined


def test_layout(dashboard: dict) -> None:
    """Unique ids and refIds, and no two panels on the same grid cell."""
    ids = [p["id"] for p in bundle.panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in bundle.panels(dashboard):
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_overview_covers_the_rows_users_expect() -> None:
    d = bundle.load_json(bundle.OVERVIEW)
    rows = " | ".join(p["title"] for p in bundle.panels(d) if p["type"] == "row").lower()
    for part in ("headline", "severity", "per day", "history", "top projects", "live", "health"):
        assert part in rows, part
    exprs = " ".join(t["expr"] for _, t in bundle.queries(d))
    for metric in ("exlogare_daily_failures", "exlogare_analyses_total", "exlogare_up",
                   "exlogare_last_success_timestamp_seconds", "exlogare_upstream_requests_total",
                   "exlogare_refresh_duration_seconds", "exlogare_time_to_rca_p50_seconds",
                   "exlogare_time_to_rca_p90_seconds", "exlogare_top_project_failures",
                   "exlogare_top_root_cause_analyses"):
        assert metric in exprs, metric
    assert re.search(r"topk\(", exprs) and re.search(r"\bup\{", exprs)


def test_tables_are_sorted(dashboard: dict) -> None:
    for panel in bundle.data_panels(dashboard):
        if panel["type"] == "table":
            sorts = [t for t in panel.get("transformations", []) if t["id"] == "sortBy"]
            assert sorts and panel["options"].get("sortBy"), panel["title"]


def test_queries_are_valid_promql(tmp_path: Path, dashboard: dict) -> None:
    """promtool parses every query (variables substituted) as a recording rule."""
    promtool = require_tool("promtool")
    rules = [{"record": f"dashboard:query_{i}", "expr": bundle.example(t["expr"])}
             for i, (_, t) in enumerate(bundle.queries(dashboard))]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- provisioning ------------------------------------------------------------------------------------------

def test_datasource_provisioning() -> None:
    doc = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")


def test_dashboard_provisioning() -> None:
    doc = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/exlogare.yaml").read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# --- every metric used exists in the live exposition -------------------------------------------------------

def used_metrics() -> dict[str, list[str]]:
    """metric name -> where it is used (dashboard panels and alert rules)."""
    used: dict[str, list[str]] = {}
    for path in bundle.prometheus_dashboards():
        for panel, target in bundle.queries(bundle.load_json(path)):
            for name in bundle.metric_names(bundle.example(target["expr"])):
                used.setdefault(name, []).append(f"{path.name}: {panel['title']}")
        for var in bundle.variables(bundle.load_json(path)).values():
            for name in re.findall(r"label_values\((\w+)", var.get("definition", "")):
                used.setdefault(name, []).append(f"{path.name}: ${var['name']}")
    for rule in bundle.alert_rules():
        for name in bundle.metric_names(rule["expr"]):
            used.setdefault(name, []).append(f"alert {rule['alert']}")
    return used


USED = used_metrics()
EXPORTER_METRICS = sorted(set(USED) - bundle.PROMETHEUS_SERIES)


def test_the_scan_finds_the_metrics() -> None:
    """Guards the lexical scan itself: it must neither miss names nor take labels or functions for them."""
    assert bundle.metric_names('sum by (tenant) (rate(a_total{job=~"$job", x="y"}[5m])) / b offset 1h') == \
        {"a_total", "b"}
    assert bundle.metric_names('time() - c{tenant="up"} > 900 and on (job) d == bool 1e3') == {"c", "d"}
    assert {"up", "exlogare_up", "exlogare_daily_failures", "exlogare_analyses_total"} <= set(USED)


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Sample names of a live exporter reading the simulator, once every tenant has refreshed."""
    tmp = tmp_path_factory.mktemp("exposition")
    sim, sim_url = start_simulator(tmp, "--tenants", "acme,lab", "--seed", "5")
    try:
        config = (f'listen_address: "127.0.0.1:{{port}}"\ndefaults:\n  base_url: "{sim_url}"\n'
                  "  interval: 5m\ntenants:\n  - name: acme\n    token_env: TOKEN_ACME\n"
                  "  - name: lab\n    token_env: TOKEN_LAB\n")
        exporter, url = start_exporter(tmp, config, {"TOKEN_ACME": "exl_sim_acme_read",
                                                     "TOKEN_LAB": "exl_sim_lab_read"})
        try:
            text = wait_until(lambda: requests.get(f"{url}/metrics", timeout=5).text, what="a scrape")
            yield {name for name, _ in parse_metrics(text)}
        finally:
            exporter.stop()
    finally:
        sim.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("name", EXPORTER_METRICS)
def test_every_metric_used_is_exposed(exposition: set[str], name: str) -> None:
    assert name in exposition, f"{name} (used by {', '.join(USED[name])}) is not in the exporter's exposition"
