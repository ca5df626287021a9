"""The exporter's HTTP side: a small WSGI app served by waitress (bounded threads, slow-client timeouts)."""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import waitress
from prometheus_client import CollectorRegistry, make_wsgi_app
from waitress import wasyncore

from . import __version__
from .state import Store, TenantState
from .stream import TenantStream
from .tlsfront import TLSFront
from .webconfig import REALM, AccessControl

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
]


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else ""


def _stream_status(stream: TenantStream | None) -> dict[str, Any]:
    """The RCA stream's part of a tenant's /readyz entry (absent when the stream is off).

    It does not gate readiness: the counters are valid (at zero) before the first walk."""
    if stream is None:
        return {}
    return {"analyses": {"status": stream.status, "last_success": _iso(stream.last_success),
                         "last_error": stream.last_error or "", "catching_up": stream.catching_up}}


def tenant_status(state: TenantState | None) -> str:
    if state is None or state.attempts == 0:
        return "pending"
    return "up" if state.up else "down"


class ExporterApp:
    """Routes `/metrics`, `/healthz`, `/readyz` and `/`; reads only the store, never the upstream."""

    def __init__(self, registry: CollectorRegistry, store: Store, tenants: Callable[[], list[str]],
                 next_run: Callable[[str], float | None] = lambda name: None,
                 streams: Store[TenantStream] | None = None, *,
                 access: AccessControl | None = None, proxy: WSGIApp | None = None,
                 metrics_app: WSGIApp | None = None) -> None:
        """`metrics_app` serves /metrics (the exporter's is `exposition.CachedExposition`); without it, the
        plain client_python app renders `registry` at every scrape."""
        self._metrics = metrics_app if metrics_app is not None else make_wsgi_app(registry)
        self._access = access
        self._proxy = proxy  # the Grafana datasource proxy under /proxy/ (its own auth and methods)
        self._store = store
        self._streams: Store[TenantStream] = streams if streams is not None else Store()
        self._tenants = tenants
        self._next_run = next_run

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if self._access is not None and not self._access.allows(path, environ.get("HTTP_AUTHORIZATION")):
            return self._send(start_response, "401 Unauthorized", b"unauthorized\n",
                              "text/plain; charset=utf-8",
                              [("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')])
        if self._proxy is not None and (path == "/proxy" or path.startswith("/proxy/")):
            return self._proxy(environ, start_response)
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return self._send(start_response, "405 Method Not Allowed", b"method not allowed\n",
                              "text/plain; charset=utf-8", [("Allow", "GET, HEAD")])
        if path == "/metrics":
            return self._metrics(environ, self._with_security_headers(start_response))
        if path == "/healthz":
            return self._send(start_response, "200 OK", b"ok\n", "text/plain; charset=utf-8")
        if path == "/readyz":
            return self._readyz(start_response)
        if path == "/":
            return self._send(start_response, "200 OK", self._landing().encode(), "text/html; charset=utf-8")
        return self._send(start_response, "404 Not Found", b"not found\n", "text/plain; charset=utf-8")

    def _tenant_rows(self) -> list[tuple[str, TenantState | None]]:
        states = self._store.snapshot()
        return [(name, states.get(name)) for name in self._tenants()]

    def _readyz(self, start_response: StartResponse) -> Iterable[bytes]:
        rows = self._tenant_rows()
        streams = self._streams.snapshot()  # one snapshot for every row
        body = {
            "ready": all(tenant_status(s) != "pending" for _, s in rows),
            "tenants": {
                name: {"status": tenant_status(s),
                       "last_success": _iso(s.last_success) if s else "",
                       "last_error": (s.last_error or "") if s else "",
                       **_stream_status(streams.get(name))}
                for name, s in rows
            },
        }
        status = "200 OK" if body["ready"] else "503 Service Unavailable"
        return self._send(start_response, status, json.dumps(body, indent=2).encode() + b"\n",
                          "application/json")

    def _landing(self) -> str:
        esc = html.escape
        streams = self._streams.snapshot()
        rows = "".join(
            f"<tr><td>{esc(name)}</td><td>{esc(tenant_status(s))}</td>"
            f"<td>{esc(_iso(s.last_success) if s else '')}</td>"
            f"<td>{esc((s.last_error or '') if s else '')}</td>"
            f"<td>{esc(_iso(self._next_run(name)))}</td>"
            f"<td>{esc(streams[name].status if name in streams else 'off')}</td></tr>"
            for name, s in self._tenant_rows())
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Exlogare exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:left}}</style></head>
<body><h1>Exlogare exporter</h1>
<p>Version {esc(__version__)}. <a href="metrics">Metrics</a> · <a href="readyz">Readiness</a> ·
<a href="healthz">Health</a></p>
<table><thead><tr><th>Tenant</th><th>Status</th><th>Last success (UTC)</th><th>Last error</th>
<th>Next refresh (UTC)</th><th>RCA stream</th></tr></thead><tbody>{rows}</tbody></table>
</body></html>
"""

    @staticmethod
    def _with_security_headers(start_response: StartResponse) -> StartResponse:
        def wrapped(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, *SECURITY_HEADERS], exc_info)
        return wrapped

    def _send(self, start_response: StartResponse, status: str, body: bytes, content_type: str,
              extra: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *(extra or []),
                   *SECURITY_HEADERS]
        start_response(status, headers)
        return [body]


class HTTPServer:
    """waitress in a background thread, with a `stop()` that really stops it (waitress has none)."""

    def __init__(self, app: WSGIApp, host: str, port: int, threads: int = 4,
                 tls: Callable[[], ssl.SSLContext] | None = None, **adjustments: Any) -> None:
        """`tls` gives the SSL context for each new connection: then waitress listens on a private Unix
        socket and a `TLSFront` serves (host, port)."""
        options: dict[str, Any] = {
            "threads": threads, "channel_timeout": 30, "connection_limit": 1000, "cleanup_interval": 5,
            "max_request_header_size": 64 * 1024, "max_request_body_size": 1024 * 1024,
            "ident": "exlogare-exporter", "asyncore_use_poll": True, **adjustments,
        }
        self.host = host
        self.tls = tls is not None
        self._front: TLSFront | None = None
        self._private_dir: str | None = None
        if tls is None:
            self._server = waitress.create_server(app, host=host, port=port, **options)
            self.port: int = self._server.effective_port  # type: ignore[union-attr]
        else:
            self._private_dir = tempfile.mkdtemp(prefix="exlogare-exporter-")  # 0700: ours alone
            backend = os.path.join(self._private_dir, "http.sock")
            self._server = waitress.create_server(app, unix_socket=backend, unix_socket_perms="600",
                                                  url_scheme="https", **options)
            try:
                self._front = TLSFront(tls, host, port, backend, idle_timeout=options["channel_timeout"],
                                       max_connections=options["connection_limit"])
            except OSError:
                wasyncore.close_all(self._server._map)
                self._remove_backend()
                raise
            self.port = self._front.port
        self._thread = threading.Thread(target=self._server.run, name=f"http-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        scheme = "https" if self.tls else "http"
        return f"{scheme}://[{host}]:{self.port}" if ":" in host else f"{scheme}://{host}:{self.port}"

    def start(self) -> HTTPServer:
        self._thread.start()
        if self._front is not None:
            self._front.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        if self._front is not None:
            self._front.stop(max(0.0, deadline - time.monotonic()))
        self._server.task_dispatcher.shutdown(timeout=max(0.0, deadline - time.monotonic()))
        wasyncore.close_all(self._server._map)  # an empty map ends waitress' loop
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._remove_backend()

    def _remove_backend(self) -> None:
        """The private directory of the TLS front's Unix socket."""
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
