"""A simulator and an exporter with its Grafana proxy, both real servers on loopback, for the proxy tests."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import requests

from exlogare_exporter.app import Exporter
from exlogare_exporter.config import parse_config
from exlogare_exporter.simulator import Simulator, SimulatorServer
from tests.support import free_port, parse_metrics, samples, wait_until

TOKEN_A = "proxy-client-a-7f3c9e21d4b8a605"
TOKEN_B = "proxy-client-b-0b61e8f2c94d3a17"
TENANTS = {"acme": {"history_days": 60, "per_day": 12.0}, "lab": {"history_days": 30, "per_day": 5.0}}


def make_simulator(seed: int = 11) -> Simulator:
    sim = Simulator(seed=seed)
    sim.freeze(datetime.now(UTC))  # windows stay still while a test compares
    for name, profile in TENANTS.items():
        sim.add_tenant(name, **profile)
    return sim


def raw_config(sim: Simulator, url: str, proxy: Mapping[str, Any] | None = None,
               tokens: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
    """Two tenants polled every 5 minutes (so the poller is quiet during a test) and two proxy clients."""
    # analyses_interval 0: the RCA stream would poll /analyses too and blur the upstream's request log.
    quiet: dict[str, Any] = {"base_url": url, "interval": "5m", "retries": 0, "analyses_interval": 0}
    tokens = {name: sim.token(name) for name in TENANTS} | dict(tokens or {})
    return {
        "listen_address": f"127.0.0.1:{free_port()}",
        "defaults": {**quiet, **(defaults or {})},
        "tenants": [{"name": name, "token": token} for name, token in tokens.items()],
        "proxy": {"enabled": True, "cache_ttl": "30s",
                  "clients": [{"name": "grafana-a", "token": TOKEN_A, "tenants": ["acme"]},
                              {"name": "grafana-b", "token": TOKEN_B, "tenants": ["lab"]}],
                  **(proxy or {})},
    }


class Stack:
    """The running pair, and ways to talk to both."""

    def __init__(self, sim: Simulator, server: SimulatorServer, exporter: Exporter) -> None:
        self.sim = sim
        self.server = server
        self.exporter = exporter
        assert exporter.http is not None
        self.url = exporter.http.url

    def get(self, path: str, token: str | None = TOKEN_A, headers: Mapping[str, str] | None = None
            ) -> requests.Response:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.url + path, headers={**auth, **(headers or {})}, timeout=30)

    def raw(self, method: str, target: str, headers: Mapping[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
        """A request exactly as written: no client-side normalising of dots, slashes or encodings."""
        conn = http.client.HTTPConnection("127.0.0.1", self.exporter.http.port, timeout=30)  # type: ignore[union-attr]
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in {"Authorization": f"Bearer {TOKEN_A}", **(headers or {})}.items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def upstream(self, path: str, tenant: str = "acme", **params: Any) -> requests.Response:
        """The simulator asked directly, with the tenant's read token (logged like any request)."""
        return requests.get(f"{self.server.url}/api/v1{path}", params=params, timeout=30,
                            headers={"Authorization": f"Bearer {self.sim.token(tenant)}"})

    def upstream_log(self, path_part: str = "") -> list[Any]:
        return [r for r in self.sim.requests() if path_part in r.path]

    def metrics(self, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return samples(parse_metrics(text), name, **labels)

    def metric(self, name: str, **labels: str) -> float:
        return sum(self.metrics(name, **labels).values())


@contextmanager
def running_stack(proxy: Mapping[str, Any] | None = None, tokens: Mapping[str, str] | None = None,
                  defaults: Mapping[str, Any] | None = None, sim: Simulator | None = None,
                  ready: bool = True) -> Iterator[Stack]:
    sim = sim or make_simulator()
    server = SimulatorServer(sim).start()
    exporter: Exporter | None = None
    try:
        exporter = Exporter(parse_config(raw_config(sim, server.url, proxy, tokens, defaults), {}))
        exporter.start()
        stack = Stack(sim, server, exporter)
        if ready:
            wait_until(lambda: requests.get(stack.url + "/readyz", timeout=5).status_code == 200,
                       what="the exporter's first refresh")
        sim.clear_requests()
        yield stack
    finally:
        if exporter is not None:
            exporter.stop(wait=2)
        server.stop()


def body(response: requests.Response | bytes) -> Any:
    return json.loads(response if isinstance(response, bytes) else response.content)
