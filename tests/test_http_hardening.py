"""The exporter's HTTP side under abuse, on a real process: slow and stalled clients (slowloris), hundreds of
concurrent scrapes, oversized headers and request lines. Throughout, a well-behaved scrape must still be
answered promptly. Plus security headers on every answer and an inert landing page."""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import trustme
from prometheus_client import CollectorRegistry

from exlogare_exporter.state import Store, TenantState
from exlogare_exporter.web import ExporterApp
from tests.support import Process, free_port, start_simulator, wait_until

pytestmark = pytest.mark.e2e

PROMPT = 2.0  # seconds a well-behaved scrape may take while the server is being abused

CONFIG = """listen_address: "127.0.0.1:{port}"
defaults:
  base_url: "{sim}"
  interval: 5m
  windows: [1d, 7d, 30d]
tenants:
  - name: acme
    token: exl_sim_acme_read
  - name: lab
    token: exl_sim_lab_ingest
"""


class Server:
    def __init__(self, url: str, ca: Path | None) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.ca = ca

    def scrape(self, timeout: float = PROMPT) -> float:
        """One well-behaved scrape; its duration (fails if it errs or takes longer than `timeout`)."""
        started = time.monotonic()
        r = requests.get(f"{self.url}/metrics", timeout=timeout, verify=str(self.ca) if self.ca else True)
        assert r.status_code == 200 and "exlogare_up" in r.text
        return time.monotonic() - started

    def connect(self) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if self.ca is None:
            return raw
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.fixture(scope="module", params=["http", "https"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"hardening-{request.param}")
    sim, sim_url = start_simulator(tmp, "--tenants", "acme,lab", "--arrival-rate", "0")
    port = free_port()
    (tmp / "config.yaml").write_text(CONFIG.format(port=port, sim=sim_url))
    args = [sys.executable, "exporter.py", "--config", str(tmp / "config.yaml")]
    ca_path = None
    if request.param == "https":
        ca = trustme.CA()
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp / "server.pem")
        ca_path = tmp / "ca.pem"
        ca.cert_pem.write_to_path(ca_path)
        (tmp / "web.yml").write_text(f"tls_server_config: {{cert_file: {tmp}/server.pem, "
                                     f"key_file: {tmp}/server.pem}}\n")
        args += ["--web.config.file", str(tmp / "web.yml")]
    proc = Process(args, tmp / "exporter.log")
    srv = Server(f"{request.param}://127.0.0.1:{port}", ca_path)
    try:
        wait_until(lambda: proc.check_alive() or srv.scrape(5) >= 0, what="the exporter")
        yield srv
        proc.check_alive()
    finally:
        proc.stop()
        sim.stop()


def test_slow_and_stalled_clients_do_not_block_a_scrape(server: Server) -> None:
    stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(150)]  # no byte, ever
    slow = [server.connect() for _ in range(150)]
    for s in slow:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and then a header, one byte a second
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(b"X")
    dripper = threading.Thread(target=trickle, daemon=True)
    dripper.start()
    try:
        durations = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            durations.append(server.scrape())
        assert len(durations) >= 5 and max(durations) < PROMPT, durations
    finally:
        stop.set()
        dripper.join(5)
        for s in stalled + slow:
            s.close()


def _complete_200(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1].strip() for line in head.lower().split(b"\r\n")
               if line.startswith(b"content-length:")]
    return (head.startswith(b"HTTP/1.1 200") and lengths == [str(len(body)).encode()]
            and b"exlogare_up" in body)


def test_hundreds_of_concurrent_scrapes(server: Server) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    socks = [server.connect() for _ in range(300)]
    sel = selectors.DefaultSelector()
    answers: dict[socket.socket, bytearray] = {}
    for s in socks:
        s.sendall(request)
        s.setblocking(False)
        answers[s] = bytearray()
        sel.register(s, selectors.EVENT_READ)
    polite: list[float] = []
    prober = threading.Thread(target=lambda: polite.append(server.scrape(timeout=10)))
    prober.start()
    deadline = time.monotonic() + 60
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            s = key.fileobj
            try:
                chunk = s.recv(65536)  # type: ignore[union-attr]
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            if chunk:
                answers[s].extend(chunk)  # type: ignore[index]
            else:
                sel.unregister(s)
    prober.join(15)
    for s in socks:
        s.close()
    complete = [a for a in answers.values() if _complete_200(bytes(a))]
    assert len(complete) == 300
    assert polite and polite[0] < 10, polite


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", b"431"),
    (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"431"),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Many: b\r\n" * 10_000 + b"\r\n", b"431"),
    (b"\x16\x03\x01garbage that is no request\r\n\r\n", b"400"),
], ids=["huge-header", "huge-request-line", "too-many-headers", "garbage"])
def test_oversized_and_malformed_requests_are_refused(server: Server, request_bytes: bytes,
                                                      status: bytes) -> None:
    with server.connect() as s:
        with contextlib.suppress(OSError):  # the server may close as soon as it has seen enough
            s.sendall(request_bytes)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    assert answer.split(b" ", 2)[1:2] == [status], answer[:200]
    assert server.scrape() < PROMPT


def test_security_headers_on_every_answer(server: Server) -> None:
    verify = str(server.ca) if server.ca else True
    for method, path in (("GET", "/"), ("GET", "/readyz"), ("GET", "/healthz"), ("GET", "/metrics"),
                         ("GET", "/nope"), ("POST", "/metrics")):
        r = requests.request(method, server.url + path, timeout=5, verify=verify)
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
        assert r.headers["X-Frame-Options"] == "DENY", path
        assert r.headers["Referrer-Policy"] == "no-referrer", path
        assert "default-src 'none'" in r.headers["Content-Security-Policy"], path
        assert r.headers["Cache-Control"] == "no-store", path


def test_landing_page_renders_hostile_text_inert() -> None:
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&"
    store = Store()
    store.put(TenantState(name=hostile, max_staleness=60, attempts=1, last_error=f"401: {hostile}"))
    app = ExporterApp(CollectorRegistry(), store, lambda: [hostile])
    seen: list[str] = []
    body = b"".join(app({"PATH_INFO": "/", "REQUEST_METHOD": "GET"}, lambda s, h, e=None: seen.append(s)))
    page = body.decode()
    assert seen == ["200 OK"]
    assert "<script" not in page and "<img" not in page and "onerror=alert(2)>" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2


def test_upstream_text_on_the_live_landing_page_is_escaped(tmp_path: Path) -> None:
    sim, sim_url = start_simulator(tmp_path, "--tenants", "acme", "--arrival-rate", "0", "--fault",
                                   'status=401,body={"detail": "<script>alert(1)</script>"}')
    port = free_port()
    (tmp_path / "config.yaml").write_text(CONFIG.format(port=port, sim=sim_url).split("  - name: lab")[0])
    proc = Process([sys.executable, "exporter.py", "--config", str(tmp_path / "config.yaml")],
                   tmp_path / "exporter.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.check_alive() or requests.get(f"{url}/readyz", timeout=2).status_code == 200,
                   what="the first refresh")
        page = requests.get(url + "/", timeout=5).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    finally:
        proc.stop()
        sim.stop()
