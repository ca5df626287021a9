"""End to end with a real Prometheus: simulator → exporter → Prometheus (with the rules) → dashboard queries.

Prometheus (Debian's package) scrapes every second and evaluates alerts.yml rewritten with `for: 1s`, so
the alerts that take minutes in production fire here in seconds. Everything else is the shipped files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests import bundle
from tests.support import (
    ROOT,
    Process,
    free_port,
    require_tool,
    start_exporter,
    start_simulator,
    wait_until,
)

pytestmark = pytest.mark.e2e

SHORT_FOR = "1s"
TENANTS = ("acme", "lab")
BURST = 40  # high-severity RCAs: far above acme's usual day, so the surge alert must fire
# The exporter's own health alerts: none may fire while the stack is healthy.
HEALTH_ALERTS = {"ExlogareExporterDown", "ExlogareTenantTokenRejected", "ExlogareTenantRefreshFailing",
                 "ExlogareTenantRCAStreamFailing", "ExlogareTenantRateLimited", "ExlogareTenantDataStale",
                 "ExlogareConfigReloadFailed"}


def fast_rules(path: Path) -> Path:
    """alerts.yml, unchanged but for every `for:`, which becomes SHORT_FOR."""
    doc = yaml.safe_load(bundle.ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def prometheus_config(path: Path, target: str, rules: Path) -> Path:
    """The shipped example config, scraping `target` every second and evaluating `rules` every second."""
    doc = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    doc["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    doc["rule_files"] = [str(rules)]
    (job,) = doc["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Stack:
    def __init__(self, sim_url: str, prom_url: str) -> None:
        self.sim_url = sim_url
        self.prom_url = prom_url

    def api(self, path: str, **params: Any) -> Any:
        r = requests.get(f"{self.prom_url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, seconds: int = 60) -> list[dict]:
        end = time.time()
        return self.api("query_range", query=expr, start=end - seconds, end=end, step=1)["result"]

    def firing(self, name: str) -> list[dict[str, str]]:
        return [a["labels"] for a in self.api("alerts")["alerts"]
                if a["labels"]["alertname"] == name and a["state"] == "firing"]


def exporter_yaml(sim_url: str) -> str:
    tenants = "".join(f"  - name: {t}\n    token_env: TOKEN_{t.upper()}\n" for t in TENANTS)
    # Stats every 5s (the least allowed), the RCA stream every second.
    return (f'listen_address: "127.0.0.1:{{port}}"\ndefaults:\n  base_url: "{sim_url}"\n  interval: 5s\n'
            "  analyses_interval: 1s\n  windows: [1d, 7d, 30d]\n  top_windows: [7d, 30d]\n"
            f"tenants:\n{tenants}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    procs: list[Process] = []
    try:
        # No random arrivals: before the burst, nothing may look like a surge or a new high-severity RCA.
        sim, sim_url = start_simulator(tmp, "--tenants", ",".join(TENANTS), "--seed", "11",
                                       "--arrival-rate", "0")
        procs.append(sim)
        exporter, exporter_url = start_exporter(
            tmp, exporter_yaml(sim_url), {f"TOKEN_{t.upper()}": f"exl_sim_{t}_read" for t in TENANTS})
        procs.append(exporter)
        port = free_port()
        config = prometheus_config(tmp / "prometheus.yml", exporter_url.removeprefix("http://"),
                                   fast_rules(tmp / "alerts.yml"))
        prom = Process([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], tmp / "prometheus.log")
        procs.append(prom)
        stack = Stack(sim_url, f"http://127.0.0.1:{port}")
        wait_until(lambda: prom.check_alive() or requests.get(f"{stack.prom_url}/-/ready", timeout=2).ok,
                   timeout=30, what="Prometheus ready")
        wait_until(lambda: [t["health"] for t in stack.api("targets")["activeTargets"]] == ["up"],
                   timeout=30, what="the exporter's target up")
        yield stack
        assert prom.stop() == 0, prom.output()[-2000:]  # a clean shutdown on SIGTERM
    finally:
        for p in reversed(procs):
            p.stop()


def panel_queries() -> list[Any]:
    params = []
    for path in bundle.prometheus_dashboards():
        for panel, target in bundle.queries(bundle.load_json(path)):
            params.append(pytest.param(panel, target, id=f"{path.stem}: {panel['title']} {target['refId']}"))
    return params


@pytest.mark.parametrize(("panel", "target"), panel_queries())
def test_every_panel_query_returns_data(stack: Stack, panel: dict, target: dict) -> None:
    expr = bundle.example(target["expr"])
    if target["instant"]:
        result = wait_until(lambda: stack.query(expr), timeout=30, what=f"data for {expr}")
    else:
        result = wait_until(lambda: [s for s in stack.query_range(expr) if len(s["values"]) >= 2],
                            timeout=30, what=f"a range of data for {expr}")
    assert result


@pytest.mark.parametrize(("variable", "expected"), [
    ("job", {"exlogare"}), ("tenant", set(TENANTS)), ("window", {"1d", "7d", "30d"}),
    ("top_window", {"7d", "30d"})])
def test_template_variables_resolve(stack: Stack, variable: str, expected: set[str]) -> None:
    var = bundle.variables(bundle.load_json(bundle.OVERVIEW))[variable]
    metric, label = var["definition"].removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
    match = bundle.substitute(metric, {"job": "exlogare", "tenant": ".*"})
    values = wait_until(lambda: stack.api(f"label/{label.strip()}/values", **{"match[]": match}),
                        what=f"values of ${variable}")
    assert set(values) == expected


def rule_expr(name: str) -> str:
    (rule,) = [r for r in bundle.alert_rules() if r["alert"] == name]
    return rule["expr"]


def test_health_alerts_stay_quiet_while_all_is_well(stack: Stack) -> None:
    """Their expressions are empty now, so no `for:` can make them fire."""
    wait_until(lambda: stack.query('exlogare_up{tenant="lab"}'), what="data in Prometheus")
    for name in sorted(HEALTH_ALERTS):
        assert stack.query(rule_expr(name)) == [], name
        assert stack.firing(name) == [], name


def test_a_burst_of_high_severity_rcas_fires_the_surge_alert(stack: Stack) -> None:
    surge = rule_expr("ExlogareHighSeveritySurge")
    wait_until(lambda: stack.query('exlogare_analyses_by_severity{tenant="acme", window="7d"}'),
               what="acme's severity split in Prometheus")
    assert stack.query(surge) == [], "a surge before the burst"
    burst(stack)
    firing = wait_until(lambda: stack.firing("ExlogareHighSeveritySurge"), timeout=30,
                        what="ExlogareHighSeveritySurge firing")
    assert [(a["tenant"], a["severity"], a["job"]) for a in firing] == [("acme", "warning", "exlogare")]


def test_a_burst_of_high_severity_rcas_fires_the_new_rca_alert(stack: Stack) -> None:
    assert stack.query('exlogare_analyses_total{tenant="acme"}'), "no exlogare_analyses_total in Prometheus"
    burst(stack)
    firing = wait_until(lambda: stack.firing("ExlogareNewHighSeverityRCAs"),
                        timeout=30, what="ExlogareNewHighSeverityRCAs firing")
    assert [(a["tenant"], a["severity"]) for a in firing] == [("acme", "warning")]


_bursts: set[str] = set()


def burst(stack: Stack) -> None:
    """BURST high-severity RCAs for acme, once per stack (both alert tests wait on the same burst)."""
    if stack.sim_url in _bursts:
        return
    _bursts.add(stack.sim_url)
    r = requests.post(f"{stack.sim_url}/_sim/tenants/acme/analyses",
                      json={"count": BURST, "severity": "high"}, timeout=10)
    r.raise_for_status()


def test_a_revoked_token_fires_token_rejected_only(stack: Stack) -> None:
    requests.post(f"{stack.sim_url}/_sim/revoke", json={"token": "exl_sim_lab_read"},
                  timeout=10).raise_for_status()
    firing = wait_until(lambda: stack.firing("ExlogareTenantTokenRejected"), timeout=40,
                        what="ExlogareTenantTokenRejected firing")
    assert [(a["tenant"], a["severity"]) for a in firing] == [("lab", "critical")]
    assert stack.query('exlogare_up{tenant="lab"} == 0') and stack.query('exlogare_analyses_stream_up == 0')
    for name in ("ExlogareTenantRefreshFailing", "ExlogareTenantRCAStreamFailing"):  # one page, not three
        assert stack.query(rule_expr(name)) == [], name
