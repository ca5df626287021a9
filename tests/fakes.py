"""Raw-socket fakes for faults the simulator cannot express (it always answers, and promptly), and a look at
a process's threads, memory and file descriptors through /proc.

`FaultyProxy` sits between the exporter and the simulator and can, at any moment, forward faithfully,
accept connections and never answer, or pass the answer on one byte a second.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FORWARD, BLACKHOLE, TRICKLE = "forward", "blackhole", "trickle"


class FaultyProxy:
    """A TCP relay to (host, port) whose behaviour for new requests is `mode`; one thread per connection."""

    def __init__(self, upstream: tuple[str, int], mode: str = FORWARD, byte_interval: float = 1.0) -> None:
        self.upstream = upstream
        self.mode = mode
        self.byte_interval = byte_interval
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, name=f"faulty-proxy-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            while not self._stopping.is_set():
                request = _read_request(client)
                if not request:
                    return
                mode = self.mode
                if mode == BLACKHOLE:
                    # Read whatever comes, answer nothing, until the client gives up.
                    while client.recv(65536):
                        pass
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=30)
                upstream.sendall(request)
                response = _read_response(upstream)
                if mode == TRICKLE:
                    for i in range(len(response)):
                        if self._stopping.wait(self.byte_interval):
                            return
                        client.sendall(response[i:i + 1])
                else:
                    client.sendall(response)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(client)
            client.close()
            if upstream is not None:
                upstream.close()

    def drop_connections(self) -> None:
        """Close every open connection (kept-alive ones included): the next request must connect anew."""
        with self._lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopping.set()
        self._server.close()
        self.drop_connections()


def _read_until(sock: socket.socket, marker: bytes, buf: bytes = b"") -> tuple[bytes, bytes]:
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf, b""
        buf += chunk
    head, _, rest = buf.partition(marker)
    return head + marker, rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _read_request(sock: socket.socket) -> bytes:
    """One GET request (headers only: the exporter sends no bodies), or b"" when the client closed."""
    head, _ = _read_until(sock, b"\r\n\r\n")
    return head if head.endswith(b"\r\n\r\n") else b""


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body (the simulator always sends one)."""
    head, rest = _read_until(sock, b"\r\n\r\n")
    length = _content_length(head)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + rest[:length]


# --- resources of a process, from /proc ---------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    threads: int
    fds: int
    rss_kib: int

    def __str__(self) -> str:
        return f"{self.threads} threads, {self.fds} fds, {self.rss_kib / 1024:.1f} MiB RSS"


def resources(pid: int) -> Resources:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Resources(threads=int(fields["Threads"]), fds=len(list(Path(f"/proc/{pid}/fd").iterdir())),
                     rss_kib=int(fields["VmRSS"].split()[0]))


def settled_resources(pid: int, samples: int = 5, interval: float = 0.2) -> Resources:
    """The smallest of a few readings: transient threads (a request in flight) should not count as growth."""
    readings = []
    for _ in range(samples):
        readings.append(resources(pid))
        time.sleep(interval)
    return Resources(min(r.threads for r in readings), min(r.fds for r in readings),
                     min(r.rss_kib for r in readings))
