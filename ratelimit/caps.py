"""Per-user frequency caps, exact over any sliding window, shared by every worker on every host.

Rules: a cap per category ("2 reminders per 7 days") and one burst limit per user across all
categories ("3 per minute"). Each (user, rule) keeps a Redis sorted set of the message ids it
admitted, scored by time; a message is admitted only if every rule that applies has fewer than
`limit` entries in (now - period, now]. So no window, wherever it starts, ever holds more than
`limit` messages: unlike fixed windows (2x the limit across a boundary) or GCRA (a burst plus the
rate inside one period). The sets hold at most `limit` recent members, so memory per user is tiny.

The whole batch is decided in one Lua call, in batch order, so messages to the same user in one
batch count against each other, and two workers never both take the last slot. Redis runs the
calls one at a time, and each key's time only moves forward (a worker whose clock lags sees the
window the latest caller saw), so the guarantee holds for any interleaving of workers. The member is
the message id with its enqueue time: a message deferred and read again is the same member, a new
enqueue of the same id is not. The worker asks only on an entry's first read.

Over a cap, the category's action applies: "defer" (back to the queue until the oldest entry
leaves the window) or "drop" (counted, with the reason). The burst limit always defers. Retries of
an admitted message (`resolved`) are not limited again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from pushgw.gateway import metrics
from pushgw.gateway.config import PolicySettings
from pushgw.gateway.schema import Message
from pushgw.queue.keys import Keys
from pushgw.ratelimit.base import ADMIT, Decision, Defer, Drop

# KEYS: per message, its cap key and its burst key ("" when the rule does not apply).
# ARGV: now_ms, then per message: id, cap_limit, cap_period_ms, burst_limit, burst_period_ms.
# Returns per message: 0 admitted, else the ms time the blocking rule frees a slot, negated when
# the blocking rule is the burst limit (so the caller knows which rule said no).
_DECIDE = """
local now = tonumber(ARGV[1])
local out = {}
local seen = {}
-- A worker whose clock lags behind another's must not see an emptier window than the later one
-- saw: each key's time only moves forward (the newest score in it is a floor for "now").
local function key_now(key)
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if newest[2] and tonumber(newest[2]) > now then return tonumber(newest[2]) end
  return now
end
local function check(key, limit, period, id, t)
  if key == '' or limit <= 0 then return 0 end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', t - period)
  if redis.call('ZSCORE', key, id) then return 0 end
  local n = redis.call('ZCARD', key)
  if n < limit then return 0 end
  local oldest = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
  return tonumber(oldest[2]) + period
end
for i = 1, #KEYS / 2 do
  local base = 1 + (i - 1) * 5
  local id = ARGV[base + 1]
  local cap_key, burst_key = KEYS[2 * i - 1], KEYS[2 * i]
  local cap_limit, cap_period = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local burst_limit, burst_period = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  local cap_on = cap_key ~= '' and cap_limit > 0
  local burst_on = burst_key ~= '' and burst_limit > 0
  local cap_t = cap_on and key_now(cap_key) or now
  local burst_t = burst_on and key_now(burst_key) or now
  local cap_until, burst_until
  if seen[id] then
    -- the same message twice in one batch: the second is new to the caps, not already counted
    cap_until = check(cap_key, cap_limit, cap_period, id .. '#' .. i, cap_t)
    burst_until = check(burst_key, burst_limit, burst_period, id .. '#' .. i, burst_t)
    id = id .. '#' .. i
  else
    cap_until = check(cap_key, cap_limit, cap_period, id, cap_t)
    burst_until = check(burst_key, burst_limit, burst_period, id, burst_t)
  end
  seen[id] = true
  if cap_until == 0 and burst_until == 0 then
    if cap_on then
      redis.call('ZADD', cap_key, 'NX', cap_t, id)
      redis.call('PEXPIRE', cap_key, cap_period + math.max(0, cap_t - now) + 1000)
    end
    if burst_on then
      redis.call('ZADD', burst_key, 'NX', burst_t, id)
      redis.call('PEXPIRE', burst_key, burst_period + math.max(0, burst_t - now) + 1000)
    end
    out[i] = 0
  elseif cap_until >= burst_until then
    out[i] = cap_until
  else
    out[i] = -burst_until
  end
end
return out
"""


class FrequencyCaps:
    """The `Limiter` for `[policy]`: category caps plus a per-user burst limit (see module docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, policy: PolicySettings) -> None:
        self._keys = keys
        self._policy = policy
        self._caps = {c.category: c for c in policy.caps}
        self._script = redis.register_script(_DECIDE)
        self._burst_ms = int(policy.user_period_s * 1000)

    async def decide(
        self, messages: Sequence[Message], now: float, members: Sequence[str] | None = None
    ) -> list[Decision]:
        out: list[Decision] = [ADMIT] * len(messages)
        keys: list[str] = []
        args: list[Any] = [int(now * 1000)]
        index: list[int] = []
        for i, m in enumerate(messages):
            if m.user is None or m.resolved:
                continue  # device-targeted sends and retries of admitted messages are not limited
            cap = self._caps.get(m.category)
            keys.append(self._keys.cap(m.user, m.category) if cap else "")
            keys.append(self._keys.burst(m.user) if self._policy.user_limit else "")
            args += [members[i] if members is not None else m.id, cap.limit if cap else 0, int(cap.period_s * 1000) if cap else 0,
                     self._policy.user_limit, self._burst_ms]
            index.append(i)
        if not index:
            return out
        replies = await self._script(keys=keys, args=args)
        for i, reply in zip(index, replies, strict=True):
            until_ms = int(reply)
            if until_ms == 0:
                continue
            m = messages[i]
            if until_ms < 0:
                out[i] = Defer(-until_ms / 1000, "burst")
                metrics.POLICY.labels(m.category, "burst", "deferred").inc()
                continue
            cap = self._caps[m.category]
            if cap.over == "drop":
                out[i] = Drop(f"cap_{m.category}")
                metrics.POLICY.labels(m.category, "cap", "dropped").inc()
            else:
                out[i] = Defer(until_ms / 1000, f"cap_{m.category}")
                metrics.POLICY.labels(m.category, "cap", "deferred").inc()
        return out
