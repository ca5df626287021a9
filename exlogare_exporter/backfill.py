"""History backfill: past per-day failure counts as OpenMetrics for `promtool tsdb create-blocks-from`.

A new Prometheus knows nothing of the months before it started, but `/stats/timeseries` holds up to 180
days of per-day failure counts. At each UTC midnight a rolling window of N days covers exactly the N whole
days before it, so `exlogare_failures_detected{window="Nd"}` had a value we can rebuild from those counts.
The backfill writes those midnight samples under the live metric's own name and labels: history and live
scrapes are the same series, and the dashboard's history panels simply reach further back.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import BinaryIO

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest

from .client import ExlogareClient, SharedLimits, TokenBucket, UpstreamError
from .config import Config, TenantConfig
from .metrics import Families
from .parse import parse_timeseries

log = logging.getLogger(__name__)

MAX_DAYS = 180  # what /stats/timeseries accepts
# Prometheus' head block holds roughly the last 3 hours; blocks created for that span may overlap it.
HEAD_GUARD_SECONDS = 3 * 3600
DAY = timedelta(days=1)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
RESERVED_LABELS = frozenset({"tenant", "window"})

Point = tuple[float, int]


@dataclass(frozen=True)
class Series:
    """One backfilled series: its labels and its (Unix time, value) samples, oldest first."""

    labels: tuple[tuple[str, str], ...]
    points: tuple[Point, ...]


def midnight(day: date) -> float:
    """Unix time of 00:00 UTC on `day`."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def window_points(daily: Sequence[tuple[str, int]], window_days: int, not_after: float) -> tuple[Point, ...]:
    """The values a `window_days` rolling window had at each midnight that `daily` fully explains.

    `daily` is `parse_timeseries`' output: whole days, oldest first, the last one (today) still growing, so
    it is left out. A sample at midnight D+1 is the sum of the `window_days` days ending with D. Samples
    after `not_after` are dropped.
    """
    complete = daily[:-1]
    points = []
    for end in range(window_days - 1, len(complete)):
        ts = midnight(date.fromisoformat(complete[end][0]) + DAY)
        if ts > not_after:
            break
        points.append((ts, sum(count for _, count in complete[end - window_days + 1:end + 1])))
    return tuple(points)


def tenant_series(tenant: TenantConfig, daily: Sequence[tuple[str, int]], not_after: float,
                  extra_labels: Mapping[str, str]) -> list[Series]:
    """A series per configured window that the fetched days can fill (a 365d window never can)."""
    out = []
    for window in tenant.windows:
        points = window_points(daily, window.days, not_after)
        if points:
            labels = {**extra_labels, "tenant": tenant.name, "window": window.label}
            out.append(Series(tuple(sorted(labels.items())), points))
    return out


def render(series: Sequence[Series]) -> bytes:
    """OpenMetrics text: one family of timestamped samples, ending in `# EOF`.

    Every series carries the same label names (the extra labels, `tenant`, `window`), as a family needs.
    """
    template = Families().failures
    family = GaugeMetricFamily(template.name, template.documentation,
                               labels=[k for k, _ in series[0].labels] if series else [])
    for s in series:
        for ts, value in s.points:
            family.add_metric([v for _, v in s.labels], value, timestamp=ts)
    return generate_latest(_Fixed(family))


class _Fixed:
    """The registry interface `generate_latest` reads: metric families that are already built."""

    def __init__(self, *families: GaugeMetricFamily) -> None:
        self._families = families

    def collect(self) -> tuple[GaugeMetricFamily, ...]:
        return self._families


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """`NAME=VALUE` arguments to a dict; the names `tenant` and `window` belong to the metric."""
    labels: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"--label {item!r}: expected NAME=VALUE with a Prometheus label name")
        if name in RESERVED_LABELS:
            raise ValueError(f"--label {item!r}: {name} is set by the backfill itself")
        labels[name] = value
    return labels


def fetch_daily(tenant: TenantConfig, days: int, today: date,
                shared: TokenBucket | None = None) -> tuple[tuple[str, int], ...]:
    """The tenant's per-day failures through its own client (timeouts, retries, rate limits: `shared` is its
    base URL's budget, `SharedLimits`, so a Retry-After to one tenant holds back the next of that server)."""
    client = ExlogareClient(tenant, shared=shared)
    try:
        return client.get("/stats/timeseries", {"days": days},
                          partial(parse_timeseries, days=days, today=today))
    finally:
        client.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML config file (may also be given before `backfill`)")
    parser.add_argument("--tenant", action="append", metavar="NAME",
                        help="a configured tenant; repeatable; default: every tenant")
    parser.add_argument("--days", type=_days, default=MAX_DAYS, metavar="N",
                        help=f"days of history to fetch, 2..{MAX_DAYS} (default {MAX_DAYS})")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=VALUE",
                        help="a label to add to every series, e.g. job=exlogare: use your scrape job's "
                             "job and instance so backfilled and scraped samples form one series")


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 2 <= days <= MAX_DAYS:
        # One day is only today, which has not ended: nothing to write.
        raise argparse.ArgumentTypeError(f"{days}: must be 2..{MAX_DAYS} (/stats/timeseries allows up to "
                                         f"{MAX_DAYS}, and today is never written)")
    return days


def run(config: Config, args: argparse.Namespace, out: BinaryIO | None = None,
        now: float | None = None) -> int:
    """Fetch, render, write; nothing is written unless every tenant succeeded. Exit code."""
    out = out or sys.stdout.buffer
    now = time.time() if now is None else now
    by_name = {t.name: t for t in config.tenants}
    wanted = args.tenant or list(by_name)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        print(f"exlogare-exporter backfill: unknown tenant(s) {', '.join(unknown)}; the config has "
              f"{', '.join(by_name)}", file=sys.stderr)
        return 2
    try:
        extra = parse_labels(args.label)
    except ValueError as exc:
        print(f"exlogare-exporter backfill: {exc}", file=sys.stderr)
        return 2
    today = datetime.fromtimestamp(now, UTC).date()
    series: list[Series] = []
    limits = SharedLimits()
    for name in dict.fromkeys(wanted):
        tenant = by_name[name]
        try:
            daily = fetch_daily(tenant, args.days, today, limits.bucket(tenant))
        except UpstreamError as exc:
            log.error("backfill failed, nothing written: %s", exc, extra={"tenant": name})
            return 1
        found = tenant_series(tenant, daily, now - HEAD_GUARD_SECONDS, extra)
        log.info("tenant %s: %d sample(s) in %d window(s)", name, sum(len(s.points) for s in found),
                 len(found), extra={"tenant": name})
        series.extend(found)
    if not series:
        log.warning("no whole day older than %d hours in the last %d days: nothing to backfill",
                    HEAD_GUARD_SECONDS // 3600, args.days)
    out.write(render(series))
    out.flush()
    return 0
