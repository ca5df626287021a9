"""The `Store`: writes cost the same at any size, snapshots never change, versions move with every write."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from exlogare_exporter.state import Store


@dataclass(frozen=True)
class Item:
    name: str
    value: int


def test_a_snapshot_never_changes_and_a_write_makes_a_new_one() -> None:
    store: Store[Item] = Store()
    store.put(Item("a", 1))
    first = store.snapshot()
    assert store.snapshot() is first  # no write, no copy
    version = store.version
    store.put(Item("a", 2))
    store.put(Item("b", 1))
    assert store.version == version + 2
    assert dict(first) == {"a": Item("a", 1)}
    assert dict(store.snapshot()) == {"a": Item("a", 2), "b": Item("b", 1)}
    with pytest.raises(TypeError):
        first["c"] = Item("c", 0)  # type: ignore[index]


def test_get_sees_a_write_at_once() -> None:
    store: Store[Item] = Store()
    assert store.get("a") is None
    store.put(Item("a", 1))
    assert store.get("a") == Item("a", 1)


def test_retain_forgets_the_others_and_moves_the_version() -> None:
    store: Store[Item] = Store()
    for name in "abc":
        store.put(Item(name, 0))
    before, version = store.snapshot(), store.version
    store.retain({"b", "x"})
    assert set(store.snapshot()) == {"b"} and store.get("a") is None
    assert set(before) == {"a", "b", "c"}
    assert store.version > version


def test_concurrent_writers_and_readers_see_consistent_snapshots() -> None:
    store: Store[Item] = Store()
    writes = 2000
    names = [f"t{i}" for i in range(8)]
    problems: list[str] = []
    done = threading.Event()

    def write(name: str) -> None:
        for value in range(1, writes + 1):
            store.put(Item(name, value))

    def read() -> None:
        last_version, last = -1, dict.fromkeys(names, 0)
        while not done.is_set():
            version = store.version  # read first: the snapshot is at least this new
            snapshot = store.snapshot()
            if version < last_version:
                problems.append(f"version went back from {last_version} to {version}")
            for name, item in snapshot.items():
                if item.value < last[name]:
                    problems.append(f"{name} went back from {last[name]} to {item.value}")
                last[name] = item.value
            last_version = version

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(name,)) for name in names]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    assert problems == []
    assert store.version == writes * len(names)
    assert {name: item.value for name, item in store.snapshot().items()} == dict.fromkeys(names, writes)
