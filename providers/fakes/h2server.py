"""The server side of HTTP/2 for the provider fakes (APNs, FCM): one asyncio protocol per connection, on jh2.

It collects each request's headers and body, answers every request from its own task (a held or
slow answer never blocks the other streams of the connection), announces MAX_CONCURRENT_STREAMS
and enforces it (jh2 refuses a stream above it as a protocol error, so a client that ignores the
limit fails its test), and can end a connection with a graceful GOAWAY after a number of requests:
streams above the GOAWAY are never processed, as with a real server going away, and the
connection closes once every stream below it is answered. What a request means is the subclass's
`respond`; the owner (the fake) holds the knobs and counters every connection shares.

`Negotiated` lets a fake serve HTTP/2 and HTTP/1.1 on one TLS port, as real front ends do: the
ALPN protocol chosen in the handshake picks the protocol object (FakeFcm, FakePushService).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, cast

from aiohttp import web
from jh2.config import H2Configuration
from jh2.connection import ConnectionInputs, ConnectionState, H2Connection, H2ConnectionStateMachine
from jh2.errors import ErrorCodes
from jh2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset
from jh2.exceptions import H2Error
from jh2.settings import SettingCodes, Settings

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


Answer = tuple[int, dict[str, str], bytes]
"""(HTTP status, response headers with lower-case names, body)."""


class H2ServerOwner(Protocol):
    """What a fake shares with its HTTP/2 connections."""

    connections: int  # HTTP/2 connections accepted so far
    peak_streams: int  # most requests in flight at once on one connection
    goaway_after: int | None  # GOAWAY after this many requests on a connection
    _protocols: set[H2ServerProtocol]  # open connections (a test may abort them)


class _ServerH2Connection(CountingH2Connection):
    """Counts the client's open streams the way the client does, to enforce MAX_CONCURRENT_STREAMS fairly.

    A stream is open from its HEADERS until our END_STREAM goes out (the client frees its slot only
    when it reads that) or until either side resets it. `open_ids` follows jh2's events, which come
    after a whole read; so at the limit, where a stream the client reset earlier in the same read
    must not count, the live stream states are consulted (an O(n) scan, only then)."""

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.open_ids: set[int] = set()

    def _count(self) -> int:
        super()._count()  # the periodic purge of closed streams
        n = len(self.open_ids)
        if n >= self.local_settings.max_concurrent_streams:
            streams = self.streams
            n = sum(1 for sid in self.open_ids if sid in streams and not streams[sid].closed)
        return n


class H2ServerProtocol(asyncio.Protocol):
    """One server-side HTTP/2 connection; subclasses implement `respond`."""

    def __init__(self, owner: H2ServerOwner, max_streams: int) -> None:
        self.owner = owner
        self.max_streams = max_streams  # MAX_CONCURRENT_STREAMS announced in the first SETTINGS
        self.h2 = _ServerH2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        drainable(self.h2)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}  # stream id -> the task answering it
        self.count = 0
        self.goaway_sent = False
        self.last_stream_id = 0

    async def respond(self, headers: dict[str, str], body: bytes) -> Answer:
        """Answer one request (headers include the pseudo-headers :method, :path, ...)."""
        raise NotImplementedError

    def answered(self, status: int) -> None:
        """Called after each answer is queued (APNs raises its stream limit after the first 200)."""

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        self.transport = transport
        self.owner.connections += 1
        self.owner._protocols.add(self)
        self.h2.local_settings = Settings(client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._protocols.discard(self)
        for t in self.tasks.values():
            t.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            self.flush()
            self.abort()
            return
        for ev in events:
            if isinstance(ev, RequestReceived):
                if self.goaway_sent and ev.stream_id > self.last_stream_id:
                    continue  # above the GOAWAY: never processed, the client resends it elsewhere
                self.requests[ev.stream_id] = (dict(ev.headers), bytearray())
                self.h2.open_ids.add(ev.stream_id)
                if ev.stream_ended is not None:
                    self._dispatch(ev.stream_id)
            elif isinstance(ev, DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                req = self.requests.get(ev.stream_id)
                if req is not None:
                    req[1].extend(ev.data)
            elif isinstance(ev, StreamEnded):
                self._dispatch(ev.stream_id)
            elif isinstance(ev, StreamReset):  # the client gave up on it: stop answering
                self.requests.pop(ev.stream_id, None)
                self.h2.open_ids.discard(ev.stream_id)
                task = self.tasks.get(ev.stream_id)
                if task is not None:
                    task.cancel()
            elif isinstance(ev, ConnectionTerminated):
                self.abort()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- requests -----------------------------------------------------------------------------

    def _dispatch(self, stream_id: int) -> None:
        req = self.requests.pop(stream_id, None)
        if req is None:
            return
        self.count += 1
        task = asyncio.get_running_loop().create_task(self._answer(stream_id, req[0], bytes(req[1])))
        self.tasks[stream_id] = task
        if len(self.tasks) > self.owner.peak_streams:
            self.owner.peak_streams = len(self.tasks)
        goaway_after = self.owner.goaway_after
        if goaway_after is not None and self.count >= goaway_after and not self.goaway_sent:
            self.goaway_sent = True
            self.last_stream_id = stream_id
            self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=stream_id)

    async def _answer(self, stream_id: int, headers: dict[str, str], body: bytes) -> None:
        try:
            status, out_headers, out_body = await self.respond(headers, body)
            self.answered(status)
            response = [(":status", str(status)), *out_headers.items()]
            if out_body:
                response.append(("content-length", str(len(out_body))))
                self.h2.send_headers(stream_id, response)
                self.h2.send_data(stream_id, out_body, end_stream=True)
            else:
                self.h2.send_headers(stream_id, response, end_stream=True)
        except H2Error:
            pass  # the client reset the stream meanwhile
        finally:
            self.h2.open_ids.discard(stream_id)
            self.tasks.pop(stream_id, None)
        self.flush()
        if self.goaway_sent and not self.tasks and self.transport is not None:
            self.transport.close()  # every stream below the GOAWAY is answered


class Negotiated(asyncio.Protocol):
    """Accepts a TLS connection and hands it to the protocol made by `h2` when ALPN chose "h2", else by
    `http1` (e.g. aiohttp's request handler: `aiohttp_protocol`). Why one port for both: a client
    that falls back to HTTP/1.1 must reach the very same service, as it would in production."""

    def __init__(self, h2: Callable[[], asyncio.Protocol], http1: Callable[[], asyncio.Protocol]) -> None:
        self._h2 = h2
        self._http1 = http1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        h2 = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
        proto = self._h2() if h2 else self._http1()
        transport.set_protocol(proto)
        proto.connection_made(transport)


def aiohttp_protocol(runner: web.AppRunner) -> asyncio.Protocol:
    """A new connection handler of `runner`'s aiohttp server (set up, with no site of its own)."""
    assert runner.server is not None
    return cast(asyncio.Protocol, runner.server())


class H2Handler(H2ServerOwner, Protocol):
    """A fake that answers each HTTP/2 request itself."""

    max_streams: int

    async def handle_h2(self, headers: Mapping[str, str], body: bytes) -> Answer: ...


class HandlerH2Protocol(H2ServerProtocol):
    """One connection of a fake whose `handle_h2` answers every request (FakeFcm, FakePushService)."""

    def __init__(self, fake: H2Handler) -> None:
        super().__init__(fake, max_streams=fake.max_streams)
        self.fake = fake

    async def respond(self, headers: dict[str, str], body: bytes) -> Answer:
        return await self.fake.handle_h2(headers, body)


class Holding(Protocol):
    """The knobs FakeFcm and FakePushService share for slow or hung services."""

    hang: bool  # hold every answer until `resume()`
    hanging: int  # answers held now
    delay_s: float  # delay every answer
    _release: asyncio.Event
    _stopping: bool


async def hold(fake: Holding) -> bool:
    """Wait as `hang` and `delay_s` say; False when the fake began stopping meanwhile (answer 503)."""
    if fake.hang:
        fake.hanging += 1
        try:
            await fake._release.wait()
        finally:
            fake.hanging -= 1
        if fake._stopping:
            return False
    if fake.delay_s > 0:
        await asyncio.sleep(fake.delay_s)
    return True
