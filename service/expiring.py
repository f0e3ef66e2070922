"""`ExpiringMap`: the in-process stores' one data structure (idempotency keys, job records)."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["ExpiringMap"]

V = TypeVar("V")


class ExpiringMap(Generic[V]):
    """Values that expire `ttl` seconds after they were set, at most `max_keys` of them (the
    least recently set dropped first)."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        """The live value, or None (an expired one is dropped on the way)."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[key]
            return None
        return item[1]

    def set(self, key: str, value: V, ttl: float) -> None:
        """Keep `value` for `ttl` seconds, evicting the oldest keys beyond the bound."""
        self._items[key] = (time.monotonic() + ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_keys:
            self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        """Forget `key`."""
        self._items.pop(key, None)
