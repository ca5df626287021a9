"""Prometheus exposition: a custom collector over the `Store`'s snapshot, on a private registry."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import disable_created_metrics
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .parse import Overview, TopProject
from .state import Store, TenantState
from .stream import Counts, TenantStream

SCHEDULED = "Refreshed from the Exlogare API on a schedule, not at scrape time."

# Endpoint kinds as stored in `TenantState.results` keys.
OVERVIEW = "overview"
TOP_PROJECTS = "top_projects"
TOP_ROOT_CAUSES = "top_root_causes"
TIMESERIES = "timeseries"

# A tenant's samples come in pieces that change independently, `(what, value)`: equal values make the same
# samples, so `exposition` renders again only the pieces whose value changed.
Piece = tuple[Hashable, Any]
HEALTH = "health"
COUNTS = "counts"


def tenant_pieces(state: TenantState, now: float) -> list[Piece]:
    """The tenant's health, then each result young enough to export, in the order they are exposed."""
    return [(HEALTH, (state.up, state.last_success, state.last_duration)),
            *((key, fetched.value) for key, fetched in state.fresh_results(now))]


def stream_pieces(stream: TenantStream, now: float) -> list[Piece]:
    """The stream's counters, then its health (time does not change them)."""
    return [(COUNTS, stream.counts),
            (HEALTH, (stream.state.newest, stream.up, stream.last_success, stream.catching_up))]


@dataclass(frozen=True)
class Kinds:
    """The family classes to fill: client_python's, or `lines`' (the same calls, lines written at once)."""

    gauge: Callable[..., Any]
    counter: Callable[..., Any]
    histogram: Callable[..., Any]


CLIENT = Kinds(GaugeMetricFamily, CounterMetricFamily, HistogramMetricFamily)


class Families:
    """The data families of one scrape, created empty so every metric has HELP/TYPE even without samples."""

    def __init__(self, kinds: Kinds = CLIENT) -> None:
        tw = ["tenant", "window"]
        self.failures = kinds.gauge(
            "exlogare_failures_detected", f"Failed CI jobs received in the window. {SCHEDULED}", labels=tw)
        self.analyses = kinds.gauge(
            "exlogare_analyses_completed", f"RCAs written in the window. {SCHEDULED}", labels=tw)
        self.by_severity = kinds.gauge(
            "exlogare_analyses_by_severity", f"RCAs written in the window, by severity. {SCHEDULED}",
            labels=[*tw, "severity"])
        ttr = "time from failure to RCA in the window; absent when the window holds no RCA."
        self.ttr = {
            key: kinds.gauge(f"exlogare_time_to_rca_{key}_seconds", f"{what} {ttr} {SCHEDULED}", labels=tw)
            for key, what in (("p50", "Median"), ("p90", "90th percentile"), ("avg", "Mean"))
        }
        self.daily = kinds.gauge(
            "exlogare_daily_failures",
            f"Failed CI jobs per UTC day, zero-filled; today's value grows during the day. {SCHEDULED}",
            labels=["tenant", "date"])
        self.project_failures = kinds.gauge(
            "exlogare_top_project_failures", f"Failures of the top projects in the window. {SCHEDULED}",
            labels=[*tw, "project"])
        self.project_analyses = kinds.gauge(
            "exlogare_top_project_analyses", f"RCAs of the top projects in the window. {SCHEDULED}",
            labels=[*tw, "project"])
        self.root_causes = kinds.gauge(
            "exlogare_top_root_cause_analyses",
            f"RCAs in the largest root-cause clusters in the window. {SCHEDULED}",
            labels=[*tw, "root_cause", "severity"])
        self.up = kinds.gauge(
            "exlogare_up", "1 when the last refresh of every endpoint of the tenant succeeded, else 0.",
            labels=["tenant"])
        self.last_success = kinds.gauge(
            "exlogare_last_success_timestamp_seconds",
            "Unix time of the tenant's last fully successful refresh.", labels=["tenant"])
        self.duration = kinds.gauge(
            "exlogare_refresh_duration_seconds", "Duration of the tenant's last refresh.", labels=["tenant"])

    def all(self) -> list[Metric]:
        return [self.failures, self.analyses, self.by_severity, *self.ttr.values(), self.daily,
                self.project_failures, self.project_analyses, self.root_causes, self.up, self.last_success,
                self.duration]

    def add_piece(self, name: str, piece: Piece) -> None:
        key, value = piece
        if key == HEALTH:
            up, last_success, last_duration = value
            self.up.add_metric([name], 1.0 if up else 0.0)
            if last_success is not None:
                self.last_success.add_metric([name], last_success)
            if last_duration is not None:
                self.duration.add_metric([name], last_duration)
            return
        kind, window = key
        if kind == OVERVIEW:
            self._add_overview(name, window, value)
        elif kind == TOP_PROJECTS:
            self._add_projects(name, window, value)
        elif kind == TOP_ROOT_CAUSES:
            for rc in value:  # type: TopRootCause
                self.root_causes.add_metric([name, window, rc.root_cause, rc.severity], rc.count)
        elif kind == TIMESERIES:
            for day, failures in value:
                self.daily.add_metric([name, day], failures)

    def _add_overview(self, name: str, window: str, ov: Overview) -> None:
        self.failures.add_metric([name, window], ov.failures_detected)
        self.analyses.add_metric([name, window], ov.analyses_completed)
        for severity, count in ov.severity_counts:
            self.by_severity.add_metric([name, window, severity], count)
        for key, value in (("p50", ov.p50_seconds), ("p90", ov.p90_seconds), ("avg", ov.avg_seconds)):
            if value is not None:
                self.ttr[key].add_metric([name, window], value)

    def _add_projects(self, name: str, window: str, projects: Iterable[TopProject]) -> None:
        for p in projects:
            self.project_failures.add_metric([name, window, p.project], p.failures)
            self.project_analyses.add_metric([name, window, p.project], p.analyses)


def data_piece_families(pieces: Iterable[tuple[str, Piece]], kinds: Kinds = CLIENT) -> list[Any]:
    """Every data family, with the samples of `(tenant, piece)` pairs (`tenant_pieces`)."""
    families = Families(kinds)
    for name, piece in pieces:
        families.add_piece(name, piece)
    return families.all()


def stream_piece_families(pieces: Iterable[tuple[str, Piece]], kinds: Kinds = CLIENT) -> list[Any]:
    """Every stream family, with the samples of `(tenant, piece)` pairs (`stream_pieces`)."""
    total = kinds.counter(
        "exlogare_analyses", "RCAs that arrived since the exporter started, each counted once, by severity "
        "(and project or source when analyses_labels asks); from the /analyses stream.")
    confidence = kinds.histogram(
        "exlogare_analysis_confidence", "Confidence of the RCAs counted in exlogare_analyses_total.",
        labels=["tenant", "severity"])
    latest = kinds.gauge(
        "exlogare_latest_analysis_timestamp_seconds", "created_at of the newest RCA the stream has seen.",
        labels=["tenant"])
    up = kinds.gauge(
        "exlogare_analyses_stream_up", "1 when the tenant's last /analyses walk succeeded, else 0.",
        labels=["tenant"])
    last_success = kinds.gauge(
        "exlogare_analyses_last_walk_success_timestamp_seconds",
        "Unix time of the tenant's last successful /analyses walk.", labels=["tenant"])
    catching_up = kinds.gauge(
        "exlogare_analyses_catching_up",
        "1 while a backlog larger than analyses_max_pages pages is being walked over several cycles.",
        labels=["tenant"])
    for name, (kind, value) in pieces:
        if kind == COUNTS:
            counts: Counts = value
            label_names = ("tenant", "severity", *counts.labels)
            for key, n in sorted(counts.totals.items()):
                total.add_sample("exlogare_analyses_total", dict(zip(label_names, (name, *key), strict=True)),
                                 float(n))
            for severity, histogram in counts.confidence.items():
                confidence.add_metric([name, severity], histogram.cumulative(), histogram.total)
            continue
        newest, stream_up, stream_last_success, stream_catching_up = value
        if newest is not None:
            latest.add_metric([name], newest.timestamp())
        up.add_metric([name], 1.0 if stream_up else 0.0)
        if stream_last_success is not None:
            last_success.add_metric([name], stream_last_success)
        catching_up.add_metric([name], 1.0 if stream_catching_up else 0.0)
    return [total, confidence, latest, up, last_success, catching_up]


@dataclass(frozen=True)
class TenantRequests:
    """A tenant's upstream requests so far, by `(endpoint, code)`; swapped whole into a `Store`."""

    name: str
    counts: Mapping[tuple[str, str], int]


def request_pieces(requests: TenantRequests, now: float) -> list[Piece]:
    return [(COUNTS, requests.counts)]


def request_piece_families(pieces: Iterable[tuple[str, Piece]], kinds: Kinds = CLIENT) -> list[Any]:
    """`exlogare_upstream_requests_total`, with the samples of `(tenant, piece)` pairs (`request_pieces`)."""
    family = kinds.counter(
        "exlogare_upstream_requests", "HTTP requests made to the Exlogare API, by endpoint and outcome "
        "(status code, or timeout, connection, invalid_body); retries count one each.",
        labels=["tenant", "endpoint", "code"])
    for name, (_, counts) in pieces:
        for (endpoint, code), n in counts.items():
            family.add_metric([name, endpoint, code], float(n))
    return [family]


@dataclass(frozen=True)
class Section:
    """Families built from one store's snapshot, item (tenant) by item and piece by piece: a collector of
    the registry, which builds them all at each scrape, and what `exposition` caches piece by piece.

    `pieces(item, now)` are an item's pieces at `now`, in exposition order; `families(pairs, kinds)` builds
    every family of the section (with or without samples) from `(tenant, piece)` pairs, and must create
    them all before it reads the first pair; `valid_until(item, now)` is when time alone would change the
    item's pieces."""

    store: Store[Any]
    pieces: Callable[[Any, float], list[Piece]]
    families: Callable[[Iterable[tuple[str, Piece]], Kinds], list[Any]]
    clock: Callable[[], float]
    valid_until: Callable[[Any, float], float] = lambda item, now: math.inf

    def describe(self) -> list[Metric]:
        return self.families((), CLIENT)

    def collect(self) -> Iterable[Metric]:
        """Every family from the snapshot; never calls the upstream."""
        now = self.clock()
        return self.families(((name, piece) for name, item in self.store.snapshot().items()
                              for piece in self.pieces(item, now)), CLIENT)


class ExporterMetrics:
    """The private registry and the instruments the poller and the CLI update directly."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time,
                 streams: Store[TenantStream] | None = None) -> None:
        disable_created_metrics()  # `_created` series would double the counters' cardinality for no use
        self.store = store
        self.clock = clock
        self.streams: Store[TenantStream] = streams if streams is not None else Store()
        # Upstream requests per tenant: a store too (a few thousand series at a thousand tenants, and most
        # tenants' counts do not move between two scrapes), so /metrics renders only the tenants that did.
        self.requests: Store[TenantRequests] = Store()
        self._requests_lock = threading.Lock()
        # `registry` is the whole exposition: the families built from the stores' snapshots, then `live`.
        self.sections = (
            Section(store, tenant_pieces, data_piece_families, clock, TenantState.fresh_until),
            Section(self.streams, stream_pieces, stream_piece_families, clock),
            Section(self.requests, request_pieces, request_piece_families, clock),
        )
        self.registry = CollectorRegistry()
        for section in self.sections:
            self.registry.register(section)
        # `live`: the small, fast-changing rest (gauges, process), which /metrics renders at every scrape
        # while it caches the snapshot part (see `exposition`). Register new instruments here.
        self.live = CollectorRegistry()
        self.registry.register(self.live)
        ProcessCollector(registry=self.live)
        PlatformCollector(registry=self.live)
        Gauge("exlogare_exporter_build_info", "The exporter's version; constant 1.", ["version"],
              registry=self.live).labels(__version__).set(1)
        # Also told of every upstream attempt, as (tenant, endpoint, code): the proxy counts its own share.
        self.response_listeners: list[Callable[[str, str, str], None]] = []
        self.reload_ok = Gauge(
            "exlogare_config_last_reload_successful", "1 when the last configuration (re)load succeeded.",
            registry=self.live)
        self.reload_time = Gauge(
            "exlogare_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.", registry=self.live)

    def on_response(self, tenant: str) -> Callable[[str, str], None]:
        """The client's per-attempt callback for one tenant."""
        def record(endpoint: str, code: str) -> None:
            with self._requests_lock:
                counts = dict(prev.counts) if (prev := self.requests.get(tenant)) else {}
                counts[(endpoint, code)] = counts.get((endpoint, code), 0) + 1
                self.requests.put(TenantRequests(tenant, MappingProxyType(counts)))
            for listener in self.response_listeners:
                listener(tenant, endpoint, code)
        return record

    def forget_tenant(self, tenant: str) -> None:
        """Drop a removed tenant's request counters, so its series end with it."""
        with self._requests_lock:
            self.requests.retain(set(self.requests.snapshot()) - {tenant})

    def config_loaded(self, ok: bool, now: float | None = None) -> None:
        self.reload_ok.set(1 if ok else 0)
        if ok:
            self.reload_time.set(time.time() if now is None else now)
