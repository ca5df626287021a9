"""How many upstream calls the Grafana proxy saves: a dashboard of N panels watched by M viewers.

Runs the simulator (with a per-answer latency, like a remote API) and the exporter with its proxy, both on
loopback in this process, then plays two scenes and prints a Markdown table:

- open: every viewer opens the dashboard at the same moment (N × M panel loads at once);
- watch: every viewer keeps the dashboard open with auto-refresh, start times spread over one refresh
  interval, for a while. Time is scaled down (a TTL of 3 s stands for Grafana's 30 s);
- hits: the dashboard's answers cached, a separate client process (so the figures are the exporter's, not
  a Python client's sharing its CPU) asks them over 1 and then 16 keep-alive connections, as Grafana's
  backend does: throughput, latency, and the exporter's CPU per answer.

Without the proxy, each panel load is one call to the Exlogare API (Infinity queries it directly); the
table compares that with the calls the simulator actually received from the proxy.

    python bench/proxy_panels.py [--viewers 10] [--panels 20] [--ttl 3] [--refresh 1] [--duration 15]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ms, percentile, table

from tests.proxy_support import TOKEN_A, Stack, make_simulator, running_stack


def panel_queries(count: int) -> list[str]:
    """`count` distinct panel queries, the kinds a dashboard mixes."""
    kinds = [("overview", "days={d}"), ("timeseries", "days={d}"), ("top-projects", "days={d}&limit=10"),
             ("top-root-causes", "days={d}&limit=10")]
    queries = []
    days = [1, 7, 14, 30, 60, 90, 120, 180]
    for i in range(count):
        name, params = kinds[i % len(kinds)]
        day = days[i // len(kinds) % len(days)]
        queries.append(f"/proxy/acme/api/v1/stats/{name}?" + params.format(d=day))
    assert len(set(queries)) == count, "not enough distinct queries"
    return queries


class Load:
    """Panel loads through the proxy, timed, from a shared pool (Grafana's backend fans out the same way)."""

    def __init__(self, stack: Stack, workers: int = 64) -> None:
        self.stack = stack
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.lock = threading.Lock()
        self.times: dict[str, list[float]] = {}
        self.loads = 0
        self.errors = 0
        self.started = self.elapsed = 0.0

    def one(self, path: str) -> None:
        started = time.perf_counter()
        answer = self.stack.get(path, token=TOKEN_A)
        took = time.perf_counter() - started
        with self.lock:
            self.loads += 1
            self.errors += answer.status_code != 200
            self.times.setdefault(answer.headers.get("X-Exlogare-Cache", "none"), []).append(took)

    def dashboard(self, queries: list[str]) -> None:
        for future in [self.pool.submit(self.one, q) for q in queries]:
            future.result()


def hammer(load: Load, queries: list[str], viewers: int, seconds: float) -> None:
    """Every viewer reloading the warm dashboard as fast as it can for `seconds` (within one TTL): hits."""
    load.dashboard(queries)
    load.started = time.monotonic()

    def viewer() -> None:
        while time.monotonic() < load.started + seconds:
            load.dashboard(queries)

    threads = [threading.Thread(target=viewer) for _ in range(viewers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.elapsed = time.monotonic() - load.started


def client(port: int, paths: list[str], connections: int, seconds: float) -> None:
    """The hits' load (in a child process): each connection asks the paths in turn, kept alive, until
    `seconds` are up; prints the latencies and the cache outcomes as JSON."""
    latencies: list[float] = []
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(connections)

    def one(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Bearer {TOKEN_A}"}
        mine: list[tuple[float, str]] = []
        start.wait()
        end = time.perf_counter() + seconds
        n = offset
        while (began := time.perf_counter()) < end:
            conn.request("GET", paths[n % len(paths)], headers=headers)
            answer = conn.getresponse()
            answer.read()
            mine.append((time.perf_counter() - began,
                         answer.getheader("X-Exlogare-Cache", "none") if answer.status == 200 else "error"))
            n += 1
        conn.close()
        with lock:
            latencies.extend(took for took, _ in mine)
            outcomes.extend(outcome for _, outcome in mine)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"latencies": latencies, "outcomes": outcomes, "seconds": seconds}))


def hits(stack: Stack, queries: list[str], connections: int, seconds: float) -> tuple[object, ...]:
    """Cached answers asked by a child process; the exporter's CPU (this process's) per answer."""
    stack.exporter.proxy.cache.clear()
    Load(stack).dashboard(queries)  # warm: every query cached, within one TTL from here
    calls = len(stack.sim.requests())
    cpu = time.process_time()
    port = str(stack.exporter.http.port)  # type: ignore[union-attr]
    child = subprocess.run([sys.executable, __file__, "--client", port, str(connections), str(seconds),  # noqa: S603
                            *queries], capture_output=True, text=True, timeout=120, check=True)
    cpu = time.process_time() - cpu
    result = json.loads(child.stdout)
    times, outcomes = result["latencies"], result["outcomes"]
    hit = outcomes.count("hit")
    return (connections, len(times), f"{hit}", f"{len(times) / seconds:.0f}/s", ms(percentile(times, 50)),
            ms(percentile(times, 99)), f"{cpu / len(times) * 1e6:.0f} µs",
            len(stack.sim.requests()) - calls)


def scene(stack: Stack, run: Callable[[Load], object]) -> tuple[int, int, Load]:
    """Run one scene from a cold cache; (panel loads, upstream calls, the timings)."""
    stack.exporter.proxy.cache.clear()
    stack.sim.clear_requests()
    load = Load(stack)
    run(load)
    load.pool.shutdown()
    return load.loads, len(stack.sim.requests()), load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=10)
    parser.add_argument("--panels", type=int, default=20)
    parser.add_argument("--ttl", type=float, default=3.0, help="proxy cache_ttl, seconds")
    parser.add_argument("--refresh", type=float, default=1.0, help="each viewer's auto-refresh, seconds")
    parser.add_argument("--duration", type=float, default=15.0, help="length of the watch scene, seconds")
    parser.add_argument("--latency", type=float, default=0.05, help="simulator answer latency, seconds")
    parser.add_argument("--client", nargs="+", help=argparse.SUPPRESS)  # port, connections, seconds, paths
    args = parser.parse_args()
    if args.client:
        port, connections, seconds, *paths = args.client
        client(int(port), paths, int(connections), float(seconds))
        return 0
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a queue is what a burst of panels makes

    sim = make_simulator()
    sim.set_latency(args.latency)
    proxy = {"cache_ttl": f"{args.ttl}s", "cache_stale_ttl": f"{max(args.ttl, 600)}s"}
    queries = panel_queries(args.panels)
    rows = []
    # running_stack waits for readiness: the poller's first refresh is not the dashboard's doing.
    with running_stack(proxy=proxy, sim=sim) as stack:
        loads, calls, opened = scene(stack, lambda load: [f.result() for f in [
            load.pool.submit(load.dashboard, queries) for _ in range(args.viewers)]])
        rows.append(("open: all viewers at once", loads, calls, opened))

        def watch(load: Load) -> None:
            end = time.monotonic() + args.duration

            def viewer(offset: float) -> None:
                time.sleep(offset)
                while time.monotonic() < end:
                    started = time.monotonic()
                    load.dashboard(queries)
                    time.sleep(max(0.0, args.refresh - (time.monotonic() - started)))

            threads = [threading.Thread(target=viewer, args=(i * args.refresh / args.viewers,))
                       for i in range(args.viewers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        loads, calls, watched = scene(stack, watch)
        rows.append((f"watch: refresh {args.refresh:g}s, TTL {args.ttl:g}s, {args.duration:g}s", loads, calls,
                     watched))
        seconds = args.ttl * 0.6  # within one TTL: every load a hit
        loads, calls, hammered = scene(stack, lambda load: hammer(load, queries, args.viewers, seconds))
        rows.append((f"hits: {args.viewers} viewers reloading as fast as they can", loads, calls, hammered))
        hit_rows = [hits(stack, queries, connections, args.ttl * 0.5) for connections in (1, 16)]
    report(args, rows, hit_rows)
    return 0


def report(args: argparse.Namespace, rows: list[tuple[str, int, int, Load]],
           hit_rows: list[tuple[object, ...]]) -> None:
    print(f"{args.panels} panels × {args.viewers} viewers, simulator latency {args.latency * 1000:.0f} ms\n")
    scenes = []
    for name, loads, calls, load in rows:
        answered = load.times.get("hit", []) + load.times.get("shared", [])
        misses = load.times.get("miss", [])
        scenes.append((name, loads, calls, f"{loads / max(calls, 1):.1f}×", load.errors,
                       f"{statistics.median(answered) * 1000 if answered else 0:.1f} ms",
                       f"{statistics.median(misses) * 1000 if misses else 0:.1f} ms"))
    print(table(("scene", "panel loads = upstream calls without the proxy", "upstream calls with the proxy",
                 "reduction", "errors", "p50 hit or shared", "p50 miss"), scenes))
    print(f"\nCache hits, asked by a separate process over keep-alive connections for {args.ttl * 0.5:g} s "
          "(within one TTL) after one load of the dashboard; the exporter's CPU is its whole process's:\n")
    print(table(("connections", "answers", "cache hits", "throughput", "latency p50", "p99",
                 "exporter CPU per answer", "upstream calls"), hit_rows))


if __name__ == "__main__":
    sys.exit(main())
