"""A small HTTP/2 client over asyncio TLS, for APNs, FCM and Web Push: one connection, and a pool of them per origin.

Why our own framing: aioapns 4.0 keeps one dict entry per successful push on a connection (it grows
without bound on a long-lived connection) and needs ALPN "h2" set on a caller's own SSL context;
it and httpx run on the pure-Python `h2` state machine, measured here at about 200 us per request.
The first version of this module drove `jh2` (the same state machine, with compiled HPACK): its
frame objects, event objects and per-stream state machines were still about 30% of a worker's CPU
under `pushgw bench` (py-spy, 2026-11-25). A client that only ever sends small POSTs needs little
of that generality, so this module reads and writes the frames itself (RFC 9113) and keeps jh2's
compiled HPACK decoder for responses (RFC 7541 state must be exact). Requests are encoded without
the dynamic table (literal header fields, a table size update to 0 first), so their encoding is
stateless and a header field's bytes are computed once and reused.

It does what APNs and FCM need and no more: POST with a small body, the server's
MAX_CONCURRENT_STREAMS (APNs starts at 1 until the first authenticated request and then raises it),
flow control both ways, PING, GOAWAY (streams the server never processed fail with
`StreamRefused`, safe to resend; streams below its last id still get their answers) and connection
loss (pending streams fail with `ConnectionLost`: they may or may not have reached the server, as
with any network error). A server that breaks the protocol gets a GOAWAY and the connection is
dropped. Frames of every request started in one loop iteration go out in one write. `H2Pool` keeps a
few long-lived connections to one origin and opens another only when every open one has all the
streams the server allows in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

try:  # jh2's compiled HPACK (Rust); its pure-Python twin has the same interface
    from jh2._hazmat import Decoder as _HpackDecoder
    from jh2._hazmat import HPACKError as _HpackError
    from jh2._hazmat import OversizedHeaderListError as _HpackTooLarge
except ImportError:  # pragma: no cover - a jh2 build without the extension
    from jh2.hpack.exceptions import HPACKError as _HpackError
    from jh2.hpack.exceptions import OversizedHeaderListError as _HpackTooLarge
    from jh2.hpack.hpack import Decoder as _HpackDecoder

Header = tuple[bytes, bytes]
Resolve = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the addresses a connection may go to, in order. Web Push passes one that refuses
private addresses, so the address it vetted is the one connected to (no second lookup to rebind)."""

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS identifiers.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = (
    range(1, 7)
)

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x0, 0x1, 0x3, 0x6, 0x7, 0x8
ERROR_NAMES = {
    0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM",
    0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR", 0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED",
}

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
# What we accept: frames up to the protocol's default (we never announce more), a receive window
# large enough that small answers never wait for our WINDOW_UPDATE, bounded header lists and bodies
# (an APNs or FCM answer is a few hundred bytes; a server sending megabytes is broken or hostile).
OUR_MAX_FRAME = 16_384
OUR_STREAM_WINDOW = 1 << 20
OUR_CONN_WINDOW = 1 << 24
MAX_HEADER_LIST = 65_536
MAX_BODY = 1 << 20
DEFAULT_TIMEOUT_S = 30.0  # a request's deadline when the caller gives none
SWEEP_S = 0.05  # deadlines are checked this often (at most this late)

_FRAME = struct.Struct(">HBBBL")  # 24-bit length split as 16 + 8, type, flags, stream id (+ reserved bit)
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: 9-byte header (RFC 9113 section 4.1) and payload."""
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


# --- HPACK, encoding side (RFC 7541) ---------------------------------------------------------------
# Names of the static table (Appendix A) that requests use; a field is sent as a literal with that
# name index, or with a literal name. Nothing goes into the dynamic table, so encoding needs no state.
_STATIC_NAMES = {
    b":authority": 1, b":method": 2, b":path": 4, b":scheme": 6, b":status": 8, b"accept": 19,
    b"accept-encoding": 16, b"authorization": 23, b"content-length": 28, b"content-type": 31,
    b"user-agent": 58,
}
_STATIC_PAIRS = {(b":method", b"GET"): 2, (b":method", b"POST"): 3, (b":path", b"/"): 4, (b":scheme", b"http"): 6,
                 (b":scheme", b"https"): 7}
_SENSITIVE = {b"authorization"}  # never indexed by any intermediary (RFC 7541 section 7.1.3)
TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update to 0: the first bytes of a connection's first block


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (section 5.1) in a `prefix_bits`-bit prefix; `first` carries the pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(name: bytes, value: bytes) -> bytes:
    """One header field as HPACK bytes: indexed when the static table has the pair, else a literal
    without indexing (never indexed for credentials), with raw (not Huffman) strings."""
    index = _STATIC_PAIRS.get((name, value))
    if index is not None:
        return bytes((0x80 | index,))
    first = 0x10 if name in _SENSITIVE else 0x00
    name_index = _STATIC_NAMES.get(name)
    if name_index is None:  # a literal name
        return bytes((first,)) + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value
    return _hpack_int(name_index, 4, first) + _hpack_int(len(value), 7, 0) + value


_FIELD_CACHE: dict[Header, bytes] = {}
_FIELD_CACHE_MAX = 4096
# Fields whose value changes per request or per device: encoded each time, never cached (they would
# only push the repeating fields out of the cache).
_VOLATILE = frozenset({b":path", b"content-length", b"ttl", b"topic", b"apns-id", b"apns-expiration",
                       b"apns-collapse-id"})


def encode_headers(headers: list[Header]) -> bytes:
    """A header block for `headers`. Fields repeat across requests (method, authority, topic, the
    bearer token), so each field's bytes are kept, up to a bound; per-request values (a device's
    path, an apns-id) are encoded each time."""
    cache = _FIELD_CACHE
    parts = []
    for h in headers:
        b = cache.get(h)
        if b is None:
            b = encode_field(h[0], h[1])
            if h[0] not in _VOLATILE:
                if len(cache) >= _FIELD_CACHE_MAX:
                    cache.clear()
                cache[h] = b
        parts.append(b)
    return b"".join(parts)


# --- the client ------------------------------------------------------------------------------------


class H2Error(Exception):
    """A request failed at the HTTP/2 layer; `str()` says why."""


class NoHttp2(H2Error):
    """The server finished the TLS handshake without choosing ALPN "h2": it does not speak HTTP/2 there."""


class StreamRefused(H2Error):
    """The server did not process the request (GOAWAY above it, or REFUSED_STREAM): resend it."""


class ConnectionLost(H2Error):
    """The connection closed with the request in flight: it may or may not have been processed."""


class _ProtocolError(Exception):
    """The server broke the protocol: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@dataclass(frozen=True, slots=True)
class H2Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _Stream:
    __slots__ = ("body", "deadline", "future", "got_final", "headers", "send_window", "sent_all", "status", "unacked")

    def __init__(self, future: asyncio.Future[H2Response], send_window: int, deadline: float) -> None:
        self.future = future
        self.deadline = deadline  # loop time after which the request fails with TimeoutError
        self.status = 0
        self.got_final = False  # final (non-1xx) response headers received
        self.sent_all = False  # our END_STREAM is out (or queued)
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.send_window = send_window  # what we may still send on this stream
        self.unacked = 0  # DATA bytes received and not yet returned by WINDOW_UPDATE


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 connection; `await connect(...)`, then `await conn.request(headers, body)`."""

    def __init__(self, max_streams: int = 1000) -> None:
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._own_max_streams = max_streams
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._out = bytearray()  # frames waiting for the next flush (one write per loop iteration)
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._sweep: asyncio.TimerHandle | None = None  # the deadline check, while streams are open
        self._sweep_at = 0.0
        self._inbuf = b""
        self._decoder = _HpackDecoder(MAX_HEADER_LIST)
        self._next_id = 1
        # What the server allows us: settings (RFC 9113 section 6.5.2 defaults until its SETTINGS).
        self._remote_max_streams = MAX_STREAM_ID  # "unlimited" until it says
        self._capacity = max(1, max_streams)  # min(ours, the server's): read on every request, so kept
        self._remote_initial_window = DEFAULT_WINDOW
        self._remote_max_frame = OUR_MAX_FRAME
        self._conn_send_window = DEFAULT_WINDOW
        self._conn_unacked = 0  # DATA bytes received on the connection, not yet returned
        self._block: bytearray | None = None  # a header block continued by CONTINUATION frames
        self._block_stream = 0
        self._block_end_stream = False
        self._first_block = True  # starts with TABLE_SIZE_ZERO
        self.closed = False  # no new requests: lost, GOAWAY received, or stream ids used up
        self.close_reason = ""
        self.requests = 0
        self.completed = 0  # requests answered: a GOAWAY before the first is a failed connection
        self._preface: asyncio.Future[None] = self._loop.create_future()  # the server's first SETTINGS
        self._alpn_h2 = False  # the TLS handshake chose HTTP/2

    # --- public -------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, host: str, port: int, ssl_context: ssl.SSLContext, *, timeout_s: float, max_streams: int = 1000,
        resolve: Resolve | None = None,
    ) -> H2ClientConnection:
        """Open TCP + TLS with ALPN h2; raise `H2Error` if the server does not speak HTTP/2.

        With `resolve`, the connection goes to the first of its addresses that accepts, while SNI and
        the certificate check still use `host`; whatever `resolve` raises propagates."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            if resolve is None:
                transport, proto = await loop.create_connection(
                    lambda: cls(max_streams), host, port, ssl=ssl_context, server_hostname=host
                )
            else:
                error: OSError = OSError(f"{host}: no address to connect to")
                for address in await resolve(host, port):
                    try:
                        transport, proto = await loop.create_connection(
                            lambda: cls(max_streams), address, port, ssl=ssl_context, server_hostname=host
                        )
                        break
                    except OSError as e:  # ssl.SSLError included; the next address may be another server
                        error = e
                else:
                    raise error
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
        if not self._capacity:  # the server allows no streams now (SETTINGS_MAX_CONCURRENT_STREAMS 0)
            return float("inf")
        return (len(self._streams) + len(self._slot_waiters)) / self._capacity

    @property
    def capacity(self) -> int:
        """How many streams may be open at once right now (the server's limit, capped by ours)."""
        return self._capacity

    async def request(self, headers: list[Header] | bytes, body: bytes, deadline: float | None = None) -> H2Response:
        """Send one request and wait for the whole response; `TimeoutError` at `deadline` (loop time).

        Why not `asyncio.timeout` around each request: under uvloop every timer is a libuv timer
        handle, and arming and cancelling one per request measured 8% of a worker's CPU (py-spy).
        Streams carry their deadline instead, and one periodic sweep per connection fails the late
        ones (RST_STREAM CANCEL, as a cancelled request). Its granularity is `SWEEP_S`."""
        streams = self._streams
        if deadline is None:
            deadline = self._loop.time() + DEFAULT_TIMEOUT_S
        while len(streams) >= self._capacity and not self.closed:
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):  # only when waiting: the rare path
                    await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_slot()  # we were handed a free slot but leave: pass it on
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._slot_waiters.remove(waiter)  # else `load` would still count it
                raise
        if self.closed:
            raise StreamRefused(f"connection closed: {self.close_reason}")
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            self._close_for_new("stream ids used up")
            if not streams:
                self.close()  # nothing left to finish on it
            raise StreamRefused("connection used up its stream ids")
        # bytes: a header block the caller encoded itself (`encode_field`), e.g. from parts it keeps.
        # Encoded before the stream exists: a bad header list fails here, leaving nothing behind.
        block = headers if isinstance(headers, bytes) else encode_headers(headers)
        self._next_id = stream_id + 2
        stream = _Stream(self._loop.create_future(), self._remote_initial_window, deadline)
        streams[stream_id] = stream
        if self._sweep is None or deadline + SWEEP_S < self._sweep_at:  # the pool's deadlines only grow
            self._arm_sweep(deadline + SWEEP_S)
        self.requests += 1
        try:
            if self._first_block:
                # We never use the server's dynamic table; saying so once means a later lower
                # SETTINGS_HEADER_TABLE_SIZE can never require a table size update from us.
                block = TABLE_SIZE_ZERO + block
                self._first_block = False
            self._send_headers(stream_id, block, not body)
            if body:
                n = len(body)
                if n <= stream.send_window and n <= self._conn_send_window and n <= self._remote_max_frame:
                    stream.send_window -= n
                    self._conn_send_window -= n
                    self._out += frame(DATA, END_STREAM, stream_id, body)
                else:
                    await self._send_body(stream_id, stream, body)
            stream.sent_all = True
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
            return await stream.future
        except asyncio.CancelledError:
            # Timed out or cancelled: tell the server, free the slot, keep the connection.
            if self._end(stream_id) is not None and not self._lost():
                self._out += frame(RST_STREAM, 0, stream_id, _U32.pack(CANCEL))
                self._flush_soon()
            raise

    def _arm_sweep(self, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = self._loop.call_at(when, self._sweep_deadlines)

    def _sweep_deadlines(self) -> None:
        self._sweep = None
        now = self._loop.time()
        first = None
        late = []
        for stream_id, stream in self._streams.items():
            if stream.deadline <= now:
                late.append(stream_id)
            elif first is None or stream.deadline < first:
                first = stream.deadline
        for stream_id in late:
            ended = self._end(stream_id)
            if ended is not None and not ended.future.done():
                ended.future.set_exception(TimeoutError(f"no answer within the deadline (stream {stream_id})"))
                if not self._lost():
                    self._out += frame(RST_STREAM, 0, stream_id, _U32.pack(CANCEL))
        if late:
            self._flush()
        if first is not None and self._streams:
            self._arm_sweep(max(first, now + SWEEP_S))

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._transport is not None and not self._transport.is_closing():
            self._out += frame(GOAWAY, 0, 0, _GOAWAY.pack(0, NO_ERROR))
            self._flush()
            self._transport.close()
        self._close_for_new("closed by us")

    # --- sending ------------------------------------------------------------------------------

    def _send_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        flags = END_STREAM if end_stream else 0
        limit = self._remote_max_frame
        if len(block) <= limit:
            self._out += frame(HEADERS, flags | END_HEADERS, stream_id, block)
            return
        view = memoryview(block)
        self._out += frame(HEADERS, flags, stream_id, bytes(view[:limit]))
        view = view[limit:]
        while view:
            chunk, view = view[:limit], view[limit:]
            self._out += frame(CONTINUATION, 0 if view else END_HEADERS, stream_id, bytes(chunk))

    async def _send_body(self, stream_id: int, stream: _Stream, body: bytes) -> None:
        """Send `body` in DATA frames within both flow-control windows, waiting for WINDOW_UPDATEs."""
        view = memoryview(body)
        while view:
            window = min(stream.send_window, self._conn_send_window, self._remote_max_frame)
            if window <= 0:
                self._flush_soon()
                waiter = self._loop.create_future()
                self._window_waiters[stream_id] = waiter
                await waiter
                if stream_id not in self._streams:
                    return  # answered early, failed or reset meanwhile: the stream's future says how
                continue
            chunk, view = view[:window], view[window:]
            stream.send_window -= len(chunk)
            self._conn_send_window -= len(chunk)
            self._out += frame(DATA, 0 if view else END_STREAM, stream_id, bytes(chunk))

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out:
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(bytes(self._out))
            self._out.clear()

    def _lost(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    # --- stream bookkeeping -------------------------------------------------------------------

    def _end(self, stream_id: int) -> _Stream | None:
        """Forget a stream (answered, reset or abandoned): free its slot, wake its body sender, and
        close a connection that is draining after GOAWAY once its last stream is gone."""
        stream = self._streams.pop(stream_id, None)
        if self._window_waiters:
            waiter = self._window_waiters.pop(stream_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if stream is not None and self._slot_waiters:
            self._wake_slot()
        if self.closed and not self._streams and not self._lost():
            assert self._transport is not None
            self._flush()
            self._transport.close()
        return stream

    def _wake_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_windows(self) -> None:
        waiters = list(self._window_waiters.values())
        self._window_waiters.clear()
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _wake_all(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        self._wake_windows()

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
        transport.write(
            PREFACE
            + settings_frame({ENABLE_PUSH: 0, MAX_CONCURRENT_STREAMS: 0, INITIAL_WINDOW_SIZE: OUR_STREAM_WINDOW,
                              MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
            + frame(WINDOW_UPDATE, 0, 0, _U32.pack(OUR_CONN_WINDOW - DEFAULT_WINDOW))
        )

    def data_received(self, data: bytes) -> None:
        buf = self._inbuf + data if self._inbuf else data
        pos = 0
        end = len(buf)
        unpack = _FRAME.unpack_from
        try:
            while end - pos >= 9:
                hi, lo, ftype, flags, stream_id = unpack(buf, pos)
                length = (hi << 8) | lo
                if length > OUR_MAX_FRAME:
                    raise _ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes (we allow {OUR_MAX_FRAME})")
                if end - pos - 9 < length:
                    break
                payload = buf[pos + 9:pos + 9 + length]
                pos += 9 + length
                self._frame(ftype, flags, stream_id & MAX_STREAM_ID, payload)
        except _ProtocolError as e:
            self._inbuf = b""
            self._protocol_failure(e.code, str(e))
            return
        self._inbuf = buf[pos:] if pos < end else b""
        if self._conn_unacked >= OUR_CONN_WINDOW // 2:
            self._out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_unacked))
            self._conn_unacked = 0
        self._flush()  # acks, window updates and whatever requests queued meanwhile

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is not None and ftype != CONTINUATION:
            raise _ProtocolError(PROTOCOL_ERROR, "header block interrupted before END_HEADERS")
        if ftype == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif ftype == DATA:
            self._on_data(flags, stream_id, payload)
        elif ftype == CONTINUATION:
            if self._block is None or stream_id != self._block_stream:
                raise _ProtocolError(PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
            self._block += payload
            if len(self._block) > MAX_HEADER_LIST:
                raise _ProtocolError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                block, self._block = bytes(self._block), None
                self._on_block(stream_id, block, self._block_end_stream)
        elif ftype == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif ftype == RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise _ProtocolError(PROTOCOL_ERROR if stream_id == 0 else FRAME_SIZE_ERROR, "bad RST_STREAM")
            code = _U32.unpack(payload)[0]
            stream = self._end(stream_id)
            if stream is not None and not stream.future.done():
                # REFUSED_STREAM means "not processed" only before any answer (then it is safe to resend).
                exc_type = StreamRefused if code == REFUSED_STREAM and not stream.got_final else H2Error
                stream.future.set_exception(exc_type(f"stream reset by server: {_error_name(code)}"))
        elif ftype == PING:
            if stream_id != 0 or len(payload) != 8:
                raise _ProtocolError(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self._out += frame(PING, ACK, 0, payload)
        elif ftype == GOAWAY:
            if stream_id != 0 or len(payload) < 8:
                raise _ProtocolError(PROTOCOL_ERROR, "bad GOAWAY")
            last, code = _GOAWAY.unpack_from(payload)
            self._on_goaway(last & MAX_STREAM_ID, code, payload[8:])
        elif ftype == PUSH_PROMISE:
            raise _ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE although we disabled push")
        elif ftype == PRIORITY and len(payload) != 5:
            raise _ProtocolError(FRAME_SIZE_ERROR, "bad PRIORITY")
        # Unknown frame types are ignored (RFC 9113 section 4.1).

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start, stop = 0, len(payload)
        if flags & PADDED:
            if not payload:
                raise _ProtocolError(PROTOCOL_ERROR, "padded HEADERS without a pad length")
            start, stop = 1, stop - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if stop < start:
            raise _ProtocolError(PROTOCOL_ERROR, "HEADERS padding longer than the frame")
        block = payload[start:stop] if start or stop != len(payload) else payload
        if flags & END_HEADERS:
            self._on_block(stream_id, block, bool(flags & END_STREAM))
        else:
            self._block = bytearray(block)
            self._block_stream = stream_id
            self._block_end_stream = bool(flags & END_STREAM)

    def _on_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        # Every block is decoded, also for a stream we no longer track: HPACK's dynamic table is
        # shared by the connection and must follow the server's.
        try:
            fields = self._decoder.decode(block)
        except (_HpackError, _HpackTooLarge, ValueError) as e:
            raise _ProtocolError(0x9, f"HPACK: {type(e).__name__}") from None  # COMPRESSION_ERROR
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.got_final:
            status = 0
            headers = stream.headers
            for field in fields:
                name, value = cast(bytes, field[0]), cast(bytes, field[1])
                if name == b":status":
                    try:
                        status = int(value)
                    except ValueError:
                        raise _ProtocolError(PROTOCOL_ERROR, "non-numeric :status") from None
                else:
                    headers[name] = value
            if 100 <= status < 200:
                headers.clear()  # informational (100 Continue): the final answer follows
            elif status:
                stream.status = status
                stream.got_final = True
            else:
                raise _ProtocolError(PROTOCOL_ERROR, "response without :status")
        if end_stream:
            self._complete(stream_id)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)  # padding counts against flow control too
        self._conn_unacked += n
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # a stream we reset or gave up on: its bytes still count for the connection window
        if not stream.got_final:
            raise _ProtocolError(PROTOCOL_ERROR, "DATA before response headers")
        if flags & PADDED:
            if not n or payload[0] >= n:
                raise _ProtocolError(PROTOCOL_ERROR, "bad DATA padding")
            payload = payload[1:n - payload[0]]
        if payload:
            if len(stream.body) + len(payload) > MAX_BODY:
                self._end(stream_id)
                self._out += frame(RST_STREAM, 0, stream_id, _U32.pack(CANCEL))
                if not stream.future.done():
                    stream.future.set_exception(H2Error(f"response body over {MAX_BODY} bytes"))
                return
            stream.body += payload
        if flags & END_STREAM:
            self._complete(stream_id)
        elif n:
            stream.unacked += n
            if stream.unacked >= OUR_STREAM_WINDOW // 2:
                self._out += frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacked))
                stream.unacked = 0

    def _complete(self, stream_id: int) -> None:
        stream = self._end(stream_id)  # an early answer (413 before the body) ends the send too
        if stream is not None and not stream.sent_all:
            # Our half is still open (the body was waiting for window): close it (RFC 9113 8.1).
            self._out += frame(RST_STREAM, 0, stream_id, _U32.pack(CANCEL))
        if stream is not None and not stream.future.done():
            if not stream.got_final:
                stream.future.set_exception(H2Error("stream ended without a response"))
                return
            self.completed += 1
            stream.future.set_result(H2Response(stream.status, stream.headers, stream.body))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise _ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ProtocolError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == MAX_CONCURRENT_STREAMS:
                grew = value > self._remote_max_streams
                self._remote_max_streams = value
                # 0 is allowed (RFC 9113 6.5.2): no new streams until the server raises it again,
                # so requests wait for a slot (until their deadline) instead of opening one.
                self._capacity = min(self._own_max_streams, value)
                if grew:
                    for _ in range(min(self.capacity, len(self._slot_waiters))):
                        self._wake_slot()
            elif key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self._remote_initial_window
                self._remote_initial_window = value
                for s in self._streams.values():  # applies to open streams too (section 6.9.2)
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:
                        raise _ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE change takes a stream window above 2^31-1")
                if delta > 0:
                    self._wake_windows()
            elif key == MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise _ProtocolError(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self._remote_max_frame = value
            elif key == ENABLE_PUSH and value > 1:
                raise _ProtocolError(PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            # HEADER_TABLE_SIZE limits a dynamic table we never use; MAX_HEADER_LIST_SIZE is advisory.
        self._out += frame(SETTINGS, ACK, 0)
        if not self._preface.done():
            self._preface.set_result(None)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ProtocolError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        inc = _U32.unpack(payload)[0] & MAX_WINDOW
        if inc == 0:
            raise _ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if stream_id == 0:
            self._conn_send_window += inc
            if self._conn_send_window > MAX_WINDOW:
                raise _ProtocolError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            if self._window_waiters:
                self._wake_windows()
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.send_window += inc
        if stream.send_window > MAX_WINDOW:
            # A stream error, not a connection error (RFC 9113 6.9.1): reset this stream only.
            self._end(stream_id)
            self._out += frame(RST_STREAM, 0, stream_id, _U32.pack(FLOW_CONTROL_ERROR))
            if not stream.future.done():
                stream.future.set_exception(H2Error("server's WINDOW_UPDATE took the stream window above 2^31-1"))
            return
        waiter = self._window_waiters.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_goaway(self, last: int, code: int, debug: bytes) -> None:
        detail = debug.decode("utf-8", "replace")[:100] if debug else ""
        self._close_for_new(f"GOAWAY {_error_name(code)}{': ' + detail if detail else ''}")
        for stream_id in [s for s in self._streams if s > last]:
            stream = self._end(stream_id)
            if stream is not None and not stream.future.done():
                stream.future.set_exception(StreamRefused("server sent GOAWAY before processing the request"))
        self._end(0)  # closes the transport now if nothing is left to drain

    def _protocol_failure(self, code: int, why: str) -> None:
        self._out += frame(GOAWAY, 0, 0, _GOAWAY.pack(0, code) + why.encode()[:100])
        self._flush()
        self._fail_all(ConnectionLost(f"HTTP/2 protocol error from server: {why}"))
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {type(exc).__name__}" if exc else "connection closed by server"
        self._fail_all(ConnectionLost(reason))

    def _fail_all(self, exc: H2Error) -> None:
        self._close_for_new(str(exc))
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if not self._preface.done():
            self._preface.set_exception(exc)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            if not stream.future.done():
                stream.future.set_exception(exc)
        self._wake_all()


def _error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"error {code:#x}")


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

    async def request(self, headers: list[Header] | bytes, body: bytes) -> H2Response:
        """Send one request and wait for its response, `timeout_s` at most in all (connecting,
        waiting for a stream, resends included).

        Raises `TimeoutError` when that time is up, `StreamRefused` when `resends` connections in a
        row refused it unprocessed, `ConnectionLost` when a connection closed with it in flight, and
        from connecting: `NoHttp2`, `H2Error`, `OSError`, `ssl.SSLError` (certificate verification
        included), and whatever `resolve` raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        for _ in range(self.resends):
            conns = self.conns
            # The common case first: one open connection with a free stream.
            if len(conns) == 1 and not (conn := conns[0]).closed and conn.load < 1.0:
                pass
            else:
                async with asyncio.timeout_at(deadline):
                    conn = await self.connection()
            try:
                return await conn.request(headers, body, deadline)
            except StreamRefused:
                continue
        raise StreamRefused(f"request refused on {self.resends} connections")

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
