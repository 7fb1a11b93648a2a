"""Who is calling and what they may do: bearer tokens, scopes and each client's rate limit."""

from __future__ import annotations

import hmac
import math
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from ...core.config import ApiClient
from ...queue.keys import Keys
from ...ratelimit.provider_rate import Gcra
from .context import CLIENT
from .errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.yaml"})


class Authenticator:
    """Tokens and scopes; and each client's `rate_per_s`, one limit per client shared by every API process.

    The rate lives in Redis as GCRA state (ratelimit/provider_rate.py), so running more API processes does
    not multiply what a client may send: a batch of n costs n, up to the client's burst at once.
    """

    def __init__(self, clients: tuple[ApiClient, ...], redis: aioredis.Redis, keys: Keys,
                 clock: Callable[[], float] | None = None) -> None:
        """`clock` (tests only) replaces Redis's clock for the rates."""
        self._clients = [(c, c.token.encode()) for c in clients]
        self._rates = {
            c.name: Gcra(redis, keys.client_rate(c.name), c.rate_per_s, max(float(c.burst or c.rate_per_s), 1.0), clock)
            for c in clients if c.rate_per_s > 0
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

    async def charge(self, client: ApiClient, units: int) -> None:
        """Take `units` of the client's rate, or answer 429 (wait) or 413 (more than its burst ever allows)."""
        rate = self._rates.get(client.name)
        if rate is None:
            return
        if units > rate.burst:
            raise ApiError(413, "batch_too_large",
                           f"{units} messages exceed client {client.name}'s burst of {rate.burst:g}; send smaller batches")
        granted, wait_s = await rate.reserve(units)
        if not granted:
            raise ApiError(429, "rate_limited", f"client {client.name} is over its {client.rate_per_s:g}/s limit",
                           headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


def auth_middleware(auth: Authenticator) -> Any:
    """Every path but the public ones needs a known bearer token; the client is kept on the request."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            request[CLIENT] = auth.client(request.headers.get("Authorization"))
        return await handler(request)

    return middleware


def require_scope(request: web.Request, scope: str) -> ApiClient:
    """The request's client, when it has `scope`; else a 403."""
    client = request[CLIENT]
    if scope not in client.scopes:
        raise ApiError(403, "forbidden", f"client {client.name} lacks the {scope!r} scope")
    return client
