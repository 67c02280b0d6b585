"""A bounded least-recently-used map for the guard's caches (plans, condition-influence
verdicts, DuckDB prepared statements): bounded by the number of entries *and* by their
estimated size in bytes, so that a run of long distinct queries cannot grow the guard's
memory the way a count bound alone allows (one 家族類型 plan is ~160 KB, a short query's
~20 KB)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class SizedLRU:
    """At most ``max_items`` entries whose ``size_of(key, value)`` add up to at most
    ``max_bytes``; the least recently used leave first (``put`` returns them, e.g. to
    release what they hold). An entry larger than ``max_bytes`` on its own is not kept.
    Thread-safe."""

    def __init__(self, max_items: int, max_bytes: int, size_of: Callable[[Any, Any], int]):
        if max_items < 1 or max_bytes < 1:
            raise ValueError("a cache needs room for at least one entry and one byte")
        self.max_items, self.max_bytes = max_items, max_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, value: Any) -> list[tuple[Hashable, Any]]:
        """Keep ``value`` under ``key``; returns the entries evicted to make room (with
        ``value`` itself when it is larger than the whole cache)."""
        size = max(int(self._size_of(key, value)), 1)
        if size > self.max_bytes:
            return [(key, value)]
        evicted = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                k, (v, s) = self._items.popitem(last=False)
                self._bytes -= s
                evicted.append((k, v))
        return evicted

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def __getitem__(self, key: Hashable) -> Any:
        """The value kept under ``key`` (without making it recently used), for inspection."""
        with self._lock:
            return self._items[key][0]

    @property
    def bytes(self) -> int:
        """The estimated size of what is kept."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
