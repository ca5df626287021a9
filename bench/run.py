"""Every benchmark, one after the other, each in a process of its own; prints all their tables.

    python bench/run.py            # the figures in the README (about 8 minutes on 2 cores)
    python bench/run.py --quick    # smaller sizes, about 2 minutes: a smoke run
    python bench/run.py --only scrape,memory

Each benchmark also runs alone, with flags for its sizes: `python bench/<name>.py --help`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine

HERE = Path(__file__).resolve().parent
# name -> (full arguments, quick arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "scrape": ([], ["--tenants", "10,100", "--seconds", "2"]),
    "refresh": ([], ["--tenants", "200", "--concurrency", "16", "--interval", "10",
                     "--schedule-concurrency", "16"]),
    "proxy_panels": ([], ["--duration", "5"]),
    "memory": ([], ["--tenants", "100", "--minutes", "10"]),
    "politeness": ([], ["--seconds", "4"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    print(f"# exlogare-exporter benchmarks\n\n{machine()}\n", flush=True)
    failed = []
    started = time.monotonic()
    for name in names:
        full, quick = BENCHMARKS[name]
        began = time.monotonic()
        if name == "proxy_panels":
            print("### Grafana proxy: 20 panels × 10 viewers\n", flush=True)
        done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else full)],  # noqa: S603
                              cwd=ROOT, check=False)
        if done.returncode:
            failed.append(name)
        print(f"\n_{name}: {time.monotonic() - began:.0f} s_\n", flush=True)
    print(f"_all: {time.monotonic() - started:.0f} s_")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
