"""The poller against an in-process simulator over loopback: isolation, staleness, health logging."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest
from prometheus_client import generate_latest

from exlogare_exporter.config import Config, parse_config
from exlogare_exporter.metrics import ExporterMetrics
from exlogare_exporter.poller import POOL_SPARE, Poller, plan_calls
from exlogare_exporter.simulator import Simulator, SimulatorServer
from exlogare_exporter.state import Store
from tests.support import parse_metrics, samples, wait_until


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=5)
    for name in ("acme", "lab"):
        simulator.add_tenant(name, history_days=40, per_day=6)
    with SimulatorServer(simulator) as server:
        yield simulator, server.url


def make_config(url: str, sim: Simulator, tenants: tuple[str, ...] = ("acme", "lab"),
                **defaults: Any) -> Config:
    data = {
        "concurrency": 2,
        "defaults": {"base_url": url, "interval": "10s", "retries": 0, "timeout": "5s", **defaults},
        "tenants": [{"name": n, "token": sim.token(n)} for n in tenants],
    }
    return parse_config(data, environ={})


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_poller(config: Config, clock: Clock | None = None) -> tuple[Poller, ExporterMetrics]:
    store = Store()
    metrics = ExporterMetrics(store, clock=clock or time.time)
    poller = Poller(store, metrics, clock=clock or time.time)
    poller.apply(config)
    return poller, metrics


def scrape(metrics: ExporterMetrics) -> dict:
    return parse_metrics(generate_latest(metrics.registry).decode())


def test_plan_is_the_minimum_the_config_needs(sim: tuple[Simulator, str]) -> None:
    cfg = make_config(sim[1], sim[0], windows=["1d", "7d", "200d"], top_windows=["7d"]).tenants[0]
    calls = plan_calls(cfg, date(2026, 11, 27))
    assert [(c.endpoint, dict(c.params)) for c in calls] == [
        ("/stats/overview", {"days": 1}), ("/stats/overview", {"days": 7}),
        ("/stats/overview", {"days": 200}), ("/stats/top-projects", {"days": 7, "limit": 10}),
        ("/stats/top-root-causes", {"days": 7, "limit": 10}),
        ("/stats/timeseries", {"days": 30}),
    ]


def test_a_slow_tenant_does_not_delay_another(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    # lab starts first, then hangs (its stats, not its RCA stream's walk, which runs beside them)
    simulator.set_fault(tenant="lab", endpoint="/stats/overview", status=None, latency=3.0, count=1)
    poller, _ = make_poller(make_config(url, simulator, tenants=("lab", "acme")))
    poller.start()
    try:
        acme = wait_until(lambda: poller.store.get("acme"), timeout=5, what="acme's first refresh")
        assert acme.up
        assert poller.store.get("lab") is None, "lab's refresh should still be waiting on the slow upstream"
        lab = wait_until(lambda: poller.store.get("lab"), timeout=10, what="lab's first refresh")
        assert lab.up and lab.last_duration is not None and lab.last_duration >= 2.5
        assert acme.last_attempt is not None and lab.last_attempt is not None
        assert acme.last_attempt > lab.last_attempt  # acme started later and still finished first
    finally:
        poller.stop(wait=5)


def test_last_good_values_stay_until_max_staleness(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    clock = Clock()
    poller, metrics = make_poller(make_config(url, simulator, max_staleness="60s"), clock)
    assert poller.refresh("acme").up  # type: ignore[union-attr]
    good = samples(scrape(metrics), "exlogare_failures_detected", tenant="acme")
    assert len(good) == 3

    simulator.set_fault(tenant="acme", status=503)
    clock.now += 30
    failed = poller.refresh("acme")
    assert failed is not None and not failed.up and failed.error_code == "503"
    m = scrape(metrics)
    assert samples(m, "exlogare_failures_detected", tenant="acme") == good
    assert samples(m, "exlogare_up", tenant="acme") == {(("tenant", "acme"),): 0.0}
    assert samples(m, "exlogare_upstream_requests_total", tenant="acme", code="503") == {
        (("code", "503"), ("endpoint", "overview"), ("tenant", "acme")): 1.0}

    clock.now += 31  # the good values are now 61 s old
    m = scrape(metrics)
    assert samples(m, "exlogare_failures_detected", tenant="acme") == {}
    assert samples(m, "exlogare_daily_failures", tenant="acme") == {}
    assert samples(m, "exlogare_up", tenant="acme") == {(("tenant", "acme"),): 0.0}
    assert samples(m, "exlogare_last_success_timestamp_seconds", tenant="acme")

    simulator.clear_faults()
    assert poller.refresh("acme").up  # type: ignore[union-attr]
    assert samples(scrape(metrics), "exlogare_failures_detected", tenant="acme") == good


def test_a_bad_request_fails_one_endpoint_not_the_refresh(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator))
    simulator.set_fault(endpoint="/stats/top-projects", status=422)
    simulator.clear_requests()
    state = poller.refresh("acme")
    assert state is not None and not state.up and state.error_code == "422"
    assert "top-projects" in (state.last_error or "")
    paths = [r.path for r in simulator.requests()]
    assert len(paths) == 10 and sum("top-root-causes" in p for p in paths) == 3
    m = scrape(metrics)
    assert len(samples(m, "exlogare_top_root_cause_analyses", tenant="acme")) > 0
    assert samples(m, "exlogare_top_project_failures", tenant="acme") == {}


def test_a_rejected_token_stops_the_refresh_after_one_call(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    poller, _ = make_poller(make_config(url, simulator))
    simulator.revoke(simulator.token("acme"))
    simulator.clear_requests()
    state = poller.refresh("acme")
    assert state is not None and state.error_code == "401"
    assert "tenant acme" in (state.last_error or "") and "revoked" in (state.last_error or "")
    assert len(simulator.requests()) == 1


def test_health_changes_are_logged_once(sim: tuple[Simulator, str], caplog: pytest.LogCaptureFixture) -> None:
    simulator, url = sim
    poller, _ = make_poller(make_config(url, simulator))
    caplog.set_level(logging.INFO, logger="exlogare_exporter.poller")
    poller.refresh("acme")
    simulator.set_fault(tenant="acme", status=500)
    for _ in range(3):
        poller.refresh("acme")
    simulator.clear_faults()
    simulator.set_fault(tenant="acme", status=429, headers={"Retry-After": "0"})
    poller.refresh("acme")
    simulator.clear_faults()
    poller.refresh("acme")
    poller.refresh("acme")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("refresh failing" in m for m in messages) == 1
    assert sum("still failing, now" in m and "429" in m for m in messages) == 1
    assert sum("recovered" in m for m in messages) == 1
    assert sum("succeeded" in m for m in messages) == 1


def test_reload_keeps_unchanged_tenants_and_drops_removed_ones(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    config = make_config(url, simulator)
    poller, metrics = make_poller(config)
    poller.refresh_all()
    before = poller.store.get("acme")
    only_acme = parse_config({"defaults": {"base_url": url, "retries": 0, "windows": ["7d"]},
                              "tenants": [{"name": "acme", "token": simulator.token("acme")}]}, environ={})
    poller.apply(only_acme)
    after = poller.store.get("acme")
    assert poller.store.get("lab") is None
    assert after is not None and before is not None and after.attempts == before.attempts
    assert {k for k in after.results} == {("overview", "7d"), ("top_projects", "7d"),
                                          ("top_root_causes", "7d"), ("timeseries", "")}
    m = scrape(metrics)
    assert {dict(k)["tenant"] for k in samples(m, "exlogare_upstream_requests_total")} == {"acme"}


def test_stop_does_not_wait_for_a_stuck_refresh(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    simulator.set_latency(4.0)
    poller, _ = make_poller(make_config(url, simulator))
    poller.start()
    wait_until(lambda: simulator.requests() or poller._busy, timeout=5, what="a refresh to be in flight")
    started = time.monotonic()
    assert poller.stop(wait=0.5) is False
    assert time.monotonic() - started < 2


def test_tenants_of_one_server_share_its_keep_alive_connections(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    for name in ("t1", "t2", "t3"):
        simulator.add_tenant(name, history_days=5, per_day=3)
    config = make_config(url, simulator, tenants=("acme", "lab", "t1", "t2", "t3"), analyses_interval=0)
    poller, _ = make_poller(config)
    assert poller.pools is not None
    try:
        assert all(s.up for s in poller.refresh_all())
        assert len(poller.pools.pools) == 1
        pool = poller.pools.pools[next(iter(poller.pools.pools.keys()))]
        assert pool.num_requests == 5 * 10  # every tenant's calls went through this one pool...
        assert pool.num_connections <= config.concurrency  # ...on at most one connection per worker
        assert pool.pool is not None and pool.pool.maxsize == config.concurrency + POOL_SPARE
        poller.apply(make_config(url, simulator, tenants=("acme",), analyses_interval=0))  # a reload
        assert poller.refresh("acme") is not None
        keys = list(poller.pools.pools.keys())
        assert len(keys) == 1 and poller.pools.pools[keys[0]] is pool  # the dropped clients left it open
        assert pool.num_connections <= config.concurrency
    finally:
        poller.stop()
    assert len(poller.pools.pools) == 0  # stop closes them


def test_the_workers_are_started_with_the_scheduler(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    poller, _ = make_poller(make_config(url, simulator))
    before = {t.name for t in threading.enumerate()}
    poller.start()
    try:
        workers = [t for t in threading.enumerate() if t.name.startswith("refresh") and t.name not in before]
        assert len(workers) == poller.concurrency == 2  # all there before the first job needs them
    finally:
        poller.stop()
