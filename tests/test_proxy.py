"""The Grafana datasource proxy over loopback: a real simulator, a real exporter, real HTTP.

Every refusal is checked against the simulator's own request log: it must never have reached the upstream.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from exlogare_exporter.config import PROXY_CLIENT_KEYS, PROXY_KEYS, ConfigError, ProxyConfig, parse_config
from exlogare_exporter.proxy import OTHER, Refused, parse_query, path_segments, route_of, walk_query
from tests.proxy_support import TOKEN_A, TOKEN_B, Stack, body, running_stack
from tests.support import ROOT, require_tool, start_exporter, start_simulator, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as running:
        yield running


@pytest.fixture(autouse=True)
def quiet_upstream(request: pytest.FixtureRequest) -> None:
    """Each test starts with an empty upstream log (and an empty cache when it uses the shared stack)."""
    if "stack" in request.fixturenames:
        shared: Stack = request.getfixturevalue("stack")
        shared.sim.clear_requests()
        shared.sim.clear_faults()
        shared.sim.set_latency(0)
        shared.exporter.proxy.cache.clear()


# --- the vendor's recipe, verbatim --------------------------------------------------------------------------


def readme_recipe() -> str:
    """The README's curl + jq walk, exactly as a user would copy it."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    (recipe,) = [b for b in blocks if "rcas.sh" in b]
    return recipe


def run_recipe(base: str, token: str) -> list[dict]:
    require_tool("curl")
    require_tool("jq")
    done = subprocess.run(["bash", "-c", readme_recipe()], env={**os.environ, "BASE": base, "TOKEN": token},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [body(line.encode()) for line in done.stdout.splitlines()]


def test_the_curl_and_jq_recipe_reads_every_rca_exactly_once_through_the_proxy(stack: Stack) -> None:
    via_proxy = run_recipe(f"{stack.url}/proxy/acme", TOKEN_A)
    pages = [r for r in stack.upstream_log("/api/v1/analyses")]
    direct = run_recipe(f"{stack.server.url}", stack.sim.token("acme"))
    ids = [item["id"] for item in via_proxy]
    assert len(ids) == len(set(ids)) > 500  # more than one page of 500, nothing twice
    assert via_proxy == direct  # the same items, in the same order, byte for byte the same fields
    assert len(pages) == len(ids) // 500 + 1  # the proxy asked once per page, nothing more
    assert all("exl_" not in line for line in map(str, via_proxy))


# --- caching ------------------------------------------------------------------------------------------------


def test_fifty_concurrent_identical_requests_make_one_upstream_call(stack: Stack) -> None:
    stack.sim.set_latency(0.3)  # the first answer takes long enough for all fifty to arrive meanwhile
    path = "/proxy/acme/api/v1/stats/top-projects?days=13&limit=7"
    start = threading.Barrier(50)
    proxy_calls_before = stack.metric("exlogare_proxy_upstream_requests_total", endpoint="top_projects")

    def one() -> requests.Response:
        start.wait(10)
        return stack.get(path)

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda _: one(), range(50)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert body(answers[0]) == body(stack.upstream("/stats/top-projects", days=13, limit=7))
    assert len(stack.upstream_log("top-projects")) == 2  # the proxy's one call, and ours just above
    results = [a.headers["X-Exlogare-Cache"] for a in answers]
    assert results.count("miss") == 1
    assert results.count("shared") >= 1  # several waited on the one call in flight
    assert set(results) <= {"miss", "shared", "hit"}
    assert stack.metric("exlogare_proxy_upstream_requests_total", endpoint="top_projects") \
        == proxy_calls_before + 1
    assert stack.metric("exlogare_proxy_cache_results_total", tenant="acme", endpoint="top_projects",
                        result="shared") == results.count("shared")


def test_equivalent_queries_share_one_entry_and_defaults_are_filled_in(stack: Stack) -> None:
    first = stack.get("/proxy/acme/api/v1/stats/overview")
    again = stack.get("/proxy/acme/api/v1/stats/overview?days=30&unknown=1&days=30")
    spaced = stack.get("/proxy/acme/api/v1/stats/overview?days=+30")
    assert [r.headers["X-Exlogare-Cache"] for r in (first, again, spaced)] == ["miss", "hit", "hit"]
    (call,) = stack.upstream_log("overview")
    assert call.query == {"days": "30"}  # only documented parameters travel, in one spelling
    assert int(again.headers["Age"]) >= 0


def test_a_dashboard_of_twenty_panels_for_ten_viewers_costs_twenty_upstream_calls(stack: Stack) -> None:
    panels = [f"/proxy/acme/api/v1/stats/overview?days={d}" for d in range(1, 11)] + \
             [f"/proxy/acme/api/v1/stats/top-root-causes?days={d}&limit=5" for d in range(1, 11)]
    with ThreadPoolExecutor(max_workers=40) as pool:
        answers = list(pool.map(stack.get, [p for _ in range(10) for p in panels]))
    assert [a.status_code for a in answers] == [200] * 200
    assert len(stack.sim.requests()) == 20  # 200 panel loads, one upstream call per distinct query


# --- refusals: never reach the upstream ---------------------------------------------------------------------

REFUSED = [
    ("GET", "/proxy/acme/api/v1/../../metrics", 400),
    ("GET", "/proxy/acme/api/v1/stats/../stats/overview", 400),
    ("GET", "/proxy/acme/./api/v1/stats/overview", 400),
    ("GET", "/proxy/acme/api/v1/stats/%2e%2e/overview", 400),
    ("GET", "/proxy/acme/api/v1/stats%2Foverview", 400),
    ("GET", "/proxy/acme/api/v1/stats/%252e%252e/overview", 400),
    ("GET", "/proxy/acme/api/v1/stats/..%5Coverview", 400),
    ("GET", "/proxy/acme/api/v1/stats/..\\overview", 400),
    ("GET", "/proxy/%61cme/api/v1/stats/overview", 400),
    ("GET", "/proxy/acme//api/v1/stats/overview", 400),
    ("GET", "/proxy/acme/api/v1//stats/overview", 400),
    ("GET", "/proxy/acme/api/v1/stats/overview/", 400),
    ("GET", "/proxy/acme/api/v1/stats/overview?days=7%0d%0aX-Injected:%201", 400),
    ("GET", "/proxy/acme/api/v1/analyses?project=a%0ab", 400),
    ("GET", "/proxy/acme/api/v1/analyses?project=%00", 400),
    ("GET", "/proxy/acme/api/v1/analyses?project=%ff", 400),
    ("GET", "/proxy/acme/api/v1/analyses?project=" + "a" * 3000, 414),
    ("GET", "/proxy/acme/api/v1/analyses?" + "&".join(f"p{i}=1" for i in range(40)), 400),
    ("GET", "/proxy/acme/" + "a/" * 300 + "x", 414),
    ("GET", "/proxy/acme/api/v1/admin/tokens", 404),
    ("GET", "/proxy/acme/api/v1/ingest", 404),
    ("GET", "/proxy/acme/api/v2/stats/overview", 404),
    ("GET", "/proxy/acme/api/v1/stats", 404),
    ("GET", "/proxy/acme/api/v1/analyses/39af2c01-0000-4000-8000-000000000000/raw", 404),
    ("GET", "/proxy/acme/API/V1/stats/overview", 404),
    ("GET", "/proxy/acme", 404),
    ("GET", "/proxy", 404),
    ("POST", "/proxy/acme/api/v1/analyses", 405),
    ("PUT", "/proxy/acme/api/v1/stats/overview", 405),
    ("DELETE", "/proxy/acme/api/v1/analyses/39af2c01-0000-4000-8000-000000000000", 405),
    ("HEAD", "/proxy/acme/api/v1/stats/overview", 405),
    ("OPTIONS", "/proxy/acme/api/v1/stats/overview", 405),
]


@pytest.mark.parametrize(("method", "target", "status"), REFUSED, ids=[t[:70] for _, t, _ in REFUSED])
def test_refused_requests_never_reach_the_upstream(stack: Stack, method: str, target: str,
                                                     status: int) -> None:
    got, headers, raw = stack.raw(method, target)
    assert got == status, raw
    if method != "HEAD":
        assert "detail" in body(raw)
    assert "X-Exlogare-Cache" not in headers
    assert stack.sim.requests() == []


# (proxy path, the same query asked of the upstream): the proxy's answer must be the server's own.
INVALID = [
    ("/stats/overview?days=0", "/stats/overview?days=0"),
    ("/stats/overview?days=366", "/stats/overview?days=366"),
    ("/stats/overview?days=abc", "/stats/overview?days=abc"),
    ("/stats/overview?days=", "/stats/overview?days="),
    ("/stats/timeseries?days=181", "/stats/timeseries?days=181"),
    ("/stats/top-projects?days=181&limit=51", "/stats/top-projects?days=181&limit=51"),
    ("/stats/top-root-causes?limit=0", "/stats/top-root-causes?limit=0"),
    ("/analyses?limit=501", "/analyses?limit=501"),
    ("/analyses?limit=0&since=yesterday", "/analyses?limit=0&since=yesterday"),
    ("/analyses?severity=HIGH", "/analyses?severity=HIGH"),
    ("/analyses?severity=", "/analyses?severity="),
    ("/analyses?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
     "/analyses?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z"),
    ("/analyses?since=2024-01-01&until=2025-06-01", "/analyses?since=2024-01-01&until=2025-06-01"),
    ("/analyses/not-a-uuid", "/analyses/not-a-uuid"),
]


@pytest.mark.parametrize(("proxy_path", "upstream_path"), INVALID, ids=[p for p, _ in INVALID])
def test_a_bad_value_gets_the_servers_own_answer_without_an_upstream_call(stack: Stack, proxy_path: str,
                                                                            upstream_path: str) -> None:
    answer = stack.get(f"/proxy/acme/api/v1{proxy_path}")
    assert stack.sim.requests() == []
    direct = requests.get(f"{stack.server.url}/api/v1{upstream_path}", timeout=10,
                          headers={"Authorization": f"Bearer {stack.sim.token('acme')}"})
    assert direct.status_code in (400, 422)
    assert (answer.status_code, body(answer)) == (direct.status_code, body(direct))


def test_a_bad_cursor_is_the_upstreams_to_judge_and_its_verdict_is_passed_on(stack: Stack) -> None:
    answer = stack.get("/proxy/acme/api/v1/analyses?cursor=not-a-cursor")
    assert (answer.status_code, body(answer)) == (400, {"detail": "Invalid cursor"})
    assert len(stack.sim.requests()) == 1  # opaque, so it went up once
    assert stack.get("/proxy/acme/api/v1/analyses?cursor=not-a-cursor").headers["X-Exlogare-Cache"] == "hit"
    assert len(stack.sim.requests()) == 1


def test_an_unknown_analysis_is_the_upstreams_404(stack: Stack) -> None:
    answer = stack.get("/proxy/acme/api/v1/analyses/39AF2C01-0000-4000-8000-000000000000")
    assert (answer.status_code, body(answer)) == (404, {"detail": "Not found"})
    (call,) = stack.sim.requests()
    assert call.path == "/api/v1/analyses/39af2c01-0000-4000-8000-000000000000"  # the canonical spelling


# --- authentication and tenant isolation --------------------------------------------------------------------


def test_clients_authenticate_with_their_own_tokens(stack: Stack) -> None:
    path = "/proxy/acme/api/v1/stats/overview?days=7"
    for token in (None, "wrong-token", TOKEN_A + "x", TOKEN_A[:-1], stack.sim.token("acme")):
        answer = stack.get(path, token=token)
        assert answer.status_code == 401, token
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert stack.get(path, headers={"Authorization": f"Basic {TOKEN_A}"}, token=None).status_code == 401
    assert stack.sim.requests() == []
    assert stack.get(path, token=None, headers={"Authorization": f"bearer  {TOKEN_A} "}).status_code == 200


def test_tenant_isolation_between_two_clients(stack: Stack) -> None:
    a_acme = stack.get("/proxy/acme/api/v1/stats/overview?days=7", token=TOKEN_A)
    b_lab = stack.get("/proxy/lab/api/v1/stats/overview?days=7", token=TOKEN_B)
    assert a_acme.status_code == b_lab.status_code == 200
    assert body(a_acme) == body(stack.upstream("/stats/overview", "acme", days=7))
    assert body(b_lab) == body(stack.upstream("/stats/overview", "lab", days=7))
    assert body(a_acme) != body(b_lab)
    stack.sim.clear_requests()
    forbidden = stack.get("/proxy/lab/api/v1/stats/overview?days=7", token=TOKEN_A)  # cached, still refused
    crossed = stack.get("/proxy/acme/api/v1/stats/overview?days=7", token=TOKEN_B)
    unknown = stack.get("/proxy/nosuch/api/v1/stats/overview?days=7", token=TOKEN_A)
    bad_path = stack.get("/proxy/lab/api/v1/admin", token=TOKEN_A)
    for answer in (forbidden, crossed, unknown, bad_path):
        # Forbidden and unknown tenants look the same: a client learns nothing of the others.
        assert (answer.status_code, answer.content) == (unknown.status_code, unknown.content) == (
            404, b'{"detail":"no such tenant for this client"}')
    assert body(stack.get("/proxy/tenants.json", token=TOKEN_A)) == [{"name": "acme"}]
    assert body(stack.get("/proxy/tenants.json", token=TOKEN_B)) == [{"name": "lab"}]
    assert stack.sim.requests() == []


def test_the_upstream_token_never_reaches_the_client(stack: Stack) -> None:
    secrets = [stack.sim.token(t) for t in ("acme", "lab")]
    stack.sim.set_fault(tenant="acme", status=500, count=1,
                        body=f"<html>proxy error for Bearer {secrets[0]}</html>", content_type="text/html")
    answers = [stack.get("/proxy/acme/api/v1/stats/overview?days=2"),
               stack.get("/proxy/acme/api/v1/stats/overview?days=3"),
               stack.get("/proxy/acme/analyses.json?since=now-1d"),
               stack.get("/proxy/tenants.json")]
    assert answers[0].status_code == 502
    for answer in answers:
        seen = answer.text + repr(answer.headers)
        assert not any(s in seen or s[:12] in seen for s in secrets)


# --- upstream trouble ---------------------------------------------------------------------------------------


def test_stale_answers_are_served_during_a_429_storm() -> None:
    with running_stack(proxy={"cache_ttl": "1s", "cache_stale_ttl": "10m"}) as stack:
        path = "/proxy/acme/api/v1/stats/overview?days=3"
        fresh = stack.get(path)
        assert fresh.headers["X-Exlogare-Cache"] == "miss"
        stack.sim.set_fault(tenant="acme", status=429, headers={"Retry-After": "120"})
        # Once the second is up, the next request asks the upstream, gets a 429, and serves the old answer.
        stale = wait_until(lambda: (r := stack.get(path)).headers["X-Exlogare-Cache"] == "stale" and r,
                           what="the TTL to run out")
        assert (stale.status_code, stale.content) == (200, fresh.content)
        assert stale.headers["X-Exlogare-Stale-Reason"] == "429"
        assert int(stale.headers["Age"]) >= 1
        storm = [stack.get(path) for _ in range(30)]
        assert {(r.status_code, r.headers["X-Exlogare-Cache"]) for r in storm} == {(200, "stale")}
        never_cached = stack.get("/proxy/acme/api/v1/stats/overview?days=4")
        assert never_cached.status_code == 503
        assert 100 <= int(never_cached.headers["Retry-After"]) <= 120
        assert "rate-limiting" in body(never_cached)["detail"]
        # One 429 reached the upstream; after it, the proxy honoured Retry-After and asked nothing more.
        assert [r.status for r in stack.upstream_log("overview")] == [200, 429]
        assert stack.metric("exlogare_proxy_cache_results_total", result="stale") >= 31


def test_a_server_error_without_a_cached_answer_is_a_502_and_then_recovers(stack: Stack) -> None:
    stack.sim.set_fault(tenant="acme", endpoint="/stats/timeseries", status=503, count=1,
                        body="<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
                        content_type="text/html")
    failed = stack.get("/proxy/acme/api/v1/stats/timeseries?days=9")
    assert failed.status_code == 502
    assert "503" in body(failed)["detail"] and "tenant acme" in body(failed)["detail"]
    assert failed.headers["X-Exlogare-Cache"] == "miss"
    recovered = stack.get("/proxy/acme/api/v1/stats/timeseries?days=9")
    assert (recovered.status_code, recovered.headers["X-Exlogare-Cache"]) == (200, "miss")


def test_an_ingest_only_upstream_token_gives_a_clear_502_never_a_401() -> None:
    sim_tokens = {"acme": "exl_sim_acme_ingest"}
    with running_stack(tokens=sim_tokens) as stack:
        answer = stack.get("/proxy/acme/api/v1/stats/overview?days=7")
        assert answer.status_code == 502
        detail = body(answer)["detail"]
        assert "tenant acme" in detail and "403" in detail and "Missing scope: read" in detail
        assert "read scope" in detail
        assert "exl_sim_acme_ingest" not in answer.text
        assert stack.get("/proxy/acme/analyses.json").status_code == 502
        assert [r.status for r in stack.sim.requests()] == [403, 403]  # never cached, never retried


def test_a_token_that_is_no_api_token_gets_the_hint() -> None:
    with running_stack(tokens={"acme": "eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl"}) as stack:
        answer = stack.get("/proxy/acme/api/v1/stats/overview?days=7")
        assert answer.status_code == 502
        assert "Invalid signature" in body(answer)["detail"] and "exl_" in body(answer)["detail"]


# --- analyses.json ------------------------------------------------------------------------------------------


def walk_upstream(stack: Stack, **params: str) -> list[dict]:
    items, cursor = [], None
    while True:
        more = {"cursor": cursor} if cursor else {}
        page = body(stack.upstream("/analyses", limit="500", **params, **more))
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def test_analyses_json_walks_every_page_into_one_flat_array(stack: Stack) -> None:
    answer = stack.get("/proxy/acme/analyses.json?max_items=5000")
    assert answer.status_code == 200
    assert answer.headers["X-Exlogare-Truncated"] == "false"
    assert body(answer) == walk_upstream(stack)
    assert len(body(answer)) > 500
    cap = len(body(answer)) - 35  # a second page cut short
    capped = stack.get(f"/proxy/acme/analyses.json?max_items={cap}")
    assert body(capped) == body(answer)[:cap]
    assert capped.headers["X-Exlogare-Truncated"] == "true"
    exact = stack.get(f"/proxy/acme/analyses.json?max_items={len(body(answer))}")
    assert exact.headers["X-Exlogare-Truncated"] == "false"


def test_analyses_json_filters_and_grafanas_all(stack: Stack) -> None:
    high = body(stack.get("/proxy/acme/analyses.json?severity=high&max_items=5000"))
    assert high == walk_upstream(stack, severity="high")
    assert {i["severity"] for i in high} == {"high"}
    everything = stack.get("/proxy/acme/analyses.json?severity=*&project=&max_items=5000")
    assert body(everything) == walk_upstream(stack)
    project = next(i["project_path"] for i in high if i["project_path"])  # generic sources may send none
    assert body(stack.get(f"/proxy/acme/analyses.json?project={project}&severity=high")) == \
        walk_upstream(stack, project=project, severity="high")
    assert stack.get("/proxy/acme/analyses.json?severity=HIGH").status_code == 400
    too_many = stack.get("/proxy/acme/analyses.json?max_items=10001")
    assert too_many.status_code == 422
    assert body(too_many)["detail"][0]["loc"] == ["query", "max_items"]


def test_analyses_json_relative_windows_are_shared_by_every_viewer(stack: Stack) -> None:
    first = stack.get("/proxy/acme/analyses.json?since=now-7d")
    second = stack.get("/proxy/acme/analyses.json?since=now-7d")
    assert (first.headers["X-Exlogare-Cache"], second.headers["X-Exlogare-Cache"]) == ("miss", "hit")
    calls = stack.upstream_log("analyses")
    assert len(calls) == 1
    since = calls[0].query["since"]
    assert body(first) == walk_upstream(stack, since=since)
    assert body(stack.get("/proxy/acme/analyses.json?since=now-1w")) == body(first)
    assert stack.get("/proxy/acme/analyses.json?since=now-400d&until=now").status_code == 400


# --- metrics ------------------------------------------------------------------------------------------------


def test_metrics_label_values_stay_bounded(stack: Stack) -> None:
    for i in range(5):
        stack.get(f"/proxy/tenant{i}/api/v1/stats/overview")
        stack.get(f"/proxy/acme/api/v1/thing{i}")
        stack.raw("GET", f"/proxy/%2e{i}/x")
    tenants = {dict(k)["tenant"] for k in stack.metrics("exlogare_proxy_requests_total")}
    endpoints = {dict(k)["endpoint"] for k in stack.metrics("exlogare_proxy_requests_total")}
    assert tenants <= {"acme", "lab", OTHER}
    assert endpoints <= {"overview", "timeseries", "top_projects", "top_root_causes", "analyses", "analysis",
                         "analyses_json", "tenants", OTHER}
    assert stack.metric("exlogare_proxy_requests_total", tenant=OTHER, endpoint="overview", code="404") >= 5


def test_the_exposition_with_proxy_series_passes_promtool(stack: Stack) -> None:
    promtool = require_tool("promtool")
    stack.get("/proxy/acme/api/v1/stats/overview")
    stack.get("/proxy/acme/api/v1/stats/overview")
    text = requests.get(stack.url + "/metrics", timeout=10).text
    assert "exlogare_proxy_cache_entries 1.0" in text
    assert 'exlogare_proxy_upstream_requests_total{code="200",endpoint="overview",tenant="acme"}' in text
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                          check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# --- configuration and reload -------------------------------------------------------------------------------


def base(**proxy: object) -> dict:
    return {"tenants": [{"name": "acme", "token": "exl_a"}, {"name": "lab", "token": "exl_b"}],
            "proxy": {"enabled": True, "clients": [{"name": "g", "token_env": "G", "tenants": ["acme"]}],
                      **proxy}}


ENV = {"G": "a-long-enough-client-token-1"}


def test_the_proxy_section_is_parsed_with_its_defaults() -> None:
    cfg = parse_config(base(), ENV)
    assert (cfg.proxy.enabled, cfg.proxy.cache_ttl, cfg.proxy.cache_stale_ttl) == (True, 30.0, 600.0)
    assert (cfg.proxy.cache_max_entries, cfg.proxy.cache_max_bytes, cfg.proxy.max_items) == (
        1000, 64 * 1024**2, 10_000)
    (client,) = cfg.proxy.clients
    assert (client.name, client.tenants, client.token.reveal()) == ("g", ("acme",), ENV["G"])
    assert "a-long-enough" not in repr(cfg)
    assert not parse_config({"tenants": [{"name": "acme", "token": "exl_a"}]}, {}).proxy.enabled
    assert parse_config(base(cache_ttl="1h"), ENV).proxy.cache_stale_ttl == 3600.0
    tuned = parse_config(base(cache_ttl="1m", cache_stale_ttl=0, cache_max_bytes="1MiB", max_items=50), ENV)
    assert (tuned.proxy.cache_ttl, tuned.proxy.cache_stale_ttl, tuned.proxy.cache_max_bytes,
            tuned.proxy.max_items) == (60.0, 0.0, 1024**2, 50)


@pytest.mark.parametrize(("change", "message"), [
    ({"clients": [{"name": "g", "token_env": "G", "tenants": ["acme", "nosuch"]}]},
     "proxy.clients[0].tenants[1]: nosuch is not a configured tenant; the tenants are acme, lab"),
    ({"clients": [{"name": "g", "token_env": "G", "tenants": []}]}, "proxy.clients[0].tenants: is empty"),
    ({"clients": [{"name": "g", "token_env": "G", "tenants": ["acme", "acme"]}]},
     "proxy.clients[0].tenants[1]: acme is listed twice"),
    ({"clients": [{"name": "g", "token_env": "G"}]}, "proxy.clients[0].tenants: is required"),
    ({"clients": [{"name": "g", "tenants": ["acme"]}]}, "proxy.clients[0]: no token"),
    ({"clients": [{"name": "g", "token_env": "NOPE", "tenants": ["acme"]}]},
     "proxy.clients[0].token_env: environment variable NOPE is not set"),
    ({"clients": [{"name": "g", "token_env": "G", "tenants": ["acme"]},
                  {"name": "g", "token_env": "G", "tenants": ["lab"]}]},
     "proxy.clients[1].name: g is already the name of proxy.clients[0]"),
    ({"clients": [{"name": "g", "token_env": "G", "tenants": ["acme"]},
                  {"name": "h", "token_env": "G", "tenants": ["lab"]}]},
     "proxy.clients[1].token_env: the same token as proxy.clients[0]"),
    ({"clients": []}, "proxy.clients: is empty; with enabled: true"),
    ({"cache_ttl": "1m", "cache_stale_ttl": "30s"}, "proxy.cache_stale_ttl: 30s is shorter than cache_ttl"),
    ({"cache_ttl": "soon"}, "proxy.cache_ttl: 'soon' is not a duration"),
    ({"cache_max_entries": 0}, "proxy.cache_max_entries: 0 is outside 1..1000000"),
    ({"enable": True}, "proxy.enable: unknown key. Did you mean enabled?"),
    ({"clients": [{"name": "g g", "token_env": "G", "tenants": ["acme"]}]},
     "proxy.clients[0].name: 'g g' is not a valid client name"),
    ({"clients": [{"name": "exl_pasted_token_value", "token_env": "G", "tenants": ["acme"]}]},
     "proxy.clients[0].name: this looks like a token, not a client name"),
])
def test_proxy_config_errors_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(base(**change), ENV)
    assert str(caught.value).startswith(message), str(caught.value)
    assert ENV["G"] not in str(caught.value)


def test_the_example_and_the_reference_document_every_proxy_key() -> None:
    example = (ROOT / "config.example.yaml").read_text()
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for key in PROXY_KEYS:
        assert f"  {key}:" in example and f"`proxy.{key}`" in reference, key
    for key in PROXY_CLIENT_KEYS:
        assert f"{key}:" in example.split("proxy:", 1)[1] and f"{key}`" in reference, key
    environ = {"EXLOGARE_TOKEN_ACME": "exl_a", "EXLOGARE_TOKEN_LAB": "exl_b"}
    assert parse_config(yaml.safe_load(example), environ).proxy == ProxyConfig()


def test_proxy_token_warnings() -> None:
    cfg = parse_config(base(clients=[{"name": "g", "token": "exl_short", "tenants": ["acme"]}]), {})
    warnings = [w for w in cfg.warnings if w.startswith("proxy.")]
    assert any("inline tokens are discouraged" in w for w in warnings)
    assert any("shorter than 16 characters" in w for w in warnings)
    assert any("like an Exlogare token" in w for w in warnings)
    assert not any("exl_short" in w for w in cfg.warnings)


def test_a_reload_adopts_new_client_tokens_and_drops_a_changed_tenants_answers(tmp_path: Path) -> None:
    with running_stack() as stack:
        token_file = tmp_path / "grafana.token"
        token_file.write_text("first-token-0123456789abcdef\n")
        token_file.chmod(0o600)
        config_path = tmp_path / "config.yaml"
        raw = stack.exporter.config  # keep the running tenants; give the proxy a file-based client
        tenants = "".join(f"  - name: {t.name}\n    token: {t.token.reveal()}\n" for t in raw.tenants)
        config_path.write_text(
            f"listen_address: 127.0.0.1:{stack.exporter.http.port}\n"  # type: ignore[union-attr]
            f"defaults:\n  base_url: {stack.server.url}\n  interval: 5m\n  analyses_interval: 0\n"
            f"tenants:\n{tenants}"
            f"proxy:\n  enabled: true\n  clients:\n    - name: grafana\n      token_file: {token_file}\n"
            f"      tenants: [acme, lab]\n")
        stack.exporter.config_path = str(config_path)
        assert stack.exporter.reload()
        path = "/proxy/lab/api/v1/stats/overview?days=5"
        assert stack.get(path, token="first-token-0123456789abcdef").status_code == 200
        assert stack.get(path, token=TOKEN_A).status_code == 401  # the old clients are gone
        token_file.write_text("second-token-0123456789abcdef\n")
        assert stack.exporter.reload()
        assert stack.get(path, token="first-token-0123456789abcdef").status_code == 401
        assert stack.get(path, token="second-token-0123456789abcdef").headers["X-Exlogare-Cache"] == "hit"
        # A tenant whose upstream changes loses its cached answers: they described the old one.
        config_path.write_text(config_path.read_text().replace(f"token: {stack.sim.token('lab')}",
                                                               "token: exl_sim_lab_ingest"))
        assert stack.exporter.reload()
        assert stack.get(path, token="second-token-0123456789abcdef").status_code == 502
        # And a client whose tenants shrink loses access at once.
        config_path.write_text(config_path.read_text().replace("[acme, lab]", "[acme]"))
        assert stack.exporter.reload()
        assert stack.get(path, token="second-token-0123456789abcdef").status_code == 404


SIGHUP_CONFIG = """
listen_address: "127.0.0.1:{port}"
defaults:
  base_url: "${SIM_URL}"
  interval: 5m
tenants:
  - name: acme
    token_env: TOKEN_ACME
proxy:
  enabled: true
  clients:
    - name: grafana
      token_file: TOKEN_FILE
      tenants: [acme]
"""


def test_sighup_picks_up_a_new_client_token(tmp_path: Path) -> None:
    sim, sim_url = start_simulator(tmp_path, "--tenants", "acme")
    exporter = None
    try:
        token_file = tmp_path / "grafana.token"
        token_file.write_text("old-client-token-0123456789\n")
        read_token = requests.get(f"{sim_url}/_sim/tenants", timeout=5).json()["acme"]["tokens"]["read"]
        exporter, url = start_exporter(tmp_path, SIGHUP_CONFIG.replace("TOKEN_FILE", str(token_file)),
                                       {"SIM_URL": sim_url, "TOKEN_ACME": read_token})
        path = f"{url}/proxy/acme/api/v1/stats/overview"

        def status(token: str) -> int:
            return requests.get(path, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code

        assert status("old-client-token-0123456789") == 200
        token_file.write_text("new-client-token-0123456789\n")
        exporter.signal(signal.SIGHUP)
        wait_until(lambda: status("old-client-token-0123456789") == 401, what="the reload")
        assert status("new-client-token-0123456789") == 200
        assert "client-token" not in exporter.output()
    finally:
        if exporter is not None:
            exporter.stop()
        sim.stop()


def test_the_pure_request_checks() -> None:
    assert path_segments("/proxy/acme/api/v1/stats/overview") == ["acme", "api", "v1", "stats", "overview"]
    for bad in ("/proxy/a/../b", "/proxy/a//b", "/proxy/a/%2e", "/proxy/a/b c", "/proxy/a/\r\n"):
        with pytest.raises(Refused):
            path_segments(bad)
    assert route_of(["acme", "api", "v1", "stats", "overview"]).label == "overview"
    assert route_of(["acme", "api", "v1", "analyses", "x"]).label == "analysis"
    assert route_of(["acme", "analyses.json"]).label == "analyses_json"
    assert route_of(["acme", "api", "v1", "stats", "nope"]).label == OTHER
    assert parse_query("a=1&a=2&b=&c=x+y%20z") == {"a": "2", "b": "", "c": "x y z"}
    walk = walk_query({"since": "now-2h", "severity": "*", "max_items": "10"}, 100, now=1_000_000.0)
    assert (walk.max_items, walk.params, walk.relative) == (10, (), (("since", 7200),))
    assert walk.upstream_params(1_000_000.0) == {"since": "1970-01-12T11:46:40+00:00"}
