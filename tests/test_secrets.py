"""No token leaks: the scenarios of the whole suite, run with recognisable canary tokens, and every log line,
exposition, HTTP response and exception text searched for them.

Canaries: each tenant's Exlogare token, the proxy client's token and the basic-auth password. A leak of a
whole token, or of its random part alone (a cut-off copy), fails the test. The scenarios: a good token, one
revoked mid-run, an ingest-only one, upstream answers that echo the token back (a 502 page, a 401 detail, an
HTML 200), config errors with a token in the wrong place, `--check-config`, `--once`, debug logging in text
and JSON, the Grafana proxy with good and bad client tokens, and basic auth with good and bad passwords.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import requests

from exlogare_exporter.client import ExlogareClient, UpstreamError
from exlogare_exporter.config import ConfigError, parse_config
from exlogare_exporter.simulator import Simulator, SimulatorServer
from tests.support import ROOT, Process, free_port, wait_until

pytestmark = pytest.mark.e2e


def canary(kind: str) -> str:
    return f"exl_CANARY{kind}{secrets.token_hex(12)}"


TOKENS = {name: canary(name) for name in ("good", "revoked", "ingest", "echoa", "echob", "echoc")}
PROXY_TOKEN = f"proxyCANARY{secrets.token_hex(12)}"
PASSWORD = f"passCANARY{secrets.token_hex(12)}"
CANARIES = [*TOKENS.values(), PROXY_TOKEN, PASSWORD]


def leaks(text: str) -> list[str]:
    """Canaries found in `text`, whole or by their random part (the last 24 characters)."""
    return [c for c in CANARIES if c in text or c[-24:] in text or c[-12:] in text]


def echo_page(token: str) -> str:
    return f"<html><body>502 Bad Gateway. You sent: Authorization: Bearer {token}</body></html>"


@pytest.fixture(scope="module")
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    simulator = Simulator(seed=21)
    for name in TOKENS:
        simulator.add_tenant(name, history_days=10, per_day=3)
    for name, token in TOKENS.items():
        simulator.add_token(name, token, ["ingest"] if name == "ingest" else ["read"])
    simulator.set_fault(tenant="echoa", status=502, body=echo_page(TOKENS["echoa"]), content_type="text/html")
    simulator.set_fault(tenant="echob", status=401, body=json.dumps(
        {"detail": f"Invalid or revoked API token: {TOKENS['echob']}"}))
    simulator.set_fault(tenant="echoc", status=200, body=echo_page(TOKENS["echoc"]), content_type="text/html")
    with SimulatorServer(simulator) as server:
        yield simulator, server


def config_text(sim_url: str, port: int, proxy: bool = True) -> str:
    tenants = "".join(f"  - name: {name}\n    token_env: TOKEN_{name.upper()}\n" for name in TOKENS)
    proxy_block = ("proxy:\n  enabled: true\n  clients:\n    - name: grafana\n      token_env: PROXY_TOKEN\n"
                   f"      tenants: [{', '.join(TOKENS)}]\n") if proxy else ""
    return (f'listen_address: "127.0.0.1:{port}"\ndefaults:\n  base_url: "{sim_url}"\n  interval: 5s\n'
            f"  retries: 1\n  windows: [7d]\n  timeseries_days: 7\n{proxy_block}tenants:\n{tenants}")


ENV = {**{f"TOKEN_{n.upper()}": t for n, t in TOKENS.items()}, "PROXY_TOKEN": PROXY_TOKEN}


def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "exporter.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, **ENV, **(env or {})}, check=False)
    return result.stdout + result.stderr


def test_a_running_exporter_never_shows_a_token(tmp_path: Path,
                                                sim: tuple[Simulator, SimulatorServer]) -> None:
    simulator, server = sim
    port = free_port()
    (tmp_path / "config.yaml").write_text(config_text(server.url, port))
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n"
                                      "unauthenticated_paths: [/healthz, /proxy/]\n")
    seen: list[str] = []
    for fmt in ("text", "json"):
        simulator.add_token("revoked", TOKENS["revoked"])
        proc = Process([sys.executable, "exporter.py", "--config", str(tmp_path / "config.yaml"),
                        "--web.config.file", str(tmp_path / "web.yml"), "--log-level", "debug",
                        "--log-format", fmt], tmp_path / f"exporter-{fmt}.log", ENV)
        try:
            seen += _exercise(simulator, proc, f"http://127.0.0.1:{port}")
        finally:
            proc.stop()
        output = proc.output()
        assert "refresh failing" in output and "tenant echoa" in output  # the scenarios did run
        seen.append(output)
    found = leaks("\n".join(seen))
    assert not found, f"tokens leaked: {found}"


def _exercise(simulator: Simulator, proc: Process, url: str) -> list[str]:
    """Every endpoint, with good and bad credentials, once the revoked token has failed; the answers."""
    auth = ("prometheus", PASSWORD)
    wait_until(lambda: proc.check_alive() or requests.get(f"{url}/readyz", auth=auth, timeout=2).ok,
               timeout=30, what="every tenant's first refresh")
    simulator.revoke(TOKENS["revoked"])
    wait_until(lambda: 'exlogare_up{tenant="revoked"} 0.0' in requests.get(
        f"{url}/metrics", auth=auth, timeout=5).text, timeout=20, what="the revoked token to fail")
    responses = [requests.get(f"{url}{path}", auth=auth, timeout=10)
                 for path in ("/metrics", "/", "/readyz", "/healthz", "/nope")]
    responses += [requests.get(f"{url}/metrics", auth=("prometheus", PASSWORD + "x"), timeout=10),
                  requests.get(f"{url}/metrics", timeout=10)]
    for tenant, tenant_token in TOKENS.items():
        for token in (PROXY_TOKEN, PROXY_TOKEN[:-1], tenant_token):
            responses.append(requests.get(f"{url}/proxy/{tenant}/api/v1/stats/overview?days=7",
                                          headers={"Authorization": f"Bearer {token}"}, timeout=10))
    responses.append(requests.get(f"{url}/proxy/tenants.json",
                                  headers={"Authorization": f"Bearer {PROXY_TOKEN}"}, timeout=10))
    assert any(r.status_code == 200 and r.url.endswith("overview?days=7") for r in responses)
    return [f"{r.url} {r.status_code} {r.headers} {r.text}" for r in responses]


def test_cli_outputs_never_show_a_token(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    _, server = sim
    path = tmp_path / "config.yaml"
    path.write_text(config_text(server.url, 10450, proxy=False))
    outputs = [run_cli("--check-config", "--config", str(path)),
               run_cli("--once", "--config", str(path), "--log-level", "debug"),
               run_cli("--once", "--config", str(path), "--log-format", "json", "--log-level", "debug")]
    assert "echoa" in outputs[1] and "exlogare_up" in outputs[1]
    bad_configs = [
        config_text(server.url, 10450, proxy=False).replace("token_env: TOKEN_GOOD",
                                                             f"token_env: {TOKENS['good']}"),
        config_text(server.url, 10450, proxy=False).replace("token_env: TOKEN_GOOD",
                                                             f"token_file: {TOKENS['good']}"),
        config_text(server.url, 10450, proxy=False).replace(f'base_url: "{server.url}"',
                                                             f'base_url: "http://u:{TOKENS["good"]}@x"'),
        config_text(server.url, 10450, proxy=False) + f"{TOKENS['good']}: 1\n",
        config_text(server.url, 10450, proxy=False).replace("  retries: 1", f"  retries: {TOKENS['good']}"),
        config_text(server.url, 10450, proxy=False).replace("  retries: 1", f"  - {TOKENS['good']}: ["),
    ]
    for index, text in enumerate(bad_configs):
        bad = tmp_path / f"bad{index}.yaml"
        bad.write_text(text)
        out = run_cli("--check-config", "--config", str(bad))
        assert "error" in out, out
        outputs.append(out)
    found = leaks("\n".join(outputs))
    assert not found, f"tokens leaked: {found}"


def test_exception_texts_and_reprs_never_show_a_token(sim: tuple[Simulator, SimulatorServer]) -> None:
    _, server = sim
    config = parse_config({"defaults": {"base_url": server.url, "retries": 0},
                           "tenants": [{"name": n, "token": t} for n, t in TOKENS.items()]}, environ={})
    texts = [repr(config), str(config)]
    for tenant in config.tenants:
        client = ExlogareClient(tenant)
        try:
            client.get("/stats/overview", {"days": 7}, lambda data: data)
        except UpstreamError as exc:
            texts += [str(exc), repr(exc), exc.detail]
        finally:
            client.close()
        texts.append(repr(client))
    for raw in ({"tenants": [{"name": "a", "token": TOKENS["good"] + " x"}]},
                {"tenants": [{"name": "a", "token_env": TOKENS["good"]}]},
                {"tenants": [{"name": TOKENS["good"] + " x", "token": "exl_x"}]},
                {"defaults": {"base_url": f"https://u:{TOKENS['good']}@x"},
                 "tenants": [{"name": "a", "token": "exl_x"}]}):
        with pytest.raises(ConfigError) as info:
            parse_config(raw, environ={})
        texts.append(str(info.value))
    assert any("502" in t for t in texts) and any("401" in t for t in texts)
    found = leaks("\n".join(texts))
    assert not found, f"tokens leaked: {found}"
