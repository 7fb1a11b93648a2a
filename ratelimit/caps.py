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

from ..core import metrics
from ..core.config import PolicySettings
from ..core.schema import Message
from ..queue.keys import Keys
from .base import ADMIT, Decision, Defer, Drop

# KEYS: per message, its cap key and its burst key (ignored when the rule's limit is 0: then cap_key or burst_key is '').
# ARGV: now_ms, burst_limit, burst_period_ms, then per message: member id, cap limit, cap period ms.
# Returns per message: 0 admitted, else the ms time the blocking rule frees a slot, negated when
# the blocking rule is the burst limit (so the caller knows which rule said no).
# Each key is read (its time, trimmed, counted) once per batch and expired once at the end: a
# learner with many messages in one batch costs one ZADD per message, not a round of six calls.
_DECIDE = """
local now = tonumber(ARGV[1])
local burst_limit, burst_period = tonumber(ARGV[2]), tonumber(ARGV[3])
local out, seen = {}, {}
local key_t, key_n, key_ttl = {}, {}, {}
-- A worker whose clock lags behind another's must not see an emptier window than the later one
-- saw: each key's time only moves forward (the newest score in it is a floor for "now").
local function open(key, period)
  if key_t[key] then return end
  local t = now
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if newest[2] and tonumber(newest[2]) > now then t = tonumber(newest[2]) end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', t - period)
  key_t[key], key_n[key] = t, redis.call('ZCARD', key)
end
local function check(key, limit, period, id)
  if key == '' or limit <= 0 then return 0 end
  open(key, period)
  local n = key_n[key]
  if n < limit then return 0 end
  if redis.call('ZSCORE', key, id) then return 0 end
  local oldest = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
  return tonumber(oldest[2]) + period
end
local function add(key, period, id)
  if key == '' then return end
  local t = key_t[key]
  key_n[key] = key_n[key] + redis.call('ZADD', key, 'NX', t, id)
  key_ttl[key] = period + math.max(0, t - now) + 1000
end
for i = 1, #KEYS / 2 do
  local base = 4 + (i - 1) * 3
  local id = ARGV[base]
  if seen[id] then id = id .. '#' .. i end  -- the same message twice in one batch: the second is new
  seen[id] = true
  local cap_key, burst_key = KEYS[2 * i - 1], KEYS[2 * i]
  local cap_limit, cap_period = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  if burst_limit <= 0 then burst_key = '' end
  if cap_limit <= 0 then cap_key = '' end
  local cap_until = check(cap_key, cap_limit, cap_period, id)
  local burst_until = check(burst_key, burst_limit, burst_period, id)
  if cap_until == 0 and burst_until == 0 then
    add(cap_key, cap_period, id)
    add(burst_key, burst_period, id)
    out[i] = 0
  elseif cap_until >= burst_until then
    out[i] = cap_until
  else
    out[i] = -burst_until
  end
end
for key, ttl in pairs(key_ttl) do redis.call('PEXPIRE', key, ttl) end
return out
"""


class FrequencyCaps:
    """The `Limiter` for `[policy]`: category caps plus a per-user burst limit (see module docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, policy: PolicySettings) -> None:
        self._keys = keys
        self._policy = policy
        self._categories = policy.labelled_categories()
        self._caps = {c.category: c for c in policy.caps}
        self._script = redis.register_script(_DECIDE)
        self._burst_ms = int(policy.user_period_s * 1000)
        self._period_ms = {c.category: int(c.period_s * 1000) for c in policy.caps}

    async def decide(
        self, messages: Sequence[Message], now: float, members: Sequence[str] | None = None,
        first_read: Sequence[bool] | None = None,
    ) -> list[Decision]:
        out: list[Decision] = [ADMIT] * len(messages)
        keys: list[str] = []
        args: list[Any] = [int(now * 1000), self._policy.user_limit, self._burst_ms]
        index: list[int] = []
        burst_on = self._policy.user_limit > 0
        for i, m in enumerate(messages):
            if m.user is None or m.resolved or (first_read is not None and not first_read[i]):
                continue  # device-targeted sends, retries of admitted messages and re-reads are not limited
            cap = self._caps.get(m.category)
            if cap is None and not burst_on:
                continue
            # A rule that does not apply gets the other rule's key, which the script ignores (its limit is 0): every
            # key of the call is the user's, on one Redis Cluster slot (queue/shards.py), never a "" of its own.
            keys.append(self._keys.cap(m.user, m.category) if cap else self._keys.burst(m.user))
            keys.append(self._keys.burst(m.user) if burst_on else self._keys.cap(m.user, m.category))
            member = members[i] if members is not None else m.id
            args += [member, cap.limit, self._period_ms[m.category]] if cap else [member, 0, 0]
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
                metrics.POLICY.labels(metrics.category_label(m.category, self._categories), "burst", "deferred").inc()
                continue
            cap = self._caps[m.category]
            if cap.over == "drop":
                out[i] = Drop(f"cap_{m.category}")
                metrics.POLICY.labels(metrics.category_label(m.category, self._categories), "cap", "dropped").inc()
            else:
                out[i] = Defer(until_ms / 1000, f"cap_{m.category}")
                metrics.POLICY.labels(metrics.category_label(m.category, self._categories), "cap", "deferred").inc()
        return out
