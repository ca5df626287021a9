"""The /analyses stream: the pure core, an exactly-once model test, and the walker against the simulator."""

from __future__ import annotations

import json
import logging
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from exlogare_exporter import stream
from exlogare_exporter.client import BadRequest, ServerError
from exlogare_exporter.config import Config, TenantConfig, parse_config
from exlogare_exporter.metrics import ExporterMetrics
from exlogare_exporter.parse import SEVERITIES, AnalysesPage, Analysis, parse_analyses_page
from exlogare_exporter.poller import Poller
from exlogare_exporter.simulator import Simulator, SimulatorServer
from exlogare_exporter.state import Store
from exlogare_exporter.stream import (
    PAGE_LIMIT,
    StreamState,
    TenantStream,
    advance,
    initial_state,
    walk,
    walk_params,
)
from tests.support import ROOT, parse_metrics, require_tool, samples, wait_until

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
T0 = NOW - timedelta(minutes=5)


def rca(seconds: float, rid: str, severity: str = "high", confidence: float = 0.5, *,
        project: str | None = None, source: str | None = None) -> Analysis:
    return Analysis(rid, severity, T0 + timedelta(seconds=seconds), confidence, project, source)


def page(*items: Analysis, cursor: str | None = None) -> AnalysesPage:
    return AnalysesPage(tuple(sorted(items, key=lambda a: (a.created_at, a.id), reverse=True)), cursor)


def ids(items: tuple[Analysis, ...]) -> list[str]:
    return [a.id for a in items]


def tenant_config(**keys: Any) -> TenantConfig:
    return parse_config({"tenants": [{"name": "t", "token": "exl_x", "base_url": "http://127.0.0.1:9",
                                      **keys}]}, environ={}).tenants[0]


# --- the pure core ------------------------------------------------------------------------------------------

def test_the_first_walk_counts_nothing_and_takes_the_newest_timestamp_with_all_its_ids() -> None:
    state, counted = advance(StreamState(), page(rca(9, "b"), rca(9, "a"), rca(5, "c"), cursor="next"))
    assert counted == ()
    assert state == StreamState(primed=True, watermark=T0 + timedelta(seconds=9), seen=frozenset({"a", "b"}))
    assert walk_params(state) == {"limit": PAGE_LIMIT, "since": (T0 + timedelta(seconds=9)).isoformat()}


def test_the_first_walk_pages_on_while_the_newest_timestamp_may_continue() -> None:
    state, _ = advance(StreamState(), page(rca(9, "c"), rca(9, "b"), cursor="p2"))
    assert not state.primed and state.walk is not None and state.walk.cursor == "p2"
    assert walk_params(state) == {"limit": PAGE_LIMIT, "cursor": "p2"}
    state, counted = advance(state, page(rca(9, "a"), cursor="p3"))
    assert not state.primed and counted == ()
    state, counted = advance(state, page(rca(1, "z"), cursor="p4"))  # older: the rest is history
    assert counted == () and state == StreamState(primed=True, watermark=T0 + timedelta(seconds=9),
                                                  seen=frozenset("abc"))


def test_a_tenant_without_rcas_then_counts_everything_that_arrives() -> None:
    state, _ = advance(StreamState(), page())
    assert state == StreamState(primed=True) and walk_params(state) == {"limit": PAGE_LIMIT}
    state, counted = advance(state, page(rca(1, "a"), rca(2, "b", "low")))
    assert sorted(ids(counted)) == ["a", "b"]
    assert state.watermark == T0 + timedelta(seconds=2) and state.seen == {"b"}


def test_since_is_inclusive_so_ids_at_the_watermark_are_not_counted_again_but_new_ones_are() -> None:
    primed = StreamState(primed=True, watermark=T0, seen=frozenset({"m"}))
    state, counted = advance(primed, page(rca(0, "m"), rca(0, "a"), rca(0, "z")))
    assert sorted(ids(counted)) == ["a", "z"]
    assert state == StreamState(primed=True, watermark=T0, seen=frozenset("amz"))
    state, counted = advance(state, page(rca(0, "m"), rca(0, "a"), rca(0, "z")))
    assert counted == ()  # an idle walk
    state, counted = advance(state, page(rca(3, "n"), rca(0, "m"), rca(0, "a"), rca(0, "z")))
    assert ids(counted) == ["n"] and state.seen == {"n"}  # only the ids at the newest timestamp are kept


def test_a_bounded_walk_moves_the_watermark_only_when_it_reaches_the_end() -> None:
    primed = StreamState(primed=True, watermark=T0, seen=frozenset({"old"}))
    state, counted = advance(primed, page(rca(9, "e"), rca(8, "d"), cursor="c1"))
    assert ids(counted) == ["e", "d"]
    assert state.watermark == T0 and state.walk is not None and state.walk.top == T0 + timedelta(seconds=9)
    assert state.newest == T0 + timedelta(seconds=9)
    assert walk_params(state)["since"] == T0.isoformat() and walk_params(state)["cursor"] == "c1"
    state, counted = advance(state, page(rca(7, "c"), rca(0, "old"), cursor=None))
    assert ids(counted) == ["c"]
    assert state == StreamState(primed=True, watermark=T0 + timedelta(seconds=9), seen=frozenset({"e"}))


def test_a_refused_cursor_resumes_below_the_last_item_without_counting_it_again() -> None:
    primed = StreamState(primed=True, watermark=T0)
    state, counted = advance(primed, page(rca(9, "e"), rca(8, "d2"), rca(8, "d1"), cursor="c1"))
    assert ids(counted) == ["e", "d2", "d1"]
    state = stream.restart_walk(state)
    params = walk_params(state)
    assert "cursor" not in params and params["until"] == (T0 + timedelta(seconds=8)).isoformat()
    # The server answers since..until again from the top of that second: d2 and d1 are skipped.
    state, counted = advance(state, page(rca(8, "d2"), rca(8, "d1"), rca(8, "d0"), rca(2, "b")))
    assert ids(counted) == ["d0", "b"] and state.walk is None
    assert state.watermark == T0 + timedelta(seconds=9)
    assert stream.restart_walk(StreamState(primed=True, watermark=T0, walk=stream.Walk("c"))).walk is None


def test_lookback_counts_what_was_created_in_the_span_and_stops_at_the_first_older_item() -> None:
    state = initial_state(lookback=60, now=(T0 + timedelta(seconds=100)).timestamp())
    assert state.count_from == T0 + timedelta(seconds=40) and not state.primed
    state, counted = advance(state, page(rca(90, "b"), rca(50, "a"), rca(40, "edge"), rca(39, "old"),
                                         rca(1, "older"), cursor="more"))
    assert sorted(ids(counted)) == ["a", "b", "edge"]
    assert state == StreamState(primed=True, watermark=T0 + timedelta(seconds=90), seen=frozenset({"b"}))
    assert initial_state(0, 1e9) == StreamState() == initial_state(60, None)


def test_arrivals_during_the_first_walk_above_its_top_are_counted_by_the_next() -> None:
    state, _ = advance(StreamState(), page(rca(5, "x"), rca(5, "w"), cursor="c"))
    state, _ = advance(state, page(rca(5, "v"), rca(4, "old")))
    assert state.seen == {"x", "w", "v"}
    state, counted = advance(state, page(rca(6, "new"), rca(5, "late"), *(rca(5, i) for i in "xwv")))
    assert sorted(ids(counted)) == ["late", "new"]


def test_counts_and_confidence_buckets() -> None:
    counts = stream.zero_counts()
    assert counts.totals == {(s,): 0 for s in SEVERITIES}
    items = [rca(1, "a", "high", 0.87), rca(1, "b", "high", 0.1), rca(1, "c", "low", 1.0),
             rca(1, "d", "high", 0.0)]
    counts = stream.count(counts, items, max_values=50, max_len=120)
    assert counts.totals == {("low",): 1, ("medium",): 0, ("high",): 3}
    high = counts.confidence["high"]
    assert high.count == 3 and high.total == pytest.approx(0.97)
    assert dict(high.cumulative()) == {"0.1": 2, "0.2": 2, "0.3": 2, "0.4": 2, "0.5": 2, "0.6": 2, "0.7": 2,
                                       "0.8": 2, "0.9": 3, "1.0": 3, "+Inf": 3}
    assert dict(counts.confidence["low"].cumulative())["0.9"] == 0
    assert stream.count(counts, [], 50, 120) is counts


def test_optional_labels_are_bounded_and_the_rest_counts_under_other() -> None:
    counts = stream.zero_counts(("project", "source"))
    assert counts.totals == {}
    items = [rca(1, "1", project="acme/api", source="gitlab_webhook"),
             rca(1, "2", project="acme/web\nline two", source=None),
             rca(1, "3", project="acme/third", source="generic"),
             rca(1, "4", project=None, source="github_app", severity="low"),
             rca(1, "5", project="acme/api", source="generic")]
    counts = stream.count(counts, items, max_values=2, max_len=120)
    assert counts.totals == {
        ("high", "acme/api", "gitlab_webhook"): 1, ("high", "acme/web line two", "(none)"): 1,
        ("high", "(other)", "(other)"): 1, ("low", "(other)", "(other)"): 1,
        ("high", "acme/api", "(other)"): 1}
    assert counts.admitted == {"project": {"acme/api", "acme/web line two"},
                               "source": {"gitlab_webhook", "(none)"}}


def test_adopt_keeps_counters_restarts_on_new_data_and_reshapes_on_new_labels() -> None:
    cfg = tenant_config()
    fresh = stream.adopt(None, cfg, False, NOW.timestamp())
    assert fresh.state == StreamState() and fresh.counts == stream.zero_counts()
    primed = replace(fresh, state=StreamState(primed=True, watermark=T0),
                     counts=stream.count(fresh.counts, [rca(1, "a")], 50, 120), attempts=3)
    assert stream.adopt(primed, cfg, False, 0) == primed
    moved = stream.adopt(primed, tenant_config(analyses_lookback="1h"), True, NOW.timestamp())
    assert moved.state == StreamState() and moved.counts == primed.counts and moved.attempts == 3
    relabelled = stream.adopt(primed, tenant_config(analyses_labels=["source"]), False, 0)
    assert relabelled.state == primed.state and relabelled.counts == stream.zero_counts(("source",))
    looking_back = stream.new_stream(tenant_config(analyses_lookback="1h"), NOW.timestamp())
    assert looking_back.state.count_from == NOW - timedelta(hours=1)


def test_config_keys_and_their_limits() -> None:
    cfg = tenant_config()
    assert (cfg.analyses_interval, cfg.analyses_lookback, cfg.analyses_max_pages, cfg.analyses_labels,
            cfg.max_label_values) == (30.0, 0.0, 20, (), 50)
    cfg = tenant_config(analyses_interval=0, analyses_lookback="1h", analyses_max_pages=1,
                        analyses_labels=["source", "project"], max_label_values=5)
    assert (cfg.analyses_interval, cfg.analyses_lookback) == (0, 3600)
    assert cfg.analyses_labels == ("project", "source")
    for key, value, message in [
            ("analyses_interval", "500ms", "under 1s"), ("analyses_lookback", "9000h", "over 365 days"),
            ("analyses_max_pages", 0, "outside 1..1000"),
            ("analyses_labels", ["severity"], "not an optional"),
            ("analyses_labels", ["project", "project"], "listed twice"),
            ("analyses_labels", "project", "a list"), ("max_label_values", 0, "outside")]:
        with pytest.raises(Exception, match=message) as info:
            tenant_config(**{key: value})
        assert f"tenants[0].{key}" in str(info.value)


# --- exactly once, against a model --------------------------------------------------------------------------

def invalid_cursor() -> BadRequest:
    return BadRequest("t", "/analyses", "400", "Invalid cursor", status=400)


class Model:
    """The simulator in-process, the stream's state and counts, and what a correct stream has counted."""

    def __init__(self) -> None:
        self.sim = Simulator(seed=11, clock=lambda: NOW)
        self.sim.add_tenant("t", history_days=1, per_day=6)
        newest = self.sim.stats("t", "analyses", limit=1)["items"]
        self.clock = datetime.fromisoformat(newest[0]["created_at"]) if newest else NOW - timedelta(hours=1)
        self.cfg = tenant_config()
        self.snapshot = stream.new_stream(self.cfg, NOW.timestamp())
        self.arrived: dict[str, str] = {}  # id -> severity, of RCAs added after the stream started
        self.counted: Counter[str] = Counter()
        self.must_have: set[str] = set()  # arrived before the logical walk in progress started

    def arrive(self, n: int, severity: str, step_us: int) -> None:
        self.clock += timedelta(microseconds=step_us)  # created_at never goes back; 0 makes a tie
        for item in self.sim.add_analyses("t", n, severity=severity, created_at=self.clock):
            self.arrived[item["id"]] = severity

    def walk(self, max_pages: int, limit: int, during: dict[int, list[tuple[int, str, int]]] = {},  # noqa: B006
             bad_cursor: frozenset[int] = frozenset(), fail: int | None = None) -> stream.WalkResult:
        if self.snapshot.state.walk is None:
            self.must_have = set(self.arrived)
        calls = 0

        def fetch(params: dict[str, Any]) -> AnalysesPage:
            nonlocal calls
            index, calls = calls, calls + 1
            for arrival in during.get(index, []):
                self.arrive(*arrival)
            if "cursor" in params and index in bad_cursor:
                raise invalid_cursor()
            if index == fail:
                raise ServerError("t", "/analyses", "503", "boom", status=503)
            return parse_analyses_page(self.sim.stats("t", "analyses", **params))

        result = walk(fetch, self.snapshot.state, max_pages=max_pages, limit=limit)
        self.snapshot = stream.record(self.snapshot, result, self.cfg, NOW.timestamp())
        self.counted.update(a.id for a in result.counted)
        assert max(self.counted.values(), default=1) == 1, "an RCA was counted twice"
        assert set(self.counted) <= set(self.arrived), "an RCA that existed at start-up was counted"
        if result.complete and self.snapshot.state.primed:
            assert self.must_have <= set(self.counted), "a walk ended without counting what was there"
        return result

    def drain(self) -> None:
        """Finish the walk in progress, then one whole walk more: it started after every arrival."""
        for _ in range(2):
            for _ in range(100):
                if self.walk(max_pages=1000, limit=7).complete:
                    break
            else:
                raise AssertionError("the stream never caught up")

    def check_exact(self) -> None:
        assert self.counted == Counter(set(self.arrived))
        expected = Counter(self.arrived.values())
        assert self.snapshot.counts.totals == {(s,): expected[s] for s in SEVERITIES}


arrivals = st.tuples(st.integers(1, 4), st.sampled_from(SEVERITIES), st.sampled_from([0, 0, 1, 2, 1000]))
walks = st.fixed_dictionaries({
    "max_pages": st.integers(1, 3),
    "limit": st.integers(1, 4),
    "during": st.dictionaries(st.integers(0, 3), st.lists(arrivals, max_size=2), max_size=2),
    "bad_cursor": st.frozensets(st.integers(0, 3), max_size=2),
    "fail": st.none() | st.integers(0, 3),
})
schedules = st.lists(st.one_of(arrivals.map(lambda a: ("arrive", a)), walks.map(lambda w: ("walk", w))),
                     max_size=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules)
def test_every_rca_is_counted_exactly_once_under_any_arrival_schedule(schedule: list[tuple[str, Any]]
                                                                      ) -> None:
    model = Model()
    model.drain()  # the first walk: counts nothing
    assert model.counted == Counter()
    for kind, args in schedule:
        if kind == "arrive":
            model.arrive(*args)
        else:
            model.walk(**args)
    model.drain()
    model.check_exact()


def test_the_model_catches_a_stream_that_forgets_the_ids_at_the_watermark(monkeypatch: pytest.MonkeyPatch
                                                                          ) -> None:
    """The model test can fail: without the boundary ids, the inclusive `since` counts an RCA twice."""
    model = Model()
    model.drain()
    model.arrive(2, "high", 1)
    real = stream._completed
    monkeypatch.setattr(stream, "_completed", lambda *a: replace(real(*a), seen=frozenset()))
    model.walk(max_pages=5, limit=5)
    with pytest.raises(AssertionError, match="counted twice"):
        model.walk(max_pages=5, limit=5)


# --- the walker through the poller, against the simulator over loopback -------------------------------------

@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=5)
    simulator.add_tenant("acme", history_days=20, per_day=6)
    simulator.add_tenant("empty", history_days=0)
    with SimulatorServer(simulator) as server:
        yield simulator, server.url


def make_config(url: str, sim: Simulator, tenants: tuple[str, ...] = ("acme",), token: str | None = None,
                **defaults: Any) -> Config:
    data = {"defaults": {"base_url": url, "retries": 0, "timeout": "5s", **defaults},
            "tenants": [{"name": n, "token": token or sim.token(n)} for n in tenants]}
    return parse_config(data, environ={})


def make_poller(config: Config) -> tuple[Poller, ExporterMetrics]:
    store: Store = Store()
    metrics = ExporterMetrics(store)
    poller = Poller(store, metrics)
    poller.apply(config)
    return poller, metrics


def scrape(metrics: ExporterMetrics) -> tuple[str, dict]:
    text = generate_latest(metrics.registry).decode()
    return text, parse_metrics(text)


def totals(metrics: ExporterMetrics, tenant: str = "acme") -> dict[str, float]:
    return {dict(k)["severity"]: v
            for k, v in samples(scrape(metrics)[1], "exlogare_analyses_total", tenant=tenant).items()}


def analyses_requests(sim: Simulator) -> list[dict[str, str]]:
    return [r.query for r in sim.requests() if r.path == "/api/v1/analyses"]


def walked(poller: Poller, name: str = "acme") -> TenantStream:
    snapshot = poller.walk_stream(name)
    assert snapshot is not None
    return snapshot


def severities(items: list[dict[str, Any]]) -> Counter[str]:
    return Counter(i["severity"] for i in items)


def newest_at(simulator: Simulator, tenant: str = "acme") -> datetime:
    """created_at of the tenant's newest RCA: arrivals are stamped from there on, never older."""
    return datetime.fromisoformat(simulator.stats(tenant, "analyses", limit=1)["items"][0]["created_at"])


def test_counters_start_at_zero_and_an_idle_walk_is_one_request(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator, tenants=("acme", "empty")))
    assert totals(metrics) == dict.fromkeys(SEVERITIES, 0.0)  # before any walk: increase() works at once
    simulator.clear_requests()
    for name in ("acme", "empty"):
        assert walked(poller, name).state.primed
    newest = simulator.stats("acme", "analyses", limit=1)["items"][0]["created_at"]
    _, m = scrape(metrics)
    assert samples(m, "exlogare_latest_analysis_timestamp_seconds") == {
        (("tenant", "acme"),): datetime.fromisoformat(newest).timestamp()}
    assert len(analyses_requests(simulator)) == 2  # one each: the first walk stops at the first page
    simulator.clear_requests()
    for _ in range(3):
        for name in ("acme", "empty"):
            assert walked(poller, name).up
    queries = analyses_requests(simulator)
    assert len(queries) == 6 and not any("cursor" in q for q in queries)
    assert sum(q.get("since") == newest for q in queries) == 3 and sum("since" not in q for q in queries) == 3
    assert totals(metrics) == totals(metrics, "empty") == dict.fromkeys(SEVERITIES, 0.0)


def test_bursts_and_identical_timestamps_are_counted_exactly_per_severity(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator))
    walked(poller)
    newest = newest_at(simulator)
    added = simulator.add_analyses("acme", 3, severity="high", created_at=newest)  # at the watermark itself
    added += simulator.add_analyses("acme", 4, severity="low", created_at=newest + timedelta(seconds=1))
    walked(poller)
    added += simulator.add_analyses("acme", 2, severity="medium", created_at=newest + timedelta(seconds=1))
    walked(poller)
    walked(poller)  # idle
    added += simulator.add_analyses("acme", 6, created_at=newest + timedelta(seconds=2))
    walked(poller)
    assert totals(metrics) == {s: float(severities(added)[s]) for s in SEVERITIES}
    _, m = scrape(metrics)
    counts = {dict(k).get("le"): v for k, v in samples(m, "exlogare_analysis_confidence_bucket",
                                                        severity="high").items()}
    assert counts["+Inf"] == severities(added)["high"]
    assert samples(m, "exlogare_analysis_confidence_sum", tenant="acme", severity="low")[
        (("severity", "low"), ("tenant", "acme"))] == pytest.approx(
            sum(i["confidence"] for i in added if i["severity"] == "low"))


def test_a_backlog_larger_than_max_pages_continues_next_cycle_without_skipping(sim: tuple[Simulator, str]
                                                                               ) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator, analyses_max_pages=1))
    walked(poller)
    later = newest_at(simulator) + timedelta(seconds=1)
    added = simulator.add_analyses("acme", 1234, created_at=later)  # one timestamp, 3 pages
    simulator.clear_requests()
    first = walked(poller)
    assert first.catching_up and sum(totals(metrics).values()) == PAGE_LIMIT
    assert samples(scrape(metrics)[1], "exlogare_analyses_catching_up") == {(("tenant", "acme"),): 1.0}
    added += simulator.add_analyses("acme", 5, created_at=later)  # meanwhile, at the same microsecond
    added += simulator.add_analyses("acme", 7, created_at=later + timedelta(seconds=1))
    assert walked(poller).catching_up
    assert not walked(poller).catching_up
    # The 5 at the same microsecond got ids at random: those sorting below the cursor were on its pages.
    assert 1234 <= sum(totals(metrics).values()) <= 1234 + 5
    walked(poller)  # the fresh walk finds what arrived during the long one
    assert totals(metrics) == {s: float(severities(added)[s]) for s in SEVERITIES}
    assert [len(q) for q in analyses_requests(simulator)] == [2, 3, 3, 2]  # limit, since(, cursor)


def test_rcas_arriving_during_a_walk_are_counted_by_the_next_walk(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator))
    walked(poller)
    added = simulator.add_analyses("acme", 600, created_at=newest_at(simulator) + timedelta(microseconds=1))
    during: list[dict[str, Any]] = []
    simulator.add_trigger(lambda: during.extend(simulator.add_analyses("acme", 9)), tenant="acme",
                          endpoint="/analyses", param="cursor")
    simulator.clear_requests()
    walked(poller)
    assert len(during) == 9 and len(analyses_requests(simulator)) == 2
    assert totals(metrics) == {s: float(severities(added)[s]) for s in SEVERITIES}
    walked(poller)
    assert totals(metrics) == {s: float(severities(added + during)[s]) for s in SEVERITIES}


def test_an_invalid_cursor_resumes_from_the_watermark_without_double_counting(sim: tuple[Simulator, str]
                                                                              ) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator, analyses_max_pages=1))
    walked(poller)
    base = newest_at(simulator)
    added = []
    for i in range(1100):  # 1100 distinct timestamps, 3 pages
        added += simulator.add_analyses("acme", created_at=base + timedelta(microseconds=i))
    walked(poller)
    simulator.set_fault(tenant="acme", endpoint="/analyses", param="cursor", status=400,
                        body='{"detail": "Invalid cursor"}', count=1)
    simulator.clear_requests()
    assert walked(poller).up  # the refused cursor used the page; the walk goes on next cycle
    for _ in range(3):
        walked(poller)
    queries = analyses_requests(simulator)
    assert "cursor" in queries[0] and "until" in queries[1] and "cursor" not in queries[1]
    assert totals(metrics) == {s: float(severities(added)[s]) for s in SEVERITIES}
    assert samples(scrape(metrics)[1], "exlogare_upstream_requests_total", endpoint="analyses", code="400")


def test_a_failing_walk_keeps_its_counts_shows_in_health_and_logs_once(
        sim: tuple[Simulator, str], caplog: pytest.LogCaptureFixture) -> None:
    simulator, url = sim
    caplog.set_level(logging.INFO, logger="exlogare_exporter.stream")
    poller, metrics = make_poller(make_config(url, simulator))
    walked(poller)
    added = simulator.add_analyses("acme", 4)
    walked(poller)
    simulator.set_fault(tenant="acme", endpoint="/analyses", status=503)
    simulator.add_analyses("acme", 2)
    for _ in range(3):
        failed = walked(poller)
    assert not failed.up and failed.error_code == "503" and "503" in (failed.last_error or "")
    _, m = scrape(metrics)
    assert samples(m, "exlogare_analyses_stream_up") == {(("tenant", "acme"),): 0.0}
    assert samples(m, "exlogare_analyses_last_walk_success_timestamp_seconds", tenant="acme")
    assert sum(totals(metrics).values()) == len(added)
    simulator.clear_faults()
    assert walked(poller).up
    assert sum(totals(metrics).values()) == len(added) + 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("RCA stream failing" in msg for msg in messages) == 1
    assert sum("RCA stream recovered" in msg for msg in messages) == 1
    assert sum("RCA stream started" in msg for msg in messages) == 1


def test_labels_are_bounded_and_the_exposition_is_clean(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator, analyses_labels=["project", "source"],
                                              max_label_values=2))
    walked(poller)
    for project, source in [("a/one", "generic"), ("a/two", "github_app"), ("a/three", None),
                            (None, "gitlab_webhook"), ("a/one", "generic")]:
        simulator.add_analyses("acme", severity="high", project_path=project, project_id=None, source=source)
    walked(poller)
    text, m = scrape(metrics)
    got = {(dict(k)["project"], dict(k)["source"]): v
           for k, v in samples(m, "exlogare_analyses_total", tenant="acme").items()}
    assert got == {("a/one", "generic"): 2, ("a/two", "github_app"): 1, ("(other)", "(other)"): 2}
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                            timeout=30, check=False)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not output.strip(), output


def test_reload_restarts_the_stream_on_a_new_token_and_drops_removed_tenants(sim: tuple[Simulator, str]
                                                                             ) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator, tenants=("acme", "empty")))
    walked(poller)
    simulator.add_analyses("acme", 3, severity="low")
    walked(poller)
    poller.apply(make_config(url, simulator, tenants=("acme", "empty"), interval="20s"))  # unrelated change
    simulator.add_analyses("acme", 1, severity="low")
    walked(poller)
    assert totals(metrics)["low"] == 4
    simulator.add_token("acme", "exl_rotated")
    simulator.add_analyses("acme", 2, severity="low")  # arrived before the new token's first walk: old
    poller.apply(make_config(url, simulator, tenants=("acme", "empty"), token="exl_rotated"))
    assert not poller.streams.get("acme").state.primed  # type: ignore[union-attr]
    walked(poller)
    simulator.add_analyses("acme", 1, severity="low")
    walked(poller)
    assert totals(metrics)["low"] == 5  # never down, nothing old counted
    poller.apply(make_config(url, simulator, tenants=("acme",)))
    assert set(poller.streams.snapshot()) == {"acme"}
    assert {dict(k)["tenant"] for k in samples(scrape(metrics)[1], "exlogare_analyses_total")} == {"acme"}
    poller.apply(make_config(url, simulator, tenants=("acme",), analyses_interval=0))
    _, m = scrape(metrics)
    assert samples(m, "exlogare_analyses_total") == {} and samples(m, "exlogare_analyses_stream_up") == {}
    assert poller.walk_stream("acme") is None


def test_lookback_counts_the_recent_span_at_start(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    now = datetime.now(UTC)
    recent = simulator.add_analyses("empty", 2, severity="medium", created_at=now - timedelta(minutes=30))
    simulator.add_analyses("empty", 5, severity="medium", created_at=now - timedelta(hours=3))
    poller, metrics = make_poller(make_config(url, simulator, tenants=("empty",), analyses_lookback="1h"))
    walked(poller, "empty")
    assert totals(metrics, "empty")["medium"] == len(recent)


def test_a_reconfiguration_during_a_walk_discards_that_walk(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    poller, metrics = make_poller(make_config(url, simulator))
    walked(poller)
    simulator.add_analyses("acme", 3)
    simulator.add_trigger(lambda: poller.apply(make_config(url, simulator, interval="30s")), tenant="acme",
                          endpoint="/analyses")
    assert poller.walk_stream("acme") is None  # its answer described the old config
    assert sum(totals(metrics).values()) == 0
    walked(poller)
    assert sum(totals(metrics).values()) == 3


# --- the README's alert recipes -----------------------------------------------------------------------------

README_ALERT = 'increase(exlogare_analyses_total{severity="high"}[10m]) > 0'
HIGH = 'exlogare_analyses_total{severity="high"}'
README_LABELLED_ALERT = f"increase({HIGH}[10m]) > 0\nor\n({HIGH} unless {HIGH} offset 10m) > 0"
RECIPE_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'exlogare_analyses_total{tenant="a", severity="high"}'   # at 0 from the start
        values: '0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'exlogare_analyses_total{tenant="b", severity="high", project="p"}'  # born at 1
        values: '_ _ _ 1 1 1 1 1 1 1 1 1 1 1 1 1 1 2 2 2'
    alert_rule_test:
      - {eval_time: 5m, alertname: Plain, exp_alerts: [{exp_labels: {tenant: a, severity: high}}]}
      - eval_time: 5m
        alertname: Labelled
        exp_alerts:
          - exp_labels: {tenant: a, severity: high}
          - exp_labels: {tenant: b, severity: high, project: p}
      - {eval_time: 15m, alertname: Labelled, exp_alerts: []}
      - eval_time: 18m
        alertname: Labelled
        exp_alerts: [{exp_labels: {tenant: b, severity: high, project: p}}]
"""


def test_the_readme_alert_recipes_do_what_the_readme_says(tmp_path: Any) -> None:
    """The plain recipe sees the first RCA of a zero-started counter but not a newly born labelled series;
    the labelled recipe sees both, and stops when nothing new arrived for 10 minutes."""
    readme = (ROOT / "README.md").read_text()
    assert README_ALERT in readme and README_LABELLED_ALERT in readme.replace("\n  ", "\n")
    promtool = require_tool("promtool")
    rules = {"groups": [{"name": "recipes", "rules": [{"alert": "Plain", "expr": README_ALERT},
                                                      {"alert": "Labelled", "expr": README_LABELLED_ALERT}]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))
    (tmp_path / "test.yml").write_text(RECIPE_TESTS)
    result = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_the_scheduler_runs_one_stream_job_per_tenant_and_reload_removes_it(sim: tuple[Simulator, str]
                                                                            ) -> None:
    simulator, url = sim
    poller, _ = make_poller(make_config(url, simulator, tenants=("acme", "empty"), analyses_interval="1s"))
    poller.start()
    try:
        scheduler = poller._scheduler
        assert scheduler is not None

        def jobs() -> set[str]:
            return {job.id for job in scheduler.get_jobs()}

        assert jobs() == {"acme", "acme:analyses", "empty", "empty:analyses"}
        simulator.clear_requests()
        wait_until(lambda: len(analyses_requests(simulator)) >= 4, what="scheduled walks")
        assert all(s.up for s in poller.streams.snapshot().values())
        poller.apply(make_config(url, simulator, tenants=("acme", "empty"), analyses_interval="1s",
                                 analyses_max_pages=3))
        poller.apply(make_config(url, simulator, tenants=("acme",), analyses_interval=0))
        assert jobs() == {"acme"} and dict(poller.streams.snapshot()) == {}
    finally:
        poller.stop(wait=5)
