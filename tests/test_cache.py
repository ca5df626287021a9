"""The proxy's cache on its own: TTL, LRU bounds, single-flight and the stale window, with a fake clock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from exlogare_exporter.cache import HIT, MISS, SHARED, STALE, Cache, Lookup
from tests.support import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class BoomError(Exception):
    pass


def make(clock: Clock, ttl: float = 30, stale_ttl: float = 600, max_entries: int = 100,
         max_bytes: int = 10_000) -> Cache[str, str]:
    return Cache(ttl, stale_ttl, max_entries, max_bytes, size=len, clock=clock)


def test_an_answer_is_fresh_for_the_ttl_then_loaded_again() -> None:
    clock = Clock()
    cache = make(clock)
    loads: list[str] = []

    def load() -> str:
        loads.append("x")
        return f"v{len(loads)}"

    assert (cache.get("k", load).value, cache.get("k", load).result) == ("v1", HIT)
    clock.now += 29.9
    found = cache.get("k", load)
    assert (found.value, found.result, round(found.age, 1)) == ("v1", HIT, 29.9)
    clock.now += 0.1
    assert (cache.get("k", load).value, len(loads)) == ("v2", 2)
    assert cache.get("other", load).result == MISS


def test_least_recently_used_entries_go_first_when_over_max_entries() -> None:
    clock = Clock()
    cache = make(clock, max_entries=2)
    cache.get("a", lambda: "A")
    cache.get("b", lambda: "B")
    cache.get("a", lambda: "A2")  # a is now the most recently used
    cache.get("c", lambda: "C")
    assert cache.get("a", lambda: "new").result == HIT
    assert cache.get("b", lambda: "new").result == MISS  # b was evicted
    assert cache.stats().evictions == 2  # b, then c to make room for b again
    assert cache.stats().entries == 2


def test_bytes_are_bounded_and_an_oversized_answer_is_served_but_not_kept() -> None:
    clock = Clock()
    cache = make(clock, max_bytes=10)
    cache.get("a", lambda: "aaaa")
    cache.get("b", lambda: "bbbb")
    assert cache.stats().bytes == 8
    cache.get("c", lambda: "cccc")  # 12 bytes > 10: a goes
    assert (cache.stats().entries, cache.stats().bytes) == (2, 8)
    assert cache.get("a", lambda: "x").result == MISS
    big = cache.get("big", lambda: "z" * 11)
    assert (big.value, big.result) == ("z" * 11, MISS)
    assert cache.get("big", lambda: "again").value == "again"
    assert cache.stats().bytes <= 10


def race(cache: Cache[str, str], answer: Callable[[], str], callers: int) -> tuple[list[Future], int]:
    """`callers` threads ask for one key at once; the load blocks until released, after it started."""
    release = threading.Event()
    calls: list[int] = []
    start = threading.Barrier(callers)

    def load() -> str:
        calls.append(1)
        release.wait(10)
        return answer()

    def caller() -> Lookup[str]:
        start.wait(10)
        return cache.get("k", load)

    with ThreadPoolExecutor(max_workers=callers) as pool:
        futures = [pool.submit(caller) for _ in range(callers)]
        wait_until(lambda: calls, what="the load to start")
        release.set()
    return futures, len(calls)


def test_concurrent_identical_requests_share_one_load() -> None:
    futures, calls = race(make(Clock()), lambda: "answer", 20)
    found = [f.result() for f in futures]
    assert calls == 1
    assert {f.value for f in found} == {"answer"}
    results = [f.result for f in found]
    assert results.count(MISS) == 1
    assert set(results) <= {MISS, SHARED, HIT}


def test_a_failed_load_fails_every_waiting_caller_and_is_not_cached() -> None:
    cache = make(Clock())

    def failing() -> str:
        raise BoomError("upstream down")

    futures, _ = race(cache, failing, 5)
    assert all(isinstance(f.exception(), BoomError) for f in futures)
    assert cache.get("k", lambda: "ok").result == MISS  # nothing was stored, nothing stuck in flight


def test_a_recent_answer_is_served_stale_only_for_allowed_errors_within_the_window() -> None:
    clock = Clock()
    cache = make(clock, ttl=30, stale_ttl=600)
    cache.get("k", lambda: "old")
    clock.now += 60

    def fail() -> str:
        raise BoomError

    found = cache.get("k", fail, stale_on=lambda exc: isinstance(exc, BoomError))
    assert (found.value, found.result, found.age) == ("old", STALE, 60)
    assert isinstance(found.error, BoomError)
    with pytest.raises(BoomError):
        cache.get("k", fail)  # not an error that allows stale answers
    clock.now += 541  # 601 s old: past the stale window
    with pytest.raises(BoomError):
        cache.get("k", fail, stale_on=lambda exc: True)
    assert cache.stats().entries == 0


def test_no_stale_window_means_no_stale_answers() -> None:
    clock = Clock()
    cache = make(clock, ttl=30, stale_ttl=0)
    cache.get("k", lambda: "old")
    clock.now += 31
    with pytest.raises(BoomError):
        cache.get("k", lambda: (_ for _ in ()).throw(BoomError()), stale_on=lambda exc: True)


def test_discard_configure_and_clear() -> None:
    clock = Clock()
    cache = make(clock)
    for key in ("acme/1", "acme/2", "lab/1"):
        cache.get(key, lambda key=key: key)
    assert cache.discard(lambda key: key.startswith("acme/")) == 2
    assert cache.get("lab/1", lambda: "x").result == HIT
    cache.get("lab/2", lambda: "y")
    cache.configure(ttl=30, stale_ttl=600, max_entries=1, max_bytes=10_000)
    assert cache.stats().entries == 1
    cache.clear()
    assert (cache.stats().entries, cache.stats().bytes) == (0, 0)


def test_a_zero_ttl_still_shares_concurrent_loads_and_keeps_answers_for_stale_serving() -> None:
    clock = Clock()
    cache = make(clock, ttl=0, stale_ttl=60)
    assert cache.get("k", lambda: "v1").result == MISS
    assert cache.get("k", lambda: "v2").value == "v2"  # never fresh
    found = cache.get("k", lambda: (_ for _ in ()).throw(BoomError()), stale_on=lambda exc: True)
    assert (found.value, found.result) == ("v2", STALE)
