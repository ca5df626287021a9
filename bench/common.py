"""Helpers shared by the benchmarks: tables, child processes, percentiles, the machine they ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank: with few values the p99 is the slowest one."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB" if abs(size) >= 2**20 or size == 0 else f"{size / 2**10:.0f} KiB"


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def machine() -> str:
    """`nproc`, the CPU model and the Python version, for the table's caption."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} CPU(s) ({len(os.sched_getaffinity(0))} usable), {model}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


class Child:
    """A helper process that prints one line (e.g. its URL) when ready; stopped with `stop()`."""

    def __init__(self, args: list[str], ready_prefix: str, timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True,  # noqa: S603
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{args} exited before it was ready")
            if line.startswith(ready_prefix):
                self.line = line.strip()
                return
        raise RuntimeError(f"{args} not ready within {timeout}s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
