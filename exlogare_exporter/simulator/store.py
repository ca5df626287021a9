"""One tenant's events and the queries over them.

Failures and RCAs are kept sorted by time in parallel lists, so a window is two bisects and a query
costs only what falls in the window, even with a thousand tenants.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from itertools import compress
from typing import Any

from ..apirules import US_PER_DAY
from .data import Failure, Project, Rca, day_name


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
        self.fprojects: list[tuple[str | None, str | None]] = []  # (id, path) of each failure in `failures`
        self.fanalysed: list[bool] = []  # whether it has an RCA
        self.rcas: list[Rca] = []
        self.rkeys: list[tuple[int, str]] = []
        self.rtimes: list[int] = []
        self.rseverities: list[str] = []  # of each RCA in `rcas`, so counting a window runs in C
        self.rttrs: list[float] = []
        self.rclusters: list[tuple[str, str]] = []
        self.by_id: dict[str, Rca] = {}

    def load(self, failures: list[Failure], rcas: list[Rca]) -> None:
        """Bulk load of already sorted history (fast path for generation)."""
        self.failures = failures
        self.ftimes = [f.us for f in failures]
        self.fprojects = [(f.project_id, f.project_path) for f in failures]
        self.fanalysed = [f.has_rca for f in failures]
        self.rcas = rcas
        self.rkeys = [r.key for r in rcas]
        self.rtimes = [r.us for r in rcas]
        self.rseverities = [r.severity for r in rcas]
        self.rttrs = [r.ttr for r in rcas]
        self.rclusters = [r.cluster for r in rcas]
        self.by_id = {r.id: r for r in rcas}
        self.next_run += len(failures) + 1

    def add_failure(self, failure: Failure) -> None:
        i = bisect_right(self.ftimes, failure.us)
        self.ftimes.insert(i, failure.us)
        self.fprojects.insert(i, (failure.project_id, failure.project_path))
        self.fanalysed.insert(i, failure.has_rca)
        self.failures.insert(i, failure)

    def add_rca(self, rca: Rca) -> None:
        i = bisect_right(self.rkeys, rca.key)
        self.rkeys.insert(i, rca.key)
        self.rtimes.insert(i, rca.us)
        self.rseverities.insert(i, rca.severity)
        self.rttrs.insert(i, rca.ttr)
        self.rclusters.insert(i, rca.cluster)
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

    def overview(self, lo: int, hi: int, days: int) -> dict[str, Any]:
        first, end = bisect_left(self.rtimes, lo), bisect_right(self.rtimes, hi)
        counts = Counter(self.rseverities[first:end])
        ttrs = sorted(self.rttrs[first:end])
        avg = p50 = p90 = None
        if ttrs:
            avg = round(sum(ttrs) / len(ttrs), 1)
            p50 = round(_percentile(ttrs, 0.5), 1)
            p90 = round(_percentile(ttrs, 0.9), 1)
        return {
            "failures_detected": bisect_right(self.ftimes, hi) - bisect_left(self.ftimes, lo),
            "analyses_completed": len(ttrs), "rca_count": len(ttrs),
            "severity_counts": {s: counts[s] for s in ("low", "medium", "high") if s in counts},
            "avg_time_to_rca_seconds": avg, "p50_time_to_rca_seconds": p50, "p90_time_to_rca_seconds": p90,
            "window_days": days,
        }

    def timeseries(self, lo: int, hi: int) -> list[dict[str, Any]]:
        """Oldest first, days without failures left out; one bisect per day, not a step per failure."""
        ftimes = self.ftimes
        first, end = bisect_left(ftimes, lo), bisect_right(ftimes, hi)
        days = []
        while first < end:
            day = ftimes[first] // US_PER_DAY
            after = bisect_left(ftimes, (day + 1) * US_PER_DAY, first, end)  # the next day's first failure
            days.append({"date": day_name(day), "failures": after - first})
            first = after
        return days

    def top_projects(self, lo: int, hi: int, limit: int) -> list[dict[str, Any]]:
        first, end = bisect_left(self.ftimes, lo), bisect_right(self.ftimes, hi)
        projects = self.fprojects[first:end]
        failures = Counter(projects)
        analyses = Counter(compress(projects, self.fanalysed[first:end]))
        ranked = sorted(failures, key=lambda k: (-failures[k], -analyses[k], k[1] or "", k[0] or ""))
        return [{"project_id": pid, "project_path": path, "failures": failures[pid, path],
                 "analyses": analyses[pid, path]} for pid, path in ranked[:limit]]

    def top_root_causes(self, lo: int, hi: int, limit: int) -> list[dict[str, Any]]:
        first, end = bisect_left(self.rtimes, lo), bisect_right(self.rtimes, hi)
        clusters = self.rclusters[first:end]
        counts = Counter(clusters)
        newest = {cluster: first + i for i, cluster in enumerate(clusters)}  # ascending: the last one wins
        ranked = sorted(counts, key=lambda c: (-counts[c], -self.rtimes[newest[c]], c))
        return [{"root_cause": self.rcas[newest[c]].root_cause[:120] if c[0] else "(unknown)",
                 "severity": c[1], "count": counts[c]} for c in ranked[:limit]]
