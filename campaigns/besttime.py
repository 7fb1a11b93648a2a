"""Best send time per learner: the local hour at which the learner opens pushes most, inside the send windows.

Learned from the learner's own `opened` events (`POST /v1/events`): each open adds a weight to the hour of
the learner's local day it happened in (their stored time zone, else the policy's). Old opens count less:
an open at time t weighs 2^((t - EPOCH) / HALF_LIFE_S), so each hour's sum is the decayed count scaled by one
common factor: comparing hours needs no rewrite of old counts (one HINCRBYFLOAT per open), and
sum / weight(now) is the decayed count itself (an open HALF_LIFE_S ago counts 1/2).

The chosen hour is the heaviest one among the hours the category's send windows allow, when the learner
has at least MIN_OPENS decayed opens; else their cohort's (every learner of the cohort's opens, the same
way); else the start of the next window (or now, with no windows). The message then goes at that hour
within the next 24 h, plus a jitter of up to JITTER_S taken from a hash of the message id (a crowd of
learners with the same hour is spread, and a message always gets the same time).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis

from ..core.config import PolicySettings
from ..core.windows import SendWindows, WindowError, zone
from ..queue.keys import Keys
from .audiences import NO_ATTRIBUTES, Attributes, ShardedAttributes, UserAttributes
from .experiments import next_local

EPOCH = 1_767_225_600  # 2026-01-01T00:00Z: weights stay far inside a float for decades
HALF_LIFE_S = 14 * 86400
MIN_OPENS = 3.0  # decayed opens before a learner's (or cohort's) own hour is trusted
JITTER_S = 1800  # inside the chosen hour
OPENS_TTL_S = 180 * 86400


def weight(at: float) -> float:
    return float(2.0 ** ((at - EPOCH) / HALF_LIFE_S))


@dataclass(frozen=True, slots=True)
class BestTime:
    """Where the time came from (`learner`, `cohort`, `window`, `now`), the local hour and the unix time."""

    source: str
    hour: int | None
    at: float


def best_hour(counts: Mapping[int, float], allowed: Sequence[int], now: float) -> int | None:
    """The heaviest allowed hour, if the decayed opens in allowed hours reach MIN_OPENS (ties: the earliest)."""
    scale = weight(now)
    usable = {h: counts.get(h, 0.0) / scale for h in allowed}
    if sum(usable.values()) < MIN_OPENS:
        return None
    return max(sorted(usable), key=lambda h: usable[h])


def allowed_hours(windows: SendWindows) -> list[int]:
    """Hours whose start is inside a window (every hour without windows)."""
    if not windows.windows:
        return list(range(24))
    return [h for h in range(24) if any(w.contains(h * 60) for w in windows.windows)]


def _counts(raw: Mapping[bytes, bytes]) -> dict[int, float]:
    return {int(k): float(v) for k, v in raw.items()}


class BestTimes:
    def __init__(self, redis: aioredis.Redis, keys: Keys, policy: PolicySettings,
                 attrs: UserAttributes | ShardedAttributes | None = None) -> None:
        """`attrs`: where learners' attributes are read (on Redis Cluster each learner's shard); `keys`' by default."""
        self.redis = redis
        self.keys = keys
        self.policy = policy
        self.attrs = attrs or UserAttributes(redis, keys)

    def _zone(self, a: Attributes) -> ZoneInfo:
        try:
            return zone(a.timezone or self.policy.timezone)
        except WindowError:
            return zone(self.policy.timezone)

    async def record_opens(self, opens: Sequence[tuple[str, float]], now: float,
                           learners: Mapping[str, Attributes] | None = None) -> None:
        """Add (learner, unix time) opens to the learners' and their cohorts' hours: one pipeline. Only learners the
        gateway knows (stored attributes or preferences) learn: an app event cannot grow Redis with made-up users."""
        opens = [(u, at) for u, at in opens if now - OPENS_TTL_S <= at <= now + 300]  # an open from another era: no
        users = sorted({u for u, _ in opens})
        if not users:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.exists(self.attrs.user_key(u))
            known = {u for u, found in zip(users, await pipe.execute(), strict=True) if found}
        opens = [(u, at) for u, at in opens if u in known]
        if not opens:
            return
        if learners is None:
            learners = await self.attrs.get_many(sorted(known))
        async with self.redis.pipeline(transaction=False) as pipe:
            for user, at in opens:
                a = learners.get(user, NO_ATTRIBUTES)
                hour = datetime.fromtimestamp(at, self._zone(a)).hour
                w = weight(at)
                pipe.hincrbyfloat(self.keys.opens(user), str(hour), w)
                pipe.expire(self.keys.opens(user), OPENS_TTL_S)
                if a.cohort:
                    pipe.hincrbyfloat(self.keys.cohort_opens(a.cohort), str(hour), w)
                    pipe.expire(self.keys.cohort_opens(a.cohort), OPENS_TTL_S)
            await pipe.execute()

    async def send_times(self, wanted: Sequence[tuple[str, str, str]], now: float,
                         learners: Mapping[str, Attributes] | None = None) -> list[BestTime]:
        """For each (learner, category, message id): when to send it. Two round trips for any number of messages."""
        if not wanted:
            return []
        if learners is None:
            learners = await self.attrs.get_many(sorted({u for u, _, _ in wanted}))
        cohorts = sorted({c for u, _, _ in wanted if (c := learners.get(u, NO_ATTRIBUTES).cohort)})
        async with self.redis.pipeline(transaction=False) as pipe:
            for u, _, _ in wanted:
                pipe.hgetall(self.keys.opens(u))
            for c in cohorts:
                pipe.hgetall(self.keys.cohort_opens(c))
            replies = await pipe.execute()
        own = replies[:len(wanted)]
        by_cohort = {c: _counts(r) for c, r in zip(cohorts, replies[len(wanted):], strict=True)}
        out: list[BestTime] = []
        for (user, category, mid), raw in zip(wanted, own, strict=True):
            a = learners.get(user, NO_ATTRIBUTES)
            tz = self._zone(a)
            windows = SendWindows.parse(self.policy.windows_for(category))
            hours = allowed_hours(windows)
            source, hour = "learner", best_hour(_counts(raw), hours, now)
            if hour is None and a.cohort:
                source, hour = "cohort", best_hour(by_cohort.get(a.cohort, {}), hours, now)
            jitter = zlib.crc32(mid.encode()) / 0xFFFFFFFF * JITTER_S
            if hour is not None:
                out.append(BestTime(source, hour, next_local(now, f"{hour:02d}:00", tz) + jitter))
            elif windows.windows:
                start, _ = windows.next_open(now, tz)
                out.append(BestTime("window", None, start + (jitter if start > now else 0.0)))
            else:
                out.append(BestTime("now", None, now))
        return out
