"""The device registry: which devices a user has, so a message to a user reaches all of them.

One Redis hash per user (device key -> device JSON): registering the same device twice is a
no-op, removal by key is O(1), and the worker resolves the users of a whole batch in one
round trip (`devices_many`, one Lua call). Invalid tokens reported by a provider are removed by the
worker's commit (see `queue.streams.StreamQueue.commit`), in the same transaction as the ack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from ..core.schema import Device, FieldError, parse_device
from ..queue.keys import Keys
from ..queue.sharded import read_shards_in_turn, sharded_id
from .profiles import Preferences, preferences_of

MAX_DEVICES_PER_USER = 100
PARSED_CACHE_SIZE = 8192  # parsed devices kept per process by their stored JSON (about 600 bytes each)


# KEYS: the users' device hashes -> one HVALS reply per key. One command for a whole batch: the client
# packs and parses one command, not one per user (docs/decisions.md).
_HVALS_MANY = "local out = {} for i = 1, #KEYS do out[i] = redis.call('HVALS', KEYS[i]) end return out"


# KEYS: ARGV[1] user hashes (their preferences), then device hashes -> HMGET tz opt_out per user hash, then HVALS
# per device hash: the policy's and the registry's reads of a batch in one command (`devices_and_preferences`).
_PREFS_AND_DEVICES = """
local out, n = {}, tonumber(ARGV[1])
for i = 1, n do out[i] = redis.call('HMGET', KEYS[i], 'tz', 'opt_out') end
for i = n + 1, #KEYS do out[i] = redis.call('HVALS', KEYS[i]) end
return out
"""


# KEYS[1]: the user's device hash; ARGV: device key, device JSON, the cap. The check and the write in one
# script, so concurrent registrations cannot all see room and together pass the cap. 1: stored, 0: full.
_REGISTER = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class BatchUsers:
    """What a batch needs to know about its users, read in one round trip."""

    preferences: dict[str, Preferences]  # users with preferences stored (the policy's `prefs`)
    devices: dict[str, list[Device]]  # users with at least one device


class RegistryFull(ValueError):
    """A user already has the maximum number of devices."""


_UNPARSED: Any = object()


def _device(raw: bytes | str) -> Device | None:
    errors: list[FieldError] = []
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return parse_device(obj, "device", errors, None)


class DeviceRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._hvals_many = redis.register_script(_HVALS_MANY)
        self._prefs_and_devices = redis.register_script(_PREFS_AND_DEVICES)
        self._register = redis.register_script(_REGISTER)
        # Stored JSON -> parsed device. Keyed by content, so never stale: an active learner's devices are
        # parsed once, not on every message. Emptied when full.
        self._parsed: dict[bytes | str, Device | None] = {}

    async def register(self, user: str, device: Device) -> None:
        """Add (or refresh) a device for `user`; `RegistryFull` when the user has MAX_DEVICES_PER_USER others."""
        stored = await self._register(keys=[self.keys.devices(user)],
                                      args=[device.key, orjson.dumps(device.to_json()), MAX_DEVICES_PER_USER])
        if not stored:
            raise RegistryFull(f"user already has {MAX_DEVICES_PER_USER} devices; remove one first")

    async def unregister(self, user: str, key: str) -> bool:
        return bool(await self.redis.hdel(self.keys.devices(user), key))

    async def devices(self, user: str) -> list[Device]:
        return (await self.devices_many([user])).get(user, [])

    async def devices_many(self, users: Sequence[str] | Iterable[str]) -> dict[str, list[Device]]:
        """Devices of many users in one round trip (the worker calls this once per batch)."""
        users = list(users)
        if not users:
            return {}
        replies = await self._hvals_many(keys=[self.keys.devices(u) for u in users])
        return self._devices_of(users, replies)

    async def devices_and_preferences(self, users: Sequence[str], pref_users: Sequence[str]) -> BatchUsers:
        """The devices of `users` and the preferences (users/profiles.py) of `pref_users`, in one round trip:
        the worker's reads for a batch when the policy (ratelimit/policy.py) is on, instead of one each."""
        if not users and not pref_users:
            return BatchUsers({}, {})
        k = self.keys
        replies = await self._prefs_and_devices(keys=[*(k.user(u) for u in pref_users), *(k.devices(u) for u in users)],
                                                args=[len(pref_users)])
        n = len(pref_users)
        return BatchUsers(preferences_of(pref_users, replies[:n]), self._devices_of(users, replies[n:]))

    def _devices_of(self, users: Sequence[str], replies: Sequence[Any]) -> dict[str, list[Device]]:
        out: dict[str, list[Device]] = {}
        parsed = self._parsed
        for u, vals in zip(users, replies, strict=True):
            devs: list[Device] = []
            for v in vals:
                d = parsed.get(v, _UNPARSED)
                if d is _UNPARSED:
                    d = _device(v)
                    if len(parsed) >= PARSED_CACHE_SIZE:
                        parsed.clear()
                    parsed[v] = d
                if d is not None:
                    devs.append(d)
            if devs:
                out[u] = devs
        return out

    async def invalid_token_events(self, count: int = 100, after: str = "-") -> list[dict[str, Any]]:
        """Invalid-token events (newest last) for upstream services that keep their own device lists."""
        items: Any = await self.redis.xrange(self.keys.invalid_tokens, min=after, max="+", count=count)
        return [{"id": _s(i)} | {_s(k): _s(v) for k, v in f.items()} for i, f in items]


async def invalid_token_events(registries: Sequence[DeviceRegistry], count: int = 100,
                               after: str = "-") -> list[dict[str, Any]]:
    """Invalid-token events of every shard (each shard's workers write their own stream, queue/shards.py): with one
    Redis, its stream's ids; on Redis Cluster shard after shard, ids `<shard>/<stream id>` (`after` resumes there)."""
    if len(registries) == 1:
        return await registries[0].invalid_token_events(count, after)
    found = await read_shards_in_turn(len(registries), count, after,
                                      lambda n, c, s: registries[n].invalid_token_events(c, s))
    return [e | {"id": sharded_id(n, e["id"])} for n, e in found]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
