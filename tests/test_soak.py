"""A bounded soak (about two minutes): random faults come and go across 30 tenants while new RCAs arrive.

At the end, with the faults cleared: every tenant is up; `exlogare_upstream_requests_total` equals the
simulator's own request log, per tenant, endpoint and status (a 200 whose body was refused counts as
`invalid_body`); `exlogare_analyses_total` counted every RCA that arrived, exactly once; and the process has
as many threads and file descriptors as after its warm-up, and no more than 10 MiB of extra memory.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
import requests

from exlogare_exporter.simulator import Simulator, SimulatorServer
from tests.fakes import settled_resources
from tests.reporting import add_table
from tests.support import Process, free_port, parse_metrics, samples, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.soak]

TENANTS = [f"s{i:02d}" for i in range(30)]
SOAK_SECONDS = 100.0
WARM_UP = 25.0
EPOCH = 3.0  # faults change this often
SEED = 7

ENDPOINTS = {"/stats/overview": "overview", "/stats/timeseries": "timeseries",
             "/stats/top-projects": "top_projects", "/stats/top-root-causes": "top_root_causes",
             "/analyses": "analyses"}

FAULTS = [
    {"status": 429, "headers": {"Retry-After": "1"}},
    {"status": 500},
    {"status": 503},
    {"status": 502, "body": "<html><h1>502 Bad Gateway</h1></html>", "content_type": "text/html"},
    {"status": 200, "body": "<html>maintenance</html>", "content_type": "text/html"},
    {"status": 200, "endpoint": "/stats/overview", "body": '{"failures_detected": 3, "analyses_'},
    {"status": 200, "endpoint": "/analyses", "body": '{"items": "oops", "next_cursor": null}'},
    {"status": None, "latency": 0.3},
    {"status": 503, "count": 1},
]


def config(sim_url: str, port: int) -> str:
    tenants = "".join(f"  - name: {t}\n    token: exl_sim_{t}_read\n" for t in TENANTS)
    return (f'listen_address: "127.0.0.1:{port}"\nconcurrency: 4\ndefaults:\n  base_url: "{sim_url}"\n'
            "  interval: 5s\n  jitter: 1s\n  analyses_interval: 5s\n  timeout: 3s\n  retries: 1\n"
            "  windows: [1d, 7d]\n  timeseries_days: 7\n  top_limit: 5\n"
            f"tenants:\n{tenants}")


def upstream_counts(m: dict) -> Counter:
    counts: Counter = Counter()
    for (name, labels), value in m.items():
        if name == "exlogare_upstream_requests_total" and value:
            lbl = dict(labels)
            code = "200" if lbl["code"] == "invalid_body" else lbl["code"]
            counts[(lbl["tenant"], lbl["endpoint"], code)] += int(value)
    return counts


def sim_counts(sim: Simulator) -> Counter:
    counts: Counter = Counter()
    for q in sim.requests():
        path = q.path.removeprefix("/api/v1")
        endpoint = ENDPOINTS.get(path, "analysis" if path.startswith("/analyses/") else path)
        counts[(q.tenant, endpoint, str(q.status))] += 1
    return counts


def test_soak(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("soak")
    rng = random.Random(SEED)  # a seeded fault schedule
    sim = Simulator(seed=SEED)
    for name in TENANTS:
        sim.add_tenant(name, history_days=20, per_day=4)
    server = SimulatorServer(sim, threads=16).start()
    port = free_port()
    (tmp / "config.yaml").write_text(config(server.url, port))
    proc = Process([sys.executable, "exporter.py", "--config", str(tmp / "config.yaml")],
                   tmp / "exporter.log")
    url = f"http://127.0.0.1:{port}"
    added: Counter = Counter()
    stop = threading.Event()

    def scrape() -> dict:
        return parse_metrics(requests.get(f"{url}/metrics", timeout=10).text)

    def arrivals() -> None:
        while not stop.wait(0.5):
            tenant, severity = rng.choice(TENANTS), rng.choice(["low", "medium", "high"])
            sim.add_analyses(tenant, 1, severity=severity, created_at=datetime.now(UTC))
            added[(tenant, severity)] += 1

    try:
        wait_until(lambda: proc.check_alive() or len(samples(
            scrape(), "exlogare_latest_analysis_timestamp_seconds")) == len(TENANTS), timeout=40,
            what="every tenant's stream to start")
        feeder = threading.Thread(target=arrivals, daemon=True)
        feeder.start()
        started = time.monotonic()
        baseline = None
        epochs = 0
        while time.monotonic() - started < SOAK_SECONDS:
            sim.clear_faults()
            for tenant in rng.sample(TENANTS, k=10):
                sim.set_fault(tenant=tenant, **rng.choice(FAULTS))
            epochs += 1
            epoch_end = started + epochs * EPOCH
            wait_until(lambda: time.monotonic() > epoch_end, timeout=EPOCH + 5,  # noqa: B023 - used at once
                       what="the epoch")
            proc.check_alive()
            if baseline is None and time.monotonic() - started > WARM_UP:
                baseline = settled_resources(proc.proc.pid, samples=3)
        stop.set()
        feeder.join(5)
        sim.clear_faults()
        wait_until(lambda: set(samples(scrape(), "exlogare_up").values()) == {1.0}, timeout=40,
                   what="every tenant up again")

        def analyses_counted() -> Counter:
            return Counter({(dict(lbl)["tenant"], dict(lbl)["severity"]): int(v)
                            for lbl, v in samples(scrape(), "exlogare_analyses_total").items() if v})
        wait_until(lambda: analyses_counted() == added, timeout=30, what="every new RCA counted")
        last: list[Counter] = []

        def consistent() -> bool:
            before, upstream, after = upstream_counts(scrape()), sim_counts(sim), upstream_counts(scrape())
            last[:] = [before, upstream]
            return before == upstream == after
        try:
            wait_until(consistent, timeout=30, interval=0.2, what="counters to match the simulator's log")
        except AssertionError:
            diff = {k: (last[0][k], last[1][k]) for k in set(last[0]) | set(last[1])
                    if last[0][k] != last[1][k]}
            raise AssertionError(f"exporter vs simulator request counts differ: {diff}") from None
        assert baseline is not None
        readings: list[object] = []

        def settled() -> bool:
            r = settled_resources(proc.proc.pid, samples=3)
            readings[:] = [r]
            # Each tenant's session may keep one more keep-alive connection than at the baseline (its stream
            # walk and its refresh overlapped once): bounded by the pool, not a leak.
            return r.threads <= baseline.threads and r.fds <= baseline.fds + len(TENANTS)
        try:
            wait_until(settled, timeout=30, what=f"threads and fds back to {baseline}")
        except AssertionError:
            raise AssertionError(f"resources grew: {baseline} -> {readings}") from None
        after = settled_resources(proc.proc.pid)
        assert after.rss_kib <= baseline.rss_kib + 10 * 1024, f"memory grew: {baseline} -> {after}"
        requests_total = sum(last[1].values())
        assert requests_total > 1000 and sum(added.values()) > 100
        add_table("soak", [f"{len(TENANTS)} tenants, {epochs} fault epochs of {EPOCH:g}s, "
                           f"{requests_total} upstream requests matched exactly, "
                           f"{sum(added.values())} new RCAs counted exactly once; "
                           f"after warm-up {baseline}, at the end {after}"])
    finally:
        stop.set()
        proc.stop()
        server.stop()
