"""The HTTP API (aiohttp): enqueue messages, manage devices, inspect dead letters; documented in openapi.yaml.

Every route under /v1 needs `Authorization: Bearer <token>`; the token is compared in constant
time with every configured client's token (no early exit, so timing reveals nothing about which
or how many matched), and the client's scopes decide what it may do. Each client has its own
token bucket (messages per second, a batch of 100 costs 100), so one noisy upstream cannot
starve the others. Bodies are bounded before they are read. Every failure is a JSON error with a
stable `code`; a malformed body is a 4xx, a Redis outage a 503 with Retry-After, never a 500
with a trace. Tokens and message contents are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..campaigns.fanout import CampaignError
from ..core import metrics
from ..core.config import ApiClient, ConfigError, Settings
from ..core.schema import MessageInvalid
from ..queue.deadletter import DeadLetters
from ..users.profiles import Profiles
from ..users.registry import RegistryFull
from .intake import Intake

log = logging.getLogger("pushgw.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CLIENT: web.RequestKey[ApiClient] = web.RequestKey("client", ApiClient)
INTAKE: web.AppKey[Intake] = web.AppKey("intake", Intake)
PROFILES: web.AppKey[Profiles] = web.AppKey("profiles", Profiles)
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis", aioredis.Redis)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
_PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.yaml"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers

    def response(self) -> web.Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            error["fields"] = self.fields
        return _json({"error": error}, self.status, self.headers)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


class TokenBucket:
    """`rate` units per second, up to `burst` banked; `take(n)` says how long to wait if n are not there."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.clock = clock
        self.at = clock()

    def take(self, n: float) -> float:
        """0 when taken; else seconds until n are there; infinity when n exceeds the bucket."""
        if n > self.burst:
            return math.inf
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class Authenticator:
    def __init__(self, clients: tuple[ApiClient, ...]) -> None:
        self._clients = [(c, c.token.encode()) for c in clients]
        self._buckets = {
            c.name: TokenBucket(c.rate_per_s, c.burst or c.rate_per_s) for c in clients if c.rate_per_s > 0
        }

    def client(self, header: str | None) -> ApiClient:
        if not header or not header.startswith("Bearer "):
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>",
                           headers={"WWW-Authenticate": 'Bearer realm="pushgw"'})
        presented = header[7:].strip().encode("utf-8", "surrogateescape")  # a header may carry any bytes
        found: ApiClient | None = None
        for client, token in self._clients:  # compare with every token: constant time over the set
            if hmac.compare_digest(presented, token):
                found = client
        if found is None:
            raise ApiError(401, "unauthenticated", "unknown token",
                           headers={"WWW-Authenticate": 'Bearer realm="pushgw", error="invalid_token"'})
        return found

    def charge(self, client: ApiClient, units: int) -> None:
        bucket = self._buckets.get(client.name)
        if bucket is None:
            return
        wait = bucket.take(units)
        if wait == math.inf:
            raise ApiError(413, "batch_too_large",
                           f"{units} messages exceed client {client.name}'s burst of {bucket.burst:g}; send smaller batches")
        if wait > 0:
            raise ApiError(429, "rate_limited", f"client {client.name} is over its {client.rate_per_s:g}/s limit",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})


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
        response = _invalid(e).response()
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


def _auth(auth: Authenticator) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _PUBLIC:
            request[CLIENT] = auth.client(request.headers.get("Authorization"))
        return await handler(request)

    return middleware


def _need(request: web.Request, scope: str) -> ApiClient:
    client = request[CLIENT]
    if scope not in client.scopes:
        raise ApiError(403, "forbidden", f"client {client.name} lacks the {scope!r} scope")
    return client


async def _body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    raw = await request.read()
    if not raw:
        raise ApiError(400, "invalid_json", "the body is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def _invalid(e: MessageInvalid) -> ApiError:
    return ApiError(422, "invalid_message", str(e.errors[0]) if len(e.errors) == 1 else f"{len(e.errors)} errors",
                    fields=e.as_json())


class Routes:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def message(self, request: web.Request) -> web.Response:
        client = _need(request, "enqueue")
        body = await _body(request)
        self.auth.charge(client, 1)
        [(msg_id, queued)] = await request.app[INTAKE].submit([body])
        return _json({"id": msg_id, "status": "queued" if queued else "duplicate"}, 202)

    async def batch(self, request: web.Request) -> web.Response:
        client = _need(request, "enqueue")
        body = await _body(request)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ApiError(422, "invalid_message", "the body must be {\"messages\": [ ...at least one message ]}",
                           fields=[{"field": "messages", "message": "must be a non-empty list"}])
        if len(messages) > request.app[SETTINGS].api.max_batch:
            raise ApiError(413, "batch_too_large", f"at most {request.app[SETTINGS].api.max_batch} messages per batch")
        self.auth.charge(client, len(messages))
        results = await request.app[INTAKE].submit(messages)
        return _json({"results": [{"id": i, "status": "queued" if ok else "duplicate"} for i, ok in results],
                      "queued": sum(ok for _, ok in results)}, 202)

    async def put_device(self, request: web.Request) -> web.Response:
        client = _need(request, "devices")
        body = await _body(request)
        self.auth.charge(client, 1)
        try:
            device = await request.app[INTAKE].register_device(request.match_info["user"], body)
        except RegistryFull as e:
            raise ApiError(409, "too_many_devices", str(e)) from None
        return _json({"key": device.key, "device": device.to_json()}, 201)

    async def list_devices(self, request: web.Request) -> web.Response:
        client = _need(request, "devices")
        self.auth.charge(client, 1)
        devices = await request.app[INTAKE].registry.devices(request.match_info["user"])
        return _json({"devices": [d.to_json() | {"key": d.key} for d in devices]})

    async def delete_device(self, request: web.Request) -> web.Response:
        client = _need(request, "devices")
        self.auth.charge(client, 1)
        if not await request.app[INTAKE].registry.unregister(request.match_info["user"], request.match_info["key"]):
            raise ApiError(404, "not_found", "no such device for this user")
        return web.Response(status=204)

    async def put_preferences(self, request: web.Request) -> web.Response:
        """PUT replaces the user's preferences, PATCH changes only the fields it names."""
        client = _need(request, "devices")
        body = await _body(request)
        self.auth.charge(client, 1)
        prefs = await request.app[PROFILES].update(request.match_info["user"], body, merge=request.method == "PATCH")
        return _json(prefs.to_json())

    async def get_preferences(self, request: web.Request) -> web.Response:
        client = _need(request, "devices")
        self.auth.charge(client, 1)
        prefs = await request.app[PROFILES].get(request.match_info["user"])
        return _json(prefs.to_json())

    async def dead_letters(self, request: web.Request) -> web.Response:
        _need(request, "admin")
        try:
            count = min(1000, max(1, int(request.query.get("count", "50"))))
        except ValueError:
            raise ApiError(400, "invalid_query", "count must be a whole number") from None
        start = request.query.get("start", "-")
        dl = DeadLetters(request.app[REDIS], request.app[INTAKE].keys)
        try:
            entries = await dl.list(count, start)
        except aioredis.ResponseError:
            raise ApiError(400, "invalid_query", "start must be a stream id such as 1700000000000-0") from None
        return _json({"dead_letters": [e.to_json() for e in entries], "total": await dl.count()})

    async def replay(self, request: web.Request) -> web.Response:
        _need(request, "admin")
        body = await _body(request)
        ids = body.get("ids") if isinstance(body, dict) else None
        replay_all = isinstance(body, dict) and body.get("all") is True
        if not replay_all and (not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids)):
            raise ApiError(422, "invalid_request", "send {\"ids\": [\"<dead-letter id>\", ...]} or {\"all\": true}")
        try:
            n = await DeadLetters(request.app[REDIS], request.app[INTAKE].keys).replay(None if replay_all else ids)
        except aioredis.ResponseError:
            raise ApiError(400, "invalid_request", "ids must be stream ids such as 1700000000000-0") from None
        return _json({"replayed": n})

    async def invalid_tokens(self, request: web.Request) -> web.Response:
        _need(request, "admin")
        after = request.query.get("after", "-")
        try:
            count = min(1000, max(1, int(request.query.get("count", "100"))))
            events = await request.app[INTAKE].registry.invalid_token_events(count, after)
        except ValueError:
            raise ApiError(400, "invalid_query", "count must be a whole number") from None
        except aioredis.ResponseError:
            raise ApiError(400, "invalid_query", "after must be a stream id") from None
        return _json({"events": events})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(1.0):
            await request.app[REDIS].ping()
    except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
        return _json({"status": "unavailable", "redis": "down"}, 503)
    return _json({"status": "ok", "redis": "up"})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _openapi(request: web.Request) -> web.Response:
    text = resources.files("pushgw.gateway").joinpath("openapi.yaml").read_text()
    return web.Response(text=text, content_type="application/yaml")


def create_app(settings: Settings, redis: aioredis.Redis) -> web.Application:
    """The aiohttp application; the caller owns `redis`. Refuses to build without API clients."""
    if not settings.api.clients:
        raise ConfigError("the HTTP API needs at least one client: set PUSHGW_API_TOKEN or add [[api.clients]]")
    auth = Authenticator(settings.api.clients)
    app = web.Application(middlewares=[_errors, _auth(auth)], client_max_size=settings.api.max_body_bytes)
    app[SETTINGS] = settings
    app[REDIS] = redis
    app[INTAKE] = Intake(redis, settings, source="api")
    app[PROFILES] = Profiles(redis, app[INTAKE].keys)
    r = Routes(auth)
    app.router.add_post("/v1/messages", r.message)
    app.router.add_post("/v1/messages/batch", r.batch)
    app.router.add_put("/v1/users/{user}/devices", r.put_device)
    app.router.add_get("/v1/users/{user}/devices", r.list_devices)
    app.router.add_delete("/v1/users/{user}/devices/{key}", r.delete_device)
    app.router.add_put("/v1/users/{user}/preferences", r.put_preferences)
    app.router.add_patch("/v1/users/{user}/preferences", r.put_preferences)
    app.router.add_get("/v1/users/{user}/preferences", r.get_preferences)
    app.router.add_get("/v1/deadletters", r.dead_letters)
    app.router.add_post("/v1/deadletters/replay", r.replay)
    app.router.add_get("/v1/events/invalid-tokens", r.invalid_tokens)
    from .campaign_routes import add_routes

    add_routes(app, auth)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.yaml", _openapi)
    return app


async def serve_api(settings: Settings, redis_url: str, supervise: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; `supervise` (the worker pool's) is called every second meanwhile."""
    from ..core.logs import setup_logging
    from .pool import make_redis

    setup_logging(settings.log_level)
    redis = make_redis(redis_url, max_connections=128, timeout_s=5.0)
    app = create_app(settings, redis)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.api.host, settings.api.port, backlog=1024)
    await site.start()
    log.info("api listening", extra={"address": f"{settings.api.host}:{settings.api.port}",
                                     "count": len(settings.api.clients)})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            if supervise is not None:
                await asyncio.to_thread(supervise)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        log.info("api stopping")
        await runner.cleanup()
        await redis.aclose()
