"""Routes that need no token: liveness, readiness (Redis answers), Prometheus metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
from importlib import resources

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...core import metrics
from .context import REDIS
from .errors import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(1.0):
            await request.app[REDIS].ping()
    except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
        return json_response({"status": "unavailable", "redis": "down"}, 503)
    return json_response({"status": "ok", "redis": "up"})


async def prometheus(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    text = resources.files("pushgw.gateway").joinpath("openapi.yaml").read_text()  # package data of pushgw.gateway
    return web.Response(text=text, content_type="application/yaml")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/openapi.yaml", openapi)
