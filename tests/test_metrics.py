"""The collector: what a snapshot becomes on /metrics, with every edge of the label values."""

from __future__ import annotations

import subprocess
from types import MappingProxyType

from prometheus_client import generate_latest

from exlogare_exporter.metrics import (
    OVERVIEW,
    TIMESERIES,
    TOP_PROJECTS,
    TOP_ROOT_CAUSES,
    ExporterMetrics,
)
from exlogare_exporter.parse import Overview, TopProject, TopRootCause
from exlogare_exporter.state import Fetched, Store, TenantState
from tests.support import parse_metrics, require_tool, samples

NOW = 1_800_000_000.0
NASTY = 'quote " backslash \\ emoji 🚀 <script>alert(1)</script> ünïcode'


def overview(p50: float | None = 12.0) -> Overview:
    return Overview(failures_detected=42, analyses_completed=41,
                    severity_counts=(("low", 11), ("medium", 0), ("high", 12)),
                    avg_seconds=None if p50 is None else 27.4, p50_seconds=p50,
                    p90_seconds=None if p50 is None else 78.1)


def state(name: str = "acme", at: float = NOW, **kw: object) -> TenantState:
    results = {
        (OVERVIEW, "1d"): Fetched(overview(None), at),
        (OVERVIEW, "7d"): Fetched(overview(), at),
        (TOP_PROJECTS, "7d"): Fetched((TopProject(NASTY, 5, 4), TopProject("(none)", 1, 0)), at),
        (TOP_ROOT_CAUSES, "7d"): Fetched((TopRootCause(NASTY, "high", 3), TopRootCause(NASTY, "low", 2)), at),
        (TIMESERIES, ""): Fetched((("2026-11-26", 0), ("2026-11-27", 7)), at),
    }
    base: dict[str, object] = {"name": name, "max_staleness": 300.0, "results": MappingProxyType(results),
                               "attempts": 1, "up": True, "last_attempt": at, "last_success": at,
                               "last_duration": 0.25}
    return TenantState(**{**base, **kw})  # type: ignore[arg-type]


def scrape(*states: TenantState, now: float = NOW) -> tuple[str, dict]:
    store = Store()
    for s in states:
        store.put(s)
    metrics = ExporterMetrics(store, clock=lambda: now)
    metrics.on_response("acme")("overview", "200")
    text = generate_latest(metrics.registry).decode()
    return text, parse_metrics(text)


def test_overview_values_and_severities_always_all_three() -> None:
    _, m = scrape(state())
    assert samples(m, "exlogare_failures_detected", window="7d") == {
        (("tenant", "acme"), ("window", "7d")): 42.0}
    assert samples(m, "exlogare_analyses_completed", window="7d") == {
        (("tenant", "acme"), ("window", "7d")): 41.0}
    by_severity = samples(m, "exlogare_analyses_by_severity", window="7d")
    sev = {dict(k)["severity"]: v for k, v in by_severity.items()}
    assert sev == {"low": 11, "medium": 0, "high": 12}


def test_null_time_to_rca_is_absent_not_zero() -> None:
    _, m = scrape(state())
    for key in ("p50", "p90", "avg"):
        windows = {dict(k)["window"] for k in samples(m, f"exlogare_time_to_rca_{key}_seconds")}
        assert windows == {"7d"}, key
    assert samples(m, "exlogare_time_to_rca_p90_seconds")[(("tenant", "acme"), ("window", "7d"))] == 78.1


def test_free_text_labels_survive_escaping() -> None:
    _, m = scrape(state())
    projects = {dict(k)["project"] for k in samples(m, "exlogare_top_project_failures")}
    assert projects == {NASTY, "(none)"}
    causes = {(dict(k)["root_cause"], dict(k)["severity"]): v
              for k, v in samples(m, "exlogare_top_root_cause_analyses").items()}
    assert causes == {(NASTY, "high"): 3, (NASTY, "low"): 2}


def test_health_series_and_build_info() -> None:
    _, m = scrape(state(), state("lab", up=False, last_success=None, last_error="tenant lab: boom"))
    assert samples(m, "exlogare_up") == {(("tenant", "acme"),): 1.0, (("tenant", "lab"),): 0.0}
    assert set(samples(m, "exlogare_last_success_timestamp_seconds")) == {(("tenant", "acme"),)}
    assert samples(m, "exlogare_refresh_duration_seconds")[(("tenant", "acme"),)] == 0.25
    assert samples(m, "exlogare_upstream_requests_total") == {
        (("code", "200"), ("endpoint", "overview"), ("tenant", "acme")): 1.0}
    (labels, value), = samples(m, "exlogare_exporter_build_info").items()
    assert value == 1.0 and dict(labels)["version"]


def test_stale_results_are_dropped_but_health_stays() -> None:
    old = state(at=NOW - 301, up=False)
    _, m = scrape(old)
    assert samples(m, "exlogare_failures_detected") == {}
    assert samples(m, "exlogare_daily_failures") == {}
    assert samples(m, "exlogare_up") == {(("tenant", "acme"),): 0.0}
    _, m = scrape(state(at=NOW - 299, up=False))
    assert len(samples(m, "exlogare_failures_detected")) == 2


def test_removed_tenant_request_counters_vanish() -> None:
    store = Store()
    metrics = ExporterMetrics(store)
    metrics.on_response("gone")("overview", "500")
    metrics.on_response("kept")("overview", "200")
    metrics.forget_tenant("gone")
    m = parse_metrics(generate_latest(metrics.registry).decode())
    assert {dict(k)["tenant"] for k in samples(m, "exlogare_upstream_requests_total")} == {"kept"}


def test_every_family_has_help_and_type_even_without_tenants() -> None:
    text, _ = scrape()
    for name in ("exlogare_failures_detected", "exlogare_daily_failures", "exlogare_up",
                 "exlogare_top_root_cause_analyses", "exlogare_time_to_rca_p50_seconds"):
        assert f"# HELP {name} " in text and f"# TYPE {name} gauge" in text
    assert "not at scrape time" in text


def test_promtool_check_metrics_is_clean() -> None:
    promtool = require_tool("promtool")
    text, _ = scrape(state(), state("lab"))
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                            timeout=30, check=False)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout.decode() + result.stderr.decode())
