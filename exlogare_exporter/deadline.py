"""A wall-clock limit on each HTTP attempt to the upstream.

Read timeouts bound the wait for each byte, not for the answer: an upstream (or a proxy in front of it) that
sends one byte a second never trips them, and would hold a refresh, and a worker thread, for as long as it
likes. Here each attempt gets a budget from the moment its request is sent; when it runs out, one shared
watchdog thread shuts the connection's socket down, the blocked read returns at once, and the attempt fails
as a timeout (so urllib3's retries and the `code="timeout"` counter treat it like any other timeout).

Use: `begin(seconds)` before the request in the calling thread, `end()` when its body has been read, and
mount `DeadlineAdapter` on the session. `expired()` tells the caller that the current attempt was cut off.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from typing import Any

from requests import PreparedRequest
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

_local = threading.local()  # .budget: seconds per attempt; .conn: the connection of the current attempt


class _Watchdog:
    """One daemon thread that shuts down the sockets of attempts past their deadline.

    It sleeps until the earliest deadline and is woken only when an attempt arms an earlier one: with equal
    budgets that is rare, so a thousand requests a second cost it no wake-up each."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, _Timed]] = {}
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf  # when the thread wakes by itself (inf: only when notified)

    def arm(self, conn: _Timed, seconds: float) -> None:
        at = time.monotonic() + seconds
        with self._cond:
            self._armed[id(conn)] = (at, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="upstream-deadlines", daemon=True)
                self._thread.start()
            if at < self._wakes_at:
                self._cond.notify()

    def disarm(self, conn: _Timed) -> None:
        with self._cond:
            self._armed.pop(id(conn), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._armed:
                    self._wakes_at = math.inf
                    self._cond.wait()
                    continue
                key, (at, conn) = min(self._armed.items(), key=lambda item: item[1][0])
                wait = at - time.monotonic()
                if wait > 0:
                    self._wakes_at = at
                    self._cond.wait(wait)
                    continue
                del self._armed[key]
            conn.cut_off()


_WATCHDOG = _Watchdog()


class _Timed:
    """Mixin for urllib3 connections: each request arms the deadline of the calling thread's budget."""

    sock: Any
    deadline_expired = False
    deadline_budget = 0.0

    def request(self, *args: Any, **kwargs: Any) -> Any:
        budget = getattr(_local, "budget", None)
        self.deadline_expired = False
        if budget:
            previous = getattr(_local, "conn", None)
            if previous is not None and previous is not self:
                _WATCHDOG.disarm(previous)  # an earlier attempt of this call, on another connection
            self.deadline_budget = budget
            _local.conn = self
            _WATCHDOG.arm(self, budget)
        return super().request(*args, **kwargs)  # type: ignore[misc]

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        except Exception:
            if self.deadline_expired:
                # urllib3 turns a socket timeout into ReadTimeoutError: retried and counted as "timeout".
                raise TimeoutError(f"no complete answer within {self.deadline_budget:g}s") from None
            raise

    def cut_off(self) -> None:
        self.deadline_expired = True
        sock = self.sock
        if sock is not None:
            # socket.socket's own shutdown: SSLSocket's would also drop its SSL object under the reader.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _HTTPConnection(_Timed, HTTPConnection):
    pass


class _HTTPSConnection(_Timed, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    """An `HTTPAdapter` whose connections honour `begin()`'s budget.

    With `pools` (from `pool_manager`) its connections come from that shared manager, which `close()` leaves
    open: the clients of many tenants of one server then share a few keep-alive connections.
    """

    def __init__(self, *args: Any, pools: PoolManager | None = None, **kwargs: Any) -> None:
        self._shared_pools = pools  # before super().__init__, which calls init_poolmanager
        self._pool_keys: dict[tuple[str, bool | str, Any], tuple[dict[str, Any], dict[str, Any]]] = {}
        super().__init__(*args, **kwargs)

    def build_connection_pool_key_attributes(self, request: PreparedRequest, verify: bool | str,
                                             cert: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """requests' own answer, kept per server and TLS settings: it looks at the disk (is `verify` a CA
        file or a directory?) on every request otherwise."""
        url = str(request.url)
        origin = url[:url.find("/", url.find("//") + 2)] if url.count("/") > 2 else url
        key = (origin, verify, cert if cert is None or isinstance(cert, str) else tuple(cert))
        found = self._pool_keys.get(key)
        if found is None:
            found = super().build_connection_pool_key_attributes(request, verify, cert)
            if len(self._pool_keys) < 64:
                self._pool_keys[key] = found
        host_params, pool_kwargs = found
        return dict(host_params), dict(pool_kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self._shared_pools is not None:
            self.poolmanager = self._shared_pools
            return
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(POOL_CLASSES)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """Through an HTTP(S) proxy too (HTTP_PROXY...), each attempt keeps to its budget."""
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = dict(POOL_CLASSES)
        return manager

    def close(self) -> None:
        if self._shared_pools is None:
            super().close()
            return
        for proxy in self.proxy_manager.values():
            proxy.clear()


POOL_CLASSES = {"http": _HTTPPool, "https": _HTTPSPool}


def pool_manager(maxsize: int, num_pools: int = 1000) -> PoolManager:
    """Connection pools to share between `DeadlineAdapter`s: one per server (and TLS settings), each keeping
    up to `maxsize` idle connections. A pool smaller than the requests in flight to its server would close
    (and urllib3 warn about) the surplus after each answer, and the next requests would connect anew."""
    manager = PoolManager(num_pools=num_pools, maxsize=maxsize, block=False)
    manager.pool_classes_by_scheme = dict(POOL_CLASSES)
    return manager


def begin(seconds: float) -> None:
    """Give every attempt this thread starts from now on `seconds`, from request to last byte."""
    _local.budget = seconds
    _local.conn = None


def end() -> None:
    """The call is over (body read or failed): disarm its last attempt."""
    conn = getattr(_local, "conn", None)
    if conn is not None:
        _WATCHDOG.disarm(conn)
    _local.budget = None


def expired() -> bool:
    """Whether the current attempt of this thread was cut off by its deadline."""
    conn = getattr(_local, "conn", None)
    return bool(conn is not None and conn.deadline_expired)
