"""The cached /metrics: the same bytes as the plain client_python rendering, rendered only when needed."""

from __future__ import annotations

import gzip
import subprocess
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families

from exlogare_exporter.exposition import (
    GROUP,
    MAX_FORMATS,
    CachedExposition,
    fast_zlib,
    negotiate,
)
from exlogare_exporter.metrics import HEALTH, ExporterMetrics, Section
from exlogare_exporter.state import Store
from exlogare_exporter.web import ExporterApp, HTTPServer
from tests import synthetic
from tests.support import Process, free_port, parse_metrics, require_tool, wait_until

NOW = 1_800_000_000.0
# What Prometheus 2.42 sends (Prometheus 3 adds escaping=allow-utf-8 and text/plain;version=1.0.0).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
PROMETHEUS_3_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
                       "application/openmetrics-text;version=0.0.1;q=0.5,"
                       "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,"
                       "*/*;q=0.2")
ACCEPTS = {"text 0.0.4": None, "openmetrics": PROMETHEUS_ACCEPT, "prometheus 3": PROMETHEUS_3_ACCEPT,
           "text 1.0.0": "text/plain;version=1.0.0;escaping=underscores"}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> ExporterMetrics:
    store: Store = Store()
    metrics = ExporterMetrics(store, clock=clock)
    synthetic.fill(store, metrics.streams, 5, NOW)
    # One tenant with results of different ages, so they expire one after the other.
    state = synthetic.tenant_state("aging", NOW, max_staleness=300.0)
    results = dict(state.results)
    for offset, key in enumerate(sorted(results)):
        results[key] = replace(results[key], at=NOW - 10 * offset)
    store.put(replace(state, results=results))
    metrics.on_response("t0000")("overview", "200")
    return metrics


def without_process(text: bytes) -> bytes:
    """The exposition without the process collector's lines, whose values move between two renderings."""
    return b"".join(line for line in text.splitlines(keepends=True)
                    if not line.startswith((b"process_", b"# HELP process_", b"# TYPE process_")))


def joined(chunks: list[bytes], compressed: bool = False) -> bytes:
    body = b"".join(chunks)
    if not compressed:
        return body
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    text = decompressor.decompress(body) + decompressor.flush()
    assert decompressor.eof and decompressor.unused_data == b"", "not exactly one gzip stream"
    return text


def assert_same_as_plain(cached: CachedExposition, metrics: ExporterMetrics) -> None:
    for name, accept in ACCEPTS.items():
        fmt = negotiate(accept)
        plain = fmt.encode(metrics.registry)
        for compressed in (False, True):
            got = joined(cached.render(fmt, compressed), compressed)
            assert without_process(got) == without_process(plain), (name, compressed)
        if fmt.openmetrics:
            assert plain.endswith(b"# EOF\n") and got.count(b"# EOF") == 1 and got.endswith(b"# EOF\n")
            list(om_families(got.decode()))  # the strict OpenMetrics parser accepts it
        else:
            assert parse_metrics(without_process(got).decode()) == \
                parse_metrics(without_process(plain).decode())


@pytest.mark.parametrize("deflate", [zlib, fast_zlib], ids=["zlib", "fast"])
def test_the_same_bytes_as_the_plain_way_across_changes_and_expiry(metrics: ExporterMetrics, clock: Clock,
                                                                   deflate: ModuleType) -> None:
    cached = CachedExposition(metrics.sections, metrics.live, metrics.registry, clock, deflate=deflate)
    assert_same_as_plain(cached, metrics)
    # a refresh of one tenant, a stream walk, a removed tenant, a new one
    metrics.store.put(synthetic.tenant_state("t0001", NOW, seed=7))
    metrics.streams.put(synthetic.tenant_stream("t0002", NOW, seed=7))
    metrics.store.retain({n for n in metrics.store.snapshot() if n != "t0003"})
    metrics.store.put(synthetic.tenant_state("new", NOW))
    assert_same_as_plain(cached, metrics)
    # time alone: the aging tenant's results pass max_staleness one after the other, then everything does
    for now in (NOW + 295, NOW + 300, NOW + 300.5, NOW + 315, NOW + 10_000):
        clock.now = now
        assert_same_as_plain(cached, metrics)
    assert b"exlogare_failures_detected{" not in joined(cached.render(negotiate(None)))
    clock.now = NOW  # a clock stepped back: the old results are fresh again
    assert_same_as_plain(cached, metrics)


def test_a_scrape_renders_only_when_a_version_changes_or_a_result_expires(metrics: ExporterMetrics,
                                                                         clock: Clock) -> None:
    cached = CachedExposition.for_metrics(metrics)
    fmt = negotiate(PROMETHEUS_ACCEPT)
    first = cached.render(fmt, True)
    for _ in range(3):
        assert cached.render(fmt, True)[0] is first[0]  # the same cached gzip prefix
        cached.render(fmt, False)
    assert cached.renders == 1
    clock.now = NOW + 1  # nothing expires yet (the oldest result is 90 s old, the limit is 300 s)
    cached.render(fmt)
    assert cached.renders == 1
    metrics.config_loaded(True, NOW)  # a live gauge: rendered at every scrape, nothing else
    cached.render(fmt)
    assert cached.renders == 1
    metrics.on_response("t0001")("overview", "200")  # an upstream request: a store of its own changed
    assert b'exlogare_upstream_requests_total{code="200",endpoint="overview",tenant="t0001"} 1.0' in \
        joined(cached.render(fmt))
    assert cached.renders == 2
    metrics.store.put(synthetic.tenant_state("t0001", NOW, seed=3))
    cached.render(fmt)
    assert cached.renders == 3
    clock.now = NOW + 210.5  # the aging tenant's oldest result is now stale
    cached.render(fmt)
    assert cached.renders == 4


def test_a_change_formats_again_only_the_pieces_whose_value_changed(metrics: ExporterMetrics,
                                                                     clock: Clock) -> None:
    built: list[tuple[str, Any]] = []

    def counting(section: Section) -> Section:
        def families(pieces: Any, kinds: Any) -> Any:
            def noted() -> Any:  # as the builder reads them: the cache cuts its lines between two pieces
                for name, (key, value) in pieces:
                    built.append((name, key))
                    yield name, (key, value)
            return section.families(noted(), kinds)
        return replace(section, families=families)

    sections = tuple(counting(s) for s in metrics.sections)
    cached = CachedExposition(sections, metrics.live, metrics.registry, metrics.clock)
    fmt = negotiate(None)
    cached.render(fmt)
    assert {name for name, _ in built} == {*metrics.store.snapshot(), *metrics.streams.snapshot()}
    assert len(built) == sum(len(s.results) + 1 for s in metrics.store.snapshot().values()) + \
        2 * len(metrics.streams.snapshot()) + len(metrics.requests.snapshot())
    built.clear()
    changed = synthetic.tenant_state("t0004", NOW, seed=9)
    metrics.store.put(changed)
    cached.render(fmt)
    assert built == [("t0004", key) for key in [HEALTH, *changed.results]]
    built.clear()
    # A refresh that brought the same numbers: only its health (last success, duration) is new.
    metrics.store.put(replace(changed, last_success=NOW + 60, last_duration=0.5))
    metrics.streams.put(replace(metrics.streams.get("t0001"), last_success=NOW + 60))  # type: ignore[arg-type]
    cached.render(fmt)
    assert built == [("t0004", HEALTH), ("t0001", HEALTH)]
    assert_same_as_plain(cached, metrics)


def test_gzip_compresses_again_only_the_segments_that_changed(clock: Clock) -> None:
    """Each family's lines of `GROUP` neighbouring tenants are a segment of the one gzip stream."""
    store: Store = Store()
    metrics = ExporterMetrics(store, clock=clock)
    synthetic.fill(store, metrics.streams, 3 * GROUP, NOW)
    cached = CachedExposition.for_metrics(metrics)
    fmt = negotiate(PROMETHEUS_ACCEPT)
    first = joined(cached.render(fmt, True), True)
    every = cached.deflated
    cached.render(fmt, True)
    assert cached.deflated == every  # nothing changed: the cached stream
    # A refresh of the second group's tenants that brought the same numbers: their health lines only.
    for name in synthetic.names(3 * GROUP)[GROUP:2 * GROUP]:
        metrics.store.put(replace(metrics.store.get(name), last_success=NOW + 60,  # type: ignore[type-var]
                                  last_duration=0.25))
    cached.render(fmt, True)
    assert cached.deflated - every == 2  # the group's last success and duration lines; `up` is the same
    # New numbers for one tenant of the third group: the segments of its group's families with samples.
    every = cached.deflated
    metrics.store.put(synthetic.tenant_state(synthetic.names(3 * GROUP)[-1], NOW, seed=5))
    cached.render(fmt, True)
    assert 3 < cached.deflated - every <= len(metrics.store.get("t0000").results) + 3  # type: ignore[union-attr]
    assert_same_as_plain(cached, metrics)
    # A tenant removed at the start shifts every group: all compressed again, still the plain way's bytes.
    metrics.store.retain(set(synthetic.names(3 * GROUP)[1:]))
    assert_same_as_plain(cached, metrics)
    assert joined(cached.render(fmt, True), True) != first


def test_concurrent_scrapes_render_once(metrics: ExporterMetrics) -> None:
    cached = CachedExposition.for_metrics(metrics)
    fmt = negotiate(PROMETHEUS_ACCEPT)
    start = threading.Barrier(8)
    bodies: list[bytes] = []

    def scrape() -> None:
        start.wait()
        bodies.append(joined(cached.render(fmt, True), True))

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cached.renders == 1
    assert len(bodies) == 8
    assert len({without_process(b) for b in bodies}) == 1


def test_name_filters_and_many_formats_are_served_the_plain_way(metrics: ExporterMetrics) -> None:
    cached = CachedExposition.for_metrics(metrics)
    text = joined(cached.render(negotiate(None), names=["exlogare_up", "exlogare_upstream_requests_total"]))
    assert {name for name, _ in parse_metrics(text.decode())} == {"exlogare_up",
                                                                  "exlogare_upstream_requests_total"}
    formats = [negotiate(f"application/openmetrics-text;version=1.0.{i}") for i in range(MAX_FORMATS + 3)]
    for fmt in formats:
        assert without_process(joined(cached.render(fmt))) == without_process(fmt.encode(metrics.registry))
    assert cached.renders <= MAX_FORMATS
    for escaping in ("dots", "values"):  # escapings that rewrite legacy names: the plain way's names
        fmt = negotiate(f"application/openmetrics-text;version=1.0.0;escaping={escaping}")
        assert not fmt.legacy_names
        text = joined(CachedExposition.for_metrics(metrics).render(fmt))
        ours = [line for line in text.splitlines() if b"exlogare" in line]  # process lines move
        assert ours == [line for line in fmt.encode(metrics.registry).splitlines() if b"exlogare" in line]
        assert b"exlogare_up{" not in text and len(ours) > 1000


def test_promtool_accepts_the_cached_exposition(metrics: ExporterMetrics) -> None:
    promtool = require_tool("promtool")
    cached = CachedExposition.for_metrics(metrics)
    for accept in (None, "text/plain;version=1.0.0"):  # promtool reads the text format, not OpenMetrics
        text = joined(cached.render(negotiate(accept), True), True)
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60,
                               check=False)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check


def test_over_http_with_the_headers_prometheus_sends(metrics: ExporterMetrics) -> None:
    app = ExporterApp(metrics.registry, metrics.store, lambda: list(metrics.store.snapshot()),
                      streams=metrics.streams, metrics_app=CachedExposition.for_metrics(metrics))
    server = HTTPServer(app, "127.0.0.1", 0).start()
    try:
        answer = requests.get(server.url + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT}, timeout=10)
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert answer.headers["Content-Encoding"] == "gzip"  # requests asks for gzip, as Prometheus does
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.text.endswith("# EOF\n") and answer.text.count("# EOF") == 1
        fmt = negotiate(PROMETHEUS_ACCEPT)
        assert answer.headers["Content-Type"] == fmt.content_type
        assert without_process(answer.content) == without_process(fmt.encode(metrics.registry))
        raw = requests.get(server.url + "/metrics", headers={"Accept-Encoding": "identity"}, timeout=10)
        assert "Content-Encoding" not in raw.headers
        assert int(raw.headers["Content-Length"]) == len(raw.content)
        assert gzip.compress(raw.content)  # a plain body
        head = requests.head(server.url + "/metrics", timeout=10)
        assert head.status_code == 200 and head.content == b""
    finally:
        server.stop()


def test_prometheus_scrapes_the_cached_gzip_exposition(metrics: ExporterMetrics, clock: Clock,
                                                       tmp_path: Path) -> None:
    """Prometheus itself (OpenMetrics, gzip) reads every sample, and sees a refresh at its next scrape."""
    prometheus = require_tool("prometheus")
    clock.now = time.time()  # Prometheus must not see the synthetic data as from the future
    for name in list(metrics.store.snapshot()):
        metrics.store.put(synthetic.tenant_state(name, clock.now))
    app = ExporterApp(metrics.registry, metrics.store, lambda: list(metrics.store.snapshot()),
                      streams=metrics.streams, metrics_app=CachedExposition.for_metrics(metrics))
    server = HTTPServer(app, "127.0.0.1", 0).start()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "exlogare",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}],
    }))
    prom = Process([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                   tmp_path / "prometheus.log")
    url = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr: str) -> list[dict[str, Any]]:
        answer = requests.get(url, params={"query": expr}, timeout=5).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    try:
        wait_until(lambda: prom.check_alive() or query('up{job="exlogare"} == 1'), timeout=30,
                   what="Prometheus scraping the exporter")
        families = list(om_families(joined(CachedExposition.for_metrics(metrics).render(
            negotiate(PROMETHEUS_ACCEPT))).decode()))
        expected = sum(len(f.samples) for f in families)
        scraped = wait_until(lambda: query("scrape_samples_scraped"), what="a scrape's sample count")
        assert float(scraped[0]["value"][1]) == expected
        down = replace(metrics.store.get("t0002"), up=False)  # type: ignore[arg-type]
        metrics.store.put(down)
        wait_until(lambda: query('exlogare_up{tenant="t0002"} == 0'), what="the refresh at the next scrape")
    finally:
        prom.stop()
        server.stop()
