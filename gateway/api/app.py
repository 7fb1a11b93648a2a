"""The application (middlewares and every route) and the API process (serve until a signal)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...automations.engine import Engine
from ...campaigns.fanout import CampaignError
from ...core import metrics
from ...core.config import ConfigError, Settings
from ...core.logs import setup_logging
from ...core.schema import MessageInvalid
from ..intake import Intake
from ..pool import make_redis
from . import automation_routes, campaign_routes, probes, routes, status_routes
from .auth import Authenticator, Handler, auth_middleware
from .context import CLIENT, ENGINE, INTAKE, REDIS, SETTINGS
from .errors import SERVER_NAME, ApiError, invalid_message
from .server import run_until_signal, start_api

log = logging.getLogger("pushgw.api")


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except ApiError as e:
        response = e.response()
    except MessageInvalid as e:  # every route: a validation error is a 422 naming the fields
        response = invalid_message(e).response()
    except CampaignError as e:  # a campaign that does not exist (404) or cannot launch now (409)
        response = ApiError(e.status, e.code, str(e)).response()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].api.max_body_bytes
        response = ApiError(413, "body_too_large", f"request body is larger than {limit} bytes").response()
    except web.HTTPException as e:  # 404/405 from routing
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        response = ApiError(e.status, code, e.reason, headers=allow).response()
    except (RedisConnectionError, RedisTimeoutError, OSError):
        log.warning("redis unavailable", extra={"path": _route_name(request)})
        response = ApiError(503, "unavailable", "the queue is unavailable; retry later",
                            headers={"Retry-After": "1"}).response()
    except Exception:
        log.exception("unexpected error", extra={"path": _route_name(request)})
        response = ApiError(500, "internal", "internal error").response()
    metrics.API_REQUESTS.labels(_route_name(request), str(response.status)).inc()
    if response.status >= 500 or log.isEnabledFor(logging.DEBUG):
        client = request.get(CLIENT)
        log.log(logging.WARNING if response.status >= 500 else logging.DEBUG, "request",
                extra={"path": _route_name(request), "status": response.status,
                       "client": client.name if client else None, "count": round((time.perf_counter() - started) * 1000, 2)})
    return response


# The routes whose data is sharded on Redis Cluster (queue/shards.py) or kept in the home of global records
# (queue/sharded.py `home_keys`); the automations' routes still use one Redis's keys and answer 501 naming the route
# (and POST /v1/events with learning events in it, campaign_routes.py).
CLUSTER_READY_ROUTES = frozenset({
    "/v1/messages", "/v1/messages/batch", "/v1/users/{user}/devices", "/v1/users/{user}/devices/{key}",
    "/v1/users/{user}/preferences", "/healthz", "/readyz", "/metrics", "/openapi.yaml",
    "/v1/deadletters", "/v1/deadletters/replay", "/v1/events/invalid-tokens",
    "/v1/users/{user}/attributes", "/v1/attributes/batch", "/v1/audiences/count",
    "/v1/templates", "/v1/templates/{name}", "/v1/templates/{name}/render",
    "/v1/messages/{id}", "/v1/users/{user}/messages",
    "/v1/campaigns", "/v1/campaigns/{id}", "/v1/campaigns/{id}/launch", "/v1/campaigns/{id}/status",
    "/v1/campaigns/{id}/report", "/v1/campaigns/{id}/report.png", "/v1/events",
})


@web.middleware
async def _cluster_ready(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = _route_name(request)
    if route != "unmatched" and route not in CLUSTER_READY_ROUTES:
        raise ApiError(501, "not_in_cluster_mode", f"{route} does not work on Redis Cluster yet")
    return await handler(request)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME


def create_app(settings: Settings, redis: aioredis.Redis) -> web.Application:
    """The aiohttp application; the caller owns `redis`. Refuses to build without API clients."""
    if not settings.api.clients:
        raise ConfigError("the HTTP API needs at least one client: set PUSHGW_API_TOKEN or add [[api.clients]]")
    intake = Intake(redis, settings, source="api")
    auth = Authenticator(settings.api.clients, redis, intake.keys)
    middlewares = [_errors, auth_middleware(auth)] + ([_cluster_ready] if settings.redis.cluster else [])
    app = web.Application(middlewares=middlewares, client_max_size=settings.api.max_body_bytes)
    app[SETTINGS] = settings
    app[REDIS] = redis
    app[INTAKE] = intake
    app[ENGINE] = Engine(redis, settings)
    app.on_response_prepare.append(_server_header)
    routes.add_routes(app, auth)
    campaign_routes.add_routes(app, auth)
    automation_routes.add_routes(app, auth)
    status_routes.add_routes(app, auth)
    probes.add_routes(app)
    return app


async def serve_api(settings: Settings, redis_url: str, supervise: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; `supervise` (the worker pool's) is called every second meanwhile."""
    setup_logging(settings.log_level)
    redis = make_redis(redis_url, max_connections=128, timeout_s=5.0)
    server = await start_api(create_app(settings, redis), settings.api)
    log.info("api listening", extra={"address": f"{settings.api.host}:{settings.api.port}",
                                     "count": len(settings.api.clients)})
    try:
        await run_until_signal(supervise, 1.0)
    finally:
        log.info("api stopping")
        await server.close()
        await redis.aclose()
