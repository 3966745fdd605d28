"""The results a model keeps across calls: the last few, by key, shared between threads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The `size` entries used last; `get` counts as a use, and `put` drops the one used longest ago.

    With `weigh` (an entry's bytes, say), the entries kept also weigh at most `budget` in all: `put`
    drops the oldest until they do, and keeps nothing of an entry that alone weighs more.
    A miss is computed by the caller outside the lock, so threads never wait on each other's work;
    two threads that miss the same key both compute it, and the later `put` stays.
    """

    def __init__(self, size: int, weigh: Callable[[V], int] | None = None, budget: int = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        if weigh is not None and budget < 1:
            raise ValueError(f"a weighed Recent needs a budget of at least 1, got {budget}")
        self.size = size
        self.weigh, self.budget = weigh, budget
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # each value with its weight
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The entry of `key`, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V) -> None:
        """Keep `value` for `key`, as the entry used last."""
        weight = self.weigh(value) if self.weigh is not None else 0
        with self._lock:
            self._weight -= self._entries.pop(key, (None, 0))[1]
            if self.weigh is not None and weight > self.budget:
                return
            self._entries[key] = (value, weight)
            self._weight += weight
            while len(self._entries) > self.size or (self.weigh is not None and self._weight > self.budget):
                self._weight -= self._entries.popitem(last=False)[1][1]

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()
            self._weight = 0

    def __len__(self) -> int:
        return len(self._entries)
