"""Who is calling and what they may do: bearer tokens, scopes and each client's rate limit."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ...core.config import ApiClient
from .context import CLIENT
from .errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.yaml"})


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
