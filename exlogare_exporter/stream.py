"""Live RCA counters: walk `/analyses` newest first and count every new RCA exactly once.

The core is pure. `advance(state, page)` takes a `StreamState` and one page and returns the next state and
the RCAs it newly counts; `walk()` is the thin loop that fetches pages through the tenant's client. The
counters (`Counts`) and the stream's health live in a `TenantStream`, a frozen per-tenant snapshot the poller
swaps into its own store, apart from the stats refresh's `TenantState`.

The exactly-once rule, in terms of the upstream's order (created_at, id) descending:
- The watermark W is the newest `created_at` a *completed* walk has seen (the server's values only), with
  the ids at exactly W. A walk asks `since=W` (inclusive) and counts an item when its created_at is after W,
  or equal to W with an id not among those ids. Memory is the ids at one timestamp, not every id ever seen.
- A walk is bounded (`analyses_max_pages`). A walk that stops early keeps its cursor, the newest item it
  saw (`top`, with the ids at that timestamp) and the last item it saw; the next cycle continues from the
  cursor with the same `since`, and W moves to `top` only when the walk reaches `next_cursor: null`. RCAs
  that arrive meanwhile sit above the cursor, so they are counted by the next fresh walk, not this one.
- Within a walk, an item is taken only if it sorts strictly below every item taken before in that walk.
  Following cursors that is always true; after a refused cursor (400 "Invalid cursor") the walk resumes
  with `since=W&until=<last created_at>` and this rule skips what the walk had already counted (and what
  arrived above that point meanwhile, which is left for the next walk like any other arrival).
- The first walk counts nothing (or, with `analyses_lookback`, only what was created in that span by the
  exporter's clock): it only finds the newest RCA, and stops at the first page that holds an older one.

Assumed of the upstream: an RCA becomes visible with a created_at no older than RCAs already visible
(the server stamps it on insert). One that appeared later with an older created_at would not be counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .apirules import PAGE_LIMIT  # a walk asks for the most /analyses gives: the fewest calls
from .client import BadRequest, UpstreamError
from .parse import NO_PROJECT_LABEL, SEVERITIES, AnalysesPage, Analysis, sanitize_label

if TYPE_CHECKING:
    from .config import TenantConfig

log = logging.getLogger(__name__)

CONFIDENCE_BUCKETS: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(1, 11))  # 0.1 … 1.0
OTHER_LABEL = "(other)"

Key = tuple[datetime, str]  # the upstream's sort key: (created_at, id)


# --- the walk state -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Walk:
    """A walk that stopped before `next_cursor: null` (page bound or error), to go on next cycle."""

    cursor: str | None = None  # None: start (or, after a refused cursor, resume) without one
    until: datetime | None = None  # set when resuming after a refused cursor
    last: Key | None = None  # the lowest item seen so far; only items below it are counted
    top: datetime | None = None  # the newest created_at seen by this walk: the next watermark
    seen_at_top: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StreamState:
    """Where a tenant's stream stands; see the module docstring for the rule."""

    primed: bool = False  # False until the first walk has completed
    count_from: datetime | None = None  # first walk only: count RCAs created at or after this (lookback)
    watermark: datetime | None = None  # None once primed: the tenant had no RCA at all
    seen: frozenset[str] = frozenset()  # ids at exactly the watermark
    walk: Walk | None = None  # a walk in progress

    @property
    def newest(self) -> datetime | None:
        """The newest created_at seen, for the latest-analysis gauge."""
        marks = [t for t in (self.watermark, self.walk.top if self.walk else None) if t is not None]
        return max(marks, default=None)


def initial_state(lookback: float = 0.0, now: float | None = None) -> StreamState:
    """A stream that counts nothing old, or what was created in the last `lookback` seconds before `now`."""
    if lookback <= 0 or now is None:
        return StreamState()
    return StreamState(count_from=datetime.fromtimestamp(now, UTC) - timedelta(seconds=lookback))


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def walk_params(state: StreamState, limit: int = PAGE_LIMIT) -> dict[str, Any]:
    """The query of the next request of this stream."""
    params: dict[str, Any] = {"limit": limit}
    if state.primed and state.watermark is not None:
        params["since"] = _iso(state.watermark)
    walk = state.walk
    if walk is not None and walk.until is not None:
        params["until"] = _iso(walk.until)
    if walk is not None and walk.cursor is not None:
        params["cursor"] = walk.cursor
    return params


def _is_new(state: StreamState, item: Analysis) -> bool:
    if not state.primed:
        return state.count_from is not None and item.created_at >= state.count_from
    if state.watermark is None or item.created_at > state.watermark:
        return True
    return item.created_at == state.watermark and item.id not in state.seen


def advance(state: StreamState, page: AnalysesPage) -> tuple[StreamState, tuple[Analysis, ...]]:
    """Take one page of the walk in progress (or a new one): the next state and the RCAs newly counted."""
    walk = state.walk or Walk()
    last, top, seen_at_top = walk.last, walk.top, set(walk.seen_at_top)
    counted: list[Analysis] = []
    first_walk_done = False
    for item in sorted(page.items, key=lambda a: (a.created_at, a.id), reverse=True):
        key = (item.created_at, item.id)
        if last is not None and key >= last:
            # Seen before in this walk, or (resuming after a refused cursor) arrived above the point where
            # it resumes: either way not this walk's to count, nor to mark as seen at the top.
            continue
        if _is_new(state, item):
            counted.append(item)
        last = key
        if top is None or item.created_at > top:
            top, seen_at_top = item.created_at, {item.id}
        elif item.created_at == top:
            seen_at_top.add(item.id)
        elif not state.primed and (state.count_from is None or item.created_at < state.count_from):
            first_walk_done = True  # every id at the newest timestamp is known; the rest is old history
    if page.next_cursor is not None and not first_walk_done:
        walk = Walk(page.next_cursor, walk.until, last, top, frozenset(seen_at_top))
        return replace(state, walk=walk), tuple(counted)
    return _completed(state, top, frozenset(seen_at_top)), tuple(counted)


def _completed(state: StreamState, top: datetime | None, seen_at_top: frozenset[str]) -> StreamState:
    """The state after a walk reached its end: the watermark moves to the walk's newest item."""
    if not state.primed:
        return StreamState(primed=True, watermark=top, seen=seen_at_top if top else frozenset())
    watermark, seen = state.watermark, state.seen
    if top is not None and (watermark is None or top > watermark):
        watermark, seen = top, seen_at_top
    elif top is not None and top == watermark:
        seen = seen | seen_at_top
    return StreamState(primed=True, watermark=watermark, seen=seen)


def restart_walk(state: StreamState) -> StreamState:
    """After a refused cursor: resume below the last item seen, from the same watermark, without a cursor."""
    walk = state.walk
    if walk is None or walk.last is None:
        return replace(state, walk=None)
    return replace(state, walk=replace(walk, cursor=None, until=walk.last[0]))


def is_invalid_cursor(exc: UpstreamError) -> bool:
    return isinstance(exc, BadRequest) and exc.status == 400 and "cursor" in exc.detail.lower()


@dataclass(frozen=True)
class WalkResult:
    state: StreamState
    counted: tuple[Analysis, ...]
    pages: int  # requests made, the refused-cursor ones included
    error: UpstreamError | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.state.walk is None


Fetch = Callable[[dict[str, Any]], AnalysesPage]


def walk(fetch: Fetch, state: StreamState, *, max_pages: int, limit: int = PAGE_LIMIT,
         stopping: Callable[[], bool] = lambda: False) -> WalkResult:
    """Fetch pages until `next_cursor` is null or `max_pages` requests were made.

    On an error the state keeps the progress made, so the next cycle continues where this one stopped.
    """
    counted: list[Analysis] = []
    pages = 0
    while pages < max_pages and not stopping():
        params = walk_params(state, limit)
        pages += 1
        try:
            page = fetch(params)
        except UpstreamError as exc:
            if "cursor" in params and is_invalid_cursor(exc):
                log.info("tenant %s: /analyses refused the cursor; resuming the walk from the watermark",
                         exc.tenant, extra={"tenant": exc.tenant})
                state = restart_walk(state)
                continue
            return WalkResult(state, tuple(counted), pages, exc)
        state, new = advance(state, page)
        counted.extend(new)
        if state.walk is None:
            break
    return WalkResult(state, tuple(counted), pages)


# --- the counters -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Histogram:
    """Confidence observations: a count per bucket of `CONFIDENCE_BUCKETS` (not cumulative), sum, count."""

    buckets: tuple[int, ...] = (0,) * len(CONFIDENCE_BUCKETS)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> Histogram:
        index = next((i for i, bound in enumerate(CONFIDENCE_BUCKETS) if value <= bound),
                     len(CONFIDENCE_BUCKETS) - 1)  # confidence is at most 1.0, the last bound
        buckets = tuple(n + (i == index) for i, n in enumerate(self.buckets))
        return Histogram(buckets, self.total + value, self.count + 1)

    def cumulative(self) -> list[tuple[str, float]]:
        """`(le, count)` pairs as the exposition wants them, `+Inf` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(CONFIDENCE_BUCKETS, self.buckets, strict=True):
            running += n
            out.append((str(bound), float(running)))
        return [*out, ("+Inf", float(self.count))]


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Counts:
    """A tenant's counters. `totals` keys are `(severity, *values of labels)`; `admitted` holds, per
    optional label, the values that have a series of their own (the rest count under `(other)`)."""

    labels: tuple[str, ...] = ()
    totals: Mapping[tuple[str, ...], int] = field(default_factory=lambda: _frozen({}))
    admitted: Mapping[str, frozenset[str]] = field(default_factory=lambda: _frozen({}))
    confidence: Mapping[str, Histogram] = field(default_factory=lambda: _frozen({}))


def zero_counts(labels: tuple[str, ...] = ()) -> Counts:
    """Every severity at 0 (per series without optional labels), so `increase()` works from the start."""
    totals = {} if labels else {(severity,): 0 for severity in SEVERITIES}
    return Counts(labels, _frozen(totals), _frozen({label: frozenset() for label in labels}),
                  _frozen({severity: Histogram() for severity in SEVERITIES}))


def label_value(item: Analysis, label: str, max_len: int) -> str:
    """`project`: path, else id, else `(none)`; `source`: the source, else `(none)`; sanitised."""
    raw = item.project if label == "project" else item.source
    return sanitize_label(raw if raw is not None and raw.strip() else NO_PROJECT_LABEL, max_len)


def count(counts: Counts, items: Iterable[Analysis], max_values: int, max_len: int) -> Counts:
    """The counters with `items` added; optional label values past `max_values` go to `(other)`.

    Values are admitted in the order their RCAs were created, whatever order a walk met them in."""
    items = sorted(items, key=lambda a: (a.created_at, a.id))
    if not items:
        return counts
    totals = dict(counts.totals)
    admitted = {label: set(values) for label, values in counts.admitted.items()}
    confidence = dict(counts.confidence)
    for item in items:
        values = []
        for label in counts.labels:
            value, known = label_value(item, label, max_len), admitted.setdefault(label, set())
            if value not in known and len(known) < max_values:
                known.add(value)
            values.append(value if value in known else OTHER_LABEL)
        key = (item.severity, *values)
        totals[key] = totals.get(key, 0) + 1
        confidence[item.severity] = confidence.get(item.severity, Histogram()).observe(item.confidence)
    frozen_admitted = {label: frozenset(values) for label, values in admitted.items()}
    return Counts(counts.labels, _frozen(totals), _frozen(frozen_admitted), _frozen(confidence))


# --- the per-tenant snapshot --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TenantStream:
    """What the exporter shows of one tenant's stream: its counters, where it stands, and its health."""

    name: str
    state: StreamState
    counts: Counts
    attempts: int = 0
    up: bool = False
    last_attempt: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    error_code: str | None = None
    last_pages: int = 0  # requests the last walk made

    @property
    def catching_up(self) -> bool:
        """True while a walk that hit `analyses_max_pages` continues on the next cycle."""
        return self.state.walk is not None

    @property
    def status(self) -> str:
        if self.attempts == 0:
            return "pending"
        return "up" if self.up else "down"


def new_stream(cfg: TenantConfig, now: float) -> TenantStream:
    return TenantStream(cfg.name, initial_state(cfg.analyses_lookback, now), zero_counts(cfg.analyses_labels))


def adopt(prev: TenantStream | None, cfg: TenantConfig, data_changed: bool, now: float) -> TenantStream:
    """The snapshot for a (re)configured tenant. Counters never go down while the tenant stays: a new
    server or token only restarts the stream from a fresh watermark (counting nothing old, no lookback);
    new `analyses_labels` mean new series, which start from zero."""
    if prev is None:
        return new_stream(cfg, now)
    state = initial_state() if data_changed else prev.state
    counts = prev.counts if prev.counts.labels == cfg.analyses_labels else zero_counts(cfg.analyses_labels)
    return replace(prev, state=state, counts=counts)


def record(prev: TenantStream, result: WalkResult, cfg: TenantConfig, now: float) -> TenantStream:
    """The snapshot after a walk: its counts added, its state and health taken over."""
    error = result.error
    return replace(
        prev, state=result.state,
        counts=count(prev.counts, result.counted, cfg.max_label_values, cfg.label_max_length),
        attempts=prev.attempts + 1, up=error is None, last_attempt=now,
        last_success=now if error is None else prev.last_success,
        last_error=str(error) if error else None, error_code=error.code if error else None,
        last_pages=result.pages)


def log_transition(prev: TenantStream, new: TenantStream) -> None:
    """Log the stream's health and backlog changes once, not every cycle."""
    name, extra = new.name, {"tenant": new.name}
    if new.up and not prev.state.primed and new.state.primed:
        newest = new.state.newest
        log.info("tenant %s: RCA stream started; counting RCAs newer than %s", name,
                 newest.isoformat() if newest else "(none yet)", extra=extra)
    if new.up and prev.attempts and not prev.up:
        log.info("tenant %s: RCA stream recovered", name, extra=extra)
    elif not new.up and (prev.up or prev.attempts == 0):
        log.warning("tenant %s: RCA stream failing: %s", name, new.last_error, extra=extra)
    elif not new.up and new.error_code != prev.error_code:
        log.warning("tenant %s: RCA stream still failing, now: %s", name, new.last_error, extra=extra)
    if new.catching_up and not prev.catching_up and new.up:
        log.info("tenant %s: RCA backlog larger than one walk (%d pages); continuing next cycle", name,
                 new.last_pages, extra=extra)
    elif prev.catching_up and not new.catching_up:
        log.info("tenant %s: RCA stream caught up", name, extra=extra)
