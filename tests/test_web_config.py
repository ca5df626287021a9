"""`--web.config.file`: parsing (exporter-toolkit's format) and, on a real exporter process, TLS with
certificates made at test time (trustme), client certificates, minimum TLS version, basic auth with bcrypt
hashes, open health endpoints, and SIGHUP re-reading it all."""

from __future__ import annotations

import base64
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import requests
import trustme

from exlogare_exporter.config import ConfigError
from exlogare_exporter.webconfig import Authenticator, load_web_config, parse_basic, parse_web_config
from tests.support import ROOT, Process, free_port, start_simulator, wait_until

HASH = bcrypt.hashpw(b"s3cret-password", bcrypt.gensalt(4)).decode()
OTHER_HASH = bcrypt.hashpw(b"another-password", bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server CA and certificate for 127.0.0.1, and a separate CA with one client certificate."""
    tmp = tmp_path_factory.mktemp("pki")
    ca, client_ca = trustme.CA(), trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(tmp / "server.pem")
    ca.cert_pem.write_to_path(tmp / "ca.pem")
    client_ca.cert_pem.write_to_path(tmp / "client-ca.pem")
    client = client_ca.issue_cert("prometheus@example.test")
    client.cert_chain_pems[0].write_to_path(tmp / "client.crt")
    client.private_key_pem.write_to_path(tmp / "client.key")
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp / "stranger.pem")
    return {p.stem: p for p in tmp.iterdir()}


# --- parsing -----------------------------------------------------------------------------------------------

def parse(data: object, base: Path) -> object:
    return parse_web_config(data, str(base))


def test_empty_file_means_plain_http_and_no_auth(tmp_path: Path) -> None:
    web = parse(None, tmp_path)
    assert web.tls is None and not web.users and not web.needs_auth("/metrics")


def test_a_full_file_is_understood(pki: dict[str, Path]) -> None:
    tls = {"cert_file": "server.pem", "key_file": "server.pem", "min_version": "TLS13",
           "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "client-ca.pem"}
    web = parse({"tls_server_config": tls,
                 "basic_auth_users": {"prometheus": HASH},
                 "unauthenticated_paths": ["/healthz", "/proxy/"]}, pki["ca"].parent)
    assert web.tls is not None and web.tls.min_version == "TLS13"
    assert web.ssl_context is not None and web.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert web.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert web.needs_auth("/metrics") and web.needs_auth("/") and web.needs_auth("/healthz/")
    assert not web.needs_auth("/healthz") and not web.needs_auth("/proxy/acme/stats/overview")


BAD_FILES = [
    ({"tls_server_config": {"cert_file": "server.pem"}}, "tls_server_config.key_file", "required"),
    ({"tls_server_config": {"cert_file": "nope.pem", "key_file": "server.pem"}}, "cert_file",
     "not a readable"),
    ({"tls_server_config": {"cert_file": "server.pem", "key_file": "ca.pem"}}, "tls_server_config",
     "cannot be used"),
    ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.pem", "min_version": "TLS10"}},
     "min_version", "'TLS10' is not one of TLS12, TLS13"),
    ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.pem", "min_version": "TLS13",
                            "max_version": "TLS12"}}, "min_version", "above max_version"),
    ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.pem",
                            "client_auth_type": "RequireAndVerifyClientCert"}}, "client_ca_file", "required"),
    ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.pem",
                            "client_auth_type": "RequireAnyClientCert", "client_ca_file": "client-ca.pem"}},
     "client_auth_type", "not supported"),
    ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.pem",
                            "client_ca_file": "client-ca.pem"}}, "client_auth_type", "NoClientCert"),
    ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.pem", "cipher_suites": ["x"]}},
     "cipher_suites", "unsupported"),
    ({"basic_auth_users": {"prometheus": "plain-text-password"}}, "basic_auth_users.prometheus",
     "not a bcrypt hash"),
    ({"basic_auth_users": {"pro:metheus": HASH}}, "basic_auth_users[0]", "without ':'"),
    ({"basic_auth_users": ["prometheus"]}, "basic_auth_users", "mapping"),
    ({"unauthenticated_paths": ["/healthz"]}, "unauthenticated_paths", "basic_auth_users is empty"),
    ({"basic_auth_users": {"p": HASH}, "unauthenticated_paths": ["healthz"]}, "unauthenticated_paths[0]",
     "starting with /"),
    ({"http_server_config": {"http2": True}}, "http_server_config", "unknown or unsupported key"),
    (["tls"], "", "must be a mapping"),
]


@pytest.mark.parametrize(("data", "key", "reason"), BAD_FILES, ids=[f"{b[1]}:{b[2]}" for b in BAD_FILES])
def test_bad_web_configs_name_the_key(pki: dict[str, Path], data: object, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data, pki["ca"].parent)
    assert key in str(info.value) and reason in str(info.value)
    assert "plain-text-password" not in str(info.value)


def test_load_names_the_file_and_the_yaml_position(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users: [oops\n")
    with pytest.raises(ConfigError, match=r"web\.yml: line 2"):
        load_web_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_web_config(tmp_path / "missing.yml")


def test_basic_auth_checks_bcrypt_and_caches_only_successes() -> None:
    auth = Authenticator()
    auth.update({"prometheus": HASH.encode()})

    def header(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert auth.check(header("prometheus", "s3cret-password"))
    started = time.perf_counter()
    assert auth.check(header("prometheus", "s3cret-password"))
    assert time.perf_counter() - started < 0.002  # remembered: no bcrypt the second time
    assert not auth.check(header("prometheus", "wrong"))
    assert not auth.check(header("nobody", "s3cret-password"))
    assert not auth.check("Bearer abc") and not auth.check(None) and not auth.check("Basic !!!")
    auth.update({"prometheus": OTHER_HASH.encode()})
    assert not auth.check(header("prometheus", "s3cret-password"))  # a changed hash forgets the cache
    assert parse_basic(header("a", "b:c")) == ("a", "b:c")


# --- a live exporter ----------------------------------------------------------------------------------------

class Live:
    def __init__(self, proc: Process, url: str, web_path: Path, pki: dict[str, Path]) -> None:
        self.proc, self.url, self.web_path, self.pki = proc, url, web_path, pki

    def get(self, path: str, **kwargs: object) -> requests.Response:
        kwargs.setdefault("verify", str(self.pki["ca"]))
        return requests.get(self.url + path, timeout=5, **kwargs)  # type: ignore[arg-type]


CONFIG = """listen_address: "127.0.0.1:{port}"
defaults:
  base_url: "{sim}"
  interval: 5m
  windows: [7d]
tenants:
  - name: acme
    token: exl_sim_acme_read
"""


def start_live(tmp: Path, sim_url: str, web: str, pki: dict[str, Path]) -> Live:
    port = free_port()
    (tmp / "config.yaml").write_text(CONFIG.format(port=port, sim=sim_url))
    web_path = tmp / "web.yml"
    web_path.write_text(web)
    proc = Process([sys.executable, "exporter.py", "--config", str(tmp / "config.yaml"),
                    "--web.config.file", str(web_path)], tmp / "exporter.log")
    live = Live(proc, f"https://127.0.0.1:{port}", web_path, pki)
    wait_until(lambda: proc.check_alive() or live.get("/healthz").ok, what="the TLS exporter")
    return live


TLS_AUTH = f"""tls_server_config:
  cert_file: {{pki}}/server.pem
  key_file: {{pki}}/server.pem
basic_auth_users:
  prometheus: '{HASH}'
unauthenticated_paths: [/healthz, /readyz]
"""


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_simulator(tmp_path_factory.mktemp("sim"), "--tenants", "acme", "--arrival-rate", "0")
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, sim_url: str, pki: dict[str, Path]) -> Iterator[Live]:
    exporter = start_live(tmp_path_factory.mktemp("live"), sim_url,
                          TLS_AUTH.format(pki=pki["ca"].parent), pki)
    yield exporter
    assert exporter.proc.stop() == 0


def test_every_endpoint_needs_auth_except_the_open_ones(live: Live) -> None:
    for path in ("/metrics", "/", "/nope", "/healthz/"):
        r = live.get(path)
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"].startswith('Basic realm="exlogare-exporter"')
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert live.get("/metrics", auth=("prometheus", "wrong")).status_code == 401
    assert live.get("/metrics", auth=("intruder", "s3cret-password")).status_code == 401
    r = live.get("/metrics", auth=("prometheus", "s3cret-password"))
    assert r.status_code == 200 and "exlogare_up" in r.text
    assert live.get("/healthz").status_code == 200
    assert live.get("/readyz").status_code in (200, 503)


def test_plain_http_and_untrusted_certificates_are_refused(live: Live) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(live.url.replace("https:", "http:") + "/healthz", timeout=5)
    with pytest.raises(requests.exceptions.SSLError):
        live.get("/healthz", verify=True)  # the system store does not know the test CA


def test_a_stalled_handshake_does_not_block_others(live: Live) -> None:
    port = int(live.url.rsplit(":", 1)[1])
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        started = time.monotonic()
        assert live.get("/healthz").ok
        assert time.monotonic() - started < 2
    finally:
        for s in stalled:
            s.close()


def tls_client(pki: dict[str, Path], version: ssl.TLSVersion | None = None,
               cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if version is not None:
        ctx.maximum_version = version
    if cert:
        ctx.load_cert_chain(str(pki["client"].with_suffix(".crt")), str(pki["client"].with_suffix(".key")))
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return tls.recv(1024)


def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """No HTTP answer: the handshake failed (TLS 1.3 may report it only as the connection closing)."""
    try:
        return not handshake(port, ctx).startswith(b"HTTP/")
    except (ssl.SSLError, ConnectionError):
        return True


def test_min_version_and_client_certificates(tmp_path: Path, sim_url: str, pki: dict[str, Path]) -> None:
    d = pki["ca"].parent
    port = free_port()
    (tmp_path / "config.yaml").write_text(CONFIG.format(port=port, sim=sim_url))
    (tmp_path / "web.yml").write_text(f"tls_server_config:\n  cert_file: {d}/server.pem\n"
                                      f"  key_file: {d}/server.pem\n  min_version: TLS13\n"
                                      "  client_auth_type: RequireAndVerifyClientCert\n"
                                      f"  client_ca_file: {d}/client-ca.pem\n")
    proc = Process([sys.executable, "exporter.py", "--config", str(tmp_path / "config.yaml"),
                    "--web.config.file", str(tmp_path / "web.yml")], tmp_path / "exporter.log")
    try:
        wait_until(lambda: proc.check_alive() or handshake(port, tls_client(pki, cert=True)).startswith(
            b"HTTP/1.1 200"), what="the exporter with client certificates")
        assert refused(port, tls_client(pki, version=ssl.TLSVersion.TLSv1_2, cert=True))
        assert refused(port, tls_client(pki))  # no client certificate
    finally:
        assert proc.stop() == 0


def test_sighup_rereads_the_web_config(tmp_path: Path, sim_url: str, pki: dict[str, Path]) -> None:
    live = start_live(tmp_path, sim_url, TLS_AUTH.format(pki=pki["ca"].parent), pki)
    try:
        assert live.get("/metrics", auth=("prometheus", "s3cret-password")).ok
        live.web_path.write_text(TLS_AUTH.format(pki=pki["ca"].parent).replace(
            f"prometheus: '{HASH}'", f"grafana: '{OTHER_HASH}'"))
        live.proc.signal(signal.SIGHUP)
        wait_until(lambda: live.get("/metrics", auth=("grafana", "another-password")).ok,
                   what="the new user to be let in")
        assert live.get("/metrics", auth=("prometheus", "s3cret-password")).status_code == 401

        live.web_path.write_text("basic_auth_users: {grafana: not-a-hash}\n")
        live.proc.signal(signal.SIGHUP)
        wait_until(lambda: "web config reload refused" in live.proc.output(), what="the refusal")
        assert live.get("/metrics", auth=("grafana", "another-password")).ok  # the running config stays
        assert "not-a-hash" not in live.proc.output()
    finally:
        assert live.proc.stop() == 0


def test_check_config_validates_the_web_config(tmp_path: Path, sim_url: str, pki: dict[str, Path]) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG.format(port=10450, sim=sim_url))
    web = tmp_path / "web.yml"
    web.write_text(TLS_AUTH.format(pki=pki["ca"].parent))
    args = [sys.executable, "exporter.py", "--config", str(tmp_path / "config.yaml"), "--web.config.file",
            str(web), "--check-config"]
    ok = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0 and "TLS on, 1 basic-auth user(s)" in ok.stdout, ok.stderr
    web.write_text("tls_server_config: {cert_file: nowhere.pem, key_file: nowhere.pem}\n")
    bad = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 1 and "tls_server_config.cert_file" in bad.stderr
