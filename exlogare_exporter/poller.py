"""Scheduled refreshes: one APScheduler job per tenant, each building a new `TenantState` to swap in."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor as FuturesPool
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from types import MappingProxyType
from typing import Any

from apscheduler.executors.pool import BasePoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from urllib3.poolmanager import PoolManager

from . import deadline, stream
from .client import BadRequest, ExlogareClient, InvalidBody, SharedLimits, UpstreamError
from .config import Config, TenantConfig
from .metrics import OVERVIEW, TIMESERIES, TOP_PROJECTS, TOP_ROOT_CAUSES, ExporterMetrics
from .parse import (
    parse_analyses_page,
    parse_overview,
    parse_timeseries,
    parse_top_projects,
    parse_top_root_causes,
)
from .state import Fetched, ResultKey, Store, TenantState
from .stream import TenantStream

log = logging.getLogger(__name__)

# The first round: a handful of tenants start at once, a thousand queue on the executor in order. Later
# rounds follow `SpreadTrigger`: each tenant keeps its own phase, the phases spread evenly over the interval.
STAGGER_STEP = 0.01
# Upstream requests in flight besides the `concurrency` refreshes and walks: the Grafana proxy's (its HTTP
# threads, `app.PROXY_HTTP_THREADS`). The connection pool of each server keeps this many more connections.
POOL_SPARE = 16


class SpreadTrigger(IntervalTrigger):
    """Fires at `start_date + k × interval` (k ≥ 1 after a first run), plus a fresh jitter each time.

    APScheduler's `IntervalTrigger` schedules `previous (jittered) + interval + jitter`, so the jitter adds
    up: phases drift, tenants bunch together over time and the mean interval is `interval + jitter / 2`.
    Here every run keeps to its phase's grid, so phases spread at start-up stay spread."""

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        start, length = self.start_date.timestamp(), self.interval_length
        if previous_fire_time is None:
            slot = max(0, math.ceil((now.timestamp() - start) / length))
        else:  # the slot after the previous run's (jitter only ever delays); a first run before the phase,
            # which starts the grid, is followed by the grid's second slot: never sooner than an interval
            slot = max(1, math.floor((previous_fire_time.timestamp() - start) / length + 1e-6) + 1)
        moment = start + slot * length + (random.uniform(0, self.jitter) if self.jitter else 0.0)  # noqa: S311
        return datetime.fromtimestamp(moment, tz=self.timezone)


class WorkerPool(BasePoolExecutor):
    """APScheduler's thread pool, with all its `workers` started at once.

    A pool that starts threads as jobs first overlap grows for as long as the exporter runs into busier
    moments (a slow upstream, a reload); started up front, the thread count is the same from start-up on and
    a thread more is a leak. Idle threads cost next to nothing."""

    def __init__(self, workers: int) -> None:
        pool = FuturesPool(workers, thread_name_prefix="refresh")
        started = threading.Barrier(workers + 1)
        for _ in range(workers):  # each waits for all the others: the pool has to start `workers` threads
            pool.submit(started.wait, 10)
        with contextlib.suppress(threading.BrokenBarrierError):  # slow to start: they are on their way
            started.wait(10)
        super().__init__(pool)


@dataclass(frozen=True)
class Call:
    """One upstream request of a refresh, and where its parsed answer goes."""

    key: ResultKey
    endpoint: str
    params: Mapping[str, int]
    parse: Callable[[Any], Any]


def plan_calls(cfg: TenantConfig, today: date) -> list[Call]:
    """The minimum set of requests a refresh needs: overview and both top lists per window, one timeseries."""
    top_params = lambda w: {"days": w.days, "limit": cfg.top_limit}  # noqa: E731
    max_len = cfg.label_max_length
    return [
        *(Call((OVERVIEW, w.label), "/stats/overview", {"days": w.days}, parse_overview)
          for w in cfg.windows),
        *(Call((TOP_PROJECTS, w.label), "/stats/top-projects", top_params(w),
               partial(parse_top_projects, max_len=max_len)) for w in cfg.top_windows),
        *(Call((TOP_ROOT_CAUSES, w.label), "/stats/top-root-causes", top_params(w),
               partial(parse_top_root_causes, max_len=max_len)) for w in cfg.top_windows),
        Call((TIMESERIES, ""), "/stats/timeseries", {"days": cfg.timeseries_days},
             partial(parse_timeseries, days=cfg.timeseries_days, today=today)),
    ]


def _data_changed(old: TenantConfig, new: TenantConfig) -> bool:
    """Whether results fetched under `old` no longer describe what `new` points at."""
    return old.base_url != new.base_url or old.token != new.token


@dataclass
class _Tenant:
    config: TenantConfig
    client: ExlogareClient


class Poller:
    """Owns the scheduler, the per-tenant clients and every write to the `Store`."""

    def __init__(self, store: Store, metrics: ExporterMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 client_factory: Callable[..., ExlogareClient] = ExlogareClient) -> None:
        self.store = store
        # The RCA stream's snapshots: a store of their own, so the stream and the stats refresh, running
        # concurrently, never overwrite each other's result. The collector reads it from `metrics`.
        self.streams: Store[TenantStream] = metrics.streams if metrics is not None else Store()
        self._metrics = metrics
        self._clock = clock
        self._client_factory = client_factory
        self.shared_limits = SharedLimits()  # one budget per base URL (`base_url_max_requests_per_second`)
        # Keep-alive connections per server, shared by its tenants' clients: a few dozen, not one per tenant.
        self.pools: PoolManager | None = None
        self._tenants: dict[str, _Tenant] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scheduler: BackgroundScheduler | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()
        self.concurrency = 1

    # --- configuration -------------------------------------------------------------------------------------

    def apply(self, config: Config) -> None:
        """Adopt a (new) config: add, replace or drop tenants, keeping the data of unchanged ones."""
        with self._lock:
            if self._scheduler is not None and config.concurrency != self.concurrency:
                log.warning("concurrency changes from %d to %d at the next restart, not on reload",
                            self.concurrency, config.concurrency)
            else:
                self.concurrency = config.concurrency
            if self.pools is None:  # sized once, like the executor: concurrency changes at a restart
                self.pools = deadline.pool_manager(maxsize=self.concurrency + POOL_SPARE)
            wanted = {t.name: t for t in config.tenants}
            for name in [n for n in self._tenants if n not in wanted]:
                self._drop(name)
            changed = []
            for name, cfg in wanted.items():
                old = self._tenants.get(name)
                if old is not None and old.config == cfg:
                    continue
                if old is not None:
                    old.client.close()
                    self._reset_state(old.config, cfg)
                if cfg.analyses_interval:
                    data_changed = old is not None and _data_changed(old.config, cfg)
                    self.streams.put(stream.adopt(self.streams.get(name), cfg, data_changed, self._clock()))
                on_response = self._metrics.on_response(name) if self._metrics else None
                shared = self.shared_limits.bucket(cfg)
                extra: dict[str, Any] = {"pools": self.pools}
                if shared is not None:
                    extra["shared"] = shared
                client = self._client_factory(cfg, on_response=on_response, **extra)
                self._tenants[name] = _Tenant(cfg, client)
                changed.append(name)
            self.shared_limits.retain({cfg.base_url for cfg in wanted.values()})
            self.store.retain(set(wanted))
            self.streams.retain({name for name, cfg in wanted.items() if cfg.analyses_interval})
            if self._scheduler is not None:
                for index, name in enumerate(changed):
                    self._schedule(name, index, len(changed))

    def _drop(self, name: str) -> None:
        tenant = self._tenants.pop(name)
        tenant.client.close()
        for job_id in (name, _stream_job_id(name)):
            if self._scheduler is not None and self._scheduler.get_job(job_id):
                self._scheduler.remove_job(job_id)
        if self._metrics:
            self._metrics.forget_tenant(name)
        log.info("tenant %s: removed from the configuration", name, extra={"tenant": name})

    def _reset_state(self, old: TenantConfig, new: TenantConfig) -> None:
        state = self.store.get(new.name)
        if state is None:
            return
        keys = {c.key for c in plan_calls(new, date.today())}
        kept = {} if _data_changed(old, new) else {k: v for k, v in state.results.items() if k in keys}
        self.store.put(replace(state, results=MappingProxyType(kept), max_staleness=new.max_staleness))

    # --- scheduling ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler; every tenant's first refresh starts at once, a step apart."""
        self._scheduler = BackgroundScheduler(
            executors={"default": WorkerPool(self.concurrency)}, timezone=UTC)
        with self._lock:
            names = list(self._tenants)
            for index, name in enumerate(names):
                self._schedule(name, index, len(names))
        self._scheduler.start()

    def _schedule(self, name: str, index: int, count: int) -> None:
        """First run soon (`index` steps from now), later runs at phase `index / count` of the interval."""
        assert self._scheduler is not None
        cfg = self._tenants[name].config
        now = datetime.now(UTC)
        step = min(STAGGER_STEP, cfg.interval / max(count, 1))
        first = now + timedelta(seconds=index * step)
        phase = now + timedelta(seconds=cfg.interval * index / max(count, 1))
        trigger = SpreadTrigger(seconds=cfg.interval, start_date=phase, jitter=cfg.jitter or None,
                                timezone=UTC)
        self._scheduler.add_job(
            self._job, trigger, args=[name], id=name, name=f"refresh {name}", replace_existing=True,
            next_run_time=first, coalesce=True, max_instances=1, misfire_grace_time=int(cfg.interval))
        self._schedule_stream(cfg, first + timedelta(seconds=step / 2), now, (index + 0.5) / max(count, 1))

    def _schedule_stream(self, cfg: TenantConfig, first: datetime, now: datetime, phase: float) -> None:
        """The tenant's /analyses walk: its own job on the same executor, or none when it is turned off."""
        assert self._scheduler is not None
        job_id = _stream_job_id(cfg.name)
        if not cfg.analyses_interval:
            if self._scheduler.get_job(job_id):
                self._scheduler.remove_job(job_id)
            return
        interval = cfg.analyses_interval
        jitter = min(cfg.jitter, 0.1 * interval)  # the stats jitter could be longer than a short interval
        trigger = SpreadTrigger(seconds=interval, start_date=now + timedelta(seconds=interval * phase),
                                jitter=jitter or None, timezone=UTC)
        self._scheduler.add_job(
            self._job, trigger, args=[cfg.name, True], id=job_id, name=f"walk /analyses {cfg.name}",
            replace_existing=True, next_run_time=first, coalesce=True, max_instances=1,
            misfire_grace_time=max(1, int(interval)))

    def client(self, name: str) -> ExlogareClient | None:
        """The tenant's client, shared with the proxy so both count against one rate limit and Retry-After."""
        tenant = self._tenants.get(name)
        return tenant.client if tenant else None

    def next_run(self, name: str) -> float | None:
        job = self._scheduler.get_job(name) if self._scheduler else None
        return job.next_run_time.timestamp() if job and job.next_run_time else None

    def stop(self, wait: float = 5.0) -> bool:
        """Stop scheduling and let running refreshes end at their next request; True if all ended in time."""
        self._stopping.set()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        deadline = time.monotonic() + wait
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            for tenant in self._tenants.values():
                tenant.client.close()
            if self.pools is not None:
                self.pools.clear()
        return not self._busy

    # --- refreshing ----------------------------------------------------------------------------------------

    def _job(self, name: str, walk: bool = False) -> None:
        """The scheduled entry point (a refresh, or with `walk` the /analyses walk): never raises."""
        with self._busy_lock:
            self._busy += 1
        try:
            if walk:
                self.walk_stream(name)
            else:
                self.refresh(name)
        except Exception:
            log.exception("tenant %s: %s crashed", name, "RCA stream walk" if walk else "refresh",
                          extra={"tenant": name})
        finally:
            with self._busy_lock:
                self._busy -= 1

    def refresh_all(self) -> list[TenantState]:
        """Refresh every tenant once, `concurrency` at a time (for `--once` and tests)."""
        with FuturesPool(max_workers=self.concurrency) as pool:
            return [s for s in pool.map(self.refresh, list(self._tenants)) if s is not None]

    def walk_all(self) -> list[TenantStream]:
        """One /analyses walk for every tenant with the stream on (for `--once` and tests)."""
        with FuturesPool(max_workers=self.concurrency) as pool:
            return [s for s in pool.map(self.walk_stream, list(self._tenants)) if s is not None]

    def walk_stream(self, name: str) -> TenantStream | None:
        """One bounded walk of the tenant's /analyses; its counts and state are swapped in together."""
        tenant = self._tenants.get(name)
        prev = self.streams.get(name)
        if tenant is None or prev is None:
            return None
        cfg = tenant.config
        result = stream.walk(lambda params: tenant.client.get("/analyses", params, parse_analyses_page),
                             prev.state, max_pages=cfg.analyses_max_pages, stopping=self._stopping.is_set)
        if self._stopping.is_set():
            return None
        new = stream.record(prev, result, cfg, self._clock())
        with self._lock:
            if self._tenants.get(name) is not tenant or self.streams.get(name) is not prev:
                # Reconfigured (or walked by someone else) meanwhile: nothing of this walk was committed,
                # so dropping it loses nothing; the next walk starts from the committed state.
                return None
            self.streams.put(new)
        stream.log_transition(prev, new)
        return new

    def refresh(self, name: str) -> TenantState | None:
        tenant = self._tenants.get(name)
        if tenant is None:
            return None
        cfg = tenant.config
        prev = self.store.get(name) or TenantState(name=name, max_staleness=cfg.max_staleness)
        started, wall = time.monotonic(), self._clock()
        calls = plan_calls(cfg, datetime.fromtimestamp(wall, UTC).date())
        results = {k: v for k, v in prev.results.items() if k in {c.key for c in calls}}
        error: UpstreamError | None = None
        for call in calls:
            if self._stopping.is_set():
                return None
            try:
                results[call.key] = Fetched(tenant.client.get(call.endpoint, dict(call.params), call.parse),
                                            self._clock())
            except UpstreamError as exc:
                error = error or exc
                if not isinstance(exc, (BadRequest, InvalidBody)):
                    break  # auth, rate limit, transport or server trouble: the rest would fare the same
        state = replace(
            prev, results=MappingProxyType(results), attempts=prev.attempts + 1, up=error is None,
            last_attempt=wall, last_success=wall if error is None else prev.last_success,
            last_duration=time.monotonic() - started, last_error=str(error) if error else None,
            error_code=error.code if error else None, max_staleness=cfg.max_staleness)
        with self._lock:
            if self._tenants.get(name) is not tenant:
                return None  # reconfigured while we were fetching: this answer describes the old config
            self.store.put(state)
        _log_transition(prev, state)
        return state


def _stream_job_id(name: str) -> str:
    return f"{name}:analyses"


def _log_transition(prev: TenantState, new: TenantState) -> None:
    """Log health changes once, not every cycle."""
    extra = {"tenant": new.name}
    if new.up and (prev.attempts == 0 or not prev.up):
        log.info("tenant %s: refresh %s in %.2fs", new.name,
                 "succeeded" if prev.attempts == 0 else "recovered", new.last_duration or 0.0, extra=extra)
    elif not new.up and (prev.up or prev.attempts == 0):
        log.warning("tenant %s: refresh failing: %s", new.name, new.last_error, extra=extra)
    elif not new.up and new.error_code != prev.error_code:
        log.warning("tenant %s: still failing, now: %s", new.name, new.last_error, extra=extra)
