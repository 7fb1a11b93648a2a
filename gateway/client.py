"""`PushClient`: enqueue straight into Redis from a Python service, without the HTTP hop.

Same validation, limits and idempotency as the API (both go through `gateway.intake.Intake`):

    client = PushClient.from_url("redis://localhost:6379/0", load_settings())
    await client.send({"id": "quiz-42-badge", "user": "learner-7", "title": "Badge earned", "category": "reward"})
    await client.aclose()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from pushgw.gateway.config import Settings
from pushgw.gateway.intake import Intake
from pushgw.gateway.profiles import Preferences, Profiles
from pushgw.gateway.schema import Device


class Unset:
    """Marks an argument that was not given (None has a meaning of its own: clear the value)."""


UNSET = Unset()


class PushClient:
    def __init__(self, redis: aioredis.Redis, settings: Settings, *, owns_redis: bool = False) -> None:
        self.redis = redis
        self._intake = Intake(redis, settings, source="client")
        self._profiles = Profiles(redis, self._intake.keys)
        self._owns = owns_redis

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> PushClient:
        return cls(aioredis.from_url(url), settings, owns_redis=True)

    async def send(self, message: dict[str, Any]) -> tuple[str, bool]:
        """Queue one message; (id, False) if that id was already accepted in the idempotency window."""
        return (await self._intake.submit([message]))[0]

    async def send_many(self, messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
        """Queue a batch, all or nothing: `MessageInvalid` lists every error and nothing is queued."""
        return await self._intake.submit(messages)

    async def register_device(self, user: str, device: dict[str, Any]) -> Device:
        return await self._intake.register_device(user, device)

    async def unregister_device(self, user: str, key: str) -> bool:
        return await self._intake.registry.unregister(user, key)

    async def devices(self, user: str) -> list[Device]:
        return await self._intake.registry.devices(user)

    async def set_preferences(
        self, user: str, *, timezone: str | Unset | None = UNSET, opt_out_all: bool | None = None,
        opt_out_categories: Sequence[str] | None = None,
    ) -> Preferences:
        """Change only the preferences named (like PATCH /v1/users/{user}/preferences); `timezone=None` clears it."""
        update: dict[str, Any] = {}
        if not isinstance(timezone, Unset):
            update["timezone"] = timezone
        opt_out: dict[str, Any] = {}
        if opt_out_all is not None:
            opt_out["all"] = opt_out_all
        if opt_out_categories is not None:
            opt_out["categories"] = list(opt_out_categories)
        if opt_out:
            update["opt_out"] = opt_out
        return await self._profiles.update(user, update)

    async def preferences(self, user: str) -> Preferences:
        return await self._profiles.get(user)

    async def aclose(self) -> None:
        if self._owns:
            await self.redis.aclose()
