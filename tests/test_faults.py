"""Fault injection: every fault of issue 7 at once, each on its own tenant, against one real exporter process.

The simulator runs in this process (faults through its Python API); `tests/fakes.py` adds an upstream that
never answers and one that answers a byte a second; `tests/fakedns.py` lets a name stop resolving and come
back. Two healthy tenants run alongside. The campaign is one warm-up round (fault, recover: it lets thread
pools and caches reach their working size) and one measured round, observed by scraping /metrics every
0.3 s. Then each case is asserted on its own:

- the failing tenant's `exlogare_up` goes to 0, and the reason is logged once (and the recovery once);
- its last good values stay exported while younger than `max_staleness`, and vanish after;
- the healthy tenants stay fresh throughout;
- it recovers by itself once the fault ends;
- and, for the process as a whole, no thread, file-descriptor or memory growth.

The table of faults and outcomes is printed at the end of the run and kept in the README.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from exlogare_exporter.simulator import Simulator, SimulatorServer
from tests.fakes import BLACKHOLE, FORWARD, TRICKLE, FaultyProxy, Resources, settled_resources
from tests.reporting import add_table, markdown_table
from tests.support import ROOT, Process, free_port, parse_metrics, samples, wait_until

pytestmark = pytest.mark.e2e

INTERVAL = 5.0
MAX_STALENESS = 15.0
LATENCY = 1.0  # per request of the reload case: a refresh of 4 calls is in flight for 4 s
SLACK = 1.5  # seconds: a refresh's values are stamped a little after its start

HEALTHY = ("ok1", "ok2")

OVERVIEW = {"failures_detected": 41, "analyses_completed": 40, "rca_count": 40,
            "severity_counts": {"low": 10, "medium": 20, "high": 10}, "avg_time_to_rca_seconds": 20.0,
            "p50_time_to_rca_seconds": 12.0, "p90_time_to_rca_seconds": 60.0, "window_days": 7}


def _overview(**changes: Any) -> str:
    body = {**OVERVIEW, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...})


@dataclass(frozen=True)
class Case:
    tenant: str
    fault: str  # the table's words
    code: str | None  # the error code the tenant must fail with; None: it must stay up
    reason: str  # a piece of the logged reason
    inject: Callable[[Campaign], None]
    recover: Callable[[Campaign], None] = lambda c: None
    data: float | None = None  # the overview value exported while the fault lasts, if not the last good one


def _sim_fault(tenant: str, **fault: Any) -> Callable[[Campaign], None]:
    return lambda c: c.sim.set_fault(tenant=tenant, **fault)


def _proxy_mode(name: str, mode: str) -> Callable[[Campaign], None]:
    def switch(c: Campaign) -> None:
        c.proxies[name].mode = mode
    return switch


def _dns(resolves: bool) -> Callable[[Campaign], None]:
    """The name stops (or starts again) resolving; kept-alive connections drop, as when the server moves."""
    def switch(c: Campaign) -> None:
        c.dns_table.write_text(json.dumps({"sim.fake.test": "127.0.0.1" if resolves else None}))
        if not resolves:
            c.proxies["dns"].drop_connections()
    return switch


def _revoke(c: Campaign) -> None:
    c.sim.revoke(c.revoke_token)


def _rotate(c: Campaign) -> None:
    """The operator's fix for a revoked token: a new one in the token file, then SIGHUP."""
    c.token_generation += 1
    c.revoke_token = f"exl_faults_rotated_{c.token_generation}"
    c.sim.add_token("revoked", c.revoke_token)
    c.token_file.write_text(c.revoke_token + "\n")
    c.exporter.signal(signal.SIGHUP)


HTML_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"

CASES = (
    Case("storm429", "429 storm with `Retry-After: 2`", "429", "429",
         _sim_fault("storm429", status=429, headers={"Retry-After": "2"})),
    Case("burst5xx", "5xx burst (every request 500)", "500", "500", _sim_fault("burst5xx", status=500)),
    Case("gateway", "502 from a proxy, HTML page", "502", "Bad Gateway",
         _sim_fault("gateway", status=502, body=HTML_PAGE, content_type="text/html")),
    Case("html200", "HTML error page with status 200", "invalid_body", "an HTML page",
         _sim_fault("html200", status=200, body=HTML_PAGE, content_type="text/html")),
    Case("truncated", "truncated JSON", "invalid_body", "not valid JSON",
         _sim_fault("truncated", status=200, body=_overview()[:60])),
    Case("badjson", "invalid JSON (`NaN`)", "invalid_body", "not valid JSON",
         _sim_fault("badjson", endpoint="/stats/overview", status=200, body='{"failures_detected": NaN}')),
    Case("missing", "field missing (`severity_counts`)", "invalid_body", "severity_counts: missing",
         _sim_fault("missing", endpoint="/stats/overview", status=200, body=_overview(severity_counts=...))),
    Case("nullfield", "field null (`failures_detected`)", "invalid_body", "failures_detected",
         _sim_fault("nullfield", endpoint="/stats/overview", status=200,
                    body=_overview(failures_detected=None))),
    Case("wrongtype", "field of the wrong type (`\"41\"`)", "invalid_body", "failures_detected",
         _sim_fault("wrongtype", endpoint="/stats/overview", status=200,
                    body=_overview(failures_detected="41"))),
    Case("extra", "extra fields (accepted)", None, "",
         _sim_fault("extra", endpoint="/stats/overview", status=200,
                    body=_overview(new_field={"nested": [1, 2]}, another="x")), data=41.0),
    Case("blip", "one 503, then fine (retried)", None, "",
         _sim_fault("blip", endpoint="/stats/overview", status=503, count=1)),
    Case("blackhole", "accepts the connection, never answers", "timeout", "no answer within 2s",
         _proxy_mode("blackhole", BLACKHOLE), _proxy_mode("blackhole", FORWARD)),
    Case("trickle", "answers one byte per second", "timeout", "did not complete within 3s",
         _proxy_mode("trickle", TRICKLE), _proxy_mode("trickle", FORWARD)),
    Case("dns", "DNS failure (name does not resolve)", "connection", "Name or service not known", _dns(False),
         _dns(True)),
    Case("revoked", "token revoked mid-run (fix: new token file + SIGHUP)", "401", "revoked", _revoke,
         _rotate),
)
RELOAD = "reload"  # config reload in the middle of a refresh: asserted on its own, below
TENANTS = (*HEALTHY, *(c.tenant for c in CASES), RELOAD)


def _config(c: Campaign, reload_top_limit: int) -> str:
    lines = [f'listen_address: "127.0.0.1:{c.port}"', "concurrency: 32", "defaults:",
             f'  base_url: "{c.server.url}"', "  interval: 5s", "  jitter: 0s", "  max_staleness: 15s",
             "  timeout: 2s", "  connect_timeout: 1s", "  retries: 1", "  windows: [7d]",
             "  timeseries_days: 7", "  top_limit: 10", "tenants:"]
    for name in TENANTS:
        lines.append(f"  - name: {name}")
        if name == "revoked":
            lines.append(f"    token_file: {c.token_file}")
        else:
            lines.append(f"    token_env: TOKEN_{name.upper()}")
        if name in ("blackhole", "trickle"):
            lines.append(f"    base_url: {c.proxies[name].url}")
        if name == "dns":
            lines += [f"    base_url: http://sim.fake.test:{c.proxies['dns'].port}",
                      "    allow_insecure_http: true"]
        if name == RELOAD:
            lines += ["    timeout: 10s", f"    top_limit: {reload_top_limit}"]
    return "\n".join(lines) + "\n"


@dataclass
class Sample:
    at: float
    metrics: dict


@dataclass
class Round:
    inject: float = 0.0
    down: float = 0.0  # every failing tenant seen down
    clear: float = 0.0
    recovered: float = 0.0
    log_start: int = 0
    log_end: int = 0
    reload_at: float = 0.0


@dataclass
class Campaign:
    tmp: Path
    sim: Simulator
    server: SimulatorServer
    proxies: dict[str, FaultyProxy]
    port: int = field(default_factory=free_port)
    token_generation: int = 0
    revoke_token: str = "exl_faults_rotated_0"
    exporter: Process = None  # type: ignore[assignment]
    timeline: list[Sample] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    resources: dict[str, Resources] = field(default_factory=dict)

    @property
    def token_file(self) -> Path:
        return self.tmp / "revoked.token"

    @property
    def dns_table(self) -> Path:
        return self.tmp / "dns.json"

    @property
    def config_path(self) -> Path:
        return self.tmp / "config.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def scrape(self) -> dict:
        return parse_metrics(requests.get(f"{self.url}/metrics", timeout=5).text)

    def log_lines(self, start: int = 0, end: int | None = None) -> list[dict]:
        text = self.exporter.log_path.read_bytes()[start:end].decode(errors="replace")
        lines = []
        for line in text.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def log_size(self) -> int:
        return self.exporter.log_path.stat().st_size


def up(m: dict, tenant: str) -> float | None:
    return m.get(("exlogare_up", (("tenant", tenant),)))


def last_success(m: dict, tenant: str) -> float | None:
    return m.get(("exlogare_last_success_timestamp_seconds", (("tenant", tenant),)))


def overview(m: dict, tenant: str) -> float | None:
    return m.get(("exlogare_failures_detected", (("tenant", tenant), ("window", "7d"))))


def _record(c: Campaign, stop: threading.Event) -> None:
    while not stop.wait(0.3):
        try:
            c.timeline.append(Sample(time.time(), c.scrape()))
        except requests.RequestException:
            continue


def _wait_all(c: Campaign, check: Callable[[dict, str], bool], tenants: tuple[str, ...], what: str,
              timeout: float = 40) -> None:
    """Wait until `check` holds for every tenant; the failure names the tenants that never got there."""
    lagging: list[str] = list(tenants)

    def done() -> bool:
        c.exporter.check_alive()
        m = c.scrape()
        lagging[:] = [t for t in tenants if not check(m, t)]
        return not lagging
    try:
        wait_until(done, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still waiting for {lagging}") from None


FAILING = tuple(case.tenant for case in CASES if case.code is not None)


def _healthy_now(m: dict, t: str) -> bool:
    return up(m, t) == 1.0 and overview(m, t) is not None


def _run_round(c: Campaign, measured: bool) -> Round:
    r = Round(log_start=c.log_size())
    r.inject = time.time()
    c.sim.set_fault(tenant=RELOAD, status=None, latency=LATENCY)
    for case in CASES:
        case.inject(c)
    _wait_all(c, lambda m, t: up(m, t) == 0.0, FAILING, "every faulty tenant to be down")
    r.down = time.time()
    if measured:
        r.reload_at = _reload_mid_refresh(c)
    # Long enough for the last good values to outlive max_staleness, then some (the warm-up round lasts as
    # long, so the thread pools reach the size this load needs before the baseline is taken).
    wait_until(lambda: time.time() > r.inject + INTERVAL + MAX_STALENESS + 2 * SLACK, timeout=60,
               what="max_staleness to pass")
    r.clear = time.time()
    c.sim.clear_faults()
    for case in CASES:
        case.recover(c)
    _wait_all(c, _healthy_now, TENANTS, "every tenant to recover")
    r.recovered = time.time()
    r.log_end = c.log_size()
    c.rounds.append(r)
    return r


def _reload_mid_refresh(c: Campaign) -> float:
    """SIGHUP with a changed `reload` tenant while one of its requests is in flight (each takes LATENCY)."""
    def in_flight() -> bool:
        recent = [q for q in c.sim.requests() if q.tenant == RELOAD and time.time() - q.at < LATENCY / 2]
        return bool(recent)
    wait_until(in_flight, timeout=20, interval=0.02, what="a refresh of the reload tenant in flight")
    c.config_path.write_text(_config(c, reload_top_limit=5))
    c.exporter.signal(signal.SIGHUP)
    return time.time()


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    tmp = tmp_path_factory.mktemp("faults")
    sim = Simulator(seed=11)
    for name in TENANTS:
        sim.add_tenant(name, history_days=30, per_day=5)
    sim.freeze(datetime.now(UTC))  # the windows stand still: values change only when a test says so
    server = SimulatorServer(sim, threads=32).start()
    proxies = {name: FaultyProxy(("127.0.0.1", server.port)) for name in ("blackhole", "trickle", "dns")}
    c = Campaign(tmp, sim, server, proxies)
    sim.add_token("revoked", c.revoke_token)
    c.token_file.write_text(c.revoke_token + "\n")
    c.token_file.chmod(0o600)
    _dns(True)(c)
    c.config_path.write_text(_config(c, reload_top_limit=10))
    env = {f"TOKEN_{n.upper()}": sim.token(n) for n in TENANTS}
    c.exporter = Process([sys.executable, "tests/fakedns.py", str(c.dns_table), "--config",
                          str(c.config_path), "--log-format", "json"], tmp / "exporter.log", env)
    stop = threading.Event()
    recorder = threading.Thread(target=_record, args=(c, stop), daemon=True)
    try:
        _wait_all(c, _healthy_now, TENANTS, "every tenant's first refresh", timeout=30)
        _run_round(c, measured=False)  # warm-up: pools and caches grow to their working size
        recorder.start()
        wait_until(lambda: time.time() > c.rounds[0].recovered + 2 * INTERVAL, timeout=30,
                   what="two quiet cycles")
        c.resources["baseline"] = settled_resources(c.exporter.proc.pid)
        _run_round(c, measured=True)
        c.resources["after"] = _settle_after(c)
        yield c
    finally:
        stop.set()
        if recorder.is_alive():
            recorder.join(5)
        c.exporter.stop()
        for proxy in proxies.values():
            proxy.stop()
        server.stop()
        _report(c)


def _settle_after(c: Campaign) -> Resources:
    """Resources once the recovered exporter is back to its routine (two quiet cycles)."""
    base = c.resources["baseline"]
    end = c.rounds[-1].recovered
    wait_until(lambda: time.time() > end + 2 * INTERVAL, timeout=30, what="two quiet cycles")
    with contextlib.suppress(AssertionError):  # the growth test below reports the figures
        wait_until(lambda: (r := settled_resources(c.exporter.proc.pid)).threads <= base.threads
                   and r.fds <= base.fds + 2, timeout=20, what="threads and fds back to the baseline")
    return settled_resources(c.exporter.proc.pid)


# --- per-case observations -------------------------------------------------------------------------------

@dataclass
class Outcome:
    up_values: set[float]
    failing_lines: list[str]
    still_lines: list[str]
    recovered_lines: list[str]
    kept: list[float]  # overview values exported while the tenant failed and its data was young
    dropped: int  # samples past max_staleness without data
    past_staleness_with_data: int
    others_fresh: bool
    recovered_after: float | None


def _window(c: Campaign) -> list[Sample]:
    r = c.rounds[-1]
    return [s for s in c.timeline if r.inject <= s.at <= r.clear]


def observe(c: Campaign, tenant: str) -> Outcome:
    r = c.rounds[-1]
    window = _window(c)
    lines = [ln for ln in c.log_lines(r.log_start, r.log_end) if ln.get("tenant") == tenant]
    msgs = [str(ln.get("msg", "")) for ln in lines]
    kept, dropped, stale_with_data = [], 0, 0
    last_good = None
    for s in window:
        ls = last_success(s.metrics, tenant)
        last_good = ls if ls is not None else last_good
        if up(s.metrics, tenant) != 0.0 or last_good is None:
            continue
        age = s.at - last_good
        value = overview(s.metrics, tenant)
        if age < MAX_STALENESS - SLACK:
            kept.append(value)  # type: ignore[arg-type]
        elif age > MAX_STALENESS + SLACK:
            dropped += value is None
            stale_with_data += value is not None
    after = [s for s in c.timeline if s.at >= r.clear and _healthy_now(s.metrics, tenant)]
    return Outcome(
        up_values={up(s.metrics, tenant) for s in window if up(s.metrics, tenant) is not None},
        failing_lines=[m for m in msgs if "refresh failing" in m],
        still_lines=[m for m in msgs if "still failing" in m],
        recovered_lines=[m for m in msgs if "refresh recovered" in m],
        kept=kept, dropped=dropped, past_staleness_with_data=stale_with_data,
        others_fresh=healthy_stayed_fresh(c),
        recovered_after=(after[0].at - r.clear) if after else None,
    )


def healthy_stayed_fresh(c: Campaign) -> bool:
    """Every scrape during the faults showed the healthy tenants up, with data younger than two intervals."""
    window = _window(c)
    return bool(window) and all(
        up(s.metrics, t) == 1.0 and overview(s.metrics, t) is not None
        and s.at - (last_success(s.metrics, t) or 0) < 2 * INTERVAL + SLACK
        for s in window for t in HEALTHY)


def _baseline_overview(c: Campaign, tenant: str) -> float | None:
    before = [s for s in c.timeline if s.at < c.rounds[-1].inject]
    return overview(before[-1].metrics, tenant) if before else None


@pytest.mark.parametrize("case", CASES, ids=[c.tenant for c in CASES])
def test_fault(campaign: Campaign, case: Case) -> None:
    o = observe(campaign, case.tenant)
    assert o.others_fresh, "a healthy tenant went stale or down while the faults ran"
    assert o.recovered_after is not None, f"{case.tenant} did not recover after the fault ended"
    if case.code is None:
        assert o.up_values == {1.0}, f"{case.tenant} should have stayed up, saw {o.up_values}"
        assert not o.failing_lines
        values = [overview(s.metrics, case.tenant) for s in _window(campaign)]
        expected = case.data or _baseline_overview(campaign, case.tenant)
        assert expected in values and set(values[values.index(expected):]) == {expected}, values
        return
    assert 0.0 in o.up_values, f"{case.tenant} never went down"
    assert len(o.failing_lines) == 1, f"the reason should be logged once: {o.failing_lines}"
    assert f": {case.code}: " in o.failing_lines[0] and case.reason in o.failing_lines[0], o.failing_lines
    assert not o.still_lines, f"the reason changed or was logged again: {o.still_lines}"
    assert len(o.recovered_lines) == 1, f"the recovery should be logged once: {o.recovered_lines}"
    assert o.kept and set(o.kept) == {_baseline_overview(campaign, case.tenant)}, \
        f"last good values not kept until max_staleness: {o.kept}"
    assert o.dropped > 0 and o.past_staleness_with_data == 0, "values outlived max_staleness"


def test_upstream_counters_name_each_fault(campaign: Campaign) -> None:
    m = campaign.scrape()
    for case in CASES:
        if case.code is not None:
            counted = samples(m, "exlogare_upstream_requests_total", tenant=case.tenant, code=case.code)
            assert sum(counted.values()) > 0, f"no request of {case.tenant} counted as {case.code}"
    blip = samples(m, "exlogare_upstream_requests_total", tenant="blip", endpoint="overview", code="503")
    assert sum(blip.values()) == 2  # one per round, retried at once


def test_retry_after_is_honoured(campaign: Campaign) -> None:
    r = campaign.rounds[-1]
    times = sorted(q.at for q in campaign.sim.requests()
                   if q.tenant == "storm429" and r.inject <= q.at <= r.clear and q.status == 429)
    assert len(times) >= 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1.9, f"a request left within Retry-After: {gaps}"


def test_config_reload_in_the_middle_of_a_refresh(campaign: Campaign) -> None:
    r = campaign.rounds[-1]
    assert campaign.exporter.proc.poll() is None
    reloads = [ln for ln in campaign.log_lines(r.log_start, r.log_end)
               if "config reloaded" in str(ln.get("msg"))]
    assert len(reloads) == 2  # the one mid-refresh, and the token rotation when the faults ended
    tops = [q for q in campaign.sim.requests() if q.tenant == RELOAD and q.path.endswith("/top-projects")]
    before = {q.query.get("limit") for q in tops if q.at < r.reload_at - LATENCY}
    late = {q.query.get("limit") for q in tops if q.at > r.reload_at + 5 * LATENCY}
    assert before == {"10"} and late == {"5"}, (before, late)
    window = [s for s in _window(campaign) if s.at > r.reload_at]
    assert window and all(up(s.metrics, RELOAD) == 1.0 for s in window)
    m = campaign.scrape()
    assert len(samples(m, "exlogare_top_project_failures", tenant=RELOAD)) == 5
    errors = [ln for ln in campaign.log_lines(r.log_start, r.log_end)
              if ln.get("tenant") == RELOAD and ln.get("level") in ("warning", "error")]
    assert not errors, errors


def test_no_thread_fd_or_memory_growth(campaign: Campaign) -> None:
    base, after = campaign.resources["baseline"], campaign.resources["after"]
    assert after.threads <= base.threads, f"threads grew: {base} -> {after}"
    assert after.fds <= base.fds + 2, f"file descriptors grew: {base} -> {after}"
    assert after.rss_kib <= base.rss_kib + 8 * 1024, f"memory grew: {base} -> {after}"


def test_readme_lists_every_fault() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Reliability", 1)[-1]
    for case in CASES:
        assert f"| {case.fault} |" in section, case.fault
    assert "config reload in the middle of a refresh" in section


def _report(c: Campaign) -> None:
    if not c.rounds:
        return
    rows = []
    for case in CASES:
        try:
            o = observe(c, case.tenant)
        except Exception:  # the table is a report: a broken observation shows as such
            rows.append([case.fault, "?", "?", "?", "?", "?"])
            continue
        down = f"0 ({case.code})" if 0.0 in o.up_values else "stays 1"
        logged = (f"{len(o.failing_lines)}× / {len(o.recovered_lines)}×" if case.code else "—")
        kept = (f"kept {len(o.kept)} scrapes, gone after" if o.kept and o.dropped else
                ("fresh" if case.code is None else "NO"))
        rec = f"{o.recovered_after:.1f}s" if o.recovered_after is not None else "NO"
        rows.append([case.fault, down, logged, kept, "yes" if o.others_fresh else "NO", rec])
    r = c.rounds[-1]
    rows.append(["config reload in the middle of a refresh", "stays 1", "—", "fresh",
                 "yes" if healthy_stayed_fresh(c) else "NO", f"applied {r.reload_at - r.inject:.1f}s in"])
    lines = markdown_table(["fault", "exlogare_up", "reason / recovery logged", "last good data",
                            "others fresh", "recovered after the fault"], rows)
    base, after = c.resources.get("baseline"), c.resources.get("after")
    if base and after:
        lines.append(f"process: before {base}; after {after}")
    add_table("faults tried and outcomes", lines)
