"""The delivery policy for messages to a user, decided once per batch, in this order:

1. **opt-out**: the user opted out of the category, or of everything (except `opt_out_exempt`
   categories) → dropped, counted as rule `opt_out`;
2. **send window**: outside the user's local window for the category → deferred to the next
   window start plus a per-message jitter (rule `window`); priority "high" skips this step when
   `high_bypasses_windows` is set. (A deferral past the message's expiry is a drop, rule
   `expired`: the worker checks that for every rule);
3. **frequency caps** and the burst limit (ratelimit/caps.py): one Lua call for what is left.

The window comes before the caps, so a message held for the morning does not use up a slot in
the evening. Preferences come from one pipelined read for the batch's users (users/profiles.py).
Device-targeted messages (no user) pass untouched. Retries of an admitted message, dead-letter
replays and entries read again after a crash meet the opt-out check only (they were decided once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis

from ..core import metrics
from ..core.config import PolicySettings
from ..core.schema import Message
from ..core.windows import SendWindows, WindowError, jitter_for, zone
from ..queue.keys import Keys
from ..users.profiles import NO_PREFERENCES, Preferences, Profiles
from .base import ADMIT, Decision, Defer, Drop
from .caps import FrequencyCaps


class DeliveryPolicy:
    """The `Limiter` the workers use when `[policy] enabled` (the default)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, policy: PolicySettings) -> None:
        self._policy = policy
        self._categories = policy.labelled_categories()
        self._profiles = Profiles(redis, keys)
        self.keys = keys  # whose user hashes hold the preferences
        self._default_windows = SendWindows.parse(policy.windows)
        self._category_windows = {c: SendWindows.parse(w) for c, w in policy.category_windows}
        self._default_zone = zone(policy.timezone)
        self._exempt = frozenset(policy.opt_out_exempt)
        self._caps = FrequencyCaps(redis, keys, policy) if (policy.caps or policy.user_limit) else None
        self._next_cache: dict[tuple[str, str], tuple[float, float, float]] = {}

    def _zone(self, name: str | None) -> ZoneInfo:
        if not name:
            return self._default_zone
        try:
            return zone(name)
        except WindowError:  # validated when stored; a zone the tz database no longer has
            return self._default_zone

    def _next_open(self, category: str, windows: SendWindows, tz: ZoneInfo, now: float) -> tuple[float, float]:
        """`windows.next_open`, remembered per (category, zone) until that window starts: a campaign deferred
        at night asks the same question, an expensive zoneinfo computation, for every learner of a zone.
        An answer computed at t stays right for any later now before its start."""
        key = (category, tz.key)
        hit = self._next_cache.get(key)
        if hit is not None and hit[0] <= now < hit[1]:
            return hit[1], hit[2]
        start, end = windows.next_open(now, tz)
        if len(self._next_cache) >= 4096:
            self._next_cache.clear()
        self._next_cache[key] = (now, start, end)
        return start, end

    def _windows(self, category: str) -> SendWindows:
        return self._category_windows.get(category, self._default_windows)

    def users(self, messages: Sequence[Message]) -> list[str]:
        """The users whose preferences `decide` reads for these messages."""
        return sorted({m.user for m in messages if m.user is not None})

    async def decide(
        self, messages: Sequence[Message], now: float, members: Sequence[str] | None = None,
        first_read: Sequence[bool] | None = None, prefs: Mapping[str, Preferences] | None = None,
    ) -> list[Decision]:
        """As `Limiter.decide`; `prefs`: the preferences of `users(messages)` read by the caller (the worker
        reads them with the batch's devices, users/registry.py `devices_and_preferences`), else read here."""
        out: list[Decision] = [ADMIT] * len(messages)
        if prefs is None:
            users = self.users(messages)
            if not users:
                return out
            prefs = await self._profiles.get_many(users)
        to_cap: list[int] = []
        for i, m in enumerate(messages):
            if m.user is None:
                continue
            p = prefs.get(m.user, NO_PREFERENCES)
            if p.opted_out(m.category, self._exempt):  # on every read, retries and replays included
                out[i] = Drop("opted_out")
                metrics.POLICY.labels(metrics.category_label(m.category, self._categories), "opt_out", "dropped").inc()
                continue
            if m.resolved or (first_read is not None and not first_read[i]):
                continue  # windows and caps decided this message on its first read
            windows = self._windows(m.category)
            if windows.windows and not (m.priority == "high" and self._policy.high_bypasses_windows):
                tz = self._zone(p.timezone)
                if not windows.open_at(now, tz):
                    start, end = self._next_open(m.category, windows, tz, now)
                    member = members[i] if members is not None else m.id
                    out[i] = Defer(jitter_for(member, start, end, self._policy.window_jitter_s), "window")
                    metrics.POLICY.labels(metrics.category_label(m.category, self._categories), "window", "deferred").inc()
                    continue
            to_cap.append(i)
        if self._caps is not None and to_cap:
            capped = await self._caps.decide(
                [messages[i] for i in to_cap], now,
                members=[members[i] for i in to_cap] if members is not None else None,
            )
            for i, decision in zip(to_cap, capped, strict=True):
                out[i] = decision
        return out
