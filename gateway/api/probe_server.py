"""The worker host's own HTTP listener (`pushgw worker` with `worker.metrics_port`): `/healthz`, `/readyz`
(Redis answers) and `/metrics` summed over the host's worker processes, with no API route and the same
connection limits as the API (`server.py`). Without it a scraper would see no worker's metrics and an
orchestrator could not ask a worker container whether it reaches Redis."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from aiohttp import web

from ...core.config import Settings
from ..pool import make_redis
from . import probes
from .context import REDIS
from .server import run_until_signal, start_api

log = logging.getLogger("pushgw.probes")

SUPERVISE_EVERY_S = 0.5  # how often the pool's dead workers are looked for (as the plain `pushgw worker` loop)


def create_probe_app(redis: aioredis.Redis) -> web.Application:
    """The probe routes alone; no route reads a body, so bodies are refused past 1 KiB."""
    app = web.Application(client_max_size=1024)
    app[REDIS] = redis
    probes.add_routes(app)
    return app


async def serve_probes(settings: Settings, redis_url: str, port: int, supervise: Callable[[], None]) -> None:
    """Serve the probes on api.host:`port` until SIGTERM/SIGINT, calling `supervise` meanwhile."""
    redis = make_redis(redis_url, max_connections=4, timeout_s=1.0)
    server = await start_api(create_probe_app(redis), settings.api, port=port)
    log.info("worker probes listening", extra={"address": f"{settings.api.host}:{port}"})
    try:
        await run_until_signal(supervise, SUPERVISE_EVERY_S)
    finally:
        await server.close()
        await redis.aclose()
