"""Upstream politeness: a request budget per tenant and per base URL, and Retry-After holding requests back.

The limiter's arithmetic runs on fake clocks; one test checks the shared budget against the simulator's own
request log (a lower bound on the time the requests took, which a faster machine cannot break).
"""

from __future__ import annotations

from typing import Any

import pytest
import responses

from exlogare_exporter.client import (
    RETRY_AFTER_CAP,
    ExlogareClient,
    RateLimited,
    SharedLimits,
    TokenBucket,
)
from exlogare_exporter.config import ConfigError, TenantConfig, parse_config
from exlogare_exporter.parse import parse_overview
from exlogare_exporter.poller import Poller
from exlogare_exporter.simulator import Simulator, SimulatorServer
from exlogare_exporter.state import Store
from tests.test_client import FakeClock

SAAS = "https://api.exlogare.test"
SELF_HOSTED = "http://127.0.0.1:8089"
OVERVIEW = {"failures_detected": 4, "analyses_completed": 3, "rca_count": 3, "severity_counts": {"high": 3},
            "avg_time_to_rca_seconds": None, "p50_time_to_rca_seconds": None, "p90_time_to_rca_seconds": None,
            "window_days": 7}


def config(*tenants: dict[str, Any], **defaults: Any) -> list[TenantConfig]:
    data = {"defaults": {"retries": 0, **defaults},
            "tenants": [{"token": f"exl_{t['name']}", **t} for t in tenants]}
    return list(parse_config(data, environ={}).tenants)


def client(cfg: TenantConfig, clock: FakeClock, shared: TokenBucket | None) -> ExlogareClient:
    return ExlogareClient(cfg, clock=clock, sleep=clock.sleep, shared=shared)


def overview(c: ExlogareClient) -> Any:
    return c.get("/stats/overview", {"days": 7}, parse_overview)


# --- the bucket ---------------------------------------------------------------------------------------------

def test_a_burst_then_one_request_per_interval() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(4.0, 2.0, clock=clock, sleep=clock.sleep)
    assert [bucket.acquire() for _ in range(5)] == [0.0, 0.0, 0.25, 0.25, 0.25]
    clock.now += 60  # idle: the bucket refills to its burst, not beyond
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.25]


def test_a_hold_lasts_its_seconds_on_the_bucket_clock() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(1.0, clock=clock, sleep=clock.sleep)
    assert bucket.held_for() == 0.0
    bucket.hold(30)
    bucket.hold(5)  # a shorter pause never shortens a longer one
    clock.now = 10
    assert bucket.held_for() == 20.0
    clock.now = 31
    assert bucket.held_for() == 0.0


# --- configuration ------------------------------------------------------------------------------------------

def test_bursts_default_to_the_rate_and_at_least_one() -> None:
    slow, fast = config({"name": "slow", "max_requests_per_second": 0.2},
                        {"name": "fast", "max_requests_per_second": 8, "base_url_max_requests_per_second": 8,
                         "base_url": "https://other.test"})
    assert (slow.max_requests_burst, slow.base_url_max_requests_burst) == (1.0, 1.0)
    assert (fast.max_requests_burst, fast.base_url_max_requests_burst) == (8.0, 8.0)
    (explicit,) = config({"name": "a", "max_requests_per_second": 8, "max_requests_burst": 2})
    assert explicit.max_requests_burst == 2.0


@pytest.mark.parametrize("bad", [0, 0.5, -1, "3", True, float("inf")])
def test_a_burst_is_a_number_of_one_or_more(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        config({"name": "a", "base_url_max_requests_burst": bad})
    assert str(info.value).startswith("tenants[0].base_url_max_requests_burst: ")


def test_tenants_of_one_base_url_must_agree_on_its_budget() -> None:
    with pytest.raises(ConfigError) as info:
        config({"name": "a", "base_url": SELF_HOSTED, "base_url_max_requests_per_second": 5},
               {"name": "b", "base_url": SAAS},
               {"name": "c", "base_url": SELF_HOSTED + "/api/v1/", "base_url_max_requests_per_second": 2})
    assert str(info.value) == (
        "tenants[2].base_url_max_requests_per_second: 2 differs from tenants[0] (5), which has the same "
        "base_url and so the same budget; set it once, under defaults")
    assert len(config({"name": "a"}, {"name": "b"}, base_url=SELF_HOSTED,
                      base_url_max_requests_per_second=5)) == 2


def test_one_bucket_per_base_url_kept_across_reloads_while_its_rate_stays() -> None:
    limits = SharedLimits()
    a, b, other = config({"name": "a"}, {"name": "b"}, {"name": "o", "base_url": SAAS},
                         base_url=SELF_HOSTED, base_url_max_requests_per_second=5)
    bucket = limits.bucket(a)
    assert bucket is not None and limits.bucket(b) is bucket
    assert limits.bucket(other) not in (None, bucket)
    (unlimited,) = config({"name": "u"})
    assert limits.bucket(unlimited) is None
    (faster,) = config({"name": "a"}, base_url=SELF_HOSTED, base_url_max_requests_per_second=9)
    assert limits.bucket(faster) is not bucket and limits.bucket(faster).rate == 9  # type: ignore[union-attr]
    limits.retain({SAAS})
    assert limits.bucket(faster) is not None  # made anew


# --- the client ---------------------------------------------------------------------------------------------

@responses.activate
def test_every_tenant_of_a_base_url_draws_from_one_budget() -> None:
    responses.add(responses.GET, SELF_HOSTED + "/api/v1/stats/overview", json=OVERVIEW)
    clock = FakeClock(0.0)
    a, b = config({"name": "a"}, {"name": "b"}, base_url=SELF_HOSTED, base_url_max_requests_per_second=2,
                  max_requests_per_second=100)
    limits = SharedLimits(clock=clock, sleep=clock.sleep)
    clients = [client(a, clock, limits.bucket(a)), client(b, clock, limits.bucket(b))]
    for _ in range(3):
        for c in clients:
            overview(c)
    # 6 requests at 2 a second with a burst of 2: the last leaves 2 s after the first
    assert clock.now == pytest.approx(2.0)
    assert len(responses.calls) == 6


@responses.activate
def test_with_a_shared_budget_a_429_holds_back_every_tenant_of_the_base_url() -> None:
    url = SELF_HOSTED + "/api/v1/stats/overview"
    responses.add(responses.GET, url, status=429, headers={"Retry-After": "120"}, json={"detail": "slow"})
    clock = FakeClock(0.0)
    a, b = config({"name": "a"}, {"name": "b"}, base_url=SELF_HOSTED, base_url_max_requests_per_second=50)
    limits = SharedLimits(clock=clock, sleep=clock.sleep)
    first, second = client(a, clock, limits.bucket(a)), client(b, clock, limits.bucket(b))
    with pytest.raises(RateLimited):
        overview(first)
    with pytest.raises(RateLimited) as info:
        overview(second)
    assert "for every tenant of this base_url" in str(info.value)
    assert len(responses.calls) == 1  # b's request never left
    clock.now += 121
    responses.replace(responses.GET, url, json=OVERVIEW)
    assert overview(second).failures_detected == 4


@responses.activate
def test_a_short_shared_pause_is_waited_out_not_failed() -> None:
    url = SELF_HOSTED + "/api/v1/stats/overview"
    responses.add(responses.GET, url, json=OVERVIEW)
    clock = FakeClock(0.0)
    a, b = config({"name": "a"}, {"name": "b"}, base_url=SELF_HOSTED, base_url_max_requests_per_second=50)
    limits = SharedLimits(clock=clock, sleep=clock.sleep)
    bucket = limits.bucket(a)
    assert bucket is not None
    bucket.hold(RETRY_AFTER_CAP / 3)  # as a's retry does when it sleeps through a short Retry-After
    assert overview(client(b, clock, limits.bucket(b))).failures_detected == 4
    assert clock.slept[0] == pytest.approx(RETRY_AFTER_CAP / 3)


@responses.activate
def test_a_token_taken_before_a_shared_pause_is_void_after_it() -> None:
    """Threads that got their token just before another tenant's 429 must not all send when the pause ends:
    each queues again, so the budget holds right after the pause too."""
    responses.add(responses.GET, SELF_HOSTED + "/api/v1/stats/overview", json=OVERVIEW)
    clock = FakeClock(0.0)

    class PausedWhileWaiting(TokenBucket):
        acquired = 0

        def acquire(self) -> float:
            waited = super().acquire()
            PausedWhileWaiting.acquired += 1
            if PausedWhileWaiting.acquired == 1:
                self.hold(5)  # another tenant's Retry-After arrives while this thread held its token
            return waited

    (cfg,) = config({"name": "b"}, base_url=SELF_HOSTED, base_url_max_requests_per_second=1)
    shared = PausedWhileWaiting(1.0, 1.0, clock=clock, sleep=clock.sleep)
    assert overview(client(cfg, clock, shared)).failures_detected == 4
    assert PausedWhileWaiting.acquired == 2 and clock.slept == [5.0]
    assert responses.calls[0].request.url and len(responses.calls) == 1


@responses.activate
def test_without_a_shared_budget_a_429_holds_back_only_its_tenant() -> None:
    url = SAAS + "/api/v1/stats/overview"
    clock = FakeClock(0.0)
    a, b = config({"name": "a"}, {"name": "b"}, base_url=SAAS)
    responses.add(responses.GET, url, status=429, headers={"Retry-After": "120"}, json={"detail": "slow"})
    responses.add(responses.GET, url, json=OVERVIEW)
    first, second = client(a, clock, None), client(b, clock, None)
    with pytest.raises(RateLimited):
        overview(first)
    assert overview(second).failures_detected == 4  # the SaaS limits each token on its own
    with pytest.raises(RateLimited):
        overview(first)  # still held back, without asking
    assert len(responses.calls) == 2


# --- the poller, against the simulator ----------------------------------------------------------------------

def test_the_poller_gives_tenants_of_one_server_one_budget() -> None:
    sim = Simulator(seed=3)
    for name in ("a", "b", "c"):
        sim.add_tenant(name, history_days=5, per_day=3)
    with SimulatorServer(sim) as server:
        data = {"concurrency": 3,
                "defaults": {"base_url": server.url, "base_url_max_requests_per_second": 20,
                             "base_url_max_requests_burst": 1, "analyses_interval": 0},
                "tenants": [{"name": n, "token": sim.token(n)} for n in ("a", "b", "c")]}
        poller = Poller(Store())
        poller.apply(parse_config(data, environ={}))
        try:
            states = poller.refresh_all()
        finally:
            poller.stop()
    assert all(s.up for s in states)
    times = sorted(r.at for r in sim.requests())
    assert len(times) == 30  # 3 tenants × 10 calls: the minimum a refresh needs
    # 30 requests at 20 a second with a burst of 1 cannot take less than 29 intervals of 50 ms
    assert times[-1] - times[0] >= 29 / 20 - 0.05
