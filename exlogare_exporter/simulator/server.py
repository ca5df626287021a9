"""Serving the simulator: waitress in a daemon thread, new RCAs arriving over time, and the CLI."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from waitress.server import create_server

from .app import make_app
from .core import Simulator

log = logging.getLogger("exlogare_exporter.simulator")

# name -> add_tenant keywords. `quiet` has only old history: its 1-day and 7-day windows are empty.
DEMO_TENANTS: dict[str, dict[str, Any]] = {
    "acme": {"history_days": 200, "per_day": 20.0},
    "lab": {"history_days": 120, "per_day": 4.0},
    "quiet": {"history_days": 90, "per_day": 2.0, "quiet_days": 14},
}
DEFAULT_PROFILE: dict[str, Any] = {"history_days": 200, "per_day": 8.0}
EXTRA_PROFILE: dict[str, Any] = {"history_days": 30, "per_day": 7.0}  # ~200 events: benchmark tenants


def demo_simulator(seed: int = 1) -> Simulator:
    """The three demo tenants: `acme` (busy), `lab` (smaller), `quiet` (nothing in the last 14 days)."""
    sim = Simulator(seed=seed)
    for name, profile in DEMO_TENANTS.items():
        sim.add_tenant(name, **profile)
    return sim


class SimulatorServer:
    """The simulator's WSGI app on waitress, in a daemon thread. The socket is bound on construction."""

    def __init__(self, sim: Simulator, host: str = "127.0.0.1", port: int = 0, threads: int = 16) -> None:
        self.sim = sim
        self._server: Any = create_server(
            make_app(sim), host=host, port=port, threads=threads, ident="exlogare-simulator",
            connection_limit=max(100, threads * 64), asyncore_use_poll=True,
        )
        self.port: int = self._server.effective_port
        self.host: str = str(self._server.effective_host)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> SimulatorServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"simulator:{self.port}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        server = self._server
        # Our own loop, so stopping needs no cross-thread closing of waitress's sockets.
        while not self._stopping.is_set():
            server.asyncore.loop(timeout=0.5, map=server._map, use_poll=True, count=1)
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        server = self._server
        server.close()
        for channel in list(server._map.values()):
            with contextlib.suppress(OSError):
                channel.handle_close()
        server.task_dispatcher.shutdown(timeout=2)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is None:
            self._close()
            return
        with contextlib.suppress(OSError):
            self._server.pull_trigger()
        self._thread.join(timeout=10)

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method; fine for the small means of one tick."""
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


class Arrivals:
    """New RCAs (random severities) arriving at `rate_per_minute` per tenant, plus a few re-run failures."""

    def __init__(self, sim: Simulator, rate_per_minute: float, *, tenants: Iterable[str] | None = None,
                 seed: int = 1, tick: float = 1.0) -> None:
        self.sim = sim
        self.rate = rate_per_minute
        self.tenants = list(tenants) if tenants is not None else None
        self.tick = tick
        self._rng = random.Random(f"arrivals:{seed}")  # noqa: S311 - seeded fake data
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulator-arrivals", daemon=True)

    def start(self) -> Arrivals:
        if self.rate > 0:
            self._thread.start()
        return self

    def step(self, seconds: float) -> int:
        """Add the arrivals of `seconds` of time; returns how many RCAs were added."""
        added = 0
        for tenant in self.tenants if self.tenants is not None else self.sim.tenants():
            n = _poisson(self._rng, self.rate * seconds / 60.0)
            if n:
                self.sim.add_analyses(tenant, n)
                added += n
            if self._rng.random() < 0.1 * min(1.0, self.rate * seconds / 60.0):
                self.sim.add_failures(tenant, 1)
        return added

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stopping.wait(self.tick):
            now = time.monotonic()
            self.step(now - last)
            last = now

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exlogare_exporter.simulator",
                                description="A fake Exlogare Read API v1 for demos, tests and benchmarks.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--tenants", default="acme,lab,quiet",
                   help="comma-separated tenant names; acme, lab and quiet get their demo profiles")
    p.add_argument("--extra-tenants", type=int, default=0, metavar="N",
                   help="also add N small tenants t0001..tN (~200 events each), for benchmarks")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--arrival-rate", type=float, default=6.0,
                   help="new RCAs per minute per tenant (not for quiet tenants); 0 = none")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every read-API answer")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--fault", action="append", default=[], type=parse_fault, metavar="SPEC",
                   help="inject a fault, e.g. status=503,endpoint=/stats/overview,count=3 or "
                        "status=429,retry_after=30 or status=none,latency=2 (keys: tenant, endpoint, "
                        "status, body, content_type, latency, count, retry_after, param); repeatable")
    return p


def parse_fault(spec: str) -> dict[str, Any]:
    """`key=value,...` to `Simulator.set_fault` keywords."""
    out: dict[str, Any] = {}
    headers: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        try:
            if not sep:
                raise ValueError(part)
            if key == "status":
                out[key] = None if value.lower() == "none" else int(value)
            elif key in ("latency",):
                out[key] = float(value)
            elif key == "count":
                out[key] = int(value)
            elif key == "retry_after":
                headers["Retry-After"] = value
            elif key in ("tenant", "endpoint", "body", "content_type", "param"):
                out[key] = value
            else:
                raise ValueError(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad fault item {part!r}") from None
    if headers:
        out["headers"] = headers
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [n.strip() for n in args.tenants.split(",") if n.strip()]
    sim = Simulator(seed=args.seed)
    try:
        for name in names:
            sim.add_tenant(name, **DEMO_TENANTS.get(name, DEFAULT_PROFILE))
        for i in range(1, args.extra_tenants + 1):
            sim.add_tenant(f"t{i:04d}", **EXTRA_PROFILE)
        server = SimulatorServer(sim, args.host, args.port, args.threads)
    except (ValueError, OSError) as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    sim.set_latency(args.latency)
    for fault in args.fault:
        sim.set_fault(**fault)
    lively = [n for n in sim.tenants() if not DEMO_TENANTS.get(n, {}).get("quiet_days")]
    arrivals = Arrivals(sim, args.arrival_rate, tenants=lively, seed=args.seed)

    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    arrivals.start()
    print(f"Exlogare simulator listening on {server.url}", flush=True)
    for name in names:
        print(f"  tenant {name}: read token {sim.token(name)}", flush=True)
    if args.extra_tenants:
        print(f"  tenants t0001..t{args.extra_tenants:04d}: read tokens exl_sim_<tenant>_read", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        arrivals.stop()
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("Exlogare simulator stopped", flush=True)
    return 0
