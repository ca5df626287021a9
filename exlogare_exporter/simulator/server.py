"""Serving the simulator: a small threaded HTTP/1.1 server in a daemon thread, new RCAs arriving over time,
and the CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import random
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from .app import WSGIApp, json_bytes, make_app
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
    """The simulator's WSGI app on a small HTTP/1.1 server in a daemon thread. The socket is bound on
    construction.

    A thread per connection (kept alive between requests), at most `threads` requests answered at once (the
    others wait): blocking I/O and no event loop, so a request costs the server about half the CPU it costs
    on waitress, whose loop visits every open connection for each event. Benchmarks run the simulator on
    the exporter's CPUs; its own cost must stay small next to the exporter's.
    """

    def __init__(self, sim: Simulator, host: str = "127.0.0.1", port: int = 0, threads: int = 16) -> None:
        self.sim = sim
        self._server = _HTTPServer((host, port), make_app(sim), threads)
        address = self._server.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> SimulatorServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                            name=f"simulator:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()
        self._server.drop_connections()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


MAX_REQUEST_BODY = 4 << 20  # the control API takes at most 1 MiB (413 above); anything larger is refused here
IDLE_TIMEOUT = 120.0  # seconds a kept-alive connection may stay silent, as waitress's channel_timeout


class _HTTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: WSGIApp, threads: int) -> None:
        self.app = app
        self.slots = threading.BoundedSemaphore(threads)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """End the kept-alive connections, so that a stopped server answers nothing any more."""
        with self.connections_lock:
            connections = list(self.connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client gone mid-answer is no news
            log.exception("simulator: error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """One connection: requests in turn, each handed to the WSGI app with its body read in full first."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "exlogare-simulator"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True  # the answer goes out in one write; never wait for the client's ACK

    def _serve(self) -> None:
        if "Transfer-Encoding" in self.headers:
            self._refuse(501, "chunked request bodies are not supported")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BODY:
            self._refuse(413 if length > 0 else 400, "bad or too large Content-Length")
            return
        body = self.rfile.read(length) if length else b""
        captured: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured[:] = [status, headers]

        try:
            with self.server.slots:
                answer = b"".join(self.server.app(self._environ(body), start_response))
        except Exception:
            log.exception("simulator: %s %s failed", self.command, self.path)
            self._refuse(500, "internal error in the simulator")
            return
        status, headers = captured
        self._answer(status, headers, answer)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve  # noqa: N815

    def _environ(self, body: bytes) -> dict[str, Any]:
        target = self.path
        if "://" in target.split("?", 1)[0]:  # absolute form: keep the path
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path, _, query = target.partition("?")
        host, port = self.server.server_address[:2]
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "PATH_INFO": unquote(path, encoding="latin-1"),
            "QUERY_STRING": query, "SERVER_NAME": str(host), "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": self.request_version, "REMOTE_ADDR": self.client_address[0],
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            key = name.upper().replace("-", "_")
            key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _answer(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        lines = [f"{self.protocol_version} {status}", f"Server: {self.server_version}",
                 f"Date: {self.date_time_string()}", *(f"{k}: {v}" for k, v in headers)]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)  # one write: one packet

    def _refuse(self, status: int, detail: str) -> None:
        self.close_connection = True
        body = json_bytes({"detail": detail})
        self._answer(f"{status} {HTTPStatus(status).phrase}",
                     [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("simulator: %s %s", self.address_string(), format % args)


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
