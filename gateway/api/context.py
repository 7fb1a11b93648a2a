"""Where handlers find their state: the app's shared objects and the request's authenticated client."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from ...automations.engine import Engine
from ...core.config import ApiClient, Settings
from ..intake import Intake

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
CLIENT: web.RequestKey[ApiClient] = web.RequestKey("client", ApiClient)
INTAKE: web.AppKey[Intake] = web.AppKey("intake", Intake)
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis", aioredis.Redis)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
