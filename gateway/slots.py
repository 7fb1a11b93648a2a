"""Request slots per provider with two priorities: high first, normal never starved.

A worker bounds requests in flight per provider. With a plain semaphore, a reminder queued behind
a million-message campaign would wait for every campaign delivery already waiting for a slot. Here
a freed slot goes to a waiting high-priority delivery first, except that after `weight` high grants
in a row a waiting normal delivery gets the next one: so high waits at most for the slots in use,
and normal still gets at least 1 slot in `weight + 1` under any high load.

A slot is handed straight to the waiter it wakes (no barging), so the order above is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class PrioritySlots:
    def __init__(self, slots: int, weight: int = 4) -> None:
        if slots < 1 or weight < 1:
            raise ValueError("slots and weight must be at least 1")
        self.free = slots
        self.weight = weight
        self._high: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()
        self._streak = 0  # high grants in a row while normal waiters were waiting

    @property
    def waiting(self) -> tuple[int, int]:
        """(high, normal) waiters, for metrics and tests."""
        return len(self._high), len(self._normal)

    async def acquire(self, high: bool) -> None:
        if self.free > 0 and not self._high and not self._normal:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._high if high else self._normal
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over as the waiter was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(fut)
            raise

    def release(self) -> None:
        fut = self._next()
        if fut is None:
            self.free += 1
        else:
            fut.set_result(None)

    def _next(self) -> asyncio.Future[None] | None:
        while self._high or self._normal:
            take_high = bool(self._high) and (not self._normal or self._streak < self.weight)
            fut = self._high.popleft() if take_high else self._normal.popleft()
            if fut.done():  # cancelled while waiting
                continue
            self._streak = self._streak + 1 if take_high and self._normal else 0
            return fut
        return None
