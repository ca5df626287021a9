"""The command line as users run it: --check-config, --once, --demo, SIGHUP reload, SIGTERM stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import (
    ROOT,
    Process,
    free_port,
    parse_metrics,
    samples,
    start_exporter,
    start_simulator,
    wait_until,
)

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    proc, url = start_simulator(tmp_path_factory.mktemp("sim"), "--tenants", "acme,lab", "--seed", "3")
    try:
        yield url, requests.get(f"{url}/_sim/tenants", timeout=5).json()
    finally:
        proc.stop()


def config(sim_url: str, *tenants: str, windows: str = "[1d, 7d]") -> str:
    body = "".join(f"  - name: {t}\n    token_env: TOKEN_{t.upper()}\n" for t in tenants)
    return (f'listen_address: "127.0.0.1:{{port}}"\ndefaults:\n  base_url: "{sim_url}"\n  interval: 5m\n'
            f"  windows: {windows}\n  timeseries_days: 7\ntenants:\n{body}")


def tokens_env(listing: dict, scope: str = "read") -> dict[str, str]:
    return {f"TOKEN_{name.upper()}": t["tokens"][scope] for name, t in listing.items()}


def run(args: list[str], env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "exporter.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


def test_check_config_accepts_a_good_file(tmp_path: Path, sim: tuple[str, dict]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config(sim[0], "acme", "lab").replace("{port}", "10450"))
    result = run(["--check-config", "--config", str(path)], tokens_env(sim[1]))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "acme, lab" in result.stdout


def test_check_config_names_the_bad_key(tmp_path: Path, sim: tuple[str, dict]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config(sim[0], "acme", windows="[1d, 400d]").replace("{port}", "10450"))
    result = run(["--check-config", "--config", str(path)], tokens_env(sim[1]))
    assert result.returncode == 1
    assert "windows[1]" in result.stderr and "365" in result.stderr


def test_check_config_reports_a_missing_token_variable(tmp_path: Path, sim: tuple[str, dict]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config(sim[0], "acme").replace("{port}", "10450"))
    result = run(["--check-config", "--config", str(path)], {"TOKEN_ACME": ""})
    assert result.returncode == 1
    assert "tenants[0].token_env" in result.stderr


def test_once_prints_the_exposition(tmp_path: Path, sim: tuple[str, dict]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config(sim[0], "acme", "lab").replace("{port}", "10450"))
    result = run(["--once", "--config", str(path)], tokens_env(sim[1]))
    assert result.returncode == 0, result.stderr
    m = parse_metrics(result.stdout)
    assert samples(m, "exlogare_up") == {(("tenant", "acme"),): 1.0, (("tenant", "lab"),): 1.0}
    assert len(samples(m, "exlogare_daily_failures", tenant="acme")) == 7


def test_once_fails_when_a_tenant_fails_and_says_why(tmp_path: Path, sim: tuple[str, dict]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config(sim[0], "acme", "lab").replace("{port}", "10450"))
    env = {**tokens_env(sim[1]), "TOKEN_LAB": sim[1]["lab"]["tokens"]["ingest"]}
    result = run(["--once", "--config", str(path)], env)
    assert result.returncode == 1
    assert "tenant lab" in result.stderr and "Missing scope: read" in result.stderr
    m = parse_metrics(result.stdout)
    assert samples(m, "exlogare_up") == {(("tenant", "acme"),): 1.0, (("tenant", "lab"),): 0.0}
    for token in env.values():
        assert token not in result.stdout + result.stderr


def test_sighup_reloads_and_refuses_a_bad_config(tmp_path: Path, sim: tuple[str, dict]) -> None:
    sim_url, listing = sim
    proc, url = start_exporter(tmp_path, config(sim_url, "acme"), tokens_env(listing))
    config_path = tmp_path / "config.yaml"
    port = url.rsplit(":", 1)[1]

    def metrics() -> dict:
        return parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)

    try:
        assert set(samples(metrics(), "exlogare_up")) == {(("tenant", "acme"),)}
        config_path.write_text(config(sim_url, "acme", "lab").replace("{port}", port))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: samples(metrics(), "exlogare_up", tenant="lab") == {(("tenant", "lab"),): 1.0},
                   what="the reloaded tenant lab to be up")
        assert samples(metrics(), "exlogare_config_last_reload_successful") == {(): 1.0}

        config_path.write_text("tenants: [oops")
        proc.signal(signal.SIGHUP)
        wait_until(lambda: samples(metrics(), "exlogare_config_last_reload_successful") == {(): 0.0},
                   what="the failed reload to show")
        assert set(samples(metrics(), "exlogare_up")) == {(("tenant", "acme"),), (("tenant", "lab"),)}

        config_path.write_text(config(sim_url, "lab").replace("{port}", port))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: set(samples(metrics(), "exlogare_up")) == {(("tenant", "lab"),)},
                   what="tenant acme to be dropped")
        assert samples(metrics(), "exlogare_failures_detected", tenant="acme") == {}
    finally:
        code = proc.stop()
    assert code == 0
    assert "config reload refused" in proc.output()


def test_sigterm_stops_promptly(tmp_path: Path, sim: tuple[str, dict]) -> None:
    proc, _ = start_exporter(tmp_path, config(sim[0], "acme"), tokens_env(sim[1]))
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert "stopping" in proc.output()
    proc.stop()


def test_demo_serves_every_demo_tenant(tmp_path: Path) -> None:
    port = free_port()
    proc = Process([sys.executable, "exporter.py", "--demo", "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "demo.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.check_alive() or requests.get(f"{url}/readyz", timeout=2).status_code == 200,
                   timeout=30, what="the demo to be ready")
        m = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
        ups = samples(m, "exlogare_up")
        assert len(ups) >= 3 and set(ups.values()) == {1.0}
        assert f"{url}/metrics" in proc.output()
    finally:
        assert proc.stop() == 0


def test_no_config_is_a_usage_error() -> None:
    result = run([], {"EXLOGARE_EXPORTER_CONFIG": ""})
    assert result.returncode == 2
    assert "--config" in result.stderr and "--demo" in result.stderr


def test_version() -> None:
    result = run(["--version"])
    assert result.returncode == 0 and result.stdout.startswith("exlogare-exporter ")
