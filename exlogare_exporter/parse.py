"""Pure parsers: Exlogare Read API v1 JSON → typed, frozen values.

Everything the upstream may legitimately vary (absent severities, null figures, missing days, colliding
labels) is absorbed here, so the metrics layer only ever sees complete, duplicate-free values. Anything
the contract does not allow raises `ShapeError`, whose message names the field and shows at most a short
excerpt of the value, never the whole body.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

SEVERITIES: tuple[str, ...] = ("low", "medium", "high")

UNKNOWN_LABEL = "(unknown)"
NO_PROJECT_LABEL = "(none)"

_EXCERPT_CHARS = 40
_WHITESPACE = re.compile(r"\s+")
_DATETIME_SHAPE = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class ShapeError(ValueError):
    """The upstream answered JSON of the wrong shape; the message names the field and the reason."""


@dataclass(frozen=True)
class Overview:
    failures_detected: int
    analyses_completed: int
    severity_counts: tuple[tuple[str, int], ...]  # all of SEVERITIES, in that order
    avg_seconds: float | None  # None: no RCA in the window ("no data", not zero)
    p50_seconds: float | None
    p90_seconds: float | None


@dataclass(frozen=True)
class TopProject:
    project: str
    failures: int
    analyses: int


@dataclass(frozen=True)
class TopRootCause:
    root_cause: str
    severity: str
    count: int


@dataclass(frozen=True)
class Analysis:
    id: str
    severity: str
    created_at: datetime  # aware, UTC
    confidence: float
    project: str | None  # path, else id, else None; raw (not sanitised)
    source: str | None


@dataclass(frozen=True)
class AnalysesPage:
    items: tuple[Analysis, ...]
    next_cursor: str | None


# --- helpers ---------------------------------------------------------------------------------------------


def _excerpt(value: Any) -> str:
    """A short repr of an offending value, so an error never carries a whole body."""
    text = repr(value)
    if len(text) > _EXCERPT_CHARS:
        text = text[: _EXCERPT_CHARS - 1] + "…"
    return text


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _got(value: Any) -> str:
    return "null" if value is None else f"{_type_name(value)} {_excerpt(value)}"


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ShapeError(f"{field}: expected an object, got {_got(value)}")
    return value


def _array(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise ShapeError(f"{field}: expected an array, got {_got(value)}")
    return value


def _required(obj: dict[str, Any], key: str, field: str) -> Any:
    if key not in obj:
        raise ShapeError(f"{field}.{key}: missing")
    return obj[key]


def _count(value: Any, field: str) -> int:
    """A non-negative integer; `17.0` is accepted (some JSON encoders write it), `true` is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ShapeError(f"{field}: expected a non-negative integer, got {_got(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ShapeError(f"{field}: expected a non-negative integer, got {_excerpt(value)}")
        value = int(value)
    if value < 0:
        raise ShapeError(f"{field}: must not be negative, got {value}")
    return value


def _seconds(value: Any, field: str) -> float | None:
    """A duration figure; null stays None because it means "no data", not zero."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ShapeError(f"{field}: expected a number or null, got {_got(value)}")
    if not math.isfinite(value) or value < 0:
        raise ShapeError(f"{field}: expected a non-negative finite number, got {_excerpt(value)}")
    return float(value)


def _optional_text(value: Any, field: str, allow_int: bool = False) -> str | None:
    if value is None:
        return None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ShapeError(f"{field}: expected a string or null, got {_got(value)}")
    return value


def _merge(rows: Iterable[tuple[K, tuple[int, ...]]]) -> dict[K, tuple[int, ...]]:
    """Sum the values of rows sharing a key, so no two series can carry the same labels."""
    merged: dict[K, tuple[int, ...]] = {}
    for key, values in rows:
        old = merged.get(key)
        merged[key] = values if old is None else tuple(a + b for a, b in zip(old, values, strict=True))
    return merged


# Unicode's Cc (control characters: noise in a label, treated like whitespace) and Cs (lone surrogates from
# JSON, which cannot be encoded as UTF-8 at scrape time), as character ranges: a regex, not a loop in Python.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def sanitize_label(text: str, max_len: int) -> str:
    """Make free text safe and bounded as a label value: one line, no runs of blanks, at most max_len."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    cleaned = _SURROGATE.sub("\ufffd", _CONTROL.sub(" ", text))
    cleaned = _WHITESPACE.sub(" ", cleaned).strip()
    cleaned = cleaned[:max_len].rstrip()
    return cleaned or UNKNOWN_LABEL[:max_len]


def _sorted_desc(items: Iterable[T], value: Callable[[T], int], *tie: Callable[[T], Any]) -> tuple[T, ...]:
    """Largest first, then by label, so the output order never depends on the upstream's order."""
    return tuple(sorted(items, key=lambda it: (-value(it), *(f(it) for f in tie))))


# --- endpoints -------------------------------------------------------------------------------------------


def parse_overview(obj: Any) -> Overview:
    """`/stats/overview`: a missing severity is zero; `analyses_completed` wins over `rca_count`."""
    data = _object(obj, "overview")
    failures = _count(_required(data, "failures_detected", "overview"), "overview.failures_detected")
    if data.get("analyses_completed") is not None:
        analyses = _count(data["analyses_completed"], "overview.analyses_completed")
    elif data.get("rca_count") is not None:
        analyses = _count(data["rca_count"], "overview.rca_count")
    else:
        raise ShapeError("overview.analyses_completed: missing (and no rca_count to fall back on)")
    counts = _object(_required(data, "severity_counts", "overview"), "overview.severity_counts")
    severity_counts = tuple(
        (sev, _count(counts[sev], f"overview.severity_counts.{sev}") if sev in counts else 0)
        for sev in SEVERITIES
    )  # unknown severities are left out: one odd key must not cost the whole answer
    return Overview(
        failures_detected=failures,
        analyses_completed=analyses,
        severity_counts=severity_counts,
        avg_seconds=_seconds(data.get("avg_time_to_rca_seconds"), "overview.avg_time_to_rca_seconds"),
        p50_seconds=_seconds(data.get("p50_time_to_rca_seconds"), "overview.p50_time_to_rca_seconds"),
        p90_seconds=_seconds(data.get("p90_time_to_rca_seconds"), "overview.p90_time_to_rca_seconds"),
    )


def _parse_date(value: Any, field: str) -> date:
    if not isinstance(value, str):
        raise ShapeError(f"{field}: expected a YYYY-MM-DD string, got {_got(value)}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ShapeError(f"{field}: not a YYYY-MM-DD date: {_excerpt(value)}") from None


def parse_timeseries(obj: Any, days: int, today: date) -> tuple[tuple[str, int], ...]:
    """`/stats/timeseries`: exactly `days` entries ending with `today`, oldest first, absent days zero.

    Entries outside that range are dropped: the server's first day is partial.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    rows = _array(obj, "timeseries")
    first = today - timedelta(days=days - 1)
    failures: dict[date, int] = {}
    for i, row in enumerate(rows):
        field = f"timeseries[{i}]"
        entry = _object(row, field)
        day = _parse_date(_required(entry, "date", field), f"{field}.date")
        count = _count(_required(entry, "failures", field), f"{field}.failures")
        if first <= day <= today:
            failures[day] = failures.get(day, 0) + count
    window = (first + timedelta(days=n) for n in range(days))
    return tuple((day.isoformat(), failures.get(day, 0)) for day in window)


def _project_label(entry: dict[str, Any], field: str) -> str | None:
    """Path, else id, else None; blank strings count as absent."""
    path = _optional_text(entry.get("project_path"), f"{field}.project_path")
    if path is not None and path.strip():
        return path
    pid = _optional_text(entry.get("project_id"), f"{field}.project_id", allow_int=True)
    if pid is not None and pid.strip():
        return pid
    return None


def parse_top_projects(obj: Any, max_len: int) -> tuple[TopProject, ...]:
    """`/stats/top-projects`: label = path, else id, else `(none)`; colliding labels are summed."""
    rows = _array(obj, "top_projects")
    parsed: list[tuple[str, tuple[int, ...]]] = []
    for i, row in enumerate(rows):
        field = f"top_projects[{i}]"
        entry = _object(row, field)
        label = _project_label(entry, field)
        project = sanitize_label(NO_PROJECT_LABEL if label is None else label, max_len)
        failures = _count(_required(entry, "failures", field), f"{field}.failures")
        analyses = _count(_required(entry, "analyses", field), f"{field}.analyses")
        parsed.append((project, (failures, analyses)))
    merged = [TopProject(p, f, a) for p, (f, a) in _merge(parsed).items()]
    return _sorted_desc(merged, lambda t: t.failures, lambda t: t.project)


def parse_top_root_causes(obj: Any, max_len: int) -> tuple[TopRootCause, ...]:
    """`/stats/top-root-causes`: rows with an unknown severity are dropped; colliding pairs are summed."""
    rows = _array(obj, "top_root_causes")
    parsed: list[tuple[tuple[str, str], tuple[int, ...]]] = []
    for i, row in enumerate(rows):
        field = f"top_root_causes[{i}]"
        entry = _object(row, field)
        severity = _required(entry, "severity", field)
        if severity not in SEVERITIES:
            continue  # one odd row must not cost the whole answer
        count = _count(_required(entry, "count", field), f"{field}.count")
        text = _optional_text(entry.get("root_cause"), f"{field}.root_cause")
        parsed.append(((sanitize_label(text or "", max_len), severity), (count,)))
    merged = [TopRootCause(rc, sev, c) for (rc, sev), (c,) in _merge(parsed).items()]
    return _sorted_desc(merged, lambda t: t.count, lambda t: t.root_cause,
                        lambda t: SEVERITIES.index(t.severity))


def parse_created_at(text: Any) -> datetime:
    """ISO 8601 with `Z` or an offset, with or without a fraction → aware UTC (naive counts as UTC)."""
    if not isinstance(text, str):
        raise ShapeError(f"created_at: expected a string, got {_got(text)}")
    if not _DATETIME_SHAPE.match(text):
        raise ShapeError(f"created_at: not an ISO 8601 date and time: {_excerpt(text)}")
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ShapeError(f"created_at: not an ISO 8601 date and time: {_excerpt(text)}") from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _parse_analysis(row: Any, field: str) -> Analysis | None:
    entry = _object(row, field)
    aid = _required(entry, "id", field)
    if not isinstance(aid, str) or not aid:
        raise ShapeError(f"{field}.id: expected a non-empty string, got {_got(aid)}")
    severity = _required(entry, "severity", field)
    if severity not in SEVERITIES:
        return None
    try:
        created_at = parse_created_at(_required(entry, "created_at", field))
    except ShapeError as exc:
        raise ShapeError(f"{field}.{exc}") from None
    confidence = _required(entry, "confidence", field)
    if (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
            or not math.isfinite(confidence) or not 0 <= confidence <= 1):
        raise ShapeError(f"{field}.confidence: expected a number from 0 to 1, got {_excerpt(confidence)}")
    project = _project_label(entry, field)
    source = _optional_text(entry.get("source"), f"{field}.source")
    return Analysis(aid, severity, created_at, float(confidence), project, source)


def parse_analyses_page(obj: Any) -> AnalysesPage:
    """A page of `/analyses`; an item with an unknown severity is left out rather than failing the page."""
    data = _object(obj, "analyses")
    rows = _array(_required(data, "items", "analyses"), "analyses.items")
    cursor = data.get("next_cursor")
    if cursor is not None and (not isinstance(cursor, str) or not cursor):
        raise ShapeError(f"analyses.next_cursor: expected a non-empty string or null, got {_excerpt(cursor)}")
    items = (_parse_analysis(row, f"analyses.items[{i}]") for i, row in enumerate(rows))
    return AnalysesPage(tuple(a for a in items if a is not None), cursor)
