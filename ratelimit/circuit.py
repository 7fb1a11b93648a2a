"""Circuit breaker per provider and app: back off as a whole when a provider is down.

Per-delivery retries already back off, but while APNs or an FCM project answers 503 for a minute,
every message would still spend one attempt (and one request) on it. The circuit counts a run of
consecutive failures (5xx, timeouts, connection errors; not 429, which carries its own Retry-After,
and not answers about one token or payload, which prove the provider is up). When the run reaches
`threshold`, the circuit opens: deliveries for that provider/app are parked until the open period
ends, without spending attempts. Then one probe request is let through (half-open): success closes
the circuit, failure opens it again for twice as long, up to `max_open_s`.

State is per worker process: each process finds out on its own within `threshold` requests, which
keeps the hot path free of Redis round trips.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(slots=True)
class Circuit:
    threshold: int = 20
    open_s: float = 2.0
    max_open_s: float = 60.0
    state: State = State.CLOSED
    failures: int = 0
    opened_until: float = 0.0
    current_open_s: float = field(default=0.0)
    probing: bool = False
    opened_count: int = 0

    def allow(self, now: float) -> bool:
        """May a request go out now? In half-open state exactly one probe is let through at a time."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and now >= self.opened_until:
            self.state = State.HALF_OPEN
            self.probing = False
        if self.state is State.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def retry_at(self, now: float) -> float:
        """When a delivery refused by `allow` should come back."""
        return max(now, self.opened_until) if self.state is State.OPEN else now + min(1.0, self.open_s)

    def success(self) -> None:
        self.state = State.CLOSED
        self.failures = 0
        self.probing = False
        self.current_open_s = 0.0

    def failure(self, now: float) -> bool:
        """Record a provider failure; True when this one opened the circuit."""
        if self.state is State.HALF_OPEN:
            self.current_open_s = min(self.max_open_s, max(self.open_s, self.current_open_s * 2))
            self._open(now)
            return True
        self.failures += 1
        if self.state is State.CLOSED and self.failures >= self.threshold:
            self.current_open_s = self.open_s
            self._open(now)
            return True
        return False

    def _open(self, now: float) -> None:
        self.state = State.OPEN
        self.opened_until = now + self.current_open_s
        self.probing = False
        self.failures = 0
        self.opened_count += 1
