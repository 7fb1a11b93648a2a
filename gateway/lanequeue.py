"""A lane's waiting deliveries with two priorities: high first, normal never starved.

A worker bounds requests in flight per provider with a fixed number of sender coroutines per lane
(gateway/lanes.py), and each free sender takes its next delivery from here. With a plain FIFO, a
reminder queued behind a million-message campaign would wait for every campaign delivery queued
before it. Here a free sender takes a waiting high-priority delivery first, except that after
`weight` high takes in a row while normal deliveries were waiting, it takes a normal one: so high
waits at most for the requests in flight, and normal still gets at least 1 sender turn in
`weight + 1` under any high load.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class LaneQueue(Generic[T]):
    def __init__(self, weight: int = 4) -> None:
        if weight < 1:
            raise ValueError("weight must be at least 1")
        self.weight = weight
        self._high: deque[T] = deque()
        self._normal: deque[T] = deque()
        self._streak = 0  # high takes in a row while normal items were waiting

    def __len__(self) -> int:
        return len(self._high) + len(self._normal)

    @property
    def waiting(self) -> tuple[int, int]:
        """(high, normal) items, for metrics and tests."""
        return len(self._high), len(self._normal)

    def put(self, item: T, high: bool) -> None:
        (self._high if high else self._normal).append(item)

    def take(self) -> T | None:
        """The next item in priority order, or None when empty."""
        high, normal = self._high, self._normal
        if high and (not normal or self._streak < self.weight):
            self._streak = self._streak + 1 if normal else 0
            return high.popleft()
        if normal:
            self._streak = 0
            return normal.popleft()
        return None
