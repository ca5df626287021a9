"""Wiring: one running exporter — store, metrics, poller and HTTP server — built from a `Config`."""

from __future__ import annotations

import logging
import time

from prometheus_client import generate_latest

from .config import Config, ConfigError, load_config
from .exposition import CachedExposition
from .metrics import ExporterMetrics
from .poller import Poller
from .proxy import Proxy
from .state import Store
from .web import ExporterApp, HTTPServer
from .webconfig import AccessControl, WebConfig, load_web_config

log = logging.getLogger(__name__)

PROXY_HTTP_THREADS = 16  # Grafana asks for a dashboard's panels at once; a slow upstream call holds a thread


class Exporter:
    """The parts of a running exporter, and the life-cycle operations the CLI and the tests call."""

    def __init__(self, config: Config, config_path: str | None = None, web: WebConfig | None = None,
                 web_config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.web_config_path = web_config_path
        self.access = AccessControl(web)
        self.store = Store()
        self.metrics = ExporterMetrics(self.store)
        self.poller = Poller(self.store, self.metrics)
        self.poller.apply(config)
        self.proxy = Proxy(self.poller.client, self.metrics.live)
        self.metrics.response_listeners.append(self.proxy.on_upstream_response)
        self.proxy.apply(config)
        self.metrics.config_loaded(True)
        self.http: HTTPServer | None = None

    def tenant_names(self) -> list[str]:
        return [t.name for t in self.config.tenants]

    def start(self) -> None:
        app = ExporterApp(self.metrics.registry, self.store, self.tenant_names, self.poller.next_run,
                          streams=self.poller.streams, access=self.access, proxy=self.proxy,
                          metrics_app=CachedExposition.for_metrics(self.metrics))
        tls = self.access.ssl_context if self.access.web.tls is not None else None
        threads = PROXY_HTTP_THREADS if self.config.proxy.enabled else 4
        self.http = HTTPServer(app, self.config.listen_host, self.config.listen_port, threads=threads,
                               tls=tls).start()
        self.poller.start()
        log.info("listening on %s, refreshing %d tenant(s)", self.http.url, len(self.config.tenants))

    def run_once(self) -> tuple[bytes, bool]:
        """One refresh and one /analyses walk of every tenant; the exposition and whether all succeeded."""
        states = self.poller.refresh_all()
        streams = self.poller.walk_all()
        return generate_latest(self.metrics.registry), all(s.up for s in [*states, *streams])

    def reload(self) -> bool:
        """Re-read the config file and the web config file; a bad one is refused and the running one stays."""
        if self.config_path is None:
            log.info("no config file to reload (demo mode)")
            return False
        web_ok = self._reload_web()
        try:
            new = load_config(self.config_path)
        except (ConfigError, OSError) as exc:
            log.error("config reload refused, keeping the running config: %s", exc)
            self.metrics.config_loaded(False)
            return False
        if (new.listen_host, new.listen_port) != (self.config.listen_host, self.config.listen_port):
            log.warning("listen_address changes only at restart")
        for warning in new.warnings:
            log.warning("config: %s", warning)
        self.poller.apply(new)
        self.proxy.apply(new)
        self.config = new
        self.metrics.config_loaded(web_ok, time.time())
        log.info("config reloaded: %d tenant(s)", len(new.tenants))
        return web_ok

    def _reload_web(self) -> bool:
        """Re-read `--web.config.file`: new users at once, a new certificate from the next handshake."""
        if self.web_config_path is None:
            return True
        try:
            web = load_web_config(self.web_config_path)
        except ConfigError as exc:
            log.error("web config reload refused, keeping the running one: %s", exc)
            return False
        if (web.tls is None) != (self.access.web.tls is None):
            log.error("web config reload refused: turning TLS on or off takes a restart")
            return False
        self.access.update(web)
        log.info("web config reloaded: TLS %s, %d basic-auth user(s)", "on" if web.tls else "off",
                 len(web.users))
        return True

    def stop(self, wait: float = 5.0) -> bool:
        """Stop serving and polling; False if a refresh was still running when `wait` ran out."""
        if self.http is not None:
            self.http.stop()
        return self.poller.stop(wait)
