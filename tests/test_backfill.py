"""`exporter.py backfill`: per-day failures as OpenMetrics that promtool turns into TSDB blocks."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from exlogare_exporter import backfill
from exlogare_exporter.backfill import (
    HEAD_GUARD_SECONDS,
    Series,
    midnight,
    parse_labels,
    render,
    window_points,
)
from exlogare_exporter.config import parse_config
from tests import bundle
from tests.support import ROOT, Process, free_port, require_tool, start_simulator, wait_until

DAY = timedelta(days=1)
Samples = dict[tuple[tuple[tuple[str, str], ...], float], float]


def days(start: str, *counts: int) -> tuple[tuple[str, int], ...]:
    first = date.fromisoformat(start)
    return tuple(((first + n * DAY).isoformat(), c) for n, c in enumerate(counts))


def ts(day: str) -> float:
    return midnight(date.fromisoformat(day))


def parse_om(text: str) -> Samples:
    """{(labels, Unix time): value} through client_python's OpenMetrics parser (which also checks # EOF)."""
    return {(tuple(sorted(s.labels.items())), float(s.timestamp)): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- the pure parts ----------------------------------------------------------------------------------------

def test_a_window_value_at_each_midnight_is_the_sum_of_the_days_before_it() -> None:
    daily = days("2026-03-01", 1, 2, 3, 4)  # the 4th is today: still growing, never written
    assert window_points(daily, 1, float("inf")) == (
        (ts("2026-03-02"), 1), (ts("2026-03-03"), 2), (ts("2026-03-04"), 3))
    assert window_points(daily, 2, float("inf")) == ((ts("2026-03-03"), 3), (ts("2026-03-04"), 5))
    assert window_points(daily, 3, float("inf")) == ((ts("2026-03-04"), 6),)
    assert window_points(daily, 4, float("inf")) == ()  # needs four whole days: only three have ended


def test_samples_after_the_cutoff_are_left_out() -> None:
    daily = days("2026-03-01", 1, 2, 3, 4)
    assert window_points(daily, 1, ts("2026-03-04") - 1) == ((ts("2026-03-02"), 1), (ts("2026-03-03"), 2))


@pytest.mark.parametrize(("hours_after_midnight", "last_day_written"),
                         [(2.9, False), (3.0, True), (20, True)])
def test_nothing_from_the_last_three_hours(tmp_path: Path, hours_after_midnight: float,
                                           last_day_written: bool) -> None:
    config = parse_config({"defaults": {"base_url": "http://127.0.0.1:1", "windows": ["1d"]},
                           "tenants": [{"name": "acme", "token": "exl_x"}]}, {}, tmp_path)
    daily = days("2026-03-01", 5, 6, 7)
    now = ts("2026-03-03") + hours_after_midnight * 3600
    (series,) = backfill.tenant_series(config.tenants[0], daily, now - HEAD_GUARD_SECONDS, {})
    assert series.points[0] == (ts("2026-03-02"), 5)
    assert (series.points[-1] == (ts("2026-03-03"), 6)) is last_day_written


def test_render_is_openmetrics_with_timestamps() -> None:
    labels = (("job", 'a "quoted"\\ value'), ("tenant", "acme"), ("window", "7d"))
    text = render([Series(labels, ((ts("2026-03-02"), 3), (ts("2026-03-03"), 0)))]).decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE exlogare_failures_detected gauge" in text
    assert parse_om(text) == {(labels, ts("2026-03-02")): 3.0, (labels, ts("2026-03-03")): 0.0}


def test_render_with_nothing_to_write_is_still_valid() -> None:
    assert parse_om(render([]).decode()) == {}


def test_labels() -> None:
    assert parse_labels(["job=exlogare", "instance=exp:10450", "empty="]) == {
        "job": "exlogare", "instance": "exp:10450", "empty": ""}
    for bad in ("tenant=x", "window=1d", "no-equals", "9bad=x", "__name__=x", "with space=x"):
        with pytest.raises(ValueError, match="--label"):
            parse_labels([bad])


# --- the command, against the simulator ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_simulator(tmp_path_factory.mktemp("sim"), "--tenants", "acme,lab", "--seed", "9",
                                "--arrival-rate", "0")
    try:
        yield url
    finally:
        proc.stop()


def write_config(tmp_path: Path, sim_url: str, windows: str = "[1d, 7d, 30d]") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f'defaults:\n  base_url: "{sim_url}"\n  windows: {windows}\n  top_windows: [7d]\n'
                    "tenants:\n  - name: acme\n    token_env: TOKEN_ACME\n"
                    "  - name: lab\n    token_env: TOKEN_LAB\n")
    return path


TOKENS = {"TOKEN_ACME": "exl_sim_acme_read", "TOKEN_LAB": "exl_sim_lab_read"}


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "exporter.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **TOKENS, **(env or {})}, check=False)


def upstream_days(sim_url: str, tenant: str, n: int) -> dict[str, int]:
    r = requests.get(f"{sim_url}/api/v1/stats/timeseries", params={"days": n}, timeout=10,
                     headers={"Authorization": f"Bearer exl_sim_{tenant}_read"})
    r.raise_for_status()
    return {row["date"]: row["failures"] for row in r.json()}


def expected(per_day: dict[str, int], n: int, window: int, now: float) -> dict[float, int]:
    """What a `window`-day window held at each midnight the last `n` days explain, written out plainly."""
    today = datetime.fromtimestamp(now, UTC).date()
    first_whole_day = today - (n - 1) * DAY
    out = {}
    end = first_whole_day + (window - 1) * DAY
    while end < today:
        at = midnight(end + DAY)
        if at <= now - 3 * 3600:
            out[at] = sum(per_day.get((end - k * DAY).isoformat(), 0) for k in range(window))
        end += DAY
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("order", ["config first", "subcommand first"])
def test_backfill_writes_each_windows_history(tmp_path: Path, sim_url: str, order: str) -> None:
    config = str(write_config(tmp_path, sim_url))
    args = ["backfill", "--tenant", "acme", "--days", "40", "--label", "job=exlogare"]
    result = run(["--config", config, *args] if order == "config first" else [*args, "--config", config])
    now = time.time()
    assert result.returncode == 0, result.stderr
    got = parse_om(result.stdout)
    per_day = upstream_days(sim_url, "acme", 40)
    for window, n in (("1d", 1), ("7d", 7), ("30d", 30)):
        labels = (("job", "exlogare"), ("tenant", "acme"), ("window", window))
        series = {at: value for (lbl, at), value in got.items() if lbl == labels}
        assert series == expected(per_day, 40, n, now), window
        assert len(series) >= 40 - n - 1 and sum(series.values()) > 0
    assert {dict(lbl)["tenant"] for lbl, _ in got} == {"acme"}


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory, sim_url: str) -> tuple[Samples, Path]:
    """Both tenants' 180 days, as written by the command and as TSDB blocks made by promtool."""
    promtool = require_tool("promtool")
    tmp = tmp_path_factory.mktemp("blocks")
    result = run(["--config", str(write_config(tmp, sim_url)), "backfill", "--days", "180",
                  "--label", "job=exlogare", "--label", "instance=exporter:10450"])
    assert result.returncode == 0, result.stderr
    om = tmp / "backfill.om"
    om.write_text(result.stdout)
    data = tmp / "blocks"
    created = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics",
                              "--max-block-duration=720h", str(om), str(data)],
                             capture_output=True, text=True, check=False, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    return parse_om(result.stdout), data


@pytest.mark.e2e
def test_promtool_turns_the_output_into_blocks(tmp_path: Path, blocks: tuple[Samples, Path]) -> None:
    written, data = blocks
    assert {dict(lbl)["tenant"] for lbl, _ in written} == {"acme", "lab"}  # every tenant by default
    assert len(written) > 2 * 170  # 1d alone has a sample per whole day, for each tenant
    copy = shutil.copytree(data, tmp_path / "data")
    (copy / "wal").mkdir()  # dump opens the directory as a database, which has a WAL
    dump = subprocess.run([require_tool("promtool"), "tsdb", "dump", str(copy)], capture_output=True,
                          text=True, check=False, timeout=120)
    assert dump.returncode == 0, dump.stderr
    assert parse_dump(dump.stdout) == written


@pytest.mark.e2e
def test_a_new_prometheus_serves_the_dashboards_history(tmp_path: Path, blocks: tuple[Samples, Path]) -> None:
    """The README's promise: with the blocks in its data directory, the history panel reaches back months."""
    written, data = blocks
    prometheus = require_tool("prometheus")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text("global: {}\n")
    proc = Process([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={shutil.copytree(data, tmp_path / 'data')}",
                    "--storage.tsdb.retention.time=400d", f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn"], tmp_path / "prometheus.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.check_alive() or requests.get(f"{url}/-/ready", timeout=2).ok, timeout=30,
                   what="Prometheus ready")
        (panel,) = [p for p in bundle.data_panels(bundle.load_json(bundle.OVERVIEW))
                    if p["title"] == "Failures in the window"]
        step = 6 * 3600  # what Grafana picks for half a year on a wide panel; $__rate_interval follows it
        expr = bundle.substitute(panel["targets"][0]["expr"], {**bundle.EXAMPLE_VALUES,
                                                                "__rate_interval": f"{step}s"})
        end = time.time()
        body = requests.get(f"{url}/api/v1/query_range", timeout=30, params={
            "query": expr, "start": end - 175 * 86400, "end": end, "step": step}).json()
        (series,) = body["data"]["result"]
        assert series["metric"] == {"tenant": "acme"}
        daily = sorted((at, v) for (lbl, at), v in written.items()
                       if dict(lbl)["tenant"] == "acme" and dict(lbl)["window"] == "1d")
        points = [(float(t), float(v)) for t, v in series["values"]]
        assert len(points) >= 170  # about one a day, for 175 days
        for t, value in points:  # each point shows the newest daily sample at most one step old
            at, expected = max(p for p in daily if p[0] <= t)
            assert t - at <= step and value == expected, (t, at, value, expected)
    finally:
        assert proc.stop() == 0


def parse_dump(text: str) -> Samples:
    """`promtool tsdb dump` lines: `{__name__="…", k="v", …} value timestamp_ms`."""
    out: Samples = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\{(.*)\} (\S+) (\d+)", line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:\\.|[^"\\])*)"', m.group(1)))
        assert labels.pop("__name__") == "exlogare_failures_detected"
        out[(tuple(sorted(labels.items())), int(m.group(3)) / 1000)] = float(m.group(2))
    return out


@pytest.mark.e2e
def test_an_upstream_failure_writes_nothing(tmp_path: Path, sim_url: str) -> None:
    result = run(["--config", str(write_config(tmp_path, sim_url)), "backfill"],
                 {"TOKEN_LAB": "exl_revoked_or_mistyped_token"})
    assert result.returncode == 1
    assert result.stdout == ""  # not a partial file that promtool would half-load
    assert "tenant lab" in result.stderr and "401" in result.stderr
    assert "exl_revoked_or_mistyped_token" not in result.stderr


@pytest.mark.e2e
def test_an_unknown_tenant_is_refused(tmp_path: Path, sim_url: str) -> None:
    result = run(["backfill", "--config", str(write_config(tmp_path, sim_url)), "--tenant", "nope"])
    assert result.returncode == 2
    assert "unknown tenant(s) nope" in result.stderr and "acme, lab" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("bad", ["1", "181", "x"])
def test_days_out_of_range_is_a_usage_error(bad: str) -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    backfill.add_arguments(parser)
    with pytest.raises(argparse.ArgumentError, match="--days"):
        parser.parse_args(["--days", bad])
