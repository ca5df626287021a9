"""End to end: the simulator and the exporter as real processes on loopback, compared value by value."""

from __future__ import annotations

import gzip
import subprocess
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.support import (
    Process,
    parse_metrics,
    require_tool,
    samples,
    start_exporter,
    start_simulator,
)

pytestmark = pytest.mark.e2e

TENANTS = ("acme", "lab", "quiet")
WINDOWS = {"1d": 1, "7d": 7, "30d": 30}
TOP_WINDOWS = {"7d": 7, "90d": 90}
TIMESERIES_DAYS = 30
TOP_LIMIT = 10
CALLS_PER_REFRESH = len(WINDOWS) + 2 * len(TOP_WINDOWS) + 1

CONFIG = """
listen_address: "127.0.0.1:{port}"
defaults:
  base_url: "${SIM_URL}"
  interval: 5m
  windows: [1d, 7d, 30d]
  top_windows: [7d, 90d]
  timeseries_days: 30
  top_limit: 10
  analyses_interval: 1h  # the RCA stream's first walk at start-up, then none while these tests run
tenants:
"""


def tenant_block(name: str, token_env: str) -> str:
    return f"  - name: {name}\n    token_env: {token_env}\n"


class Stack:
    def __init__(self, sim_url: str, exporter_url: str, tokens: dict[str, str]) -> None:
        self.sim_url = sim_url
        self.url = exporter_url
        self.tokens = tokens

    def upstream(self, tenant: str, path: str, **params: int) -> object:
        r = requests.get(f"{self.sim_url}/api/v1{path}", params=params, timeout=10,
                         headers={"Authorization": f"Bearer {self.tokens[tenant]}"})
        r.raise_for_status()
        return r.json()

    def scrape(self) -> tuple[str, dict]:
        r = requests.get(f"{self.url}/metrics", timeout=10)
        r.raise_for_status()
        return r.text, parse_metrics(r.text)

    def sim_requests(self) -> list[dict]:
        return requests.get(f"{self.sim_url}/_sim/requests", timeout=10).json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    procs: list[Process] = []
    try:
        sim, sim_url = start_simulator(tmp, "--tenants", ",".join(TENANTS), "--seed", "7")
        procs.append(sim)
        # A frozen upstream clock keeps the windows still while the test compares.
        requests.post(f"{sim_url}/_sim/clock", json={"now": datetime.now(UTC).isoformat()},
                      timeout=5).raise_for_status()
        listing = requests.get(f"{sim_url}/_sim/tenants", timeout=5).json()
        tokens = {name: listing[name]["tokens"]["read"] for name in TENANTS}
        env = {"SIM_URL": sim_url, **{f"TOKEN_{n.upper()}": tok for n, tok in tokens.items()}}
        config = CONFIG + "".join(tenant_block(n, f"TOKEN_{n.upper()}") for n in TENANTS)
        exporter, url = start_exporter(tmp, config, env)
        procs.append(exporter)
        yield Stack(sim_url, url, tokens)
    finally:
        for p in reversed(procs):
            p.stop()


def clean(text: str) -> str:
    return " ".join(text.split())[:120] or "(unknown)"


def summed(rows: list[tuple[tuple[str, ...], float]]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for key, value in rows:
        out[key] = out.get(key, 0) + value
    return out


def test_every_tenant_is_up_after_one_refresh_each(stack: Stack) -> None:
    _, m = stack.scrape()
    assert samples(m, "exlogare_up") == {(("tenant", t),): 1.0 for t in TENANTS}
    for tenant in TENANTS:
        calls = {k: v for k, v in samples(m, "exlogare_upstream_requests_total", tenant=tenant).items()
                 if dict(k)["endpoint"] != "analyses"}  # the stream's walk is tested in test_stream_e2e
        assert sum(calls.values()) == CALLS_PER_REFRESH, calls
        assert {dict(k)["code"] for k in calls} == {"200"}


@pytest.mark.parametrize("tenant", TENANTS)
def test_overview_matches_upstream(stack: Stack, tenant: str) -> None:
    _, m = stack.scrape()
    for window, days in WINDOWS.items():
        up = stack.upstream(tenant, "/stats/overview", days=days)
        assert isinstance(up, dict)
        lbl = {"tenant": tenant, "window": window}
        assert samples(m, "exlogare_failures_detected", **lbl) == {
            tuple(sorted(lbl.items())): up["failures_detected"]}
        assert samples(m, "exlogare_analyses_completed", **lbl) == {
            tuple(sorted(lbl.items())): up["analyses_completed"]}
        sev = {dict(k)["severity"]: v for k, v in samples(m, "exlogare_analyses_by_severity", **lbl).items()}
        assert sev == {s: up["severity_counts"].get(s, 0) for s in ("low", "medium", "high")}
        for key in ("p50", "p90", "avg"):
            got = samples(m, f"exlogare_time_to_rca_{key}_seconds", **lbl)
            expected = up[f"{key}_time_to_rca_seconds"]
            assert list(got.values()) == ([] if expected is None else [pytest.approx(expected)]), key


@pytest.mark.parametrize("tenant", TENANTS)
def test_top_lists_match_upstream(stack: Stack, tenant: str) -> None:
    _, m = stack.scrape()
    for window, days in TOP_WINDOWS.items():
        projects = stack.upstream(tenant, "/stats/top-projects", days=days, limit=TOP_LIMIT)
        assert isinstance(projects, list)
        expected = summed([((clean(p["project_path"] or p["project_id"] or "(none)"),), p["failures"])
                           for p in projects])
        got = {(dict(k)["project"],): v
               for k, v in samples(m, "exlogare_top_project_failures", tenant=tenant, window=window).items()}
        assert got == expected
        causes = stack.upstream(tenant, "/stats/top-root-causes", days=days, limit=TOP_LIMIT)
        assert isinstance(causes, list)
        expected = summed([((clean(c["root_cause"]), c["severity"]), c["count"]) for c in causes])
        got = {(dict(k)["root_cause"], dict(k)["severity"]): v
               for k, v in samples(m, "exlogare_top_root_cause_analyses", tenant=tenant,
                                   window=window).items()}
        assert got == expected


@pytest.mark.parametrize("tenant", TENANTS)
def test_daily_failures_are_zero_filled(stack: Stack, tenant: str) -> None:
    _, m = stack.scrape()
    upstream = stack.upstream(tenant, "/stats/timeseries", days=TIMESERIES_DAYS)
    assert isinstance(upstream, list)
    today = datetime.now(UTC).date()
    days = [(today - timedelta(days=i)).isoformat() for i in range(TIMESERIES_DAYS)]
    by_day = {e["date"]: e["failures"] for e in upstream}
    got = {dict(k)["date"]: v for k, v in samples(m, "exlogare_daily_failures", tenant=tenant).items()}
    assert got == {d: by_day.get(d, 0) for d in days}
    assert date.fromisoformat(min(got)) == today - timedelta(days=TIMESERIES_DAYS - 1)


def test_quiet_tenant_has_no_time_to_rca_in_empty_windows(stack: Stack) -> None:
    _, m = stack.scrape()
    assert samples(m, "exlogare_time_to_rca_p50_seconds", tenant="quiet", window="1d") == {}
    sev = samples(m, "exlogare_analyses_by_severity", tenant="quiet", window="1d")
    assert sorted(sev.values()) == [0.0, 0.0, 0.0]


def test_scrapes_never_reach_the_upstream(stack: Stack) -> None:
    before = len(stack.sim_requests())
    for _ in range(20):
        stack.scrape()
    assert len(stack.sim_requests()) == before


def test_promtool_check_metrics_on_live_scrape(stack: Stack) -> None:
    promtool = require_tool("promtool")
    text, _ = stack.scrape()
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert not (result.stdout + result.stderr).strip(), result.stdout.decode() + result.stderr.decode()


def test_metrics_gzip_when_asked(stack: Stack) -> None:
    r = requests.get(f"{stack.url}/metrics", headers={"Accept-Encoding": "gzip"}, timeout=10, stream=True)
    assert r.headers["Content-Encoding"] == "gzip"
    assert b"exlogare_up{" in gzip.decompress(r.raw.read())


def test_readyz_landing_and_healthz(stack: Stack) -> None:
    ready = requests.get(f"{stack.url}/readyz", timeout=5)
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True
    assert {n: t["status"] for n, t in body["tenants"].items()} == dict.fromkeys(TENANTS, "up")
    page = requests.get(f"{stack.url}/", timeout=5)
    assert page.headers["Content-Type"].startswith("text/html")
    for tenant in TENANTS:
        assert f"<td>{tenant}</td>" in page.text
    assert requests.get(f"{stack.url}/healthz", timeout=5).text == "ok\n"
    assert requests.get(f"{stack.url}/nope", timeout=5).status_code == 404
    assert requests.post(f"{stack.url}/metrics", timeout=5).status_code == 405


def test_a_rejected_token_fails_only_its_tenant(tmp_path: Path, stack: Stack) -> None:
    listing = requests.get(f"{stack.sim_url}/_sim/tenants", timeout=5).json()
    env = {"SIM_URL": stack.sim_url, "TOKEN_ACME": stack.tokens["acme"],
           "TOKEN_LAB": listing["lab"]["tokens"]["ingest"]}
    proc, url = start_exporter(tmp_path, CONFIG + tenant_block("acme", "TOKEN_ACME")
                               + tenant_block("lab", "TOKEN_LAB"), env)
    try:
        m = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
        assert samples(m, "exlogare_up") == {(("tenant", "acme"),): 1.0, (("tenant", "lab"),): 0.0}
        assert samples(m, "exlogare_failures_detected", tenant="lab") == {}
        assert len(samples(m, "exlogare_failures_detected", tenant="acme")) == len(WINDOWS)
        lab = requests.get(f"{url}/readyz", timeout=5).json()["tenants"]["lab"]
        assert lab["status"] == "down"
        assert "lab" in lab["last_error"] and "Missing scope: read" in lab["last_error"]
        # One 403, then no further calls for that tenant in this refresh (its RCA stream walks on its own).
        assert samples(m, "exlogare_upstream_requests_total", tenant="lab", endpoint="overview") == {
            (("code", "403"), ("endpoint", "overview"), ("tenant", "lab")): 1.0}
        assert {dict(k)["endpoint"] for k in samples(m, "exlogare_upstream_requests_total", tenant="lab")
                } <= {"overview", "analyses"}
    finally:
        proc.stop()
    log = proc.output()
    assert "Missing scope: read" in log and "tenant lab" in log
    assert env["TOKEN_LAB"] not in log and env["TOKEN_ACME"] not in log
