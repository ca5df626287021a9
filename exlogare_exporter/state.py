"""Per-tenant results, immutable and swapped in whole, so a scrape never sees half a refresh."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

# A result key is (endpoint kind, window label); the timeseries has one window: "".
ResultKey = tuple[str, str]


@dataclass(frozen=True)
class Fetched:
    """One endpoint's last good value and when it arrived (wall clock, for staleness)."""

    value: Any
    at: float


@dataclass(frozen=True)
class TenantState:
    """Everything the exporter knows about one tenant after its latest refresh attempt."""

    name: str
    max_staleness: float
    results: Mapping[ResultKey, Fetched] = field(default_factory=lambda: MappingProxyType({}))
    attempts: int = 0
    up: bool = False
    last_attempt: float | None = None
    last_success: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    error_code: str | None = None

    def fresh_results(self, now: float) -> list[tuple[ResultKey, Fetched]]:
        """Results young enough to export; older ones are dropped rather than shown as current."""
        return [(k, f) for k, f in self.results.items() if now - f.at <= self.max_staleness]

    def fresh_until(self, now: float) -> float:
        """When `fresh_results` next changes by time alone (the first fresh result to expire); inf if never.

        Results already stale stay stale as time goes on, so a rendering made at `now` holds until then."""
        return min((f.at + self.max_staleness for _, f in self.fresh_results(now)), default=math.inf)


class Named(Protocol):
    @property
    def name(self) -> str: ...


S = TypeVar("S", bound=Named)


class Store(Generic[S]):
    """Map of tenant name to a frozen per-tenant value (`TenantState` unless said otherwise): writers swap a
    tenant's value, readers take a reference to an immutable snapshot.

    A write changes a private dict and drops the snapshot; the next `snapshot()` copies the dict once. A
    write costs the same with a thousand tenants as with one (the upstream request counters write on every
    request), and a scrape pays one copy for all the writes since the last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, S] = {}
        self._snapshot: Mapping[str, S] | None = MappingProxyType({})
        self.version = 0  # moves with every write: a snapshot taken after reading it is at least as new

    def snapshot(self) -> Mapping[str, S]:
        snapshot = self._snapshot
        if snapshot is None:
            with self._lock:
                if self._snapshot is None:
                    self._snapshot = MappingProxyType(dict(self._live))
                snapshot = self._snapshot
        return snapshot

    def get(self, name: str) -> S | None:
        return self._live.get(name)

    def put(self, state: S) -> None:
        with self._lock:
            self._live[state.name] = state
            self._changed()

    def retain(self, names: set[str]) -> None:
        """Forget tenants no longer configured, so their series vanish with them."""
        with self._lock:
            for name in [n for n in self._live if n not in names]:
                del self._live[name]
            self._changed()

    def _changed(self) -> None:
        self._snapshot = None
        self.version += 1
