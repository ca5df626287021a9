"""The Infinity RCA explorer dashboard and its datasource provisioning: valid, and every query it makes is a
proxy route that exists and answers with the fields its panels select."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml

from exlogare_exporter.proxy import api_params, path_segments, route_of, walk_query
from tests.bundle import load_json, panels, queries, substitute, variables
from tests.proxy_support import Stack, body, running_stack
from tests.support import ROOT

DASHBOARD = ROOT / "grafana" / "dashboards" / "exlogare-rca-explorer.json"
DATASOURCE = ROOT / "grafana" / "provisioning" / "datasources" / "exlogare-proxy-infinity.yaml"
INFINITY = "yesoreyeram-infinity-datasource"
DASH = load_json(DASHBOARD)
VARS = variables(DASH)


def infinity_queries() -> list[tuple[str, dict[str, Any]]]:
    """(where, query) for every panel target (collapsed rows' too) and every Infinity variable."""
    found = [(f"panel {p['title']}", t) for p, t in queries(DASH)]
    found += [(f"variable {v['name']}", v["query"]["infinityQuery"])
              for v in DASH["templating"]["list"] if v["type"] == "query"]
    return found


def choices() -> Iterator[dict[str, str]]:
    """Every combination of the custom variables' values, as Grafana would substitute them."""
    custom = {name: [o["value"] for o in v["options"]]
              for name, v in VARS.items() if v["type"] == "custom"}
    for combo in itertools.product(*custom.values()):
        values = dict(zip(custom, combo, strict=True))
        for name, value in values.items():
            if value == "$__all":
                values[name] = VARS[name]["allValue"]
        yield values


def render(query: dict[str, Any], values: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The query's path and parameters with `${name}` replaced; unresolved variables fail the test."""
    def sub(text: str) -> str:
        # only the plain `${name}` form: a `${name:format}` changes the value, which `substitute` ignores
        assert "$" not in re.sub(r"\$\{\w+\}", "", text), text
        out = substitute(text, values)
        assert "$" not in out, text
        return out
    params = {p["key"]: sub(p["value"]) for p in query["url_options"].get("params", [])}
    return sub(query["url"]), params


def test_the_dashboard_is_valid_and_stable() -> None:
    assert DASH["uid"] == "exlogare-rca-explorer"
    assert DASH["schemaVersion"] == 41
    assert DASH["title"] and DASH["description"]
    ids = [p["id"] for p in DASH["panels"]]
    assert len(ids) == len(set(ids))
    cells = [(x, y) for p in DASH["panels"] for g in [p["gridPos"]]
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    assert len(cells) == len(set(cells)), "panels overlap"
    assert all(g["x"] + g["w"] <= 24 for g in (p["gridPos"] for p in DASH["panels"]))
    assert VARS["datasource"]["type"] == "datasource" and VARS["datasource"]["query"] == INFINITY
    assert {"tenant", "days", "severity", "project"} <= set(VARS)
    assert VARS["project"]["regex"] == "/.+/" and VARS["project"]["allValue"] == "*"
    for panel in panels(DASH):
        assert panel["datasource"] == {"type": INFINITY, "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
    for name in ("tenant", "project"):
        assert VARS[name]["datasource"] == {"type": INFINITY, "uid": "${datasource}"}
    titles = {p["title"] for p in panels(DASH)}
    assert "Recent RCAs" in titles


def test_the_recent_rcas_table_links_to_the_job_and_filters_by_severity_and_project() -> None:
    (table,) = [p for p in panels(DASH) if p["title"] == "Recent RCAs"]
    (target,) = table["targets"]
    assert target["url"] == "/proxy/${tenant}/analyses.json"
    params = {p["key"]: p["value"] for p in target["url_options"]["params"]}
    assert params["severity"] == "${severity}" and params["project"] == "${project}"
    links = [link["url"] for o in table["fieldConfig"]["overrides"] for prop in o["properties"]
             if prop["id"] == "links" for link in prop["value"]]
    assert "${__data.fields.job_url}" in links
    assert "job_url" in {c["text"] for c in target["columns"]}


def test_every_query_is_a_proxy_route_that_exists_for_every_variable_value() -> None:
    found = infinity_queries()
    assert len(found) >= 8
    for (where, query), values in itertools.product(found, choices()):
        path, params = render(query, {**values, "tenant": "acme", "project": "acme/api"})
        assert query["type"] == "json" and query["source"] == "url", where
        assert query["url_options"]["method"] == "GET", where
        route = route_of(path_segments(path))
        assert route.kind != "unknown", (where, path)
        if route.kind == "api":
            api_params(route.api_path, params)  # raises Refused for a value the server would refuse
        elif route.kind == "walk":
            walk_query(params, 1000, now=2e9)


def test_the_infinity_datasource_provisioning_points_at_the_proxy_with_a_bearer_token() -> None:
    text = DATASOURCE.read_text()
    (source,) = yaml.safe_load(text)["datasources"]
    assert source["type"] == INFINITY
    assert source["url"] == "${EXLOGARE_PROXY_URL}"
    assert source["jsonData"]["auth_method"] == "bearerToken"
    assert source["jsonData"]["allowedHosts"] == [source["url"]]
    assert source["secureJsonData"] == {"bearerToken": "${EXLOGARE_PROXY_TOKEN}"}
    health = source["jsonData"]["customHealthCheckUrl"].removeprefix(source["url"])
    assert route_of(path_segments(health)).kind == "tenants"
    assert "exl_" not in text


# --- live: the dashboard's own queries against a running proxy -------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as running:
        yield running


def get(stack: Stack, query: dict[str, Any], values: dict[str, str]) -> Any:
    path, params = render(query, values)
    answer = stack.get(f"{path}?{urlencode(params)}" if params else path)
    assert answer.status_code == 200, (path, params, answer.text[:300])
    return body(answer)


def selected(data: Any, selector: str) -> list[Any]:
    rows = data if isinstance(data, list) else [data]
    values = []
    for row in rows:
        value = row
        for part in selector.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values.append(value)
    return values


@pytest.mark.e2e
def test_every_panel_query_answers_with_the_fields_it_selects(stack: Stack) -> None:
    tenants = get(stack, VARS["tenant"]["query"]["infinityQuery"], {})
    assert tenants == [{"name": "acme"}]
    values = {"tenant": "acme", "days": "30", "severity": "*", "project": "*"}
    projects = get(stack, VARS["project"]["query"]["infinityQuery"], values)
    projects = [p for p in projects if p["project_path"]]  # the variable's regex drops the others
    assert projects
    for where, query in infinity_queries():
        data = get(stack, query, values)
        for column in query["columns"]:
            found = selected(data, column["selector"])
            optional = column["selector"] == "severity_counts.high"  # absent when there were none
            assert optional or any(v is not None for v in found), (where, column["selector"])
    (recent,) = [p["targets"][0] for p in panels(DASH) if p["title"] == "Recent RCAs"]
    filtered = get(stack, recent, {**values, "severity": "high", "project": projects[0]["project_path"]})
    assert filtered and {(r["severity"], r["project_path"]) for r in filtered} == {
        ("high", projects[0]["project_path"])}


@pytest.mark.e2e
def test_ten_viewers_of_the_dashboard_cost_one_upstream_call_per_distinct_query(stack: Stack) -> None:
    stack.exporter.proxy.cache.clear()
    stack.sim.clear_requests()
    values = {"tenant": "acme", "days": "7", "severity": "*", "project": "*"}
    loads = [render(q, values) for _, q in infinity_queries()] * 10
    with ThreadPoolExecutor(max_workers=30) as pool:
        answers = list(pool.map(lambda pq: stack.get(f"{pq[0]}?{urlencode(pq[1])}"), loads))
    assert {a.status_code for a in answers} == {200}
    calls = stack.sim.requests()
    distinct = {(r.path, tuple(sorted(r.query.items()))) for r in calls}
    assert len(calls) == len(distinct)  # no query asked twice: viewers and panels share answers
    # The four headline stats share one overview query; tenants.json never reaches the upstream.
    assert sum(1 for r in calls if r.path.endswith("/stats/overview")) == 1
