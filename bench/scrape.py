"""Scrape cost: `/metrics` at 10, 100 and 1000 tenants, cached (the exporter) against the plain way.

Each tenant has 3 windows, 10 top projects and 10 top root causes per window, 30 days of timeseries (about
150 data series) and an RCA stream (about 45 series): `tests/synthetic.py`. The exporter's HTTP side runs
in a child process (waitress, as in production) and reports its own CPU time, so the figures are the
server's cost per scrape, HTTP included; the scrapes ask what Prometheus asks (OpenMetrics, gzip).

- plain: client_python's `make_wsgi_app` over the registry, every family rebuilt and formatted at every
  scrape (the exporter before this cache, and most Python exporters);
- cached, unchanged: the snapshot did not change between scrapes;
- cached, 1 refresh: one tenant was refreshed before each scrape (its changed pieces formatted again, the
  text joined again, the gzip segments its lines are in compressed again);
- cached, a quarter refreshed: a quarter of the tenants were refreshed and their RCA streams walked
  before each scrape (a 15 s scrape interval with tenants refreshed every 60 s), neighbours in config
  order as the scheduler's phases make them, either bringing the same numbers (a quiet spell: new
  objects, equal values, a new last-success time) or changing every value (the worst case); and the worst
  case once more with tenants picked anywhere, so that nearly every gzip segment changes;
- concurrent: 8 scrapes at once, right after a refresh.

    python bench/scrape.py [--tenants 10,100,1000] [--seconds 4] [--concurrent 8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Child, machine, mib, ms, percentile, table

PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
              "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


# --- the server (child process) -----------------------------------------------------------------------------

def serve(tenants: int, mode: str) -> None:
    """The exporter's HTTP side over `tenants` synthetic tenants; `/_bench/cpu` and `/_bench/touch` aside."""
    import copy
    import logging
    from dataclasses import replace

    from exlogare_exporter.exposition import CachedExposition
    from exlogare_exporter.metrics import ExporterMetrics
    from exlogare_exporter.state import Fetched, Store, TenantState
    from exlogare_exporter.web import ExporterApp, HTTPServer
    from tests import synthetic

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    now = time.time()
    store: Store = Store()
    metrics = ExporterMetrics(store)
    synthetic.fill(store, metrics.streams, tenants, now)
    for name in synthetic.names(tenants):
        for endpoint in ("overview", "timeseries", "top_projects", "top_root_causes", "analyses"):
            metrics.on_response(name)(endpoint, "200")
    # Two prebuilt states of every tenant to swap in, so a "refresh" costs the server nothing but the swap:
    # every value differs between the two, the worst case for the cache.
    names = synthetic.names(tenants)
    states = {name: [synthetic.tenant_state(name, now, seed=seed) for seed in (1, 2)] for name in names}
    walks = {name: [replace(metrics.streams.get(name), last_success=now + seed)  # type: ignore[type-var]
                    for seed in (1, 2)] for name in names}
    turn = [0]
    flips = dict.fromkeys(names, 0)
    scatter = random.Random(1)  # noqa: S311 (a benchmark's choice, not a secret)

    def same_numbers(state: TenantState, phase: int) -> TenantState:
        """The state a refresh that found nothing new makes: freshly parsed (equal) values, new times."""
        results = {k: Fetched(copy.deepcopy(f.value), f.at + phase) for k, f in state.results.items()}
        return replace(state, results=results, last_success=state.last_success + phase,  # type: ignore[operator]
                       last_duration=0.5 + phase)

    def touch(count: int, how: str) -> None:
        """Refresh `count` tenants, the next ones in config order (or anywhere: `scattered`): new results,
        a stream walk and 5 upstream requests each."""
        chosen = scatter.sample(names, count) if how == "scattered" else \
            [names[(turn[0] + n) % tenants] for n in range(count)]
        turn[0] += count
        for name in chosen:
            phase = flips[name] = 1 - flips[name]
            store.put(same_numbers(store.get(name), phase + 1) if how == "same" else states[name][phase])
            metrics.streams.put(walks[name][phase])
            for endpoint in ("overview", "timeseries", "top_projects", "top_root_causes", "analyses"):
                metrics.on_response(name)(endpoint, "200")
    cached = CachedExposition.for_metrics(metrics) if mode == "cached" else None
    app = ExporterApp(metrics.registry, store, lambda: list(store.snapshot()), streams=metrics.streams,
                      metrics_app=cached)

    def bench_app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/_bench/touch":
            count, _, how = (environ.get("QUERY_STRING") or "1").partition("&")
            touch(int(count), how)
            body = b"ok"
        elif path == "/_bench/cpu":
            renders = cached.renders if cached else 0
            body = json.dumps({"cpu": time.process_time(), "renders": renders}).encode()
        else:
            return app(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    server = HTTPServer(bench_app, "127.0.0.1", 0).start()
    print(f"ready {server.port}", flush=True)
    threading.Event().wait()


# --- the client (this process) ------------------------------------------------------------------------------

class Target:
    def __init__(self, tenants: int, mode: str) -> None:
        self.child = Child([__file__, "--serve", str(tenants), mode], "ready", timeout=300)
        self.port = int(self.child.line.split()[1])
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def get(self, path: str, headers: dict[str, str] | None = None,
            conn: http.client.HTTPConnection | None = None) -> bytes:
        conn = conn or self.conn
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status}")
        return body

    def cpu(self) -> tuple[float, int]:
        data = json.loads(self.get("/_bench/cpu"))
        return data["cpu"], data["renders"]

    def scrape(self, conn: http.client.HTTPConnection | None = None) -> tuple[float, int]:
        started = time.perf_counter()
        body = self.get("/metrics", PROMETHEUS_HEADERS, conn)
        return time.perf_counter() - started, len(body)

    def stop(self) -> None:
        self.conn.close()
        self.child.stop()


def sequential(target: Target, seconds: float, touch: str = "", min_scrapes: int = 5,
               max_scrapes: int = 2000) -> dict[str, Any]:
    """Scrapes one after the other for about `seconds`: latency percentiles and server CPU per scrape."""
    latencies: list[float] = []
    size = 0
    cpu0, _ = target.cpu()
    overhead = 0.0
    deadline = time.monotonic() + seconds
    while len(latencies) < max_scrapes and (len(latencies) < min_scrapes or time.monotonic() < deadline):
        if touch:
            before, _ = target.cpu()
            target.get(f"/_bench/touch?{touch}")
            after, _ = target.cpu()
            overhead += after - before  # the touch and the two cpu reads are not the scrape's
        took, size = target.scrape()
        latencies.append(took)
    cpu1, _ = target.cpu()
    return {"n": len(latencies), "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "cpu": (cpu1 - cpu0 - overhead) / len(latencies), "bytes": size}


def concurrent(target: Target, clients: int) -> dict[str, Any]:
    """`clients` scrapes at once right after a refresh: server CPU for all of them, and the wall time."""
    conns = [http.client.HTTPConnection("127.0.0.1", target.port, timeout=300) for _ in range(clients)]
    for conn in conns:
        target.scrape(conn)  # warm the connections
    target.get("/_bench/touch")
    cpu0, renders0 = target.cpu()
    barrier = threading.Barrier(clients + 1)
    times: list[float] = []

    def one(conn: http.client.HTTPConnection) -> None:
        barrier.wait()
        times.append(target.scrape(conn)[0])

    threads = [threading.Thread(target=one, args=(c,)) for c in conns]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cpu1, renders1 = target.cpu()
    for conn in conns:
        conn.close()
    return {"cpu": cpu1 - cpu0, "wall": wall, "renders": renders1 - renders0, "slowest": max(times)}


def measure(tenants: int, seconds: float, clients: int) -> dict[str, Any]:
    results: dict[str, Any] = {"tenants": tenants}
    for mode in ("plain", "cached"):
        target = Target(tenants, mode)
        try:
            target.scrape()  # warm: the first rendering of the cached way, imports of the plain way
            results[mode] = sequential(target, seconds)
            if mode == "cached":
                quarter = max(1, tenants // 4)
                results["touched"] = sequential(target, seconds, touch="1")
                results["quiet"] = sequential(target, seconds, touch=f"{quarter}&same")
                results["quarter"] = sequential(target, seconds, touch=f"{quarter}")
                results["scattered"] = sequential(target, seconds, touch=f"{quarter}&scattered")
            results[f"{mode}_concurrent"] = concurrent(target, clients)
        finally:
            target.stop()
    return results


def report(all_results: list[dict[str, Any]], clients: int) -> str:
    rows = []
    for r in all_results:
        plain = r["plain"]
        rows.append((r["tenants"], "plain (client_python)", f"{ms(plain['p50'])} / {ms(plain['p99'])}",
                     ms(plain["cpu"]), "1×", mib(plain["bytes"])))
        for key, what in (("cached", "cached, unchanged"), ("touched", "cached, 1 tenant refreshed"),
                          ("quiet", "cached, ¼ of the tenants refreshed, same numbers"),
                          ("quarter", "cached, ¼ of the tenants refreshed, every value changed"),
                          ("scattered", "cached, ¼ refreshed, every value changed, not neighbours")):
            row = r[key]
            rows.append(("", what, f"{ms(row['p50'])} / {ms(row['p99'])}", ms(row["cpu"]),
                         f"**{plain['cpu'] / row['cpu']:.0f}×**", mib(row["bytes"])))
    out = [table(("tenants", "scrape", "latency p50 / p99", "CPU per scrape", "less CPU than plain",
                  "gzip body"), rows)]
    rows = []
    for r in all_results:
        p, c = r["plain_concurrent"], r["cached_concurrent"]
        rows.append((r["tenants"], f"{ms(p['cpu'])} ({p['cpu'] / r['plain']['cpu']:.1f} scrapes' worth)",
                     ms(p["wall"]), f"{ms(c['cpu'])} ({c['renders']} rendering)", ms(c["wall"]),
                     f"{p['cpu'] / c['cpu']:.0f}×"))
    out.append("")
    out.append(f"{clients} scrapes at once, right after a refresh (server CPU for all of them, and the time "
               "until the last answer):\n")
    out.append(table(("tenants", "plain CPU", "plain wall", "cached CPU", "cached wall", "ratio"), rows))
    scrapes = ", ".join(f"{r['tenants']}: {r['plain']['n']} plain, {r['cached']['n']} cached, "
                        f"{r['touched']['n']}, {r['quiet']['n']}, {r['quarter']['n']} and "
                        f"{r['scattered']['n']} after refreshes"
                        for r in all_results)
    out.append(f"\nScrapes measured per row ({scrapes}); CPU is the server process's own.")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("TENANTS", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--tenants", default="10,100,1000", help="comma-separated tenant counts")
    parser.add_argument("--seconds", type=float, default=4.0, help="scraping time per measurement")
    parser.add_argument("--concurrent", type=int, default=8, help="scrapes at once")
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return 0
    results = [measure(int(n), args.seconds, args.concurrent) for n in args.tenants.split(",")]
    print(f"### Scrape cost\n\n{machine()}\n")
    print(report(results, args.concurrent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
