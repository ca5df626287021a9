"""TLS in front of waitress: an asyncio listener that terminates TLS and relays bytes to a private socket.

waitress has no TLS. Rather than trade it for a threaded server that does the handshake on its accept
thread (one stalled client there stalls every client), the HTTP parsing, limits and slow-client timeouts stay
waitress's, and this front only does what asyncio does well: thousands of idle or slow connections for the
price of a coroutine each. Handshakes have a deadline; a connection idle in both directions is closed; the
number of connections is capped. waitress listens on a Unix socket in a 0700 directory of our own, so only
this process (and its user) can reach it without TLS.

The SSL context is taken per connection from a callable, so a reloaded certificate applies to the next
handshake without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


class _Link:
    """One client connection and its relay to the backend; `last` is the time of the last byte either way."""

    def __init__(self, writer: asyncio.StreamWriter, now: float) -> None:
        self.client = writer
        self.backend: asyncio.StreamWriter | None = None
        self.last = now

    def close(self) -> None:
        for writer in (self.client, self.backend):
            if writer is not None:
                writer.close()


class TLSFront:
    """Listens on (host, port) with TLS and relays each connection to the Unix socket `backend`."""

    def __init__(self, context: Callable[[], ssl.SSLContext], host: str, port: int, backend: str, *,
                 handshake_timeout: float = 10.0, idle_timeout: float = 30.0,
                 max_connections: int = 1000) -> None:
        self._context = context
        self._backend = backend
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._links: set[_Link] = set()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=1024)
        self.port: int = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name=f"tls-{self.port}", daemon=True)
        self._started = threading.Event()

    def start(self) -> TLSFront:
        self._thread.start()
        self._started.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, sock=self._sock, limit=_CHUNK))
        sweeper = self._loop.create_task(self._sweep())
        self._started.set()
        self._loop.run_forever()
        sweeper.cancel()
        for link in list(self._links):
            link.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(shutdown)
            self._thread.join(timeout)
        self._sock.close()

    async def _sweep(self) -> None:
        """Close connections that moved no byte either way for `idle_timeout` (waitress does the same)."""
        while True:
            await asyncio.sleep(1.0)
            cutoff = self._loop.time() - self._idle_timeout
            for link in [lk for lk in self._links if lk.last < cutoff]:
                link.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._links) >= self._max_connections:
            writer.close()
            return
        link = _Link(writer, self._loop.time())
        self._links.add(link)
        try:
            # asyncio sets this itself only for sockets created with proto=IPPROTO_TCP; without it, Nagle and
            # the client's delayed ACK hold every answer's second TLS record back 40 ms.
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await writer.start_tls(self._context(), ssl_handshake_timeout=self._handshake_timeout)
            link.last = self._loop.time()
            back_reader, link.backend = await asyncio.open_unix_connection(self._backend, limit=_CHUNK)
            await asyncio.gather(self._pipe(reader, link.backend, link, half_close=True),
                                 self._pipe(back_reader, writer, link, half_close=False))
        except asyncio.CancelledError:
            pass  # shutting down: ending quietly keeps asyncio from reporting every open connection
        except Exception as exc:  # one client's trouble must never reach the loop
            log.debug("TLS connection ended: %s", type(exc).__name__)
        finally:
            self._links.discard(link)
            link.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link,
                    half_close: bool) -> None:
        try:
            while data := await reader.read(_CHUNK):
                link.last = self._loop.time()
                writer.write(data)
                await writer.drain()
                link.last = self._loop.time()
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            if half_close and not writer.is_closing() and writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()  # the client is done sending; waitress still answers
            else:
                link.close()
