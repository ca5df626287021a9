"""Wiring: one running exporter — store, metrics, poller and HTTP server — built from a `Config`."""

from __future__ import annotations

import logging
import time

from prometheus_client import generate_latest

from .config import Config, ConfigError, load_config
from .metrics import ExporterMetrics
from .poller import Poller
from .state import Store
from .web import ExporterApp, HTTPServer

log = logging.getLogger(__name__)


class Exporter:
    """The parts of a running exporter, and the life-cycle operations the CLI and the tests call."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.store = Store()
        self.metrics = ExporterMetrics(self.store)
        self.poller = Poller(self.store, self.metrics)
        self.poller.apply(config)
        self.metrics.config_loaded(True)
        self.http: HTTPServer | None = None

    def tenant_names(self) -> list[str]:
        return [t.name for t in self.config.tenants]

    def start(self) -> None:
        app = ExporterApp(self.metrics.registry, self.store, self.tenant_names, self.poller.next_run)
        self.http = HTTPServer(app, self.config.listen_host, self.config.listen_port).start()
        self.poller.start()
        log.info("listening on %s, refreshing %d tenant(s)", self.http.url, len(self.config.tenants))

    def run_once(self) -> tuple[bytes, bool]:
        """One refresh of every tenant; the exposition and whether every tenant succeeded."""
        states = self.poller.refresh_all()
        return generate_latest(self.metrics.registry), all(s.up for s in states)

    def reload(self) -> bool:
        """Re-read the config file; a bad one is refused and the running config stays."""
        if self.config_path is None:
            log.info("no config file to reload (demo mode)")
            return False
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
        self.config = new
        self.metrics.config_loaded(True, time.time())
        log.info("config reloaded: %d tenant(s)", len(new.tenants))
        return True

    def stop(self, wait: float = 5.0) -> bool:
        """Stop serving and polling; False if a refresh was still running when `wait` ran out."""
        if self.http is not None:
            self.http.stop()
        return self.poller.stop(wait)
