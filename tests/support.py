"""Test helpers: polling with a deadline, free ports, and real processes on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05,
               what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as exc:  # a server still starting refuses connections: keep polling
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})"
                                                                            if last_exc else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text to {(sample name, sorted labels): value}, through client_python's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def samples(metrics: dict, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {lbl: v for (n, lbl), v in metrics.items() if n == name and want <= set(lbl)}


def require_tool(name: str) -> str:
    """A Debian tool the tests need; skipped on a developer machine without it, fatal in CI."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; .ci/run installs Debian's prometheus package")
    pytest.skip(f"{name} not installed (apt-get install prometheus)")
    raise AssertionError  # unreachable


class Process:
    """A child process with its output in a file, stopped (and reaped) by `stop()`."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"process exited with {self.proc.returncode}:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_simulator(tmp_path: Path, *extra: str) -> tuple[Process, str]:
    port = free_port()
    proc = Process([sys.executable, "-m", "exlogare_exporter.simulator", "--host", "127.0.0.1",
                    "--port", str(port), *extra], tmp_path / f"simulator-{port}.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: proc.check_alive() or requests.get(f"{url}/_sim/health", timeout=1).ok,
               what=f"simulator on {url}")
    return proc, url


def start_exporter(tmp_path: Path, config: str, env: dict[str, str] | None = None,
                   ready: bool = True) -> tuple[Process, str]:
    port = free_port()
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config.replace("{port}", str(port)))
    proc = Process([sys.executable, "exporter.py", "--config", str(config_path)],
                   tmp_path / f"exporter-{port}.log", env)
    url = f"http://127.0.0.1:{port}"
    if ready:
        wait_until(lambda: proc.check_alive() or requests.get(f"{url}/readyz", timeout=2).status_code == 200,
                   what=f"exporter ready on {url}")
    else:
        wait_until(lambda: proc.check_alive() or requests.get(f"{url}/healthz", timeout=2).ok,
                   what=f"exporter up on {url}")
    return proc, url
