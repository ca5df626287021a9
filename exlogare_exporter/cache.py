"""A response cache for the proxy: TTL, LRU bounds on entries and bytes, single-flight and a stale window.

Pure of HTTP and of the upstream: it caches whatever `load()` returns. The clock is injectable so the
tests can move time. Every method is thread-safe; `load()` runs outside the lock, once per key at a time.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# How an answer was found; also the `result` label values of the proxy's cache metric.
HIT = "hit"  # fresh in the cache
MISS = "miss"  # loaded by this caller
SHARED = "shared"  # loaded by a concurrent caller with the same key (single-flight)
STALE = "stale"  # the load failed in a way that allows it, so an older answer was served


@dataclass(frozen=True)
class Lookup(Generic[V]):
    """An answer and how it was found; `age` is seconds since it was loaded; `error` why it is stale."""

    value: V
    result: str
    age: float
    error: BaseException | None = None


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    evictions: int


@dataclass(frozen=True)
class _Entry(Generic[V]):
    value: V
    size: int
    stored: float


class Cache(Generic[K, V]):
    """Answers by key, fresh for `ttl` seconds, kept for `stale_ttl` seconds for serving stale.

    `size(value)` is the bytes an entry counts for. An entry larger than `max_bytes` is returned but not
    stored. When the bounds are exceeded the least recently used entries go first.
    """

    def __init__(self, ttl: float, stale_ttl: float, max_entries: int, max_bytes: int, *,
                 size: Callable[[V], int], clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._flights: dict[K, Future[Lookup[V]]] = {}
        self._bytes = 0
        self._evictions = 0
        self.ttl = self.stale_ttl = 0.0
        self.max_entries = self.max_bytes = 0
        self.configure(ttl, stale_ttl, max_entries, max_bytes)

    def configure(self, ttl: float, stale_ttl: float, max_entries: int, max_bytes: int) -> None:
        """New limits (a config reload); entries over the new bounds are evicted at once."""
        with self._lock:
            self.ttl, self.stale_ttl = ttl, max(stale_ttl, ttl)
            self.max_entries, self.max_bytes = max_entries, max_bytes
            self._shrink()

    def get(self, key: K, load: Callable[[], V],
            stale_on: Callable[[BaseException], bool] = lambda exc: False) -> Lookup[V]:
        """The cached answer for `key`, or `load()`'s, shared with concurrent callers of the same key.

        When `load()` raises an exception for which `stale_on` is true and an answer younger than
        `stale_ttl` is cached, that answer is returned as `STALE`; otherwise the exception propagates (to
        every caller waiting on that load).
        """
        with self._lock:
            now = self._clock()
            entry = self._entries.get(key)
            if entry is not None and now - entry.stored < self.ttl:
                self._entries.move_to_end(key)
                return Lookup(entry.value, HIT, now - entry.stored)
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if not leader:
            found = flight.result()
            result = SHARED if found.result == MISS else found.result
            return Lookup(found.value, result, found.age, found.error)
        return self._load(key, load, stale_on, flight)

    def _load(self, key: K, load: Callable[[], V], stale_on: Callable[[BaseException], bool],
              flight: Future[Lookup[V]]) -> Lookup[V]:
        """Run `load()` as the leader; the flight is always removed and resolved, whatever happens."""
        try:
            value = load()
        except BaseException as exc:
            found = None
            try:
                found = self._stale(key, exc, stale_on)
            finally:
                if found is None:
                    flight.set_exception(exc)
                else:
                    flight.set_result(found)
            if found is None:
                raise
            return found
        found = Lookup(value, MISS, 0.0)
        try:
            with self._lock:
                try:
                    self._store(key, value)
                finally:
                    del self._flights[key]  # under the same lock: a newcomer sees the entry, not the flight
        finally:
            flight.set_result(found)
        return found

    def _stale(self, key: K, exc: BaseException, stale_on: Callable[[BaseException], bool]
               ) -> Lookup[V] | None:
        with self._lock:
            del self._flights[key]
            entry = self._entries.get(key)
            now = self._clock()
            if entry is None or now - entry.stored > self.stale_ttl:
                if entry is not None:
                    self._remove(key)
                return None
        if not stale_on(exc):
            return None
        return Lookup(entry.value, STALE, now - entry.stored, exc)

    def _store(self, key: K, value: V) -> None:
        size = self._size(value)
        if key in self._entries:
            self._remove(key)
        if self.stale_ttl <= 0 or size > self.max_bytes:  # stale_ttl >= ttl (`configure`): nothing kept
            return
        self._entries[key] = _Entry(value, size, self._clock())
        self._bytes += size
        self._shrink()

    def _shrink(self) -> None:
        """Drop expired entries from the LRU end, then the least recently used ones until within bounds."""
        now = self._clock()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            over = len(self._entries) > self.max_entries or self._bytes > self.max_bytes
            if not over and now - entry.stored <= self.stale_ttl:
                break
            self._remove(key)
            if over:
                self._evictions += 1

    def _remove(self, key: K) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size

    def discard(self, predicate: Callable[[K], bool]) -> int:
        """Forget the entries whose key matches (a tenant reconfigured or removed); returns how many."""
        with self._lock:
            keys = [k for k in self._entries if predicate(k)]
            for key in keys:
                self._remove(key)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self._evictions)
