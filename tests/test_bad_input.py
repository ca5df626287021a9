"""Bad config, bad CLI use, bad HTTP requests and bad proxy queries: one test per row of the README's table
("Bad input and the answer it gets"), and a test that the README's table is exactly this one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from exlogare_exporter.config import ConfigError, load_config, parse_config
from tests.support import ROOT, Process, free_port, start_simulator, wait_until

GOOD = {"defaults": {"base_url": "https://api.exlogare.net"},
        "tenants": [{"name": "acme", "token_env": "TOKEN_ACME"}]}
ENV = {"TOKEN_ACME": "exl_acme_read_token"}


def with_(path: str, value: Any) -> dict[str, Any]:
    """GOOD with one key set (`defaults.interval`, `tenants.0.token_file`, ...)."""
    data: Any = {"defaults": dict(GOOD["defaults"]), "tenants": [dict(GOOD["tenants"][0])]}
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value
    return data


def refused(data: Any, *expected: str, env: dict[str, str] | None = None) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        with pytest.raises(ConfigError) as info:
            parse_config(data, environ=env if env is not None else ENV, base_dir=tmp)
        for text in expected:
            assert text in str(info.value), str(info.value)
    return check


def cli(args: list[str], code: int, *expected: str, files: dict[str, str] | None = None
        ) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        result = subprocess.run([sys.executable, "exporter.py", *(a.format(tmp=tmp) for a in args)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60, env={**os.environ, **ENV},
                                check=False)
        assert result.returncode == code, result.stderr
        for text in expected:
            assert text in result.stderr, result.stderr
    return check


def yaml_error(tmp: Path) -> None:
    (tmp / "c.yaml").write_text("tenants:\n  - name: acme\n    token_env: [TOKEN_ACME\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 4, column 1"):
        load_config(tmp / "c.yaml", environ=ENV)


def world_readable(tmp: Path) -> None:
    token = tmp / "token"
    token.write_text("exl_acme_read_token\n")
    token.chmod(0o644)
    data = with_("tenants.0.token_file", str(token))
    del data["tenants"][0]["token_env"]
    config = parse_config(data, environ={}, base_dir=tmp)
    assert any("readable by group or others" in w and "chmod 600" in w for w in config.warnings)


def empty_token_file(tmp: Path) -> None:
    (tmp / "token").write_text("\n")
    data = with_("tenants.0.token_file", str(tmp / "token"))
    del data["tenants"][0]["token_env"]
    refused(data, "tenants[0].token_file", "is empty")(tmp)


@dataclass(frozen=True)
class Row:
    kind: str
    bad: str  # the README's words for the input
    answer: str  # the README's words for the answer
    check: Callable[[Path], None] | None = None  # None: checked against the live exporter (`live_check`)
    live: tuple[str, str, int] | None = None  # (method, path, status) for HTTP and proxy rows


EXIT1 = "refused at start-up and by `--check-config` (exit 1), naming the key"

ROWS = [
    Row("config", "YAML syntax error", "exit 1, with the line and column", yaml_error),
    Row("config", "unknown key (a typo: `intervall`)", f"{EXIT1}, suggesting `interval`",
        refused(with_("defaults.intervall", "1m"), "defaults.intervall", "Did you mean interval?")),
    Row("config", "value of the wrong type (`retries: \"2\"`)", f"{EXIT1}, with the expected type",
        refused(with_("defaults.retries", "2"), "defaults.retries", "without quotes")),
    Row("config", "`windows` over 365 days, `top_windows` over 180", f"{EXIT1}, with the API's limit",
        refused(with_("defaults.top_windows", ["200d"]), "top_windows[0]", "over 180 days")),
    Row("config", "`interval` under 5s", EXIT1,
        refused(with_("defaults.interval", "1s"), "interval", "under 5s")),
    Row("config", "`max_staleness` shorter than `interval`", EXIT1,
        refused(with_("defaults.max_staleness", "30s"), "max_staleness", "shorter than the interval")),
    Row("config", "two tenants with one name", EXIT1,
        refused({**GOOD, "tenants": GOOD["tenants"] * 2}, "tenants[1].name", "already the name")),
    Row("config", "plain `http://` to a host that is not loopback", f"{EXIT1}; `allow_insecure_http: true` "
        "allows it", refused(with_("defaults.base_url", "http://exlogare.lan"), "allow_insecure_http")),
    Row("config", "`user:password@` in `base_url`", f"{EXIT1}; the URL is not echoed",
        refused(with_("defaults.base_url", "https://u:pw@x"), "must not hold user:password@")),
    Row("config", "token variable not set, token file empty or unreadable", EXIT1,
        refused(GOOD, "tenants[0].token_env", "TOKEN_ACME is not set", env={})),
    Row("config", "empty token file", EXIT1, empty_token_file),
    Row("config", "a token pasted where a variable name, file name or tenant name goes",
        f"{EXIT1}; the token is not echoed",
        refused(with_("tenants.0.token_env", "exl_pasted_token_value"), "looks like a token")),
    Row("config", "two token sources for one tenant", EXIT1,
        refused(with_("tenants.0.token", "exl_inline"), "keep exactly one token source")),
    Row("config", "`${VAR}` of an unset variable", EXIT1,
        refused(with_("defaults.base_url", "${NOPE}"), "NOPE is not set")),
    Row("config", "token file readable by group or others", "a warning at start-up: `chmod 600`",
        world_readable),
    Row("CLI", "unknown flag or bad `--log-level`", "exit 2, with the usage",
        cli(["--log-level", "loud"], 2, "invalid choice")),
    Row("CLI", "no `--config` and no `$EXLOGARE_EXPORTER_CONFIG`", "exit 2, suggesting `--demo`",
        cli([], 2, "--config", "--demo")),
    Row("CLI", "`--config` file missing or unreadable", "exit 1, naming the file",
        cli(["--config", "{tmp}/nope.yaml"], 1, "nope.yaml", "cannot read")),
    Row("CLI", "bad `--listen`", "exit 1, with the accepted forms",
        cli(["--config", "{tmp}/c.yaml", "--listen", "localhost", "--check-config"], 1, "--listen",
            files={"c.yaml": "tenants: [{name: acme, token_env: TOKEN_ACME}]\n"})),
    Row("CLI", "`--web.config.file` with a password where a bcrypt hash goes",
        "exit 1, naming the key; the password is not echoed",
        cli(["--config", "{tmp}/c.yaml", "--web.config.file", "{tmp}/w.yml", "--check-config"], 1,
            "basic_auth_users.prometheus", "not a bcrypt hash",
            files={"c.yaml": "tenants: [{name: acme, token_env: TOKEN_ACME}]\n",
                   "w.yml": "basic_auth_users: {prometheus: hunter2}\n"})),
    Row("HTTP", "a method other than GET or HEAD", "405 with `Allow: GET, HEAD`",
        live=("POST", "/metrics", 405)),
    Row("HTTP", "an unknown path", "404", live=("GET", "/admin", 404)),
    Row("HTTP", "no or wrong basic-auth credentials (when configured)", "401 with `WWW-Authenticate`"),
    Row("HTTP", "request line or headers over 64 KiB", "431, connection closed"),
    Row("HTTP", "not HTTP at all", "400, connection closed"),
    Row("proxy query", "a value out of range (`days=400` on top lists)",
        "the server's own 422, without asking the upstream",
        live=("GET", "/proxy/acme/api/v1/stats/top-projects?days=400", 422)),
    Row("proxy query", "an unknown endpoint or a `..` segment", "404, without asking the upstream",
        live=("GET", "/proxy/acme/api/v1/stats/../admin", 404)),
    Row("proxy query", "a method other than GET", "405", live=("DELETE", "/proxy/acme/api/v1/stats/overview",
                                                                405)),
    Row("proxy query", "no client token, or an unknown one", "401",
        live=("GET", "/proxy/acme/api/v1/stats/overview", 401)),
    Row("proxy query", "a query over 2048 characters", "414",
        live=("GET", "/proxy/acme/api/v1/analyses?project=" + "a" * 3000, 414)),
]


@pytest.mark.parametrize("row", [r for r in ROWS if r.check], ids=lambda r: f"{r.kind}: {r.bad}")
def test_offline_row(row: Row, tmp_path: Path) -> None:
    assert row.check is not None
    row.check(tmp_path)


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Callable[[], int]]]:
    tmp = tmp_path_factory.mktemp("bad-input")
    sim, sim_url = start_simulator(tmp, "--tenants", "acme", "--arrival-rate", "0")
    port = free_port()
    (tmp / "c.yaml").write_text(
        f'listen_address: "127.0.0.1:{port}"\ndefaults:\n  base_url: "{sim_url}"\n  interval: 5m\n'
        "  analyses_interval: 0s\n"  # no background calls: any upstream request was let through
        "proxy:\n  enabled: true\n  clients:\n    - name: grafana\n      token: proxy-client-token\n"
        "      tenants: [acme]\ntenants:\n  - name: acme\n    token: exl_sim_acme_read\n")
    proc = Process([sys.executable, "exporter.py", "--config", str(tmp / "c.yaml")], tmp / "exporter.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.check_alive() or requests.get(f"{url}/readyz", timeout=2).ok, what="exporter")
        yield url, lambda: len(requests.get(f"{sim_url}/_sim/requests", timeout=5).json())
    finally:
        proc.stop()
        sim.stop()


@pytest.mark.parametrize("row", [r for r in ROWS if r.live], ids=lambda r: f"{r.kind}: {r.bad}")
def test_live_row(row: Row, exporter: tuple[str, Callable[[], int]]) -> None:
    url, upstream_calls = exporter
    assert row.live is not None
    method, path, status = row.live
    headers = {"Authorization": "Bearer proxy-client-token"} if path.startswith("/proxy/") and status != 401 \
        else {}
    before = upstream_calls()
    r = requests.request(method, url + path, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    if status == 405 and not path.startswith("/proxy/"):
        assert r.headers["Allow"] == "GET, HEAD"
    assert upstream_calls() == before, "a refused request reached the upstream"


COVERED_ELSEWHERE = {  # rows whose test lives with its subject
    "no or wrong basic-auth credentials (when configured)": "tests/test_web_config.py",
    "request line or headers over 64 KiB": "tests/test_http_hardening.py",
    "not HTTP at all": "tests/test_http_hardening.py",
}


def test_every_row_is_tested_somewhere() -> None:
    for row in ROWS:
        if row.check is None and row.live is None:
            assert row.bad in COVERED_ELSEWHERE, row.bad


def test_readme_table_is_this_table() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Bad input and the answer it gets", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert table == [f"| {r.kind} | {r.bad} | {r.answer} |" for r in ROWS]
