"""The per-attempt wall-clock deadline: a trickling answer is cut off on time, whatever else is in flight."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from exlogare_exporter import deadline
from exlogare_exporter.client import ExlogareClient, TransportError
from exlogare_exporter.parse import parse_overview
from tests.support import wait_until
from tests.test_client import Tenant


class Trickle:
    """Answers every request with a 200 whose body comes one byte every `step` seconds, forever."""

    def __init__(self, step: float = 0.05) -> None:
        self.step = step
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n")
                while not self.stop.wait(self.step):
                    conn.sendall(b" ")
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def trickle() -> Iterator[Trickle]:
    server = Trickle()
    yield server
    server.close()


def fetch(client: ExlogareClient) -> Any:
    return client.get("/stats/overview", {"days": 7}, parse_overview)


def test_a_short_budget_is_cut_on_time_while_a_longer_one_waits(trickle: Trickle) -> None:
    """The watchdog sleeps until the earliest deadline: an attempt armed later with an earlier deadline must
    wake it, or it would be cut only when the long one is due."""
    pools = deadline.pool_manager(maxsize=4)
    long = ExlogareClient(Tenant(name="long", base_url=trickle.url, retries=0, timeout=20.0,
                                 connect_timeout=1.0), pools=pools)
    short = ExlogareClient(Tenant(name="short", base_url=trickle.url, retries=0, timeout=0.3,
                                  connect_timeout=0.2), pools=pools)
    outcome: list[BaseException] = []

    def slow() -> None:
        try:
            fetch(long)
        except BaseException as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=slow, daemon=True)
    waiting.start()
    # the long attempt arms its deadline before it connects: once the server has its connection, it is armed
    wait_until(lambda: trickle.threads, timeout=5, what="the long attempt's connection")
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        fetch(short)
    took = time.monotonic() - started
    assert info.value.code == "timeout" and "did not complete within 0.5s" in info.value.detail
    assert 0.4 <= took < 2.0, took
    assert waiting.is_alive()  # the long one is still within its budget
    trickle.close()  # ends the long attempt's answer early
    waiting.join(timeout=10)
    assert outcome and isinstance(outcome[0], TransportError)
    long.close()
    short.close()
    pools.clear()


def test_a_shared_pool_outlives_one_client_closing() -> None:
    pools = deadline.pool_manager(maxsize=2)
    adapter = deadline.DeadlineAdapter(pools=pools)
    assert adapter.poolmanager is pools
    pool = pools.connection_from_url("http://127.0.0.1:9")
    adapter.close()
    assert pools.connection_from_url("http://127.0.0.1:9") is pool  # not cleared by one adapter's close
    own = deadline.DeadlineAdapter()
    assert own.poolmanager is not pools
    assert own.poolmanager.pool_classes_by_scheme == deadline.POOL_CLASSES
    assert pools.pool_classes_by_scheme == deadline.POOL_CLASSES
    pools.clear()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8089/api/v1/stats/overview?days=1",
                                 "https://api.exlogare.test/api/v1/analyses?cursor=x",
                                 "http://[::1]:80/exlogare/api/v1/x", "http://host"])
@pytest.mark.parametrize("verify", [True, False, "/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs"])
def test_pool_key_attributes_are_requests_own(url: str, verify: bool | str) -> None:
    adapter = deadline.DeadlineAdapter()
    request = requests.PreparedRequest()
    request.prepare_url(url, None)
    expected = HTTPAdapter.build_connection_pool_key_attributes(adapter, request, verify, None)
    assert adapter.build_connection_pool_key_attributes(request, verify, None) == expected
    assert adapter.build_connection_pool_key_attributes(request, verify, None) == expected  # remembered


def test_a_trickle_through_an_http_proxy_is_cut_off_too(trickle: Trickle,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", trickle.url)  # the "proxy" answers, one byte at a time
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = ExlogareClient(Tenant(base_url="http://upstream.invalid", retries=0, timeout=0.3,
                                   connect_timeout=0.2))
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as info:
            fetch(client)
    finally:
        client.close()
    assert info.value.code == "timeout" and "did not complete within 0.5s" in info.value.detail
    assert time.monotonic() - started < 3.0
