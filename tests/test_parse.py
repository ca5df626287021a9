"""The pure parsers against every edge of the Read API v1 contract."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exlogare_exporter.parse import (
    SEVERITIES,
    AnalysesPage,
    Analysis,
    Overview,
    ShapeError,
    TopProject,
    TopRootCause,
    parse_analyses_page,
    parse_created_at,
    parse_overview,
    parse_timeseries,
    parse_top_projects,
    parse_top_root_causes,
    sanitize_label,
)

BASE_OVERVIEW: dict[str, Any] = {
    "failures_detected": 42, "analyses_completed": 41, "rca_count": 41,
    "severity_counts": {"low": 11, "medium": 18, "high": 12},
    "avg_time_to_rca_seconds": 27.4, "p50_time_to_rca_seconds": 12.0, "p90_time_to_rca_seconds": 78.1,
    "window_days": 7,
}


def overview(**changes: Any) -> dict[str, Any]:
    data = dict(BASE_OVERVIEW)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


# --- sanitize_label --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "max_len", "expected"), [
    ("acme/api", 120, "acme/api"),
    ("  padded  ", 120, "padded"),
    ("line one\nline two", 120, "line one line two"),
    ("tabs\t\tand\r\nCRLF", 120, "tabs and CRLF"),
    ("a \u2028 b\u00a0c", 120, "a b c"),  # Unicode line separator and no-break space are whitespace too
    ("bell\x07and\x00nul", 120, "bell and nul"),
    ("", 120, "(unknown)"),
    (" \n\t ", 120, "(unknown)"),
    ("abcdef", 3, "abc"),
    ("ab cdef", 3, "ab"),  # no trailing blank after the cut
    ("ééééé", 2, "éé"),  # code points, not bytes
    ("🚨🚨🚨", 2, "🚨🚨"),
    ("", 4, "(unk"),  # even the placeholder respects max_len
    ("lone \ud800 surrogate", 120, "lone \ufffd surrogate"),
    ('quotes " and \\ backslash', 120, 'quotes " and \\ backslash'),  # the exposition format escapes these
])
def test_sanitize_label(text: str, max_len: int, expected: str) -> None:
    assert sanitize_label(text, max_len) == expected


def test_sanitize_label_refuses_zero_length() -> None:
    with pytest.raises(ValueError, match="max_len"):
        sanitize_label("x", 0)


@given(st.text(), st.integers(min_value=1, max_value=200))
def test_sanitized_labels_are_one_bounded_line(text: str, max_len: int) -> None:
    label = sanitize_label(text, max_len)
    assert "\n" not in label and "\r" not in label
    assert 0 < len(label) <= max_len
    assert label == label.strip()
    assert "  " not in label
    label.encode("utf-8")  # a lone surrogate would make the scrape fail here


# --- overview --------------------------------------------------------------------------------------------


def test_overview_full() -> None:
    assert parse_overview(BASE_OVERVIEW) == Overview(
        failures_detected=42, analyses_completed=41,
        severity_counts=(("low", 11), ("medium", 18), ("high", 12)),
        avg_seconds=27.4, p50_seconds=12.0, p90_seconds=78.1,
    )


@pytest.mark.parametrize(("counts", "expected"), [
    ({}, (("low", 0), ("medium", 0), ("high", 0))),
    ({"high": 3}, (("low", 0), ("medium", 0), ("high", 3))),
    ({"high": 3, "low": 1}, (("low", 1), ("medium", 0), ("high", 3))),  # upstream order does not matter
    ({"high": 3, "critical": 9}, (("low", 0), ("medium", 0), ("high", 3))),  # unknown severity left out
    ({"HIGH": 3}, (("low", 0), ("medium", 0), ("high", 0))),  # case-sensitive, like the server
    ({"low": 2.0, "weird": "x"}, (("low", 2), ("medium", 0), ("high", 0))),  # a bad unknown key is ignored
])
def test_overview_severity_counts(counts: dict[str, Any], expected: tuple) -> None:
    result = parse_overview(overview(severity_counts=counts))
    assert result.severity_counts == expected
    assert tuple(sev for sev, _ in result.severity_counts) == SEVERITIES


def test_overview_null_figures_stay_none() -> None:
    result = parse_overview(overview(failures_detected=0, analyses_completed=0, rca_count=0,
                                     severity_counts={}, avg_time_to_rca_seconds=None,
                                     p50_time_to_rca_seconds=None, p90_time_to_rca_seconds=None))
    assert (result.avg_seconds, result.p50_seconds, result.p90_seconds) == (None, None, None)
    assert result.failures_detected == 0


def test_overview_absent_figures_are_none_and_ints_become_floats() -> None:
    result = parse_overview(overview(avg_time_to_rca_seconds=..., p50_time_to_rca_seconds=3,
                                     p90_time_to_rca_seconds=...))
    assert result.avg_seconds is None and result.p90_seconds is None
    assert result.p50_seconds == 3.0 and isinstance(result.p50_seconds, float)


@pytest.mark.parametrize(("changes", "analyses"), [
    ({"analyses_completed": 41, "rca_count": 99}, 41),  # analyses_completed wins
    ({"analyses_completed": ..., "rca_count": 40}, 40),  # older servers: fall back on rca_count
    ({"analyses_completed": None, "rca_count": 39}, 39),
    ({"analyses_completed": 17.0}, 17),  # an integral float is accepted
    ({"extra_field": {"nested": True}}, 41),  # unknown fields are ignored
])
def test_overview_analyses_completed(changes: dict[str, Any], analyses: int) -> None:
    result = parse_overview(overview(**changes))
    assert result.analyses_completed == analyses
    assert isinstance(result.analyses_completed, int)


@pytest.mark.parametrize(("obj", "field", "why"), [
    ([], "overview", "expected an object"),
    (None, "overview", "expected an object"),
    (overview(failures_detected=...), "overview.failures_detected", "missing"),
    (overview(analyses_completed=..., rca_count=...), "overview.analyses_completed", "missing"),
    (overview(severity_counts=...), "overview.severity_counts", "missing"),
    (overview(severity_counts=[1, 2]), "overview.severity_counts", "expected an object"),
    (overview(severity_counts=None), "overview.severity_counts", "expected an object"),
    (overview(failures_detected=True), "overview.failures_detected", "non-negative integer"),
    (overview(failures_detected="42"), "overview.failures_detected", "non-negative integer"),
    (overview(failures_detected=-1), "overview.failures_detected", "must not be negative"),
    (overview(failures_detected=4.5), "overview.failures_detected", "non-negative integer"),
    (overview(failures_detected=float("nan")), "overview.failures_detected", "non-negative integer"),
    (overview(analyses_completed=-3), "overview.analyses_completed", "must not be negative"),
    (overview(severity_counts={"high": -1}), "overview.severity_counts.high", "must not be negative"),
    (overview(severity_counts={"low": "many"}), "overview.severity_counts.low", "non-negative integer"),
    (overview(severity_counts={"medium": False}), "overview.severity_counts.medium", "non-negative integer"),
    (overview(avg_time_to_rca_seconds="fast"), "overview.avg_time_to_rca_seconds", "number or null"),
    (overview(p50_time_to_rca_seconds=True), "overview.p50_time_to_rca_seconds", "number or null"),
    (overview(p90_time_to_rca_seconds=-2.0), "overview.p90_time_to_rca_seconds", "non-negative finite"),
    (overview(p90_time_to_rca_seconds=float("inf")), "overview.p90_time_to_rca_seconds",
     "non-negative finite"),
])
def test_overview_shape_errors(obj: Any, field: str, why: str) -> None:
    with pytest.raises(ShapeError) as info:
        parse_overview(obj)
    message = str(info.value)
    assert message.startswith(field + ":")
    assert why in message


def test_shape_error_excerpt_is_short() -> None:
    with pytest.raises(ShapeError) as info:
        parse_overview(overview(failures_detected="x" * 10_000))
    assert len(str(info.value)) < 150
    assert "xxxx" in str(info.value)


# --- timeseries ------------------------------------------------------------------------------------------

TODAY = date(2026, 11, 23)


@pytest.mark.parametrize(("rows", "days", "today", "expected"), [
    ([], 3, TODAY, (("2026-11-21", 0), ("2026-11-22", 0), ("2026-11-23", 0))),
    ([{"date": "2026-11-20", "failures": 12}, {"date": "2026-11-23", "failures": 3}], 4, TODAY,
     (("2026-11-20", 12), ("2026-11-21", 0), ("2026-11-22", 0), ("2026-11-23", 3))),
    # the server's partial first day (and anything older or in the future) falls outside the window
    ([{"date": "2026-11-19", "failures": 5}, {"date": "2026-11-22", "failures": 1},
      {"date": "2026-11-24", "failures": 7}], 2, TODAY, (("2026-11-22", 1), ("2026-11-23", 0))),
    ([{"date": "2026-11-23", "failures": 2.0, "extra": "ignored"}], 1, TODAY, (("2026-11-23", 2),)),
    ([{"date": "2026-11-23", "failures": 2}, {"date": "2026-11-23", "failures": 1}], 1, TODAY,
     (("2026-11-23", 3),)),  # a repeated day cannot produce two samples
    ([{"date": "2026-01-01", "failures": 4}], 2, date(2026, 1, 1),  # across a year boundary
     (("2025-12-31", 0), ("2026-01-01", 4))),
    ([{"date": "2028-02-29", "failures": 1}], 2, date(2028, 3, 1), (("2028-02-29", 1), ("2028-03-01", 0))),
])
def test_timeseries(rows: list[Any], days: int, today: date, expected: tuple) -> None:
    assert parse_timeseries(rows, days, today) == expected


@pytest.mark.parametrize("days", [1, 7, 30, 180])
def test_timeseries_has_exactly_days_entries_ending_today(days: int) -> None:
    result = parse_timeseries([{"date": TODAY.isoformat(), "failures": 1}], days, TODAY)
    assert len(result) == days
    assert result[-1] == (TODAY.isoformat(), 1)
    assert result[0][0] == (TODAY - timedelta(days=days - 1)).isoformat()
    assert [d for d, _ in result] == sorted(d for d, _ in result)


@pytest.mark.parametrize(("obj", "field", "why"), [
    ({"date": "2026-11-23", "failures": 1}, "timeseries", "expected an array"),
    (None, "timeseries", "expected an array"),
    (["2026-11-23"], "timeseries[0]", "expected an object"),
    ([{"failures": 1}], "timeseries[0].date", "missing"),
    ([{"date": "2026-11-23"}], "timeseries[0].failures", "missing"),
    ([{"date": "23/11/2026", "failures": 1}], "timeseries[0].date", "not a YYYY-MM-DD date"),
    ([{"date": 20261123, "failures": 1}], "timeseries[0].date", "YYYY-MM-DD string"),
    ([{"date": "2026-11-23", "failures": -1}], "timeseries[0].failures", "must not be negative"),
    ([{"date": "2026-11-22", "failures": 1}, {"date": "2026-11-23", "failures": True}],
     "timeseries[1].failures", "non-negative integer"),
])
def test_timeseries_shape_errors(obj: Any, field: str, why: str) -> None:
    with pytest.raises(ShapeError) as info:
        parse_timeseries(obj, 7, TODAY)
    assert str(info.value).startswith(field + ":")
    assert why in str(info.value)


def test_timeseries_refuses_zero_days() -> None:
    with pytest.raises(ValueError, match="days"):
        parse_timeseries([], 0, TODAY)


# --- top projects ----------------------------------------------------------------------------------------


def project(path: Any = None, pid: Any = None, failures: Any = 1, analyses: Any = 1) -> dict[str, Any]:
    return {"project_id": pid, "project_path": path, "failures": failures, "analyses": analyses}


@pytest.mark.parametrize(("rows", "expected"), [
    ([], ()),
    ([project("acme/api", "12345", 17, 17)], (TopProject("acme/api", 17, 17),)),
    ([project(None, "12345", 5, 4)], (TopProject("12345", 5, 4),)),  # no path: the id
    ([project(None, 12345, 5, 4)], (TopProject("12345", 5, 4),)),  # an integer id is tolerated
    ([project(None, None, 2, 2)], (TopProject("(none)", 2, 2),)),  # neither
    ([project("  ", "77", 2, 2)], (TopProject("77", 2, 2),)),  # a blank path counts as absent
    ([project("", "", 2, 2)], (TopProject("(none)", 2, 2),)),
    ([project("acme/a\nb", None, 1, 1)], (TopProject("acme/a b", 1, 1),)),
    # labels colliding after sanitising are summed
    ([project("acme/api", None, 3, 2), project("acme/api ", None, 4, 4), project("\tacme/api\n", None, 1, 0)],
     (TopProject("acme/api", 8, 6),)),
    ([project(None, None, 3, 3), project("", None, 2, 1)], (TopProject("(none)", 5, 4),)),
    # stable order: failures descending, then label
    ([project("b", None, 5, 5), project("a", None, 5, 1), project("c", None, 9, 9)],
     (TopProject("c", 9, 9), TopProject("a", 5, 1), TopProject("b", 5, 5))),
    ([{**project("x", None, 1.0, 1), "extra": [1]}], (TopProject("x", 1, 1),)),
])
def test_top_projects(rows: list[Any], expected: tuple[TopProject, ...]) -> None:
    assert parse_top_projects(rows, 120) == expected


def test_top_projects_cut_long_paths_merge() -> None:
    long = "group/" + "x" * 200
    rows = [project(long + "/one", None, 2, 2), project(long + "/two", None, 3, 1)]
    result = parse_top_projects(rows, 20)
    assert result == (TopProject("group/" + "x" * 14, 5, 3),)


@pytest.mark.parametrize(("obj", "field", "why"), [
    ({"project_path": "a"}, "top_projects", "expected an array"),
    ([None], "top_projects[0]", "expected an object"),
    ([project("a", None, failures=...)], "top_projects[0].failures", "non-negative integer"),
    ([{"project_path": "a", "analyses": 1}], "top_projects[0].failures", "missing"),
    ([{"project_path": "a", "failures": 1}], "top_projects[0].analyses", "missing"),
    ([project("a", None, -1, 0)], "top_projects[0].failures", "must not be negative"),
    ([project(["a"], None)], "top_projects[0].project_path", "string or null"),
    ([project(None, True)], "top_projects[0].project_id", "string or null"),
])
def test_top_projects_shape_errors(obj: Any, field: str, why: str) -> None:
    with pytest.raises(ShapeError) as info:
        parse_top_projects(obj, 120)
    assert str(info.value).startswith(field + ":")
    assert why in str(info.value)


# --- top root causes -------------------------------------------------------------------------------------


def cause(text: Any, severity: Any = "high", count: Any = 1) -> dict[str, Any]:
    return {"root_cause": text, "severity": severity, "count": count}


@pytest.mark.parametrize(("rows", "expected"), [
    ([], ()),
    ([cause("Connection refused", "high", 9)], (TopRootCause("Connection refused", "high", 9),)),
    # the same cause at two severities stays two series
    ([cause("OOM", "high", 2), cause("OOM", "low", 3)],
     (TopRootCause("OOM", "low", 3), TopRootCause("OOM", "high", 2))),
    # texts that differ past max_len, or only in whitespace, collide and are summed
    ([cause("x" * 30 + "a", "medium", 1), cause("x" * 30 + "b", "medium", 2)],
     (TopRootCause("x" * 20, "medium", 3),)),
    ([cause("disk\nfull", "low", 1), cause("disk  full ", "low", 1)], (TopRootCause("disk full", "low", 2),)),
    # texts that differ only in case stay apart (distinct labels, no duplicate series)
    ([cause("Timeout", "low", 1), cause("timeout", "low", 1)],
     (TopRootCause("Timeout", "low", 1), TopRootCause("timeout", "low", 1))),
    # empty, blank or null root causes become (unknown)
    ([cause("", "high", 1), cause(None, "high", 2), cause("   ", "high", 3)],
     (TopRootCause("(unknown)", "high", 6),)),
    # an unknown severity keeps the row out (even with a bad count), the rest survives
    ([cause("a", "critical", 5), cause("b", "HIGH", 5), cause("c", None, "x"), cause("d", "low", 1)],
     (TopRootCause("d", "low", 1),)),
    # order: count desc, then label, then severity in SEVERITIES order
    ([cause("b", "high", 1), cause("b", "low", 1), cause("a", "medium", 1), cause("z", "low", 4)],
     (TopRootCause("z", "low", 4), TopRootCause("a", "medium", 1), TopRootCause("b", "low", 1),
      TopRootCause("b", "high", 1))),
])
def test_top_root_causes(rows: list[Any], expected: tuple[TopRootCause, ...]) -> None:
    assert parse_top_root_causes(rows, 20) == expected


@pytest.mark.parametrize(("obj", "field", "why"), [
    ({}, "top_root_causes", "expected an array"),
    ([[1]], "top_root_causes[0]", "expected an object"),
    ([{"root_cause": "a", "count": 1}], "top_root_causes[0].severity", "missing"),
    ([{"root_cause": "a", "severity": "low"}], "top_root_causes[0].count", "missing"),
    ([cause("a", "low", -2)], "top_root_causes[0].count", "must not be negative"),
    ([cause(42, "low", 1)], "top_root_causes[0].root_cause", "string or null"),
])
def test_top_root_causes_shape_errors(obj: Any, field: str, why: str) -> None:
    with pytest.raises(ShapeError) as info:
        parse_top_root_causes(obj, 120)
    assert str(info.value).startswith(field + ":")
    assert why in str(info.value)


# --- merging never repeats a label (property) ------------------------------------------------------------

_messy_text = st.one_of(st.none(), st.text(alphabet=st.sampled_from("ab \n\t\r\u2028x"), max_size=12))


@given(st.lists(st.tuples(_messy_text, _messy_text, st.integers(0, 1000), st.integers(0, 1000)), max_size=20),
       st.integers(min_value=1, max_value=6))
def test_top_projects_never_repeat_a_label(rows: list[tuple], max_len: int) -> None:
    data = [project(path, pid, f, a) for path, pid, f, a in rows]
    result = parse_top_projects(data, max_len)
    labels = [p.project for p in result]
    assert len(labels) == len(set(labels))
    assert all("\n" not in label and len(label) <= max_len for label in labels)
    assert sum(p.failures for p in result) == sum(f for _, _, f, _ in rows)
    assert sum(p.analyses for p in result) == sum(a for _, _, _, a in rows)
    assert [(-p.failures, p.project) for p in result] == sorted((-p.failures, p.project) for p in result)


@given(st.lists(st.tuples(_messy_text, st.sampled_from([*SEVERITIES, "critical"]), st.integers(0, 1000)),
                max_size=20),
       st.integers(min_value=1, max_value=6))
def test_top_root_causes_never_repeat_a_pair(rows: list[tuple], max_len: int) -> None:
    result = parse_top_root_causes([cause(t, s, c) for t, s, c in rows], max_len)
    pairs = [(r.root_cause, r.severity) for r in result]
    assert len(pairs) == len(set(pairs))
    assert all("\n" not in rc and len(rc) <= max_len for rc, _ in pairs)
    assert sum(r.count for r in result) == sum(c for _, s, c in rows if s in SEVERITIES)


# --- created_at and /analyses pages ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-04-21T10:15:00+00:00", datetime(2026, 4, 21, 10, 15, tzinfo=UTC)),
    ("2026-04-21T10:15:00.123456+00:00", datetime(2026, 4, 21, 10, 15, 0, 123456, tzinfo=UTC)),
    ("2026-04-21T10:15:00Z", datetime(2026, 4, 21, 10, 15, tzinfo=UTC)),
    ("2026-04-21T10:15:00.5Z", datetime(2026, 4, 21, 10, 15, 0, 500000, tzinfo=UTC)),
    ("2026-04-21T12:15:00+02:00", datetime(2026, 4, 21, 10, 15, tzinfo=UTC)),  # converted to UTC
    ("2026-04-21T10:15:00", datetime(2026, 4, 21, 10, 15, tzinfo=UTC)),  # naive counts as UTC
])
def test_parse_created_at(text: str, expected: datetime) -> None:
    result = parse_created_at(text)
    assert result == expected
    assert result.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", "yesterday", "2026-04-21", "2026-13-01T00:00:00Z", 1745230500, None])
def test_parse_created_at_refuses(text: Any) -> None:
    with pytest.raises(ShapeError, match="created_at"):
        parse_created_at(text)


def rca(**changes: Any) -> dict[str, Any]:
    item = {
        "id": "39af2c01-0000-4000-8000-000000000001", "provider": "gitlab", "source": "gitlab_webhook",
        "ci_run_id": "654", "ci_job_id": "1552", "project_id": "12345",
        "project_path": "apex/apexframework/release-server", "project_web_url": None, "pipeline_url": None,
        "job_url": None, "mr_iid": None, "root_cause": "Connection refused", "explanation": "…",
        "fix_suggestion": "…", "severity": "high", "confidence": 0.87,
        "created_at": "2026-04-21T10:15:00+00:00",
    }
    item.update(changes)
    return item


def test_analyses_page() -> None:
    page = parse_analyses_page({"items": [rca(), rca(id="b", project_path=None, source=None, confidence=1,
                                                     created_at="2026-04-21T10:14:00Z")],
                                "next_cursor": "opaque==", "limit": 100})
    assert page == AnalysesPage(items=(
        Analysis("39af2c01-0000-4000-8000-000000000001", "high", datetime(2026, 4, 21, 10, 15, tzinfo=UTC),
                 0.87, "apex/apexframework/release-server", "gitlab_webhook"),
        Analysis("b", "high", datetime(2026, 4, 21, 10, 14, tzinfo=UTC), 1.0, "12345", None),
    ), next_cursor="opaque==")


def test_analyses_last_page_and_unknown_severity() -> None:
    items = [rca(severity="critical"), rca(id="k", project_id=None, project_path=None)]
    page = parse_analyses_page({"items": items, "next_cursor": None})
    assert page.next_cursor is None
    assert [a.id for a in page.items] == ["k"]
    assert page.items[0].project is None


@pytest.mark.parametrize(("obj", "field"), [
    ([], "analyses:"),
    ({"next_cursor": None}, "analyses.items: missing"),
    ({"items": {}, "next_cursor": None}, "analyses.items:"),
    ({"items": [], "next_cursor": 5}, "analyses.next_cursor:"),
    ({"items": [], "next_cursor": ""}, "analyses.next_cursor:"),
    ({"items": [rca(id=None)]}, "analyses.items[0].id:"),
    ({"items": [rca(created_at="soon")]}, "analyses.items[0].created_at:"),
    ({"items": [rca(confidence=1.5)]}, "analyses.items[0].confidence:"),
    ({"items": [rca(confidence=True)]}, "analyses.items[0].confidence:"),
    ({"items": [rca(source=3)]}, "analyses.items[0].source:"),
    ({"items": [rca(), "x"]}, "analyses.items[1]:"),
])
def test_analyses_shape_errors(obj: Any, field: str) -> None:
    with pytest.raises(ShapeError) as info:
        parse_analyses_page(obj)
    assert str(info.value).startswith(field)


def test_values_are_frozen() -> None:
    result = parse_overview(BASE_OVERVIEW)
    with pytest.raises(AttributeError):
        result.failures_detected = 1  # type: ignore[misc]
