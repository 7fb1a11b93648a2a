"""A request rate per provider (or provider and app) shared by every worker on every host.

FCM grants a project 600k messages a minute by default; APNs and push services answer 429 when a
sender goes too fast. A per-process limit would multiply with the number of workers, so the rate
lives in Redis as GCRA state (one "theoretical arrival time" per scope). Asking Redis for every
request would cost a round trip per push, so a worker reserves a small block of requests at a
time (about 20 ms worth) and spends it locally; a block it does not spend within a second lapses
(so a worker that went quiet cannot later burst above the rate). Over any interval T the scope
sends at most rate * T + one block per worker, and never more than the rate on average. The
time is Redis's own, so clock skew between hosts cannot stall anyone.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from ..core import metrics
from ..queue.keys import Keys

# KEYS: tat key   ARGV: now_ms ('' = Redis's own clock), interval_ms (float), wanted, burst_ms
# -> {granted, wait_ms}. Redis's clock by default: every worker on every host then shares one time, so
# a host whose clock runs ahead cannot push the state into the future and stall the others.
# A reservation is all of `wanted` or nothing (wait until a whole block is free), so a worker
# makes one call per block, not one per request, however many workers share the rate.
_RESERVE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local interval = tonumber(ARGV[2])
local wanted, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + burst - tat) / interval + 1e-9)
if room < wanted then
  return {0, math.ceil(tat + wanted * interval - burst - now)}
end
tat = tat + wanted * interval
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now + burst) + 1000)
return {wanted, 0}
"""

BLOCK_S = 0.02  # a reservation covers about this much of the rate
LAPSE_S = 1.0  # unspent requests of a reservation are given up after this long
MAX_SLEEP_S = 0.5  # a single wait is never longer: the answer is asked again (state may have been reset)


class Gcra:
    """One rate kept in Redis as GCRA state, shared by every process that names the same key.

    `reserve(n)` takes n units at once, all or nothing: (True, 0.0), or (False, seconds until n are free).
    Up to `burst` units can be taken at once after a quiet spell; more than `burst` never fit.
    """

    def __init__(self, redis: aioredis.Redis, key: str, rate_per_s: float, burst: float,
                 clock: Callable[[], float] | None = None) -> None:
        """`clock` (tests only) replaces Redis's clock in the script."""
        self.key = key
        self.rate = rate_per_s
        self.burst = burst
        self._script = redis.register_script(_RESERVE)
        self._interval_ms = 1000.0 / rate_per_s
        self._burst_ms = burst * self._interval_ms
        self._clock = clock

    async def reserve(self, n: int) -> tuple[bool, float]:
        now_arg = int(self._clock() * 1000) if self._clock else ""
        granted, wait_ms = await self._script(keys=[self.key], args=[now_arg, self._interval_ms, n, self._burst_ms])
        return int(granted) > 0, int(wait_ms) / 1000


class SharedRate:
    """`await acquire()` before each request; waits as long as the shared rate requires."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, scope: str, rate_per_s: float,
        clock: Callable[[], float] | None = None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`clock` (tests only) replaces Redis's clock in the script; the lapse of a reservation uses it too."""
        self.scope = scope
        self.rate = rate_per_s
        self._block = max(1, min(256, int(rate_per_s * BLOCK_S)))
        self._gcra = Gcra(redis, keys.provider_rate(scope), rate_per_s, self._block, clock)
        self._clock = clock or time.monotonic
        self._sleep = sleep
        self.waiting = 0  # deliveries of this process waiting for the rate now
        self._tokens = 0
        self._valid_until = 0.0
        self._lock = asyncio.Lock()
        self._waits = metrics.PROVIDER_RATE_WAITS.labels(scope)

    def take_now(self) -> bool:
        """Take a request from this process's reservation without waiting; False when it is spent."""
        if self._tokens > 0 and self._clock() < self._valid_until:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.take_now():
            return
        waited = False
        self.waiting += 1
        try:
            async with self._lock:  # one reservation in flight per process; the others wait for it
                while not self.take_now():
                    granted, wait_s = await self._gcra.reserve(self._block)
                    if granted:
                        self._tokens, self._valid_until = self._block, self._clock() + LAPSE_S
                        continue
                    waited = True
                    await self._sleep(min(MAX_SLEEP_S, max(0.001, wait_s)))
        finally:
            self.waiting -= 1
        if waited:
            self._waits.inc()


def rates_for(redis: aioredis.Redis, keys: Keys, rates: tuple[tuple[str, float], ...]) -> dict[str, SharedRate]:
    """`[policy.provider_rates]` as limiters keyed by scope ("fcm" or "fcm:<app>")."""
    return {scope: SharedRate(redis, keys, scope, rate) for scope, rate in rates if rate > 0 and math.isfinite(rate)}
