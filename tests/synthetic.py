"""Exporter snapshots of many tenants without an upstream: for the exposition tests and the benchmarks.

Each tenant has the shape the issue's benchmark names: 3 windows, 10 top projects and 10 top root causes
per window, 30 days of timeseries (about 150 data series), and an RCA stream with counters and confidence
histograms. Label values are the simulator's root causes and project paths, cut like the parsers cut them.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from types import MappingProxyType

from exlogare_exporter.metrics import OVERVIEW, TIMESERIES, TOP_PROJECTS, TOP_ROOT_CAUSES
from exlogare_exporter.parse import SEVERITIES, Overview, TopProject, TopRootCause, sanitize_label
from exlogare_exporter.simulator.data import CATALOG, make_projects
from exlogare_exporter.state import Fetched, Store, TenantState
from exlogare_exporter.stream import Counts, Histogram, StreamState, TenantStream

WINDOWS = (("1d", 1), ("7d", 7), ("30d", 30))
TOP = 10
DAYS = 30
LABEL_MAX = 120
# The simulator's root causes as the parser labels them, without the pairs that collide once cleaned.
CAUSES = sorted({(sanitize_label(entry[0], LABEL_MAX), entry[1]) for entry in CATALOG})


def tenant_state(name: str, now: float, *, at: float | None = None, max_staleness: float = 300.0,
                 seed: int = 0) -> TenantState:
    """A tenant after a successful refresh at `at` (default `now`)."""
    rng = random.Random(f"{seed}:{name}")
    at = now if at is None else at
    paths = sorted({sanitize_label(p.path or p.id or "(none)", LABEL_MAX) for p in make_projects(rng, name)})
    paths += [f"{name}/services/component-{i}" for i in range(TOP - len(paths))]
    results: dict[tuple[str, str], Fetched] = {}
    for label, days in WINDOWS:
        failures = rng.randint(days, 40 * days)
        analyses = failures - rng.randint(0, failures // 10)
        high = rng.randint(0, analyses // 3)
        medium = rng.randint(0, analyses - high)
        counts = (("low", analyses - high - medium), ("medium", medium), ("high", high))
        p50 = rng.uniform(5, 60)
        results[(OVERVIEW, label)] = Fetched(
            Overview(failures, analyses, counts, p50 * 1.5, p50, p50 * 4), at)
        projects = tuple(TopProject(path, rng.randint(1, 99), rng.randint(0, 99))
                         for path in rng.sample(paths, TOP))
        results[(TOP_PROJECTS, label)] = Fetched(projects, at)
        causes = tuple(TopRootCause(cause, severity, rng.randint(1, 50))
                       for cause, severity in rng.sample(CAUSES, TOP))
        results[(TOP_ROOT_CAUSES, label)] = Fetched(causes, at)
    today = datetime.fromtimestamp(now, UTC).date().toordinal()
    daily = tuple((datetime.fromordinal(today - offset).date().isoformat(), rng.randint(0, 40))
                  for offset in range(DAYS - 1, -1, -1))
    results[(TIMESERIES, "")] = Fetched(daily, at)
    return TenantState(name=name, max_staleness=max_staleness, results=MappingProxyType(results), attempts=1,
                       up=True, last_attempt=at, last_success=at, last_duration=rng.uniform(0.2, 2.0))


def tenant_stream(name: str, now: float, *, seed: int = 0) -> TenantStream:
    """A tenant's RCA stream after some walks: a count per severity and a confidence histogram each."""
    rng = random.Random(f"stream:{seed}:{name}")
    totals: dict[tuple[str, ...], int] = {}
    confidence: dict[str, Histogram] = {}
    for severity in SEVERITIES:
        histogram = Histogram()
        for _ in range(rng.randint(0, 30)):
            histogram = histogram.observe(round(rng.uniform(0.05, 1.0), 2))
        totals[(severity,)] = histogram.count
        confidence[severity] = histogram
    counts = Counts((), MappingProxyType(totals), MappingProxyType({}), MappingProxyType(confidence))
    state = StreamState(primed=True, watermark=datetime.fromtimestamp(now - rng.uniform(0, 600), UTC))
    return TenantStream(name, state, counts, attempts=3, up=True, last_attempt=now, last_success=now)


def names(count: int) -> list[str]:
    return [f"t{i:04d}" for i in range(count)]


def fill(store: Store, streams: Store, count: int, now: float) -> None:
    """`count` tenants in both stores."""
    for name in names(count):
        store.put(tenant_state(name, now))
        streams.put(tenant_stream(name, now))
