"""The simulator's stats queries against plain reference implementations (a step per event), on random
tenants, windows and added events: the fast queries must answer exactly the same."""

from __future__ import annotations

import math
import random
from datetime import UTC, date, datetime
from typing import Any

import pytest

from exlogare_exporter.apirules import US_PER_DAY
from exlogare_exporter.simulator import Simulator
from exlogare_exporter.simulator.store import TenantStore


def day(us: int) -> str:
    return date.fromordinal(date(1970, 1, 1).toordinal() + us // US_PER_DAY).isoformat()


def percentile(ordered: list[float], p: float) -> float:
    k = (len(ordered) - 1) * p
    f = math.floor(k)
    c = min(f + 1, len(ordered) - 1)
    return ordered[f] + (ordered[c] - ordered[f]) * (k - f)


def overview(store: TenantStore, lo: int, hi: int, days: int) -> dict[str, Any]:
    rcas = [r for r in store.rcas if lo <= r.us <= hi]
    counts: dict[str, int] = {}
    for rca in rcas:
        counts[rca.severity] = counts.get(rca.severity, 0) + 1
    ttrs = sorted(r.ttr for r in rcas)
    figures = ({"avg": round(sum(ttrs) / len(ttrs), 1), "p50": round(percentile(ttrs, 0.5), 1),
                "p90": round(percentile(ttrs, 0.9), 1)} if ttrs else dict.fromkeys(("avg", "p50", "p90")))
    return {"failures_detected": sum(1 for f in store.failures if lo <= f.us <= hi),
            "analyses_completed": len(rcas), "rca_count": len(rcas),
            "severity_counts": {s: counts[s] for s in ("low", "medium", "high") if s in counts},
            **{f"{k}_time_to_rca_seconds": v for k, v in figures.items()}, "window_days": days}


def timeseries(store: TenantStore, lo: int, hi: int) -> list[dict[str, Any]]:
    per_day: dict[str, int] = {}
    for failure in store.failures:
        if lo <= failure.us <= hi:
            per_day[day(failure.us)] = per_day.get(day(failure.us), 0) + 1
    return [{"date": d, "failures": n} for d, n in per_day.items()]


def top_projects(store: TenantStore, lo: int, hi: int, limit: int) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, Any], list[int]] = {}
    for f in store.failures:
        if lo <= f.us <= hi:
            row = groups.setdefault((f.project_id, f.project_path), [0, 0])
            row[0] += 1
            row[1] += f.has_rca
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0][1] or "", kv[0][0] or ""))
    return [{"project_id": pid, "project_path": path, "failures": n, "analyses": a}
            for (pid, path), (n, a) in ranked[:limit]]


def top_root_causes(store: TenantStore, lo: int, hi: int, limit: int) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Any]] = {}
    for rca in store.rcas:
        if lo <= rca.us <= hi:
            row = groups.setdefault(rca.cluster, [0, 0, ""])
            row[0] += 1
            row[1], row[2] = rca.us, rca.root_cause
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
    return [{"root_cause": text[:120] if key else "(unknown)", "severity": severity, "count": n}
            for (key, severity), (n, _us, text) in ranked[:limit]]


@pytest.mark.parametrize("seed", range(6))
def test_queries_answer_like_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    sim = Simulator(seed=seed, clock=lambda: now)
    for t in range(8):
        name = f"x{t}"
        sim.add_tenant(name, history_days=rng.choice([0, 3, 30, 200]), per_day=rng.choice([0.5, 4, 25]),
                       quiet_days=rng.choice([0, 0, 14]))
        for _ in range(rng.randrange(4)):  # events after the history: inserted in the middle of the lists
            when = datetime.fromtimestamp(now.timestamp() - rng.uniform(0, 40 * 86400), tz=UTC)
            sim.add_analyses(name, rng.randrange(1, 4), created_at=when, time_to_rca=rng.uniform(0, 900))
            sim.add_failures(name, rng.randrange(1, 3), received_at=when)
        store = sim._tenants[name]
        hi = int(now.timestamp()) * 1_000_000
        for days in (1, 7, 30, 180, 365):
            for shift in (0, rng.randrange(US_PER_DAY), rng.randrange(40 * US_PER_DAY)):
                lo, top = hi - shift - days * US_PER_DAY, hi - shift
                assert store.overview(lo, top, days) == overview(store, lo, top, days)
                assert store.timeseries(lo, top) == timeseries(store, lo, top)
                for limit in (1, 10, 50):
                    assert store.top_projects(lo, top, limit) == top_projects(store, lo, top, limit)
                    assert store.top_root_causes(lo, top, limit) == top_root_causes(store, lo, top, limit)
