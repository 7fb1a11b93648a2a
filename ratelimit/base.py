"""The seam between the worker and delivery policy (frequency caps, quiet hours, opt-outs).

The worker asks once per batch, with every message of the batch, so an implementation can answer
with one Redis round trip (one Lua call over all users of the batch) instead of one per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..core.schema import Message


@dataclass(frozen=True, slots=True)
class Admit:
    """Send now."""


@dataclass(frozen=True, slots=True)
class Defer:
    """Not now: move the message back to the queue for `until` (unix seconds)."""

    until: float
    reason: str


@dataclass(frozen=True, slots=True)
class Drop:
    """Never: the message is dropped and counted with this reason (over a cap, opted out)."""

    reason: str


Decision = Admit | Defer | Drop
ADMIT = Admit()


class Limiter(Protocol):
    async def decide(
        self, messages: Sequence[Message], now: float, members: Sequence[str] | None = None,
        first_read: Sequence[bool] | None = None,
    ) -> list[Decision]:
        """One decision per message, in order. `members` name each message's acceptance (id and enqueue
        time): the same message deferred and read again is the same member, a new enqueue is not.
        `first_read` is False for an entry read again after a crash: only opt-outs apply to it."""
        ...


class Unlimited:
    """No policy: every message is admitted, with no Redis round trip."""

    async def decide(
        self, messages: Sequence[Message], now: float, members: Sequence[str] | None = None,
        first_read: Sequence[bool] | None = None,
    ) -> list[Decision]:
        return [ADMIT] * len(messages)
