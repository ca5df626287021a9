"""The simulator against every row of the Read API v1 contract, through real HTTP on loopback."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from exlogare_exporter.simulator import (
    ApiError,
    Arrivals,
    Simulator,
    SimulatorServer,
    demo_simulator,
)

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
RCA_FIELDS = {
    "id", "provider", "source", "ci_run_id", "ci_job_id", "project_id", "project_path", "project_web_url",
    "pipeline_url", "job_url", "mr_iid", "root_cause", "explanation", "fix_suggestion", "severity",
    "confidence", "created_at",
}
NEVER_NULL = {"id", "provider", "ci_run_id", "root_cause", "explanation", "fix_suggestion", "severity",
              "confidence", "created_at"}
ROOT = Path(__file__).resolve().parent.parent


def build_sim() -> Simulator:
    s = Simulator(seed=7, clock=lambda: NOW)
    s.add_tenant("acme", history_days=200, per_day=20)
    s.add_tenant("lab", history_days=120, per_day=4)
    s.add_tenant("quiet", history_days=90, per_day=2, quiet_days=14)
    s.add_tenant("fresh", history_days=0)  # no history: tests add exactly what they need
    return s


@pytest.fixture
def sim() -> Simulator:
    return build_sim()


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim, threads=8) as srv:
        yield srv


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


class Api:
    """Small helper: GET a read-API path as a tenant."""

    def __init__(self, server: SimulatorServer, http: requests.Session) -> None:
        self.server = server
        self.http = http

    def get(self, path: str, tenant: str | None = "fresh", token: str | None = None, **params: Any
            ) -> requests.Response:
        headers = {}
        if token is None and tenant is not None:
            token = self.server.sim.token(tenant)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.get(f"{self.server.url}/api/v1{path}", params=params, headers=headers, timeout=10)

    def ok(self, path: str, tenant: str = "fresh", **params: Any) -> Any:
        r = self.get(path, tenant, **params)
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"] == "application/json"
        return r.json()

    def walk(self, tenant: str = "fresh", **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = params.pop("cursor", None)
        for _ in range(10_000):
            page = self.ok("/analyses", tenant, **params, **({"cursor": cursor} if cursor else {}))
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items
        raise AssertionError("the walk never ended")


@pytest.fixture
def api(server: SimulatorServer, http: requests.Session) -> Api:
    return Api(server, http)


@pytest.fixture(scope="module")
def ro() -> Iterator[Api]:
    """A shared server for tests that only read (they must not change its state)."""
    with SimulatorServer(build_sim(), threads=8) as srv, requests.Session() as session:
        yield Api(srv, session)


def order_key(item: dict[str, Any]) -> tuple[datetime, str]:
    return datetime.fromisoformat(item["created_at"]), item["id"]


# -- authentication ----------------------------------------------------------------------------------

ENDPOINTS = ["/analyses", f"/analyses/{uuid.uuid4()}", "/stats/overview", "/stats/timeseries",
             "/stats/top-projects", "/stats/top-root-causes"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_missing_token_is_401_on_every_endpoint(ro: Api, path: str) -> None:
    r = ro.get(path, tenant=None)
    assert r.status_code == 401
    assert r.json() == {"detail": "Missing token"}
    assert r.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("header", "detail"), [
    ("Basic dXNlcjpwdw==", "Missing token"),
    ("Bearer ", "Missing token"),
    ("Bearer not-an-exl-token", "Malformed token"),
    ("Bearer eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", "Invalid signature"),
    ("Bearer exl_unknown_token", "Invalid or revoked API token"),
])
def test_bad_tokens_are_401_with_their_detail(ro: Api, header: str, detail: str) -> None:
    r = ro.http.get(f"{ro.server.url}/api/v1/stats/overview", headers={"Authorization": header}, timeout=10)
    assert r.status_code == 401
    assert r.json() == {"detail": detail}


def test_ingest_only_token_is_403_missing_scope(ro: Api) -> None:
    r = ro.get("/stats/overview", token=ro.server.sim.token("acme", "ingest"))
    assert r.status_code == 403
    assert r.json() == {"detail": "Missing scope: read"}


def test_read_token_and_added_tokens(api: Api, sim: Simulator) -> None:
    assert api.get("/stats/overview", "acme").status_code == 200
    sim.add_token("lab", "exl_custom_lab", scopes=("read", "ingest"))
    sim.add_token("lab", "exl_custom_lab_ingest", scopes=("ingest",))
    assert api.get("/stats/overview", token="exl_custom_lab").status_code == 200
    assert api.get("/stats/overview", token="exl_custom_lab_ingest").status_code == 403
    assert sim.token("acme") == "exl_sim_acme_read"
    assert sim.token("acme", "ingest") == "exl_sim_acme_ingest"


def test_revoked_token_is_401(api: Api, sim: Simulator) -> None:
    assert api.get("/stats/overview", "lab").status_code == 200
    sim.revoke(sim.token("lab"))
    r = api.get("/stats/overview", "lab")
    assert r.status_code == 401
    assert r.json() == {"detail": "Invalid or revoked API token"}
    assert api.get("/stats/overview", "acme").status_code == 200  # other tenants unaffected


# -- validation: 422 and 400 -------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "params", "loc", "kind"), [
    ("/stats/overview", {"days": "0"}, ["query", "days"], "greater_than_equal"),
    ("/stats/overview", {"days": "366"}, ["query", "days"], "less_than_equal"),
    ("/stats/overview", {"days": "seven"}, ["query", "days"], "int_parsing"),
    ("/stats/overview", {"days": "7.5"}, ["query", "days"], "int_parsing"),
    ("/stats/timeseries", {"days": "181"}, ["query", "days"], "less_than_equal"),
    ("/stats/timeseries", {"days": "0"}, ["query", "days"], "greater_than_equal"),
    ("/stats/top-projects", {"days": "181"}, ["query", "days"], "less_than_equal"),
    ("/stats/top-projects", {"limit": "0"}, ["query", "limit"], "greater_than_equal"),
    ("/stats/top-projects", {"limit": "51"}, ["query", "limit"], "less_than_equal"),
    ("/stats/top-root-causes", {"days": "181"}, ["query", "days"], "less_than_equal"),
    ("/stats/top-root-causes", {"limit": "51"}, ["query", "limit"], "less_than_equal"),
    ("/stats/top-root-causes", {"limit": "ten"}, ["query", "limit"], "int_parsing"),
    ("/analyses", {"limit": "0"}, ["query", "limit"], "greater_than_equal"),
    ("/analyses", {"limit": "501"}, ["query", "limit"], "less_than_equal"),
    ("/analyses", {"since": "yesterday"}, ["query", "since"], None),
    ("/analyses", {"until": "2026-13-45T99:00:00"}, ["query", "until"], None),
    ("/analyses/not-a-uuid", {}, ["path", "analysis_id"], "uuid_parsing"),
])
def test_range_and_type_errors_are_422_fastapi_shaped(ro: Api, path: str, params: dict[str, str],
                                                      loc: list[str], kind: str | None) -> None:
    r = ro.get(path, "acme", **params)
    assert r.status_code == 422, r.text
    assert r.headers["Content-Type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, list) and len(detail) == 1
    assert detail[0]["loc"] == loc
    assert isinstance(detail[0]["msg"], str) and detail[0]["msg"]
    assert isinstance(detail[0]["type"], str) and detail[0]["type"]
    if kind is not None:
        assert detail[0]["type"] == kind


def test_422_lists_every_bad_parameter(ro: Api) -> None:
    r = ro.get("/stats/top-projects", "acme", days="0", limit="99")
    assert r.status_code == 422
    assert [d["loc"] for d in r.json()["detail"]] == [["query", "days"], ["query", "limit"]]


@pytest.mark.parametrize(("path", "params"), [
    ("/stats/overview", {"days": "365"}), ("/stats/overview", {"days": "1"}),
    ("/stats/timeseries", {"days": "180"}), ("/stats/top-projects", {"days": "180", "limit": "50"}),
    ("/stats/top-root-causes", {"days": "180", "limit": "1"}), ("/analyses", {"limit": "500"}),
    ("/analyses", {"limit": "1"}),
])
def test_bounds_themselves_are_accepted(ro: Api, path: str, params: dict[str, str]) -> None:
    assert ro.get(path, "acme", **params).status_code == 200


@pytest.mark.parametrize(("params", "detail"), [
    ({"cursor": "not a cursor!"}, "Invalid cursor"),
    ({"cursor": base64.urlsafe_b64encode(b"[1, 2]").decode()}, "Invalid cursor"),
    ({"cursor": base64.urlsafe_b64encode(b'{"t": "x", "id": "y"}').decode()}, "Invalid cursor"),
    ({"since": "2026-05-02T00:00:00Z", "until": "2026-05-01T00:00:00Z"}, None),
    ({"since": "2025-05-01T00:00:00Z", "until": "2026-05-02T00:00:00Z"}, None),
    ({"severity": "HIGH"}, None),
    ({"severity": "critical"}, None),
    ({"severity": ""}, None),
])
def test_semantic_errors_are_400_with_a_detail_string(ro: Api, params: dict[str, str],
                                                      detail: str | None) -> None:
    r = ro.get("/analyses", "acme", **params)
    assert r.status_code == 400, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    if detail is not None:
        assert body["detail"] == detail


def test_a_window_of_exactly_365_days_is_accepted(ro: Api) -> None:
    r = ro.get("/analyses", "acme", since="2025-05-01T00:00:00Z", until="2026-05-01T00:00:00Z")
    assert r.status_code == 200


def test_unknown_paths_404_other_methods_405_unknown_params_ignored(api: Api, server: SimulatorServer,
                                                                    http: requests.Session) -> None:
    for path in ("/api/v1/nope", "/api/v2/stats/overview", "/api/v1/stats", "/"):
        r = http.get(server.url + path, headers={"Authorization": "Bearer exl_sim_acme_read"}, timeout=10)
        assert r.status_code == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = http.request(method, f"{server.url}/api/v1/analyses", timeout=10,
                         headers={"Authorization": "Bearer exl_sim_acme_read"})
        assert r.status_code == 405
        assert r.json() == {"detail": "Method Not Allowed"}
    assert api.ok("/stats/overview", "acme", days=7, bogus="x") == api.ok("/stats/overview", "acme", days=7)


# -- /analyses and /analyses/{id} --------------------------------------------------------------------

def test_items_have_exactly_the_contract_fields(ro: Api) -> None:
    page = ro.ok("/analyses", "acme", limit=200)
    assert page["limit"] == 200 and len(page["items"]) == 200 and page["next_cursor"]
    for item in page["items"]:
        assert set(item) == RCA_FIELDS
        assert all(item[k] is not None for k in NEVER_NULL)
        assert item["severity"] in ("low", "medium", "high")
        assert 0 <= item["confidence"] <= 1
        assert str(uuid.UUID(item["id"])) == item["id"]
        assert item["created_at"].endswith("+00:00")
    assert ro.ok("/analyses", "acme")["limit"] == 100


def test_one_analysis_by_id_and_404_for_other_tenants(api: Api, sim: Simulator) -> None:
    [mine] = sim.add_analyses("fresh", root_cause="x")
    assert api.ok(f"/analyses/{mine['id']}") == mine
    assert api.ok(f"/analyses/{mine['id'].upper()}") == mine  # a UUID in any spelling
    other = api.get(f"/analyses/{mine['id']}", "lab")
    assert other.status_code == 404 and other.json() == {"detail": "Not found"}
    unknown = api.get(f"/analyses/{uuid.uuid4()}")
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Not found"}


def test_cursor_walk_returns_every_rca_once_in_order(api: Api, sim: Simulator) -> None:
    shared = NOW - timedelta(hours=3)
    created = sim.add_analyses("fresh", 60, created_at=shared)  # one created_at for 60 RCAs
    for i in range(40):
        created += sim.add_analyses("fresh", created_at=NOW - timedelta(minutes=7 * i, microseconds=i))
    created += sim.add_analyses("fresh", 5, created_at=NOW - timedelta(days=30))
    walked = api.walk(limit=7)
    assert [i["id"] for i in walked] == [i["id"] for i in sorted(created, key=order_key, reverse=True)]
    assert len({i["id"] for i in walked}) == len(created) == 105


def test_next_cursor_is_null_when_the_last_page_is_full(api: Api, sim: Simulator) -> None:
    sim.add_analyses("fresh", 10, created_at=NOW - timedelta(minutes=1))
    first = api.ok("/analyses", limit=5)
    assert first["next_cursor"] is not None
    second = api.ok("/analyses", limit=5, cursor=first["next_cursor"])
    assert len(second["items"]) == 5 and second["next_cursor"] is None


def test_new_rcas_do_not_shift_a_walk_in_progress(api: Api, sim: Simulator) -> None:
    before = sim.add_analyses("fresh", 12, created_at=NOW - timedelta(hours=1))
    first = api.ok("/analyses", limit=5)
    sim.add_analyses("fresh", 3, created_at=NOW)
    rest = api.walk(cursor=first["next_cursor"], limit=5)
    assert {i["id"] for i in first["items"] + rest} == {i["id"] for i in before}
    assert len(first["items"] + rest) == 12


def test_since_and_until_are_inclusive(api: Api, sim: Simulator) -> None:
    times = [NOW - timedelta(hours=h) for h in (3, 2, 1)]
    ids = [sim.add_analyses("fresh", created_at=t)[0]["id"] for t in times]

    def got(**params: Any) -> list[str]:
        return [i["id"] for i in api.walk(**params)]

    assert got(since=times[0].isoformat(), until=times[2].isoformat()) == ids[::-1]
    assert got(since=times[1].isoformat()) == [ids[2], ids[1]]
    assert got(until=times[1].isoformat()) == [ids[1], ids[0]]
    assert got(since=times[1].isoformat(), until=times[1].isoformat()) == [ids[1]]


def test_the_three_created_at_forms_and_naive_times_are_accepted(api: Api, sim: Simulator) -> None:
    on_second = datetime(2026, 5, 31, 8, 30, 0, tzinfo=UTC)
    with_fraction = datetime(2026, 5, 31, 9, 30, 0, 250000, tzinfo=UTC)
    [a] = sim.add_analyses("fresh", created_at=on_second)
    [b] = sim.add_analyses("fresh", created_at=with_fraction)
    assert a["created_at"] == "2026-05-31T08:30:00+00:00"  # fraction dropped when zero
    assert b["created_at"] == "2026-05-31T09:30:00.250000+00:00"
    spellings = ["2026-05-31T08:30:00+00:00", "2026-05-31T08:30:00Z", "2026-05-31T08:30:00.000000+00:00",
                 "2026-05-31T08:30:00.000000Z", "2026-05-31T08:30:00", "2026-05-31T10:30:00+02:00"]
    for spelling in spellings:
        assert [i["id"] for i in api.walk(since=spelling)] == [b["id"], a["id"]], spelling
        assert [i["id"] for i in api.walk(until=spelling)] == [a["id"]], spelling
    # the server's own spelling with a fraction round-trips too
    assert [i["id"] for i in api.walk(since=b["created_at"])] == [b["id"]]


def test_filters_severity_project_source(api: Api, sim: Simulator) -> None:
    sim.add_analyses("fresh", 2, severity="high", project_path="g/api", project_id="11", source="github_app")
    sim.add_analyses("fresh", 3, severity="low", project_path=None, project_id=None, source="generic")
    assert {i["severity"] for i in api.walk(severity="high")} == {"high"}
    assert len(api.walk(severity="high")) == 2
    assert len(api.walk(severity="medium")) == 0
    assert len(api.walk(project="g/api")) == 2 and len(api.walk(project="11")) == 2
    assert len(api.walk(source="generic")) == 3
    assert len(api.walk(source="generic", severity="high")) == 0


# -- stats -------------------------------------------------------------------------------------------

def test_overview_counts_percentiles_and_severity_subset(api: Api, sim: Simulator) -> None:
    for ttr in (10, 20, 30, 40):
        sim.add_analyses("fresh", severity="high", time_to_rca=ttr, created_at=NOW - timedelta(hours=1))
    sim.add_failures("fresh", 2, received_at=NOW - timedelta(hours=2))
    sim.add_analyses("fresh", severity="low", created_at=NOW - timedelta(days=20))
    week = api.ok("/stats/overview", days=7)
    assert week == {
        "failures_detected": 6, "analyses_completed": 4, "rca_count": 4, "severity_counts": {"high": 4},
        "avg_time_to_rca_seconds": 25.0, "p50_time_to_rca_seconds": 25.0, "p90_time_to_rca_seconds": 37.0,
        "window_days": 7,
    }
    month = api.ok("/stats/overview", days=30)
    assert month["severity_counts"] == {"low": 1, "high": 4}
    assert month["window_days"] == 30 and month["analyses_completed"] == 5
    assert api.ok("/stats/overview")["window_days"] == 30  # default


def test_overview_of_an_empty_window_has_nulls_and_empty_counts(ro: Api) -> None:
    for days in (1, 7):
        body = ro.ok("/stats/overview", "quiet", days=days)
        assert body == {
            "failures_detected": 0, "analyses_completed": 0, "rca_count": 0, "severity_counts": {},
            "avg_time_to_rca_seconds": None, "p50_time_to_rca_seconds": None,
            "p90_time_to_rca_seconds": None, "window_days": days,
        }
    month = ro.ok("/stats/overview", "quiet", days=60)
    assert month["failures_detected"] > month["analyses_completed"] > 0
    assert month["p50_time_to_rca_seconds"] is not None


def test_demo_simulator_quiet_tenant_is_empty_in_recent_windows() -> None:
    demo = demo_simulator()
    assert set(demo.tenants()) == {"acme", "lab", "quiet"}
    for days in (1, 7):
        body = demo.stats("quiet", "overview", days=days)
        assert body["severity_counts"] == {} and body["p90_time_to_rca_seconds"] is None
        assert demo.stats("quiet", "timeseries", days=days) == []
    acme, lab = demo.stats("acme", "overview", days=30), demo.stats("lab", "overview", days=30)
    assert acme["failures_detected"] > lab["failures_detected"] > 0


def test_timeseries_omits_days_without_failures(api: Api, sim: Simulator) -> None:
    sim.add_failures("fresh", 2, received_at=NOW - timedelta(days=3))
    sim.add_analyses("fresh", created_at=NOW - timedelta(days=1), time_to_rca=1)
    sim.add_failures("fresh", 1, received_at=NOW - timedelta(days=40))
    assert api.ok("/stats/timeseries", days=7) == [
        {"date": "2026-05-29", "failures": 2}, {"date": "2026-05-31", "failures": 1}]
    assert api.ok("/stats/timeseries", "quiet", days=7) == []


def test_timeseries_agrees_with_the_overview_on_seeded_data(ro: Api) -> None:
    series = ro.ok("/stats/timeseries", "acme", days=90)
    dates = [e["date"] for e in series]
    assert dates == sorted(dates) and len(set(dates)) == len(dates)
    assert all(e["failures"] > 0 for e in series)
    assert len(series) < 91  # the seeded history has days off
    overview = ro.ok("/stats/overview", "acme", days=90)
    assert sum(e["failures"] for e in series) == overview["failures_detected"]
    assert overview["failures_detected"] > overview["analyses_completed"]


def test_top_root_causes_cluster_by_case_120_chars_and_severity(api: Api, sim: Simulator) -> None:
    head = "x" * 120
    at = NOW - timedelta(hours=5)
    sim.add_analyses("fresh", 2, root_cause="Disk full on /var", severity="high", created_at=at)
    sim.add_analyses("fresh", 1, root_cause="  DISK FULL on /VAR ", severity="high",
                     created_at=at + timedelta(minutes=1))
    sim.add_analyses("fresh", 1, root_cause="disk full on /var", severity="low", created_at=at)
    sim.add_analyses("fresh", 1, root_cause=head + " tail one", severity="medium", created_at=at)
    sim.add_analyses("fresh", 1, root_cause=head + " tail two", severity="medium",
                     created_at=at + timedelta(minutes=2))
    sim.add_analyses("fresh", 1, root_cause="", severity="low", created_at=at)
    rows = api.ok("/stats/top-root-causes", days=1)
    assert rows == [
        {"root_cause": "  DISK FULL on /VAR ", "severity": "high", "count": 3},  # newest member's text
        {"root_cause": head, "severity": "medium", "count": 2},
        {"root_cause": "(unknown)", "severity": "low", "count": 1},
        {"root_cause": "disk full on /var", "severity": "low", "count": 1},
    ]
    assert len(api.ok("/stats/top-root-causes", days=1, limit=2)) == 2


def test_seeded_root_causes_exercise_every_edge(ro: Api) -> None:
    rows = ro.ok("/stats/top-root-causes", "acme", days=180, limit=50)
    texts = [r["root_cause"] for r in rows]
    assert "(unknown)" in texts
    assert any("\n" in t for t in texts) and any("\\" in t and '"' in t for t in texts)
    assert any(not t.isascii() for t in texts)
    assert any(len(t) == 120 for t in texts)
    keys = [(t[:120].strip().lower(), r["severity"]) for t, r in zip(texts, rows, strict=True)]
    assert len(keys) == len(set(keys))  # one row per cluster
    lowered = [t.lower() for t in texts]
    assert any(lowered.count(t) > 1 for t in lowered)  # same text (up to case) under two severities
    counts = [r["count"] for r in rows]
    assert counts == sorted(counts, reverse=True)


def test_top_projects_with_null_ids_and_paths(api: Api, sim: Simulator) -> None:
    at = NOW - timedelta(hours=1)
    sim.add_analyses("fresh", 3, project_path="team/api", project_id="42", created_at=at)
    sim.add_failures("fresh", 2, project_path="team/api", project_id="42", received_at=at)
    sim.add_failures("fresh", 4, project_path=None, project_id=None, source="generic", received_at=at)
    sim.add_analyses("fresh", 2, project_path=None, project_id="77", created_at=at)
    rows = api.ok("/stats/top-projects", days=7)
    assert rows == [
        {"project_id": "42", "project_path": "team/api", "failures": 5, "analyses": 3},
        {"project_id": None, "project_path": None, "failures": 4, "analyses": 0},
        {"project_id": "77", "project_path": None, "failures": 2, "analyses": 2},
    ]
    assert api.ok("/stats/top-projects", days=7, limit=1) == rows[:1]
    seeded = api.ok("/stats/top-projects", "acme", days=180, limit=50)
    assert {"project_id": None, "project_path": None} in [
        {k: r[k] for k in ("project_id", "project_path")} for r in seeded]


def test_stats_defaults(ro: Api) -> None:
    assert ro.ok("/stats/overview", "acme")["window_days"] == 30
    top = ro.ok("/stats/top-root-causes", "acme")
    assert len(top) == 10 and top == ro.ok("/stats/top-root-causes", "acme", days=30, limit=10)
    assert ro.ok("/stats/top-projects", "acme") == ro.ok("/stats/top-projects", "acme", days=30, limit=10)
    assert ro.ok("/stats/timeseries", "acme") == ro.ok("/stats/timeseries", "acme", days=30)


def test_concurrent_reads_while_rcas_arrive(server: SimulatorServer, sim: Simulator) -> None:
    errors: list[str] = []

    def reader() -> None:
        with requests.Session() as session:
            worker = Api(server, session)
            for _ in range(15):
                for path in ("/stats/overview", "/analyses", "/stats/top-root-causes"):
                    r = worker.get(path, "acme", days=7) if path != "/analyses" else worker.get(path, "acme")
                    if r.status_code != 200:
                        errors.append(f"{path}: {r.status_code}")

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for i in range(100):
        sim.add_analyses("acme", created_at=NOW - timedelta(seconds=i))
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert not any(t.is_alive() for t in threads)
    assert len(sim.requests()) == 6 * 15 * 3


def test_python_stats_match_http_answers(api: Api, sim: Simulator) -> None:
    pairs = (("overview", "/stats/overview"), ("timeseries", "/stats/timeseries"),
             ("top-projects", "/stats/top-projects"), ("top_root_causes", "/stats/top-root-causes"))
    for kind, path in pairs:
        assert sim.stats("acme", kind, days=30) == api.ok(path, "acme", days=30)
    assert sim.stats("acme", "analyses", limit=3) == api.ok("/analyses", "acme", limit=3)
    with pytest.raises(ApiError) as err:
        sim.stats("acme", "timeseries", days=181)
    assert err.value.status == 422


def test_seed_makes_data_deterministic() -> None:
    def build(seed: int) -> Any:
        s = Simulator(seed=seed, clock=lambda: NOW)
        s.add_tenant("t", history_days=20, per_day=5)
        return s.stats("t", "analyses", limit=500)

    assert build(3) == build(3)
    assert build(3) != build(4)


def test_a_thousand_small_tenants_build_quickly() -> None:
    started = time.perf_counter()
    s = Simulator(seed=2, clock=lambda: NOW)
    for i in range(300):
        s.add_tenant(f"t{i:04d}", history_days=30, per_day=7)
    assert time.perf_counter() - started < 5.0  # ~1 s here; 1000 tenants take about 3 s
    assert 150 < s.stats("t0007", "overview", days=30)["failures_detected"] < 300


# -- faults, latency, request log --------------------------------------------------------------------

def test_5xx_fault_with_count(api: Api, sim: Simulator) -> None:
    sim.set_fault(endpoint="/stats/overview", status=503, count=2)
    assert [api.get("/stats/overview", "acme").status_code for _ in range(3)] == [503, 503, 200]
    sim.set_fault(status=502, body="<html><body>Bad gateway</body></html>", content_type="text/html")
    r = api.get("/stats/timeseries", "acme")
    assert r.status_code == 502 and r.headers["Content-Type"] == "text/html" and "<html>" in r.text
    sim.clear_faults()
    assert api.get("/stats/timeseries", "acme").status_code == 200


def test_429_with_retry_after_and_tenant_scope(api: Api, sim: Simulator) -> None:
    sim.set_fault(tenant="acme", status=429, headers={"Retry-After": "7"})
    r = api.get("/analyses", "acme")
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert api.get("/analyses", "lab").status_code == 200


def test_broken_200_answers(api: Api, sim: Simulator) -> None:
    sim.set_fault(endpoint="/stats/top-projects", status=200, body="<!doctype html><h1>Login</h1>",
                  content_type="text/html; charset=utf-8", count=1)
    sim.set_fault(endpoint="/stats/overview", status=200, body='{"failures_detected": 4', count=1)
    sim.set_fault(endpoint="/stats/timeseries", status=200, count=1)
    html = api.get("/stats/top-projects", "acme")
    assert html.status_code == 200 and html.headers["Content-Type"].startswith("text/html")
    truncated = api.get("/stats/overview", "acme")
    assert truncated.status_code == 200
    with pytest.raises(ValueError):
        truncated.json()
    empty = api.get("/stats/timeseries", "acme")
    assert empty.status_code == 200 and empty.content == b""
    assert isinstance(api.ok("/stats/top-projects", "acme"), list)  # count used up


def test_latency_fault_and_global_latency(api: Api, sim: Simulator) -> None:
    sim.set_fault(endpoint="/stats/overview", status=None, latency=0.3, count=1)
    started = time.perf_counter()
    assert api.ok("/stats/overview", "acme")["window_days"] == 30
    assert time.perf_counter() - started >= 0.3
    started = time.perf_counter()
    api.ok("/stats/overview", "acme")
    assert time.perf_counter() - started < 0.3
    sim.set_latency(0.2)
    started = time.perf_counter()
    api.ok("/stats/timeseries", "acme")
    assert time.perf_counter() - started >= 0.2


def test_first_matching_fault_wins(api: Api, sim: Simulator) -> None:
    sim.set_fault(endpoint="/analyses/{id}", status=500, count=1)
    sim.set_fault(status=503)
    assert api.get(f"/analyses/{uuid.uuid4()}", "acme").status_code == 500
    assert api.get(f"/analyses/{uuid.uuid4()}", "acme").status_code == 503
    assert api.get("/stats/overview", "acme").status_code == 503


def test_triggers_and_param_faults_act_between_two_pages_of_a_walk(
        api: Api, sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    sim.add_analyses("fresh", 8, created_at=NOW - timedelta(hours=1))
    sim.add_trigger(lambda: sim.add_analyses("fresh", 2, created_at=NOW), endpoint="/api/v1/analyses",
                    param="cursor")
    first = api.ok("/analyses", limit=5)
    assert sim.stats("fresh", "overview", days=1)["rca_count"] == 8  # no cursor: the trigger waits
    second = api.ok("/analyses", limit=5, cursor=first["next_cursor"])
    assert sim.stats("fresh", "overview", days=1)["rca_count"] == 10  # fired before the answer ...
    assert len(first["items"] + second["items"]) == 8  # ... which the keyset cursor keeps out
    assert len(api.walk(limit=5)) == 10  # fired once only

    sim.set_fault(endpoint="/analyses", param="cursor", status=400, body='{"detail": "Invalid cursor"}')
    assert api.get("/analyses", limit=5).status_code == 200
    assert api.get("/analyses", limit=5, cursor=first["next_cursor"]).json() == {"detail": "Invalid cursor"}
    sim.clear_faults()

    base = f"{server.url}/_sim"
    trigger = {"tenant": "fresh", "endpoint": "/analyses", "param": "cursor",
               "add_analyses": {"count": 3, "severity": "high", "created_at": NOW.isoformat()}}
    assert http.post(f"{base}/triggers", json=trigger, timeout=10).status_code == 200
    before = {i["id"] for i in api.walk(limit=500)}
    api.ok("/analyses", limit=5, cursor=first["next_cursor"])
    added = [i for i in api.walk(limit=500) if i["id"] not in before]
    assert [i["severity"] for i in added] == ["high"] * 3
    assert http.post(f"{base}/triggers", json={**trigger, "count": None}, timeout=10).status_code == 200
    assert http.delete(f"{base}/triggers", timeout=10).status_code == 200
    api.ok("/analyses", limit=5, cursor=first["next_cursor"])
    assert len(api.walk(limit=500)) == 13
    bad = http.post(f"{base}/triggers", json={"tenant": "nobody", "add_analyses": {}}, timeout=10)
    assert bad.status_code == 404


def test_request_log(api: Api, sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    sim.clear_requests()
    api.get("/stats/overview", "acme", days=7)
    api.get("/stats/overview", tenant=None)
    http.get(f"{server.url}/_sim/health", timeout=10)
    records = sim.requests()
    assert [(r.method, r.path, r.query, r.tenant, r.status) for r in records] == [
        ("GET", "/api/v1/stats/overview", {"days": "7"}, "acme", 200),
        ("GET", "/api/v1/stats/overview", {}, None, 401),
    ]
    assert records[0].at <= records[1].at <= time.time()
    sim.clear_requests()
    assert sim.requests() == []


def test_freeze_moves_the_windows(api: Api, sim: Simulator) -> None:
    sim.add_analyses("fresh", severity="medium", created_at=NOW - timedelta(hours=1))
    assert api.ok("/stats/overview", days=1)["rca_count"] == 1
    sim.freeze(NOW + timedelta(days=2))
    assert api.ok("/stats/overview", days=1)["rca_count"] == 0
    assert sim.now() == NOW + timedelta(days=2)
    sim.freeze(None)
    assert sim.now() == NOW


def test_arrivals_add_rcas(sim: Simulator) -> None:
    before = sim.stats("fresh", "overview", days=1)["rca_count"]
    added = Arrivals(sim, 600.0, tenants=["fresh"], seed=3).step(60.0)
    assert added > 400
    assert sim.stats("fresh", "overview", days=1)["rca_count"] == before + added


# -- control API -------------------------------------------------------------------------------------

def test_control_api(server: SimulatorServer, http: requests.Session, api: Api) -> None:
    base = f"{server.url}/_sim"
    assert http.get(f"{base}/health", timeout=10).json()["status"] == "ok"
    tenants = http.get(f"{base}/tenants", timeout=10).json()
    assert set(tenants) == {"acme", "lab", "quiet", "fresh"}
    assert tenants["acme"]["tokens"] == {"read": "exl_sim_acme_read", "ingest": "exl_sim_acme_ingest"}
    assert {"token": "exl_sim_acme_ingest", "scopes": ["ingest"]} in tenants["acme"]["active_tokens"]

    r = http.post(f"{base}/tenants/fresh/analyses", timeout=10, json={
        "count": 2, "severity": "high", "created_at": "2026-06-01T11:00:00Z", "project_path": None,
        "source": "generic", "root_cause": "Kaboom \"quoted\"\n"})
    items = r.json()["items"]
    assert r.status_code == 200 and len(items) == 2
    assert items[0]["created_at"] == "2026-06-01T11:00:00+00:00" and items[0]["project_path"] is None
    assert api.ok(f"/analyses/{items[1]['id']}") == items[1]

    assert http.post(f"{base}/failures/fresh", json={"count": 3}, timeout=10).status_code == 200
    assert api.ok("/stats/overview", days=1)["failures_detected"] == 5

    http.post(f"{base}/faults", json={"status": 429, "headers": {"Retry-After": "1"}, "count": 1}, timeout=10)
    assert api.get("/stats/overview").status_code == 429
    http.post(f"{base}/faults", json={"status": 500}, timeout=10)
    assert api.get("/stats/overview").status_code == 500
    http.delete(f"{base}/faults", timeout=10)
    assert api.get("/stats/overview").status_code == 200

    http.post(f"{base}/latency", json={"seconds": 0.2}, timeout=10)
    started = time.perf_counter()
    api.get("/stats/overview")
    assert time.perf_counter() - started >= 0.2
    http.post(f"{base}/latency", json={"seconds": 0}, timeout=10)

    clock = http.post(f"{base}/clock", json={"now": "2026-06-10T00:00:00Z"}, timeout=10).json()
    assert clock["now"] == "2026-06-10T00:00:00+00:00"
    assert api.ok("/stats/overview", days=1)["failures_detected"] == 0
    http.post(f"{base}/clock", json={"now": None}, timeout=10)
    assert api.ok("/stats/overview", days=1)["failures_detected"] == 5

    http.post(f"{base}/revoke", json={"token": "exl_sim_fresh_read"}, timeout=10)
    assert api.get("/stats/overview").status_code == 401

    log = http.get(f"{base}/requests", timeout=10).json()
    assert log and all(r["path"].startswith("/api/v1/") for r in log)
    assert log[-1]["status"] == 401
    http.delete(f"{base}/requests", timeout=10)
    assert http.get(f"{base}/requests", timeout=10).json() == []


def test_control_api_errors(server: SimulatorServer, http: requests.Session) -> None:
    base = f"{server.url}/_sim"
    assert http.post(f"{base}/tenants/nobody/analyses", json={}, timeout=10).status_code == 404
    assert http.post(f"{base}/faults", data="{not json", timeout=10).status_code == 400
    bad = http.post(f"{base}/tenants/acme/analyses", json={"severity": "HIGH"}, timeout=10)
    assert bad.status_code == 400
    assert http.post(f"{base}/revoke", json={}, timeout=10).status_code == 400
    assert http.get(f"{base}/faults", timeout=10).status_code == 405
    assert http.get(f"{base}/nothing", timeout=10).status_code == 404
    r = http.post(f"{base}/tenants", json={"name": "newco", "history_days": 10, "per_day": 3}, timeout=10)
    assert r.status_code == 200 and r.json()["newco"]["tokens"]["read"] == "exl_sim_newco_read"


# -- server lifecycle and CLI ------------------------------------------------------------------------

def test_server_stops_and_frees_its_port(sim: Simulator) -> None:
    srv = SimulatorServer(sim).start()
    assert requests.get(f"{srv.url}/_sim/health", timeout=10).status_code == 200
    started = time.perf_counter()
    srv.stop()
    assert time.perf_counter() - started < 3
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{srv.url}/_sim/health", timeout=2)


def test_cli_serves_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "exlogare_exporter.simulator", "--port", "0", "--arrival-rate", "0",
         "--tenants", "acme,quiet", "--fault", "status=503,count=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("Exlogare simulator listening on http://127.0.0.1:"), first
        url = first.split()[-1]
        lines = [proc.stdout.readline() for _ in range(2)]
        assert "exl_sim_acme_read" in lines[0] and "exl_sim_quiet_read" in lines[1]
        headers = {"Authorization": "Bearer exl_sim_acme_read"}
        assert requests.get(f"{url}/api/v1/stats/overview", headers=headers, timeout=10).status_code == 503
        assert requests.get(f"{url}/api/v1/stats/overview", headers=headers, timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
