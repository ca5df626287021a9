"""Upstream politeness under load: the per-tenant and per-base-URL rate limits, and Retry-After.

One self-hosted server (the simulator) serves many tenants. The poller refreshes them back to back while
eight Grafana users hammer the proxy with uncacheable questions (`cache_ttl: 0`), so the exporter would
send far more than the limits allow. From the simulator's own request log:

- the most requests that reached the server in any one-second window, for the whole base URL and for the
  busiest tenant, against what the limits allow (rate × 1 s + burst), and what the same load sends with no
  limit;
- a 429 with `Retry-After` in the middle of the load: the requests that reached the server during the
  pause, from that tenant and (with a shared budget, which holds back every tenant of the base URL) from
  the others.

    python bench/politeness.py [--tenants 40] [--seconds 8]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table

from exlogare_exporter.config import Config, parse_config
from exlogare_exporter.metrics import ExporterMetrics
from exlogare_exporter.poller import Poller
from exlogare_exporter.proxy import Proxy
from exlogare_exporter.simulator import RequestRecord, Simulator, SimulatorServer
from exlogare_exporter.state import Store

PROXY_TOKEN = "bench-proxy-client-token-0123456789"  # noqa: S105 - a made-up client token
TENANT_RATE, TENANT_BURST = 4.0, 2.0
SHARED_RATE, SHARED_BURST = 25.0, 5.0
RETRY_AFTER = 3
VICTIM = "t0003"


def config(url: str, names: list[str], *, limits: bool, shared: bool) -> Config:
    defaults: dict[str, Any] = {"base_url": url, "retries": 0, "analyses_interval": 0, "timeout": "10s"}
    if limits:
        defaults |= {"max_requests_per_second": TENANT_RATE, "max_requests_burst": TENANT_BURST}
    if limits and shared:
        defaults |= {"base_url_max_requests_per_second": SHARED_RATE,
                     "base_url_max_requests_burst": SHARED_BURST}
    return parse_config({"concurrency": 16, "defaults": defaults,
                         "tenants": [{"name": n, "token": f"exl_sim_{n}_read"} for n in names],
                         "proxy": {"enabled": True, "cache_ttl": 0, "cache_stale_ttl": 0,
                                   "clients": [{"name": "grafana", "token": PROXY_TOKEN, "tenants": names}]}},
                        environ={})


def busiest_second(times: list[float]) -> int:
    """The most events in any window of one second."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


class Load:
    """The poller refreshing back to back, and `users` proxy users asking uncacheable questions."""

    def __init__(self, cfg: Config, users: int = 8) -> None:
        logging.getLogger("exlogare_exporter").setLevel(logging.CRITICAL)
        store: Store = Store()
        metrics = ExporterMetrics(store)
        self.poller = Poller(store, metrics)
        self.poller.apply(cfg)
        self.proxy = Proxy(self.poller.client, None)
        self.proxy.apply(cfg)
        self.names = [t.name for t in cfg.tenants]
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._refresh)] + [
            threading.Thread(target=self._user, args=(i,)) for i in range(users)]

    def _refresh(self) -> None:
        while not self.stopping.is_set():
            self.poller.refresh_all()

    def _user(self, seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311
        while not self.stopping.is_set():
            environ = {"REQUEST_METHOD": "GET", "QUERY_STRING": f"days={rng.randint(1, 365)}",
                       "PATH_INFO": f"/proxy/{rng.choice(self.names)}/api/v1/stats/overview",
                       "HTTP_AUTHORIZATION": f"Bearer {PROXY_TOKEN}"}
            b"".join(self.proxy(environ, lambda *a: None))

    def run(self, seconds: float, during: Any = None) -> None:
        for thread in self.threads:
            thread.start()
        if during is not None:
            time.sleep(seconds / 2)
            during()
            time.sleep(seconds / 2)
        else:
            time.sleep(seconds)
        self.stopping.set()
        self.poller.stop(wait=10)
        for thread in self.threads:
            thread.join(timeout=15)


def scene(sim: Simulator, url: str, names: list[str], seconds: float, *, limits: bool, shared: bool,
          retry_after: bool) -> dict[str, Any]:
    sim.clear_requests()
    sim.clear_faults()

    def inject() -> None:
        sim.set_fault(tenant=VICTIM, status=429, headers={"Retry-After": str(RETRY_AFTER)}, count=1)

    Load(config(url, names, limits=limits, shared=shared)).run(seconds, inject if retry_after else None)
    log = [r for r in sim.requests() if r.tenant is not None]
    result: dict[str, Any] = {"requests": len(log), "seconds": seconds,
                              "base_peak": busiest_second([r.at for r in log]),
                              "tenant_peak": max(busiest_second([r.at for r in log if r.tenant == n])
                                                 for n in names)}
    rejected = [r for r in log if r.status == 429]
    if rejected:
        result.update(pause(log, rejected[0]))
    return result


def pause(log: list[RequestRecord], rejected: RequestRecord) -> dict[str, Any]:
    """What reached the server during the Retry-After pause (after the answer got back to the exporter)."""
    begin, end = rejected.at, rejected.at + RETRY_AFTER
    during = [r for r in log if begin < r.at < end]
    late = [r for r in during if r.at > begin + 0.05]  # 50 ms: requests already on the wire are not held
    return {"victim_during": sum(r.tenant == VICTIM for r in late),
            "others_during": sum(r.tenant != VICTIM for r in late),
            "in_flight": len(during) - len(late),
            "others_before": sum(r.tenant != VICTIM for r in log if begin - RETRY_AFTER < r.at <= begin)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--latency", type=float, default=0.01)
    args = parser.parse_args()
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    sim = Simulator(seed=2)
    names = [f"t{i:04d}" for i in range(args.tenants)]
    for name in names:
        sim.add_tenant(name, history_days=10, per_day=5)
    sim.set_latency(args.latency)
    with SimulatorServer(sim, threads=48) as server:
        free = scene(sim, server.url, names, args.seconds / 2, limits=False, shared=False, retry_after=False)
        own = scene(sim, server.url, names, args.seconds, limits=True, shared=False, retry_after=True)
        shared = scene(sim, server.url, names, args.seconds, limits=True, shared=True, retry_after=True)

    print(f"### Upstream politeness\n\n{machine()}; {args.tenants} tenants on one server (simulator latency "
          f"{args.latency * 1000:g} ms), the poller refreshing back to back and 8 proxy users asking "
          f"uncacheable questions; per tenant {TENANT_RATE:g}/s (burst {TENANT_BURST:g}), per base URL "
          f"{SHARED_RATE:g}/s (burst {SHARED_BURST:g})\n")
    tenant_cap = TENANT_RATE + TENANT_BURST
    shared_cap = SHARED_RATE + SHARED_BURST
    rate = lambda r: f"{r['requests'] / r['seconds']:.0f}/s"  # noqa: E731
    rows = [
        ("no limits", rate(free), free["base_peak"], "—", free["tenant_peak"], "—"),
        ("per tenant only", rate(own), own["base_peak"], "— (none set)", own["tenant_peak"],
         f"≤ {tenant_cap:g}"),
        ("per tenant and per base URL", rate(shared), shared["base_peak"], f"≤ {shared_cap:g}",
         shared["tenant_peak"], f"≤ {tenant_cap:g}"),
    ]
    print(table(("limits", "mean to the server", "busiest second, base URL", "allowed",
                 "busiest second, one tenant", "allowed"), rows))
    print(f"\nA 429 with `Retry-After: {RETRY_AFTER}` to {VICTIM} halfway through; requests that reached the "
          f"server in the {RETRY_AFTER} s after it (leaving out the first 50 ms, requests already on the "
          "wire):\n")
    rows = [(name, r.get("victim_during", "no 429 seen"), r.get("others_during", ""),
             r.get("others_before", ""), r.get("in_flight", ""), expected)
            for name, r, expected in (
                ("per tenant only (the SaaS case)", own, "0 from the tenant; the others go on"),
                ("with a per-base-URL budget", shared, "0 from every tenant of the base URL"))]
    print(table(("limits", f"from {VICTIM}", "from the other tenants",
                 f"others in the {RETRY_AFTER} s before", "in flight", "expected"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
