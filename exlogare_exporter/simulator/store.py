"""One tenant's events and the queries over them.

Failures and RCAs are kept sorted by time in parallel lists, so a window is two bisects and a query
costs only what falls in the window, even with a thousand tenants.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from typing import Any

from .data import Failure, Project, Rca, day_of


def _percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between closest ranks, like PostgreSQL's percentile_cont."""
    k = (len(ordered) - 1) * p
    f = math.floor(k)
    c = min(f + 1, len(ordered) - 1)
    return ordered[f] + (ordered[c] - ordered[f]) * (k - f)


class TenantStore:
    """Not thread-safe on its own: the Simulator's lock guards every call."""

    def __init__(self, name: str, projects: list[Project], first_run: int) -> None:
        self.name = name
        self.projects = projects
        self.next_run = first_run
        self.failures: list[Failure] = []
        self.ftimes: list[int] = []
        self.rcas: list[Rca] = []
        self.rkeys: list[tuple[int, str]] = []
        self.rtimes: list[int] = []
        self.by_id: dict[str, Rca] = {}

    def load(self, failures: list[Failure], rcas: list[Rca]) -> None:
        """Bulk load of already sorted history (fast path for generation)."""
        self.failures = failures
        self.ftimes = [f.us for f in failures]
        self.rcas = rcas
        self.rkeys = [r.key for r in rcas]
        self.rtimes = [r.us for r in rcas]
        self.by_id = {r.id: r for r in rcas}
        self.next_run += len(failures) + 1

    def add_failure(self, failure: Failure) -> None:
        i = bisect_right(self.ftimes, failure.us)
        self.ftimes.insert(i, failure.us)
        self.failures.insert(i, failure)

    def add_rca(self, rca: Rca) -> None:
        i = bisect_right(self.rkeys, rca.key)
        self.rkeys.insert(i, rca.key)
        self.rtimes.insert(i, rca.us)
        self.rcas.insert(i, rca)
        self.by_id[rca.id] = rca

    def take_run_id(self) -> int:
        self.next_run += 1
        return self.next_run

    # -- queries -------------------------------------------------------------------------------------

    def page(self, *, since: int | None, until: int | None, severity: str | None, project: str | None,
             source: str | None, after: tuple[int, str] | None, limit: int
             ) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        """Newest first by (created_at, id); `after` is the keyset of the previous page's last item."""
        hi = len(self.rcas) if until is None else bisect_right(self.rtimes, until)
        if after is not None:
            hi = min(hi, bisect_left(self.rkeys, after))
        lo = 0 if since is None else bisect_left(self.rtimes, since)
        found: list[Rca] = []
        more = False
        for i in range(hi - 1, lo - 1, -1):
            rca = self.rcas[i]
            if severity is not None and rca.severity != severity:
                continue
            if project is not None and project not in (rca.project_path, rca.project_id):
                continue
            if source is not None and rca.source != source:
                continue
            if len(found) == limit:
                more = True
                break
            found.append(rca)
        return [r.data for r in found], (found[-1].key if more and found else None)

    def _failures_in(self, lo: int, hi: int) -> list[Failure]:
        return self.failures[bisect_left(self.ftimes, lo):bisect_right(self.ftimes, hi)]

    def _rcas_in(self, lo: int, hi: int) -> list[Rca]:
        return self.rcas[bisect_left(self.rtimes, lo):bisect_right(self.rtimes, hi)]

    def overview(self, lo: int, hi: int, days: int) -> dict[str, Any]:
        rcas = self._rcas_in(lo, hi)
        counts: dict[str, int] = {}
        for rca in rcas:
            counts[rca.severity] = counts.get(rca.severity, 0) + 1
        ttrs = sorted(r.ttr for r in rcas)
        avg = p50 = p90 = None
        if ttrs:
            avg = round(sum(ttrs) / len(ttrs), 1)
            p50 = round(_percentile(ttrs, 0.5), 1)
            p90 = round(_percentile(ttrs, 0.9), 1)
        return {
            "failures_detected": bisect_right(self.ftimes, hi) - bisect_left(self.ftimes, lo),
            "analyses_completed": len(rcas), "rca_count": len(rcas),
            "severity_counts": {s: counts[s] for s in ("low", "medium", "high") if s in counts},
            "avg_time_to_rca_seconds": avg, "p50_time_to_rca_seconds": p50, "p90_time_to_rca_seconds": p90,
            "window_days": days,
        }

    def timeseries(self, lo: int, hi: int) -> list[dict[str, Any]]:
        per_day: dict[str, int] = {}
        for failure in self._failures_in(lo, hi):
            day = day_of(failure.us)
            per_day[day] = per_day.get(day, 0) + 1
        return [{"date": day, "failures": n} for day, n in per_day.items()]  # insertion order is oldest first

    def top_projects(self, lo: int, hi: int, limit: int) -> list[dict[str, Any]]:
        groups: dict[tuple[str | None, str | None], list[int]] = {}
        for failure in self._failures_in(lo, hi):
            row = groups.setdefault((failure.project_id, failure.project_path), [0, 0])
            row[0] += 1
            row[1] += failure.has_rca
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0][1] or "", kv[0][0] or ""))
        return [{"project_id": pid, "project_path": path, "failures": n, "analyses": a}
                for (pid, path), (n, a) in ranked[:limit]]

    def top_root_causes(self, lo: int, hi: int, limit: int) -> list[dict[str, Any]]:
        groups: dict[tuple[str, str], list[Any]] = {}  # key -> [count, newest us, newest text]
        for rca in self._rcas_in(lo, hi):  # ascending, so the last member seen is the newest
            row = groups.setdefault(rca.cluster, [0, 0, ""])
            row[0] += 1
            row[1] = rca.us
            row[2] = rca.root_cause
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
        return [{"root_cause": text[:120] if key else "(unknown)", "severity": severity, "count": n}
                for (key, severity), (n, _us, text) in ranked[:limit]]
