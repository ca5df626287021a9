"""Refresh cycles at scale: 1000 tenants against the simulator answering each call in 50 ms.

- cycle: every tenant refreshed once, `concurrency` at a time (`Poller.refresh_all`, what `--once` does);
  its time against the ideal, calls × latency ÷ concurrency, and the calls against the minimum the config
  needs (windows + 2 × top_windows + 1 per tenant);
- schedule: the real scheduler for two intervals; when each refresh starts within the interval (a
  histogram), and the busiest second at the upstream against the mean: spread, not bursts.

The simulator runs in a child process (its own CPU), the exporter's poller in this one.

    python bench/refresh.py [--tenants 1000] [--latency 0.05] [--concurrency 16,32,64] [--interval 30]
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests
from common import Child, machine, ms, table

from exlogare_exporter.config import Config, parse_config
from exlogare_exporter.metrics import ExporterMetrics
from exlogare_exporter.poller import Poller
from exlogare_exporter.state import Store, TenantState

WINDOWS = ["1d", "7d", "30d"]


def simulator(tenants: int, latency: float, threads: int) -> tuple[Child, str]:
    child = Child(["-m", "exlogare_exporter.simulator", "--port", "0", "--tenants", "", "--extra-tenants",
                   str(tenants), "--arrival-rate", "0", "--latency", str(latency), "--threads", str(threads)],
                  "Exlogare simulator listening on", timeout=300)
    return child, child.line.rsplit(" ", 1)[1]


def exporter_config(url: str, tenants: int, concurrency: int, interval: float) -> Config:
    data = {"concurrency": concurrency,
            "defaults": {"base_url": url, "interval": f"{interval:g}s", "windows": WINDOWS, "top_limit": 10,
                         "timeseries_days": 30, "retries": 0, "timeout": "30s", "analyses_interval": 0},
            "tenants": [{"name": f"t{i:04d}", "token": f"exl_sim_t{i:04d}_read"}
                        for i in range(1, tenants + 1)]}
    return parse_config(data, environ={})


def upstream_log(url: str, clear: bool = False) -> list[dict[str, Any]]:
    if clear:
        requests.delete(url + "/_sim/requests", timeout=30).raise_for_status()
        return []
    answer = requests.get(url + "/_sim/requests", timeout=60)
    answer.raise_for_status()
    return answer.json()


def check_calls(log: list[dict[str, Any]], config: Config) -> tuple[int, int, bool]:
    """(calls, the minimum, whether each tenant made exactly its own distinct calls, all answered 200)."""
    per_call = len(WINDOWS) * 3 + 1
    minimum = per_call * len(config.tenants)
    by_tenant = collections.Counter(r["tenant"] for r in log)
    distinct = {(r["tenant"], r["path"], tuple(sorted(r["query"].items()))) for r in log}
    exact = (all(n == per_call for n in by_tenant.values()) and len(by_tenant) == len(config.tenants)
             and len(distinct) == len(log) and all(r["status"] == 200 for r in log))
    return len(log), minimum, exact


def cycle(url: str, tenants: int, concurrency: int, latency: float) -> tuple[Any, ...]:
    config = exporter_config(url, tenants, concurrency, 60)
    poller = Poller(Store(), ExporterMetrics(Store()))
    poller.apply(config)
    upstream_log(url, clear=True)
    started = time.perf_counter()
    states = poller.refresh_all()
    took = time.perf_counter() - started
    poller.stop()
    calls, minimum, exact = check_calls(upstream_log(url), config)
    ideal = calls * latency / concurrency
    up = sum(s.up for s in states)
    return (tenants, concurrency, f"{took:.1f} s", f"{ideal:.1f} s", f"**{took / ideal:.2f}×**",
            f"{calls} ({'= the minimum' if exact and calls == minimum else f'minimum {minimum}'})",
            f"{up}/{tenants}")


class RecordingPoller(Poller):
    """Notes when each refresh starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.starts: list[tuple[float, str]] = []
        self._starts_lock = threading.Lock()

    def refresh(self, name: str) -> TenantState | None:
        with self._starts_lock:
            self.starts.append((time.monotonic(), name))
        return super().refresh(name)


def schedule(url: str, tenants: int, concurrency: int, interval: float, bins: int = 10) -> str:
    config = exporter_config(url, tenants, concurrency, interval)
    store: Store = Store()
    poller = RecordingPoller(store, ExporterMetrics(store))
    poller.apply(config)
    upstream_log(url, clear=True)
    jitter = config.tenants[0].jitter
    origin = time.monotonic()
    wall_origin = time.time()
    poller.start()
    time.sleep(2 * interval + jitter + 1)
    poller.stop()
    log = upstream_log(url)
    runs: dict[str, list[float]] = collections.defaultdict(list)
    for moment, name in poller.starts:
        runs[name].append(moment - origin)
    second = [starts[1] for starts in runs.values() if len(starts) > 1]
    histogram = collections.Counter(int(offset % interval / interval * bins) for offset in second)
    first_round = max(starts[0] for starts in runs.values())
    steady = [r["at"] - wall_origin for r in log if interval <= r["at"] - wall_origin < 2 * interval]
    seconds = collections.Counter(int(moment) for moment in steady)
    step = interval / bins
    header = [f"{i * step:g}–{(i + 1) * step:g} s" for i in range(bins)]
    rows = [[histogram.get(i, 0) for i in range(bins)]]
    up = sum(1 for s in store.snapshot().values() if s.up)
    return "\n".join([
        f"{tenants} tenants, interval {interval:g} s (jitter {jitter:g} s), concurrency {concurrency}, the "
        f"real scheduler for {2 * interval + jitter + 1:g} s. Each tenant's second refresh, by its phase in "
        f"the interval (when it started, modulo the interval; ideal: {tenants / bins:g} per bin):\n",
        table(header, rows),
        f"\nThe first round (all tenants, as fast as the concurrency allows) started its last refresh "
        f"{first_round:.1f} s in; {len(second)} of {tenants} tenants made their second refresh in the "
        f"following interval, none more than {max(len(s) for s in runs.values())} refreshes in all. "
        f"Upstream calls per second in the second interval: mean {len(steady) / interval:.0f}, busiest "
        f"second {max(seconds.values(), default=0)}. Tenants up at the end: {up}/{tenants}.",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.05, help="simulator latency per call, seconds")
    parser.add_argument("--concurrency", default="16,32,64", help="comma-separated values for the cycle")
    parser.add_argument("--interval", type=float, default=30.0, help="for the schedule; 0 skips it")
    parser.add_argument("--schedule-concurrency", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    threads = 2 * max([*concurrencies, args.schedule_concurrency]) + 8
    child, url = simulator(args.tenants, args.latency, threads)
    try:
        rows = [cycle(url, args.tenants, c, args.latency) for c in concurrencies]
        print(f"### Refresh cycle\n\n{machine()}; simulator latency {ms(args.latency)} per call\n")
        print(table(("tenants", "concurrency", "cycle", "ideal", "ratio", "upstream calls", "up"), rows))
        if args.interval:
            print()
            print(schedule(url, args.tenants, args.schedule_concurrency, args.interval))
    finally:
        child.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
