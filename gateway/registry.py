"""The device registry: which devices a user has, so a message to a user reaches all of them.

One Redis hash per user (device key -> device JSON): registering the same device twice is a
no-op, removal by key is O(1), and the worker resolves the users of a whole batch in one
pipelined round trip (`devices_many`). Invalid tokens reported by a provider are removed by the
worker's commit (see `queue.streams.StreamQueue.commit`), in the same transaction as the ack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from pushgw.gateway.schema import Device, FieldError, parse_device
from pushgw.queue.keys import Keys

MAX_DEVICES_PER_USER = 100


class RegistryFull(ValueError):
    """A user already has the maximum number of devices."""


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

    async def register(self, user: str, device: Device) -> None:
        """Add (or refresh) a device for `user`."""
        key = self.keys.devices(user)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hexists(key, device.key)
            pipe.hlen(key)
            exists, count = await pipe.execute()
        if not exists and int(count) >= MAX_DEVICES_PER_USER:
            raise RegistryFull(f"user already has {MAX_DEVICES_PER_USER} devices; remove one first")
        await self.redis.hset(key, device.key, orjson.dumps(device.to_json()))

    async def unregister(self, user: str, key: str) -> bool:
        return bool(await self.redis.hdel(self.keys.devices(user), key))

    async def devices(self, user: str) -> list[Device]:
        return (await self.devices_many([user])).get(user, [])

    async def devices_many(self, users: Sequence[str] | Iterable[str]) -> dict[str, list[Device]]:
        """Devices of many users in one round trip (the worker calls this once per batch)."""
        users = list(users)
        if not users:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.hvals(self.keys.devices(u))
            replies = await pipe.execute()
        out: dict[str, list[Device]] = {}
        for u, vals in zip(users, replies, strict=True):
            devs = [d for d in (_device(v) for v in vals) if d is not None]
            if devs:
                out[u] = devs
        return out

    async def invalid_token_events(self, count: int = 100, after: str = "-") -> list[dict[str, Any]]:
        """Invalid-token events (newest last) for upstream services that keep their own device lists."""
        items: Any = await self.redis.xrange(self.keys.invalid_tokens, min=after, max="+", count=count)
        return [{"id": _s(i)} | {_s(k): _s(v) for k, v in f.items()} for i, f in items]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
