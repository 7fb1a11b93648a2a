"""The one way providers reach their servers: HTTP/2 first, HTTP/1.1 when a server has no HTTP/2, one time
budget for the whole send, and transport errors mapped to the typed outcomes of `providers.base` in one place.

A provider builds its requests (header fields, body) and reads its answers (status -> outcome); everything
between is `Transport.send`, as httpx keeps its transport-error mapping in one place behind one
`handle_async_request`. `send` returns the server's answer as an `H2Response` (on either protocol) or the
outcome a transport failure means; it never raises for a network, TLS or protocol failure:

- `TimeoutError` (the budget ran out) -> `Retry("<provider> timeout")`;
- `AddressRefused` (our own policy refused every address of the host, possibly wrapped by aiohttp) ->
  `Rejected`: a retry cannot make the address acceptable;
- `StreamRefused` (refused unprocessed on `RESENDS` connections, RFC 9113 section 8.7), `ConnectionLost`
  (the request may or may not have been processed, as with any network error), other `H2Error`s, aiohttp
  client errors and `OSError`s (`ssl.SSLError`, certificate checks included) -> `Retry`.

HTTP/1.1 fallback: a server that finishes the TLS handshake without choosing ALPN "h2" (RFC 7301), or a
plain http:// endpoint, is sent to over HTTP/1.1 (aiohttp, one keep-alive `ClientSession`), and the
provider's `Fallback.no_http2` remembers that the destination has no HTTP/2. A fallback after `NoHttp2`
gets what is left of the send's `timeout_s`. The provider decides per request which protocol the
destination is on (`pool` or None), so a request answered over HTTP/2 is never sent again.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict

from ..core.config import ConfigError
from ..core.metrics import HELD, PROVIDER_LATENCY
from .base import Delivery, Outcome, Rejected, Retry
from .h2 import ConnectionLost, H2Error, H2Pool, H2Response, Header, NoHttp2, Resolve, StreamRefused

REASON_MAX = 200  # an outcome's reason, at most (it is logged and stored with dead letters)
CONNECTIONS = 4  # HTTP/2 connections per destination and process, at most (opened as streams in flight need them)
RESENDS = 3  # tries for a request refused unprocessed (GOAWAY above its stream), each on another connection
# After a failed connection attempt, wait this long before the next: Apple and Google both ask clients
# not to reconnect in a tight loop.
RECONNECT_GAP_S = 1.0

R = TypeVar("R")
R_contra = TypeVar("R_contra", contravariant=True)


class AddressRefused(OSError):
    """Every address of a host is one our policy refuses (private, loopback, link-local)."""


def h2_pool(host: str, port: int, ssl_context: ssl.SSLContext, *, max_streams: int, timeout_s: float,
            size: int = CONNECTIONS, resolve: Resolve | None = None) -> H2Pool:
    """The HTTP/2 connections to one destination, with the shared resend and reconnect rules."""
    return H2Pool(host, port, ssl_context, size=size, max_streams=max_streams, timeout_s=timeout_s,
                  reconnect_gap_s=RECONNECT_GAP_S, resends=RESENDS, resolve=resolve)


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The TLS settings of a provider with an HTTP/1.1 fallback."""

    h2: ssl.SSLContext  # offers ALPN "h2" and "http/1.1" (RFC 7301)
    http1: ssl.SSLContext | None  # aiohttp's (no ALPN); None: the default verification


def tls_contexts(ca_file: str, where: str) -> TlsContexts:
    """TLS contexts that trust `ca_file` (empty: the system's CAs); `where` names the setting in errors.

    The HTTP/2 context offers "http/1.1" too, so a server without HTTP/2 says so by choosing it (and
    the send falls back) instead of failing the handshake."""
    try:
        http1 = ssl.create_default_context(cafile=ca_file) if ca_file else None
        h2 = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError):
        raise ConfigError(f"{where}.ca_file {ca_file} is not a readable PEM CA file") from None
    h2.set_alpn_protocols(["h2", "http/1.1"])
    return TlsContexts(h2, http1)


class Http1Client:
    """HTTP/1.1 over one aiohttp keep-alive session (`TCPConnector(limit=concurrency)`), made on first use.

    `ssl_context`: None for aiohttp's default verification; `body_limit`: read at most this many bytes
    of an answer (None: all of it); `resolver`: makes the connector's resolver (called inside the event
    loop); `redirects`: follow redirects."""

    def __init__(self, *, limit: int, ssl_context: ssl.SSLContext | None, body_limit: int | None = None,
                 resolver: Callable[[], AbstractResolver] | None = None, redirects: bool = True) -> None:
        self._limit = limit
        self._ssl = ssl_context
        self._body_limit = body_limit
        self._resolver = resolver
        self._redirects = redirects
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl if self._ssl is not None else True,
                                             keepalive_timeout=60.0,
                                             resolver=self._resolver() if self._resolver is not None else None)
            # The transport bounds each send (asyncio.timeout), not the session.
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def post(self, url: str, headers: CIMultiDict[str], body: bytes) -> H2Response:
        """POST `body`; the answer in the shape HTTP/2 gives it (header names lowercased bytes, the first of each)."""
        async with self.session().post(url, data=body, headers=headers, allow_redirects=self._redirects) as r:
            raw = await r.read() if self._body_limit is None else await r.content.read(self._body_limit)
            fields: dict[bytes, bytes] = {}
            for name, value in r.raw_headers:
                fields.setdefault(name.lower(), value)
            return H2Response(r.status, fields, raw)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True, slots=True)
class Http1Request:
    """Where and how one delivery goes over HTTP/1.1."""

    client: Http1Client
    url: str
    headers: CIMultiDict[str]


class Fallback(Protocol[R_contra]):
    """What a provider with an HTTP/1.1 path tells the transport; `route` is the provider's name for a
    destination (an FCM app, a push-service origin)."""

    def no_http2(self, route: R_contra, reason: str) -> None:
        """`route` did not negotiate HTTP/2: send to it over HTTP/1.1 from now on."""

    def http1_request(self, route: R_contra, delivery: Delivery, credential: str) -> Http1Request:
        """The HTTP/1.1 request for `delivery`; `credential` is what `Transport.send` was given."""
        ...


class Transport(Generic[R]):
    """One provider's sends: HTTP/2 with the HTTP/1.1 fallback, the time budget and the error-to-outcome
    mapping (module docstring). Holds the provider's latency histogram child.

    `fallback`: None for a provider that only speaks HTTP/2 (APNs), where `NoHttp2` is a connection error;
    `error_text`: whether an error's own text goes into the reason, or its type name only."""

    def __init__(self, provider: str, timeout_s: float, *, fallback: Fallback[R] | None = None,
                 error_text: bool = True) -> None:
        self.provider = provider
        self.timeout_s = timeout_s
        self._fallback = fallback
        self._error_text = error_text
        self._timeout_reason = f"{provider} timeout"
        self._latency = PROVIDER_LATENCY.labels(provider)

    async def send(self, pool: H2Pool | None, route: R, headers: bytes | list[Header], body: bytes,
                   delivery: Delivery, credential: str) -> H2Response | Outcome:
        """One request: over `pool` (HTTP/2; `headers` its header block) or, with `pool` None or after
        `NoHttp2`, over HTTP/1.1 (`Fallback.http1_request(route, delivery, credential)`), `timeout_s` in all.
        The pool bounds its own time (`H2Pool.request`)."""
        started = time.perf_counter()
        try:
            if pool is not None:
                # The common case without the pool's and the connection's coroutines: an open
                # connection with room takes the request at once (`H2ClientConnection.start`).
                conn = pool.ready()
                stream = conn.start(headers, body, conn.loop.time() + pool.timeout_s) if conn is not None else None
                if conn is not None and stream is not None:
                    try:
                        return await stream.future
                    except StreamRefused:  # refused unprocessed: resent as `pool.request` would, in the same time
                        return await pool.request(headers, body, deadline=stream.deadline, tries=pool.resends - 1)
                    except asyncio.CancelledError:
                        conn.abandon(stream)
                        raise
                try:
                    return await pool.request(headers, body)
                except NoHttp2 as e:
                    if self._fallback is None:
                        raise
                    self._fallback.no_http2(route, str(e))
            return await self._http1(route, delivery, credential, body, started)
        except TimeoutError:
            return Retry(self._timeout_reason)
        except (H2Error, aiohttp.ClientError, OSError) as e:
            return self.failure(e)
        finally:
            HELD.observe(self._latency, time.perf_counter() - started)

    async def _http1(self, route: R, delivery: Delivery, credential: str, body: bytes, started: float) -> H2Response:
        if self._fallback is None:
            raise NoHttp2(f"{self.provider}: no HTTP/2 pool and no HTTP/1.1 path")
        request = self._fallback.http1_request(route, delivery, credential)
        async with asyncio.timeout(max(0.0, self.timeout_s - (time.perf_counter() - started))):
            return await request.client.post(request.url, request.headers, body)

    def failure(self, error: Exception) -> Retry | Rejected:
        """The outcome of a send that failed with `error` below HTTP (see the module docstring)."""
        if isinstance(error, TimeoutError):
            return Retry(self._timeout_reason)
        cause = error.os_error if isinstance(error, aiohttp.ClientConnectorError) else error
        if isinstance(cause, AddressRefused):
            return Rejected(f"{self.provider} endpoint refused: {cause}"[:REASON_MAX])
        kind = type(error).__name__
        if not self._error_text:
            return Retry(f"{self.provider} connection error: {kind}"[:REASON_MAX])
        if isinstance(error, StreamRefused):
            return Retry(f"{self.provider}: {error}"[:REASON_MAX])
        if isinstance(error, ConnectionLost):
            return Retry(f"{self.provider} {error}"[:REASON_MAX])
        text = str(error)
        return Retry(f"{self.provider} connection error: {kind}{': ' + text if text else ''}"[:REASON_MAX])
