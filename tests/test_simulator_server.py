"""The simulator's HTTP server: keep-alive, HEAD, bodies, refusals, its `threads` bound, stopping."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from exlogare_exporter.simulator import Simulator, SimulatorServer
from tests.support import wait_until


@pytest.fixture
def sim() -> Simulator:
    s = Simulator(seed=2)
    s.add_tenant("acme", history_days=10, per_day=5)
    return s


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim, threads=4) as srv:
        yield srv


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request and read one answer (its head and Content-Length bytes of body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    if not head.startswith(b"HTTP/1.1 ") or b"HEAD " in request[:5]:
        return head + b"\r\n\r\n" + body
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head + b"\r\n\r\n" + body


def connect(server: SimulatorServer) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=10)


def test_one_connection_serves_request_after_request(server: SimulatorServer, sim: Simulator) -> None:
    with requests.Session() as session:
        headers = {"Authorization": f"Bearer {sim.token('acme')}"}
        for days in (1, 7, 30):
            r = session.get(f"{server.url}/api/v1/stats/overview", params={"days": days}, headers=headers,
                            timeout=10)
            assert r.status_code == 200 and r.json()["window_days"] == days
            assert r.headers["Content-Type"] == "application/json"
            assert r.headers["Server"] == "exlogare-simulator" and "Date" in r.headers
        pools = session.get_adapter(server.url).poolmanager.pools
        assert len(pools) == 1
        pool = pools[next(iter(pools.keys()))]
        assert pool.num_connections == 1 and pool.num_requests == 3


def test_head_has_no_body_and_the_connection_goes_on(server: SimulatorServer) -> None:
    with connect(server) as sock:
        head = exchange(sock, b"HEAD /_sim/health HTTP/1.1\r\nHost: x\r\n\r\n")  # GET only: a 405
        assert head.startswith(b"HTTP/1.1 405 ") and b"\r\nContent-Length: 31\r\n" in head
        assert head.endswith(b"\r\n\r\n")
        answer = exchange(sock, b"GET /_sim/health HTTP/1.1\r\nHost: x\r\n\r\n")  # no stray body before it
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"}")


def test_connection_close_is_honoured(server: SimulatorServer) -> None:
    with connect(server) as sock:
        answer = exchange(sock, b"GET /_sim/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"\r\nConnection: close\r\n" in answer
        assert sock.recv(100) == b""


def test_a_post_body_reaches_the_app_and_the_next_request_is_clean(server: SimulatorServer,
                                                                   sim: Simulator) -> None:
    body = b'{"count": 2, "severity": "high"}'
    with connect(server) as sock:
        answer = exchange(sock, b"POST /_sim/tenants/acme/analyses HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(body), body))
        assert answer.startswith(b"HTTP/1.1 200 OK")
        # a read-API POST is answered without reading the body: the server must have read it anyway
        answer = exchange(sock, b"POST /api/v1/analyses HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 5\r\n\r\nxxxxx")
        assert answer.startswith(b"HTTP/1.1 405 ")
        assert exchange(sock, b"GET /_sim/health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    assert sum(1 for r in sim.stats("acme", "analyses", limit=500)["items"] if r["severity"] == "high") >= 2


@pytest.mark.parametrize(("headers", "status"), [
    (b"Transfer-Encoding: chunked\r\n", b"501"),
    (b"Content-Length: 99999999\r\n", b"413"),
    (b"Content-Length: nope\r\n", b"400"),
])
def test_bodies_it_cannot_take_are_refused_and_the_connection_closed(server: SimulatorServer, headers: bytes,
                                                                      status: bytes) -> None:
    with connect(server) as sock:
        answer = exchange(sock, b"POST /_sim/faults HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 " + status + b" ")
        assert b"\r\nConnection: close\r\n" in answer
        assert sock.recv(100) == b""


def test_paths_are_percent_decoded(server: SimulatorServer, sim: Simulator) -> None:
    headers = {"Authorization": f"Bearer {sim.token('acme')}"}
    r = requests.get(f"{server.url}/api/v1/stats/%6Fverview", headers=headers, timeout=10)
    assert r.status_code == 200 and "failures_detected" in r.json()


def test_an_error_in_the_app_is_a_500(server: SimulatorServer, sim: Simulator,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(sim, "handle", broken)
    r = requests.get(f"{server.url}/api/v1/stats/overview", timeout=10)
    assert r.status_code == 500 and r.json() == {"detail": "internal error in the simulator"}


def test_at_most_threads_requests_are_answered_at_once(sim: Simulator) -> None:
    sim.set_latency(0.3)
    headers = {"Authorization": f"Bearer {sim.token('acme')}"}
    with SimulatorServer(sim, threads=2) as server:
        def one(_: int) -> int:
            answer = requests.get(f"{server.url}/api/v1/stats/overview", headers=headers, timeout=10)
            return answer.status_code

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=6) as pool:
            codes = list(pool.map(one, range(6)))
        took = time.monotonic() - started
    assert codes == [200] * 6
    assert took >= 3 * 0.3 - 0.05, took  # six 0.3 s answers, two at a time
    arrivals = sorted(r.at for r in sim.requests())
    assert len(arrivals) == 6
    assert all(later - earlier >= 0.25 for earlier, later in zip(arrivals, arrivals[2:], strict=False))


def test_stop_ends_kept_alive_connections(sim: Simulator) -> None:
    server = SimulatorServer(sim).start()
    sock = connect(server)
    try:
        assert exchange(sock, b"GET /_sim/health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 ")
        handlers = [t for t in threading.enumerate() if t is not threading.current_thread()]
        server.stop()
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed by the server, not left hanging
        wait_until(lambda: not server._server.connections, timeout=5, what="the connection's thread to end")
        assert len([t for t in threading.enumerate() if t in handlers and t.is_alive()]) < len(handlers)
    finally:
        sock.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/_sim/health", timeout=2)
