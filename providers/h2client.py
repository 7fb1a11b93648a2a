"""A small HTTP/2 client over asyncio TLS, for APNs and FCM: one connection, and a pool of them per origin.

Why not aioapns or httpx: aioapns 4.0 keeps one dict entry per successful push on a connection
(it grows without bound on a long-lived connection) and needs ALPN "h2" set on a caller's own
SSL context; both it and httpx use the pure-Python `h2` stack, measured here at about 200 us per
request. This module drives `jh2` (the same state machine, with compiled HPACK) straight from an
`asyncio.Protocol`: no per-request task, frames of every request started in one loop iteration
go out in one write, and each stream's state is dropped as soon as it ends.

It does what APNs and FCM need and no more: POST with a small body, the server's
MAX_CONCURRENT_STREAMS (APNs starts at 1 until the first authenticated request and then raises it),
flow control, GOAWAY (streams the server never processed fail with `StreamRefused`, safe to resend)
and connection loss (pending streams fail with `ConnectionLost`: they may or may not have reached
the server, as with any network error). `H2Pool` keeps a few long-lived connections to one origin
and opens another only when every open one has all the streams the server allows in flight.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from jh2.config import H2Configuration
from jh2.connection import ConnectionInputs, ConnectionState, H2Connection, H2ConnectionStateMachine
from jh2.errors import ErrorCodes
from jh2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from jh2.exceptions import H2Error as _JH2Error
from jh2.exceptions import NoAvailableStreamIDError
from jh2.settings import SettingCodes

Header = tuple[bytes, bytes]

# After a GOAWAY, jh2 (like h2) closes its connection state machine at once and would then refuse
# the frames of the streams the server still answers: a graceful GOAWAY would lose those answers.
# This machine keeps a closed connection usable for finishing the streams already open (HEADERS,
# DATA, WINDOW_UPDATE, RST_STREAM, PING, SETTINGS both ways); starting a new stream stays our
# caller's job to prevent (`H2ClientConnection.closed`, the fake's last_stream_id).
_AFTER_GOAWAY = {
    ConnectionInputs.SEND_HEADERS, ConnectionInputs.SEND_DATA, ConnectionInputs.SEND_WINDOW_UPDATE,
    ConnectionInputs.SEND_RST_STREAM, ConnectionInputs.SEND_PING, ConnectionInputs.SEND_SETTINGS,
    ConnectionInputs.RECV_HEADERS, ConnectionInputs.RECV_DATA, ConnectionInputs.RECV_WINDOW_UPDATE,
    ConnectionInputs.RECV_RST_STREAM, ConnectionInputs.RECV_PING, ConnectionInputs.RECV_SETTINGS,
    ConnectionInputs.RECV_PRIORITY, ConnectionInputs.SEND_PRIORITY,
}


class _DrainableStateMachine(H2ConnectionStateMachine):  # type: ignore[misc]
    _transitions: ClassVar[dict[Any, Any]] = {
        **H2ConnectionStateMachine._transitions,
        **{(ConnectionState.CLOSED, i): (None, ConnectionState.CLOSED) for i in _AFTER_GOAWAY},
    }


class CountingH2Connection(H2Connection):  # type: ignore[misc]
    """jh2 counts open streams by scanning every stream it holds, on each new stream: O(n) per request,
    measured at 90 us per request with 250 streams in flight (bench/apns_throughput.py, cProfile).
    The owner already knows how many streams it has open and enforces the peer's limit itself, so
    the check reads `in_flight`, set by the owner; closed streams are purged by one scan every
    `PURGE_EVERY` new streams, so the stream table stays bounded (what aioapns fails to do)."""

    PURGE_EVERY = 128
    # jh2 remembers 2**16 closed streams per connection (to tell late frames from protocol errors):
    # about 7 MB per connection before it stops growing, which a 10-minute soak showed as creeping RSS
    # (tracemalloc: the top allocation). Late frames only follow the last few thousand streams.
    MAX_CLOSED_STREAMS = 4096
    in_flight = 0
    _since_purge = 0

    def _count(self) -> int:
        self._since_purge += 1
        if self._since_purge >= self.PURGE_EVERY:
            self._since_purge = 0
            self._open_streams(0)  # drops closed streams of both parities while it counts
        return self.in_flight

    @property
    def open_outbound_streams(self) -> int:
        return self._count()

    @property
    def open_inbound_streams(self) -> int:
        return self._count()


def drainable(conn: H2Connection) -> H2Connection:
    """Let `conn` finish its open streams after a GOAWAY in either direction (see `_AFTER_GOAWAY`)."""
    conn.state_machine = _DrainableStateMachine()
    return conn


class H2Error(Exception):
    """A request failed at the HTTP/2 layer; `str()` says why."""


class NoHttp2(H2Error):
    """The server finished the TLS handshake without choosing ALPN "h2": it does not speak HTTP/2 there."""


class StreamRefused(H2Error):
    """The server did not process the request (GOAWAY above it, or REFUSED_STREAM): resend it."""


class ConnectionLost(H2Error):
    """The connection closed with the request in flight: it may or may not have been processed."""


@dataclass(frozen=True, slots=True)
class H2Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _Stream:
    __slots__ = ("body", "future", "headers", "status")

    def __init__(self, future: asyncio.Future[H2Response]) -> None:
        self.future = future
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 connection; `await connect(...)`, then `await conn.request(headers, body)`."""

    def __init__(self, max_streams: int = 1000) -> None:
        self._h2 = drainable(CountingH2Connection(H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            validate_inbound_headers=False, normalize_outbound_headers=False,
        )))
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._own_max_streams = max_streams
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self.closed = False  # no new requests: lost, GOAWAY received, or stream ids used up
        self.close_reason = ""
        self.requests = 0
        self.completed = 0  # requests answered: a GOAWAY before the first is a failed connection
        self._preface: asyncio.Future[None] = self._loop.create_future()  # the server's first SETTINGS
        self._alpn_h2 = False  # the TLS handshake chose HTTP/2

    # --- public -------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, host: str, port: int, ssl_context: ssl.SSLContext, *, timeout_s: float, max_streams: int = 1000
    ) -> H2ClientConnection:
        """Open TCP + TLS with ALPN h2; raise `H2Error` if the server does not speak HTTP/2."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            transport, proto = await loop.create_connection(
                lambda: cls(max_streams), host, port, ssl=ssl_context, server_hostname=host
            )
        if not proto._alpn_h2:
            proto._preface.cancel()  # nobody will wait for it
            transport.close()
            raise NoHttp2(f"{host}:{port} did not negotiate HTTP/2 (ALPN h2)")
        try:
            # Wait for the server's SETTINGS: APNs allows a single stream at first, and sending more
            # before we know would be a protocol error.
            async with asyncio.timeout(timeout_s):
                await proto._preface
        except BaseException:
            transport.close()
            raise
        return proto

    @property
    def active(self) -> int:
        """Requests in flight on this connection."""
        return len(self._streams)

    @property
    def load(self) -> float:
        """Streams in flight plus requests waiting for one, per stream the server allows."""
        return (len(self._streams) + len(self._slot_waiters)) / self.capacity

    @property
    def capacity(self) -> int:
        """How many streams may be open at once right now (the server's limit, capped by ours)."""
        remote: int = self._h2.remote_settings.max_concurrent_streams
        return max(1, min(self._own_max_streams, remote))

    async def request(self, headers: list[Header], body: bytes) -> H2Response:
        """Send one request and wait for the whole response (the caller bounds the time)."""
        while len(self._streams) >= self.capacity and not self.closed:
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_slot()  # we were handed a free slot but leave: pass it on
                else:
                    waiter.cancel()
                raise
        if self.closed:
            raise StreamRefused(f"connection closed: {self.close_reason}")
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except NoAvailableStreamIDError:
            self._close_for_new("stream ids used up")
            raise StreamRefused("connection used up its stream ids") from None
        stream = _Stream(self._loop.create_future())
        self._streams[stream_id] = stream
        self.requests += 1
        try:
            self._h2.in_flight = len(self._streams) - 1  # open before this one (see CountingH2Connection)
            self._h2.send_headers(stream_id, headers, end_stream=not body)
            if body:
                await self._send_body(stream_id, body)
            self._flush_soon()
            return await stream.future
        except asyncio.CancelledError:
            # Timed out or cancelled: tell the server, free the slot, keep the connection.
            if self._end(stream_id) is not None:
                try:
                    self._h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                    self._flush_soon()
                except _JH2Error:
                    pass
            raise
        except _JH2Error as e:
            self._end(stream_id)
            raise H2Error(f"HTTP/2 protocol error: {type(e).__name__}") from None

    def _end(self, stream_id: int) -> _Stream | None:
        """Forget a stream (answered, reset or abandoned): free its slot, wake its body sender, and
        close a connection that is draining after GOAWAY once its last stream is gone."""
        stream = self._streams.pop(stream_id, None)
        waiter = self._window_waiters.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if stream is not None:
            self._wake_slot()
        if self.closed and not self._streams and self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.close()
        return stream

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            try:
                self._h2.close_connection()
                self._transport.write(self._h2.data_to_send())
            except _JH2Error:
                pass
            self._transport.close()
        self._close_for_new("closed by us")

    # --- sending ------------------------------------------------------------------------------

    async def _send_body(self, stream_id: int, body: bytes) -> None:
        view = memoryview(body)
        while view:
            window = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
            if window <= 0:
                self._flush_soon()
                waiter = self._loop.create_future()
                self._window_waiters[stream_id] = waiter
                await waiter
                if stream_id not in self._streams:
                    return  # failed or reset meanwhile: the stream's future says why
                continue
            chunk, view = view[:window], view[window:]
            self._h2.send_data(stream_id, bytes(chunk), end_stream=not view)

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _wake_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        for waiter in self._window_waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._window_waiters.clear()

    def _close_for_new(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
        self._wake_all()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        self._transport = transport
        ssl_obj = transport.get_extra_info("ssl_object")
        self._alpn_h2 = ssl_obj is not None and ssl_obj.selected_alpn_protocol() == "h2"
        if not self._alpn_h2:
            return  # not an HTTP/2 server: no preface; `connect` closes the connection
        self._h2.initiate_connection()
        self._h2.update_settings({SettingCodes.ENABLE_PUSH: 0, SettingCodes.MAX_CONCURRENT_STREAMS: 0})
        transport.write(self._h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        # Write what requests queued first: jh2 drops its outbound buffer when it reads a GOAWAY,
        # and frames of streams the server will still process must not be lost with it.
        self._flush()
        try:
            events = self._h2.receive_data(data)
        except _JH2Error as e:
            self._fail_all(ConnectionLost(f"HTTP/2 protocol error from server: {type(e).__name__}"))
            if self._transport is not None:
                self._transport.write(self._h2.data_to_send())
                self._transport.close()
            return
        for event in events:
            self._handle(event)
        data_out = self._h2.data_to_send()
        if data_out and self._transport is not None:
            self._transport.write(data_out)

    def _handle(self, event: Any) -> None:
        if isinstance(event, ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                for name, value in event.headers:
                    if name == b":status":
                        stream.status = int(value)
                    else:
                        stream.headers[name] = value
        elif isinstance(event, DataReceived):
            if event.flow_controlled_length:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.body += event.data
        elif isinstance(event, StreamEnded):
            stream = self._end(event.stream_id)  # an early answer (413 before the body) ends the send too
            if stream is not None and not stream.future.done():
                self.completed += 1
                stream.future.set_result(H2Response(stream.status, stream.headers, bytes(stream.body)))
        elif isinstance(event, StreamReset):
            stream = self._end(event.stream_id)
            if stream is not None and not stream.future.done():
                exc_type = StreamRefused if event.error_code == ErrorCodes.REFUSED_STREAM else H2Error
                stream.future.set_exception(exc_type(f"stream reset by server: {event.error_code!r}"))
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                waiters = list(self._window_waiters.values())
                self._window_waiters.clear()
            else:
                w = self._window_waiters.pop(event.stream_id, None)
                waiters = [w] if w is not None else []
            for w in waiters:
                if not w.done():
                    w.set_result(None)
        elif isinstance(event, RemoteSettingsChanged):
            if not self._preface.done():
                self._preface.set_result(None)
            if SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings:
                for _ in range(self.capacity):
                    self._wake_slot()
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                waiters = list(self._window_waiters.values())  # windows grew without a WINDOW_UPDATE
                self._window_waiters.clear()
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
        elif isinstance(event, ConnectionTerminated):
            last = event.last_stream_id if event.last_stream_id is not None else 0
            detail = event.additional_data.decode("utf-8", "replace")[:100] if event.additional_data else ""
            self._close_for_new(f"GOAWAY {event.error_code!r}{': ' + detail if detail else ''}")
            for stream_id in [s for s in self._streams if s > last]:
                stream = self._end(stream_id)
                if stream is not None and not stream.future.done():
                    stream.future.set_exception(StreamRefused("server sent GOAWAY before processing the request"))
            self._end(0)  # closes the transport now if nothing is left to drain

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {type(exc).__name__}" if exc else "connection closed by server"
        self._fail_all(ConnectionLost(reason))

    def _fail_all(self, exc: H2Error) -> None:
        self._close_for_new(str(exc))
        if not self._preface.done():
            self._preface.set_exception(exc)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            if not stream.future.done():
                stream.future.set_exception(exc)
        self._wake_all()


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
                 timeout_s: float, reconnect_gap_s: float = 1.0, resends: int = 3) -> None:
        self.host = host
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

    async def request(self, headers: list[Header], body: bytes) -> H2Response:
        """Send one request and wait for its response; the caller bounds the time (`asyncio.timeout`).

        Raises `StreamRefused` when `resends` connections in a row refused it unprocessed,
        `ConnectionLost` when a connection closed with it in flight, and from connecting: `NoHttp2`,
        `H2Error`, `OSError`, `ssl.SSLError` (certificate verification included) or `TimeoutError`."""
        for _ in range(self.resends):
            conn = await self.connection()
            try:
                return await conn.request(headers, body)
            except StreamRefused:
                continue
        raise StreamRefused(f"request refused on {self.resends} connections")

    async def connection(self) -> H2ClientConnection:
        """The open connection with a free stream, else a new one while below `size`, else the least loaded."""
        while True:
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
                self.host, self.port, self.ssl, timeout_s=self.timeout_s, max_streams=self.max_streams
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
        for c in [*self.conns, *self.draining]:
            c.close()
        self.conns = []
        self.draining = set()
        if self._connecting is not None:
            self._connecting.cancel()


def _load(conn: H2ClientConnection) -> float:
    return conn.load
