"""A few long-lived HTTP/2 connections to one origin, opened as load needs them."""

from __future__ import annotations

import asyncio
import ssl
import time

from .connection import H2ClientConnection, Resolve
from .errors import H2Error, StreamRefused
from .headers import Header
from .stream import H2Response


class H2Pool:
    """Up to `size` long-lived HTTP/2 connections to one origin (APNs per app, FCM per project).

    `request()` goes out on the open connection with the most room; a new connection is opened only
    while every open one has as many streams in flight as the server allows and fewer than `size`
    are open, so a pool under light load holds one connection. A request the server refused
    unprocessed (GOAWAY above it, REFUSED_STREAM) is resent on another connection, at most
    `resends` times in all. A closed connection (GOAWAY, lost, stream ids used up) leaves the pool
    at once and finishes its open streams on its own. After a failed attempt to connect, or a
    connection refused before its first answer, the next attempt waits `reconnect_gap_s`: both
    Apple and Google ask clients not to reconnect in a tight loop.
    """

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext, *, size: int, max_streams: int,
                 timeout_s: float, reconnect_gap_s: float = 1.0, resends: int = 3, resolve: Resolve | None = None) -> None:
        self.host = host
        self.resolve = resolve  # see `H2ClientConnection.connect`
        self.port = port
        self.ssl = ssl_context
        self.size = max(1, size)
        self.max_streams = max(1, max_streams)  # our own cap on streams per connection
        self.timeout_s = timeout_s
        self.reconnect_gap_s = reconnect_gap_s
        self.resends = max(1, resends)
        self.conns: list[H2ClientConnection] = []
        self.draining: set[H2ClientConnection] = set()  # closed for new requests, still finishing streams
        self.connects = 0  # connections opened so far (tests, diagnostics)
        self._connecting: asyncio.Task[H2ClientConnection] | None = None
        self._last_failure = -reconnect_gap_s
        self.closed = False  # after close(): no new connections

    async def request(self, headers: list[Header] | bytes, body: bytes, *, deadline: float | None = None,
                      tries: int | None = None) -> H2Response:
        """Send one request and wait for its response, `timeout_s` at most in all (connecting,
        waiting for a stream, resends included), or until `deadline` (loop time) when given.

        Raises `TimeoutError` when that time is up, `StreamRefused` when `tries` (default `resends`)
        connections in a row refused it unprocessed, `ConnectionLost` when a connection closed with it
        in flight, and from connecting: `NoHttp2`, `H2Error`, `OSError`, `ssl.SSLError` (certificate
        verification included), and whatever `resolve` raises."""
        tries = self.resends if tries is None else tries
        for _ in range(tries):
            conn = self.ready()
            if conn is None:  # connecting, or pruning closed connections: the rare path
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + self.timeout_s
                async with asyncio.timeout_at(deadline):
                    conn = await self.connection()
            if deadline is None:
                # The connection's loop, not `asyncio.get_running_loop()`: on CPython 3.11 that is a
                # getpid() system call, per request.
                deadline = conn.loop.time() + self.timeout_s
            try:
                return await conn.request(headers, body, deadline)
            except StreamRefused:
                continue
        raise StreamRefused(f"request refused on {self.resends} connections")

    def ready(self) -> H2ClientConnection | None:
        """The connection `connection()` would return without waiting, when it would (the common case:
        every connection open and either one with a free stream or all `size` of them opened), else
        None. Deciding it here spares each request a coroutine and a timer."""
        conns = self.conns
        if len(conns) == 1:
            conn = conns[0]
            return conn if not conn.closed and conn.load < 1.0 else None
        if not conns or self.draining or any(c.closed for c in conns):
            return None
        best = min(conns, key=_load)
        return best if best.load < 1.0 or len(conns) >= self.size else None

    async def connection(self) -> H2ClientConnection:
        """The open connection with a free stream, else a new one while below `size`, else the least loaded."""
        while True:
            if self.closed:
                raise H2Error("connection pool closed")
            if any(c.closed for c in self.conns):
                for c in self.conns:
                    if c.closed:
                        self.draining.add(c)  # may still finish streams; closed at shutdown if not
                        if c.completed == 0:
                            self._last_failure = time.monotonic()  # refused before any answer: back off
                self.conns = [c for c in self.conns if not c.closed]
            if self.draining:
                self.draining = {c for c in self.draining if c.active}
            conns = self.conns
            best = conns[0] if len(conns) == 1 else min(conns, key=_load, default=None)
            if best is not None and best.load < 1.0:
                return best
            if len(self.conns) >= self.size:
                assert best is not None
                return best  # every connection is busy: queue for a stream on the least loaded one
            if self._connecting is None:
                self._connecting = asyncio.create_task(self._connect())
                # A caller that stops waiting leaves the error unobserved otherwise.
                self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
            try:
                await asyncio.shield(self._connecting)
            except (H2Error, OSError, ssl.SSLError, TimeoutError):
                if best is None:
                    raise
                return best

    async def _connect(self) -> H2ClientConnection:
        try:
            wait = self._last_failure + self.reconnect_gap_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            conn = await H2ClientConnection.connect(
                self.host, self.port, self.ssl, timeout_s=self.timeout_s, max_streams=self.max_streams,
                resolve=self.resolve,
            )
        except BaseException:
            self._last_failure = time.monotonic()
            raise
        finally:
            self._connecting = None
        self.connects += 1
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        self.closed = True
        for c in [*self.conns, *self.draining]:
            c.close()
        self.conns = []
        self.draining = set()
        if self._connecting is not None:
            self._connecting.cancel()


def _load(conn: H2ClientConnection) -> float:
    return conn.load
