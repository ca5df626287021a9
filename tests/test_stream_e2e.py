"""The RCA stream end to end: the simulator and the exporter as real processes on loopback (and a real
Prometheus for the README's alert recipe); counters must equal exactly what was added, per severity."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import (
    Process,
    free_port,
    parse_metrics,
    require_tool,
    samples,
    start_exporter,
    start_simulator,
    wait_until,
)

pytestmark = pytest.mark.e2e

SEVERITIES = ("low", "medium", "high")
TENANTS = ("burst", "backlog", "during", "idle", "labels", "restart", "alert")
# A busy 1s stream and a stats refresh that stays out of the way (5m): the tests watch the stream only.
CONFIG = """
listen_address: "127.0.0.1:{port}"
defaults:
  base_url: "${SIM_URL}"
  interval: 5m
  windows: [1d]
  timeseries_days: 1
  analyses_interval: 1s
tenants:
"""
TENANT_KEYS = {"backlog": "    analyses_max_pages: 1\n",
               "labels": "    analyses_labels: [project, source]\n    max_label_values: 2\n"}


def tenant_blocks(*names: str) -> str:
    return "".join(f"  - name: {n}\n    token_env: TOKEN_{n.upper()}\n{TENANT_KEYS.get(n, '')}"
                   for n in names)


class Stack:
    def __init__(self, sim_url: str, tokens: dict[str, str]) -> None:
        self.sim_url = sim_url
        self.tokens = tokens
        self.url = ""

    @property
    def env(self) -> dict[str, str]:
        return {"SIM_URL": self.sim_url, **{f"TOKEN_{n.upper()}": t for n, t in self.tokens.items()}}

    def add(self, tenant: str, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
        r = requests.post(f"{self.sim_url}/_sim/tenants/{tenant}/analyses", json={"count": count, **fields},
                          timeout=30)
        r.raise_for_status()
        return r.json()["items"]

    def newest(self, tenant: str) -> datetime:
        r = requests.get(f"{self.sim_url}/api/v1/analyses", params={"limit": 1}, timeout=10,
                         headers={"Authorization": f"Bearer {self.tokens[tenant]}"})
        r.raise_for_status()
        return datetime.fromisoformat(r.json()["items"][0]["created_at"])

    def sim_requests(self, tenant: str) -> list[dict[str, Any]]:
        log = requests.get(f"{self.sim_url}/_sim/requests", timeout=10).json()
        return [r for r in log if r["tenant"] == tenant and r["path"] == "/api/v1/analyses"]

    def metrics(self, url: str | None = None) -> dict:
        r = requests.get(f"{url or self.url}/metrics", timeout=10)
        r.raise_for_status()
        return parse_metrics(r.text)

    def totals(self, tenant: str, url: str | None = None) -> dict[str, float]:
        """Per severity, summed over any optional labels; a severity without a series is 0."""
        out = dict.fromkeys(SEVERITIES, 0.0)
        for labels, value in samples(self.metrics(url), "exlogare_analyses_total", tenant=tenant).items():
            out[dict(labels)["severity"]] += value
        return out

    def wait_primed(self, tenant: str, url: str | None = None) -> None:
        wait_until(lambda: samples(self.metrics(url), "exlogare_analyses_last_walk_success_timestamp_seconds",
                                   tenant=tenant), what=f"the first walk of {tenant}")

    def wait_totals(self, tenant: str, added: list[dict[str, Any]], url: str | None = None,
                    timeout: float = 30) -> None:
        """Until the counters equal `added` per severity; never may they pass it on the way."""
        want = Counter(i["severity"] for i in added)
        expected = {s: float(want[s]) for s in SEVERITIES}

        def reached() -> bool:
            got = self.totals(tenant, url)
            assert all(got.get(s, 0) <= expected[s] for s in SEVERITIES), f"over-counted: {got} > {expected}"
            return got == expected

        wait_until(reached, timeout=timeout, what=f"{tenant}'s counters to reach {expected}")

    def wait_walks(self, tenant: str, count: int) -> None:
        """Until `count` more /analyses requests of the tenant have been answered."""
        start = len(self.sim_requests(tenant))
        wait_until(lambda: len(self.sim_requests(tenant)) >= start + count, what=f"{count} walks of {tenant}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stream")
    procs: list[Process] = []
    try:
        sim, sim_url = start_simulator(tmp, "--tenants", ",".join(TENANTS), "--arrival-rate", "0",
                                       "--seed", "3")
        procs.append(sim)
        listing = requests.get(f"{sim_url}/_sim/tenants", timeout=5).json()
        stack = Stack(sim_url, {name: listing[name]["tokens"]["read"] for name in TENANTS})
        names = [n for n in TENANTS if n != "restart"]  # that one gets exporters of its own
        exporter, stack.url = start_exporter(tmp, CONFIG + tenant_blocks(*names), stack.env)
        procs.append(exporter)
        for name in names:
            stack.wait_primed(name)
        yield stack
    finally:
        for p in reversed(procs):
            p.stop()


def test_bursts_and_identical_timestamps_are_counted_exactly(stack: Stack) -> None:
    zeros = samples(stack.metrics(), "exlogare_analyses_total", tenant="burst")
    assert {dict(k)["severity"]: v for k, v in zeros.items()} == dict.fromkeys(SEVERITIES, 0.0)
    newest = stack.newest("burst")
    added = stack.add("burst", 3, severity="high", created_at=newest.isoformat())  # at the watermark
    added += stack.add("burst", 4, severity="low")
    stack.wait_totals("burst", added)
    same = stack.newest("burst").isoformat()
    added += stack.add("burst", 2, severity="medium", created_at=same)  # the new watermark's own second
    added += stack.add("burst", 25)
    stack.wait_totals("burst", added)
    stack.wait_walks("burst", 3)
    stack.wait_totals("burst", added, timeout=1)  # still exact after more walks


def test_a_backlog_over_max_pages_is_walked_over_several_cycles_without_loss(stack: Stack) -> None:
    added = stack.add("backlog", 1700)  # 4 pages of 500 at analyses_max_pages: 1
    added += stack.add("backlog", 3, severity="high")
    stack.wait_totals("backlog", added)
    walks = stack.sim_requests("backlog")
    assert sum("cursor" in r["query"] for r in walks) >= 3  # the walk went on from its cursor


def test_rcas_arriving_during_a_walk_are_counted_once(stack: Stack) -> None:
    trigger = {"tenant": "during", "endpoint": "/analyses", "param": "cursor",
               "add_analyses": {"count": 6, "severity": "high"}}
    requests.post(f"{stack.sim_url}/_sim/triggers", json=trigger, timeout=10).raise_for_status()
    added = stack.add("during", 800)  # two pages: the trigger fires between them
    wait_until(lambda: any("cursor" in r["query"] for r in stack.sim_requests("during")),
               what="a second page of a walk")
    during = [{"severity": "high"}] * 6
    stack.wait_totals("during", added + during)


def test_an_idle_walk_is_one_request(stack: Stack) -> None:
    since = stack.newest("idle").isoformat()
    before = stack.metrics()
    stack.wait_walks("idle", 4)
    walks = stack.sim_requests("idle")[-4:]
    assert all(r["query"] == {"limit": "500", "since": since} and r["status"] == 200 for r in walks)
    after = stack.metrics()
    key = (("code", "200"), ("endpoint", "analyses"), ("tenant", "idle"))
    calls = samples(after, "exlogare_upstream_requests_total")[key] - samples(
        before, "exlogare_upstream_requests_total")[key]
    assert calls >= 4
    assert stack.totals("idle") == dict.fromkeys(SEVERITIES, 0.0)


def test_labels_are_bounded_end_to_end_and_promtool_is_clean(stack: Stack) -> None:
    for project in ("p/one", "p/two", "p/three", "p/four"):
        stack.add("labels", severity="low", project_path=project, source="generic")
    added = [{"severity": "low"}] * 4
    stack.wait_totals("labels", added)
    got = {dict(k)["project"]: v for k, v in samples(stack.metrics(), "exlogare_analyses_total",
                                                      tenant="labels").items()}
    assert got == {"p/one": 1, "p/two": 1, "(other)": 2}
    promtool = require_tool("promtool")
    text = requests.get(f"{stack.url}/metrics", timeout=10).text
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                            timeout=30, check=False)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not output.strip(), output


def test_readyz_shows_the_stream(stack: Stack) -> None:
    body = requests.get(f"{stack.url}/readyz", timeout=5).json()
    assert body["tenants"]["idle"]["analyses"] == {
        "status": "up", "last_success": body["tenants"]["idle"]["analyses"]["last_success"], "last_error": "",
        "catching_up": False}
    assert "RCA stream" in requests.get(f"{stack.url}/", timeout=5).text


def test_a_restarted_exporter_starts_from_zero_without_counting_old_rcas(stack: Stack, tmp_path: Path
                                                                         ) -> None:
    config = CONFIG + tenant_blocks("restart")
    first, url = start_exporter(tmp_path, config, stack.env)
    try:
        stack.wait_primed("restart", url)
        added = stack.add("restart", 3, severity="high")
        stack.wait_totals("restart", added, url)
    finally:
        assert first.stop() == 0
    stack.add("restart", 5, severity="high")  # while no exporter runs: old by the time one starts
    second, url = start_exporter(tmp_path, config, stack.env)
    try:
        stack.wait_primed("restart", url)
        assert len(samples(stack.metrics(url), "exlogare_analyses_total", tenant="restart")) == 3
        assert stack.totals("restart", url) == dict.fromkeys(SEVERITIES, 0.0)
        newer = stack.add("restart", 2, severity="medium")
        stack.wait_totals("restart", newer, url)
    finally:
        second.stop()


def test_the_readme_alert_fires_in_a_real_prometheus(stack: Stack, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    port = free_port()
    target = stack.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: exlogare\n    static_configs: [{{targets: ['{target}']}}]\n")
    proc = Process([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                   tmp_path / "prometheus.log")
    api = f"http://127.0.0.1:{port}/api/v1/query"
    expr = 'increase(exlogare_analyses_total{severity="high"}[10m]) > 0'

    def query(q: str) -> list[dict[str, Any]]:
        r = requests.get(api, params={"query": q}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]["result"]

    try:
        # The zero-valued counter scraped twice first: from there on, one RCA must show in increase().
        zeros = 'count_over_time(exlogare_analyses_total{tenant="alert", severity="high"}[1m]) >= 2'
        wait_until(lambda: proc.check_alive() or query(zeros), timeout=30,
                   what="Prometheus to scrape the zero counter twice")
        assert not [r for r in query(expr) if r["metric"]["tenant"] == "alert"]
        stack.add("alert", severity="high")
        fired = wait_until(lambda: [r for r in query(expr) if r["metric"]["tenant"] == "alert"], timeout=30,
                           what="the alert expression to fire for tenant alert")
        assert fired[0]["metric"]["severity"] == "high" and float(fired[0]["value"][1]) > 0
    finally:
        proc.stop()
