"""One HTTP/2 connection over asyncio TLS (RFC 9113): settings, flow control, reading and writing frames.

It does what APNs, FCM and Web Push need and no more: POST with a small body, the server's
MAX_CONCURRENT_STREAMS (APNs starts at 1 until the first authenticated request and then raises it),
flow control both ways, PING, GOAWAY (streams the server never processed fail with
`StreamRefused`, safe to resend; streams below its last id still get their answers) and connection
loss (pending streams fail with `ConnectionLost`: they may or may not have reached the server, as
with any network error). A server that breaks the protocol gets a GOAWAY and the connection is
dropped. Frames of every request started in one loop iteration go out in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import cast

from .errors import (
    CANCEL,
    COMPRESSION_ERROR,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    ConnectionLost,
    H2Error,
    NoHttp2,
    ProtocolError,
    StreamRefused,
    error_name,
)
from .frames import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    FRAME_HEADER,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    LARGEST_MAX_FRAME,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    GoAway,
    check_ping,
    check_settings_ack,
    frame,
    goaway,
    goaway_frame,
    header_block_fragment,
    rst_stream_code,
    rst_stream_frame,
    settings_entries,
    settings_frame,
    unpadded_data,
    window_increment,
    window_update_frame,
)
from .headers import HPACK_ERRORS, TABLE_SIZE_ZERO, Header, HpackDecoder, encode_headers
from .stream import CLOSED, HALF_CLOSED_LOCAL, OPEN, H2Response, Stream

Resolve = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the addresses a connection may go to, in order. Web Push passes one that refuses
private addresses, so the address it vetted is the one connected to (no second lookup to rebind)."""

# What we accept: frames up to the protocol's default (we never announce more), a receive window
# large enough that small answers never wait for our WINDOW_UPDATE, bounded header lists and bodies
# (an APNs or FCM answer is a few hundred bytes; a server sending megabytes is broken or hostile).
OUR_MAX_FRAME = DEFAULT_MAX_FRAME
OUR_STREAM_WINDOW = 1 << 20
OUR_CONN_WINDOW = 1 << 24
MAX_HEADER_LIST = 65_536
MAX_BODY = 1 << 20
_WHOLE_BLOCK = END_HEADERS | PADDED | PRIORITY_FLAG  # a HEADERS frame's flags that say how to read its payload
DEFAULT_TIMEOUT_S = 30.0  # a request's deadline when the caller gives none
SWEEP_S = 0.05  # deadlines are checked this often (at most this late)


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 connection; `await connect(...)`, then `await conn.request(headers, body)`."""

    def __init__(self, max_streams: int = 1000) -> None:
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, Stream] = {}  # the streams not CLOSED, by id
        self._own_max_streams = max_streams
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._out = bytearray()  # frames waiting for the next flush (one write per loop iteration)
        self._flush_scheduled = False
        self.loop = asyncio.get_running_loop()  # the loop it runs on (its callers read its time from it)
        self._sweep: asyncio.TimerHandle | None = None  # the deadline check, while streams are open
        self._sweep_at = 0.0
        self._inbuf = b""
        self._decoder = HpackDecoder(MAX_HEADER_LIST)
        self._next_id = 1
        # What the server allows us: its settings (the §6.5.2 defaults until its first SETTINGS).
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
        self._preface: asyncio.Future[None] = self.loop.create_future()  # the server's first SETTINGS
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

        Requests carry their deadline on their stream, and one periodic sweep per connection fails
        the late ones (RST_STREAM CANCEL, as a cancelled request), rather than a timer armed and
        cancelled per request (`asyncio.timeout`): under uvloop each would be a libuv timer handle.
        The sweep's granularity is `SWEEP_S`."""
        streams = self._streams
        if deadline is None:
            deadline = self.loop.time() + DEFAULT_TIMEOUT_S
        while len(streams) >= self._capacity and not self.closed:
            waiter = self.loop.create_future()
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
        if self._next_id > MAX_STREAM_ID:
            self._close_for_new("stream ids used up")
            if not streams:
                self.close()  # nothing left to finish on it
            raise StreamRefused("connection used up its stream ids")
        stream = self._open(headers, body, deadline)
        try:
            if stream.state is OPEN:  # the body did not fit the flow-control windows or one frame
                await self._send_body(stream.id, stream, body)
            self._flush_soon()
            return await stream.future
        except asyncio.CancelledError:
            self.abandon(stream)  # timed out or cancelled: tell the server, free the slot, keep the connection
            raise

    def start(self, headers: list[Header] | bytes, body: bytes, deadline: float) -> Stream | None:
        """`request` without a coroutine, when nothing has to be waited for: a stream is free and no
        request waits for one (it is not taken from them), the connection takes new ones, and the body
        fits both flow-control windows and one frame. Queues
        the request's frames and returns its stream; `await stream.future` for the answer (it fails
        as `request` raises, `TimeoutError` at `deadline`), and call `abandon(stream)` on giving up
        (a cancellation). Otherwise returns None and queues nothing: `request` waits for what is missing."""
        if (len(self._streams) >= self._capacity or self._slot_waiters or self.closed or self._next_id > MAX_STREAM_ID
                or len(body) > self._remote_initial_window or len(body) > self._conn_send_window
                or len(body) > self._remote_max_frame):
            return None
        stream = self._open(headers, body, deadline)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return stream

    def abandon(self, stream: Stream) -> None:
        """The caller stopped waiting for `stream`: RST_STREAM CANCEL unless it already ended (answered,
        reset, failed), its slot freed, the connection kept."""
        if self._end(stream.id) is not None and not self._lost():
            self._out += rst_stream_frame(stream.id, CANCEL)
            self._flush_soon()

    def _open(self, headers: list[Header] | bytes, body: bytes, deadline: float) -> Stream:
        """A new stream with the request's HEADERS queued, and its DATA when the body fits the windows
        and one frame (then the stream is HALF_CLOSED_LOCAL; else OPEN, for `_send_body`)."""
        # bytes: a header block the caller encoded itself (`encode_field`), e.g. from parts it keeps.
        # Encoded before the stream exists: a bad header list fails here, leaving nothing behind.
        block = headers if isinstance(headers, bytes) else encode_headers(headers)
        stream_id = self._next_id
        self._next_id = stream_id + 2
        stream = Stream(self.loop.create_future(), self._remote_initial_window, deadline,
                        OPEN if body else HALF_CLOSED_LOCAL, stream_id)
        self._streams[stream_id] = stream
        if self._sweep is None or deadline + SWEEP_S < self._sweep_at:  # the pool's deadlines only grow
            self._arm_sweep(deadline + SWEEP_S)
        self.requests += 1
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
                stream.state = HALF_CLOSED_LOCAL
        return stream

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._transport is not None and not self._transport.is_closing():
            self._out += goaway_frame(NO_ERROR)
            self._flush()
            self._transport.close()
        self._close_for_new("closed by us")

    # --- deadlines ----------------------------------------------------------------------------

    def _arm_sweep(self, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = self.loop.call_at(when, self._sweep_deadlines)

    def _sweep_deadlines(self) -> None:
        self._sweep = None
        now = self.loop.time()
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
                    self._out += rst_stream_frame(stream_id, CANCEL)
        if late:
            self._flush()
        if first is not None and self._streams:
            self._arm_sweep(max(first, now + SWEEP_S))

    # --- sending ------------------------------------------------------------------------------

    def _send_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        """HEADERS, and CONTINUATION frames when the block exceeds the server's frame size (§6.10)."""
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

    async def _send_body(self, stream_id: int, stream: Stream, body: bytes) -> None:
        """Send `body` in DATA frames within both flow-control windows (§6.9), waiting for WINDOW_UPDATEs."""
        view = memoryview(body)
        while view:
            window = min(stream.send_window, self._conn_send_window, self._remote_max_frame)
            if window <= 0:
                self._flush_soon()
                waiter = self.loop.create_future()
                self._window_waiters[stream_id] = waiter
                await waiter
                if stream.state is CLOSED:
                    return  # answered early, failed or reset meanwhile: the stream's future says how
                continue
            chunk, view = view[:window], view[window:]
            stream.send_window -= len(chunk)
            self._conn_send_window -= len(chunk)
            self._out += frame(DATA, 0 if view else END_STREAM, stream_id, bytes(chunk))
        stream.state = HALF_CLOSED_LOCAL

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out:
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(bytes(self._out))
            self._out.clear()

    def _lost(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    # --- stream bookkeeping -------------------------------------------------------------------

    def _end(self, stream_id: int) -> Stream | None:
        """Close a stream (answered, reset or abandoned): forget it, free its slot, wake its body
        sender, and close a connection that is draining after GOAWAY once its last stream is gone."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.state = CLOSED
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

    def _complete(self, stream_id: int, stream: Stream | None) -> None:
        """The server's END_STREAM on `stream_id` (`stream`: the open stream with that id, or None)."""
        ours_open = stream is not None and stream.state is OPEN
        self._end(stream_id)
        if stream is None:
            return
        if ours_open:
            # An early answer (413 before the whole body): our half is still open, close it (§8.1).
            self._out += rst_stream_frame(stream_id, CANCEL)
        if not stream.future.done():
            if not stream.status:
                stream.future.set_exception(H2Error("stream ended without a response"))
                return
            self.completed += 1
            stream.future.set_result(H2Response(stream.status, stream.headers, stream.body))

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
            + window_update_frame(0, OUR_CONN_WINDOW - DEFAULT_WINDOW)
        )

    def data_received(self, data: bytes) -> None:
        buf = self._inbuf + data if self._inbuf else data
        pos = 0
        end = len(buf)
        unpack = FRAME_HEADER.unpack_from
        try:
            while end - pos >= 9:  # 9: the frame header's size (§4.1)
                hi, lo, ftype, flags, stream_id = unpack(buf, pos)
                length = (hi << 8) | lo
                if length > OUR_MAX_FRAME:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes (we allow {OUR_MAX_FRAME})")
                if end - pos - 9 < length:
                    break
                payload = buf[pos + 9:pos + 9 + length]
                pos += 9 + length
                stream_id &= MAX_STREAM_ID
                if ftype == HEADERS and flags & _WHOLE_BLOCK == END_HEADERS and self._block is None and stream_id:
                    # An answer's header block in one frame, unpadded, no priority (nearly every answer):
                    # straight to its block (`_frame` and `_on_headers` check and do the same).
                    self._on_block(stream_id, payload, bool(flags & END_STREAM))
                    continue
                self._frame(ftype, flags, stream_id, payload)
        except ProtocolError as e:
            self._inbuf = b""
            self._protocol_failure(e.code, str(e))
            return
        self._inbuf = buf[pos:] if pos < end else b""
        if self._conn_unacked >= OUR_CONN_WINDOW // 2:
            self._out += window_update_frame(0, self._conn_unacked)
            self._conn_unacked = 0
        self._flush()  # acks, window updates and whatever requests queued meanwhile

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is not None and ftype != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "header block interrupted before END_HEADERS")
        if ftype == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif ftype == DATA:
            self._on_data(flags, stream_id, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif ftype == RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif ftype == PING:
            check_ping(stream_id, payload)
            if not flags & ACK:
                self._out += frame(PING, ACK, 0, payload)
        elif ftype == GOAWAY:
            self._on_goaway(goaway(stream_id, payload))
        elif ftype == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE although we disabled push")
        elif ftype == PRIORITY and len(payload) != 5:
            raise ProtocolError(FRAME_SIZE_ERROR, "bad PRIORITY")
        # Unknown frame types are ignored (§4.1).

    # --- receiving: the answer ------------------------------------------------------------------

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = header_block_fragment(flags, payload) if flags & (PADDED | PRIORITY_FLAG) else payload
        if flags & END_HEADERS:
            self._on_block(stream_id, block, bool(flags & END_STREAM))
        else:
            self._block = bytearray(block)
            self._block_stream = stream_id
            self._block_end_stream = bool(flags & END_STREAM)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None or stream_id != self._block_stream:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
        self._block += payload
        if len(self._block) > MAX_HEADER_LIST:
            raise ProtocolError(PROTOCOL_ERROR, "header block too large")
        if flags & END_HEADERS:
            block, self._block = bytes(self._block), None
            self._on_block(stream_id, block, self._block_end_stream)

    def _on_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        # Every block is decoded, also for a stream we no longer track: HPACK's dynamic table is
        # shared by the connection and must follow the server's.
        try:
            fields = self._decoder.decode(block)
        except HPACK_ERRORS as e:
            raise ProtocolError(COMPRESSION_ERROR, f"HPACK: {type(e).__name__}") from None
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.status:  # after the final response, a block is trailers
            stream.receive_headers(fields)
        if end_stream:
            self._complete(stream_id, stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)  # padding counts against flow control too
        self._conn_unacked += n
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # a stream we reset or gave up on: its bytes still count for the connection window
        if not stream.status:
            raise ProtocolError(PROTOCOL_ERROR, "DATA before response headers")
        if flags & PADDED:
            payload = unpadded_data(payload)
        if payload:
            if len(stream.body) + len(payload) > MAX_BODY:
                self._end(stream_id)
                self._out += rst_stream_frame(stream_id, CANCEL)
                stream.fail(H2Error(f"response body over {MAX_BODY} bytes"))
                return
            stream.body += payload
        if flags & END_STREAM:
            self._complete(stream_id, stream)
        elif n:
            stream.unacked += n
            if stream.unacked >= OUR_STREAM_WINDOW // 2:
                self._out += window_update_frame(stream_id, stream.unacked)
                stream.unacked = 0

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        code = rst_stream_code(stream_id, payload)
        stream = self._end(stream_id)
        if stream is not None:
            # REFUSED_STREAM means "not processed" only before any answer (then it is safe to resend, §8.7).
            exc_type = StreamRefused if code == REFUSED_STREAM and not stream.status else H2Error
            stream.fail(exc_type(f"stream reset by server: {error_name(code)}"))

    # --- receiving: the connection --------------------------------------------------------------

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            check_settings_ack(payload)
            return
        for setting in settings_entries(payload):
            key, value = setting.key, setting.value
            if key == MAX_CONCURRENT_STREAMS:
                grew = value > self._remote_max_streams
                self._remote_max_streams = value
                # 0 is allowed (§6.5.2): no new streams until the server raises it again,
                # so requests wait for a slot (until their deadline) instead of opening one.
                self._capacity = min(self._own_max_streams, value)
                if grew:
                    for _ in range(min(self.capacity, len(self._slot_waiters))):
                        self._wake_slot()
            elif key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self._remote_initial_window
                self._remote_initial_window = value
                for s in self._streams.values():  # applies to open streams too (§6.9.2)
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:
                        raise ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE change takes a stream window above 2^31-1")
                if delta > 0:
                    self._wake_windows()
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= LARGEST_MAX_FRAME:
                    raise ProtocolError(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self._remote_max_frame = value
            elif key == ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            # HEADER_TABLE_SIZE limits a dynamic table we never use; MAX_HEADER_LIST_SIZE is advisory.
        self._out += frame(SETTINGS, ACK, 0)
        if not self._preface.done():
            self._preface.set_result(None)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        inc = window_increment(payload)
        if stream_id == 0:
            self._conn_send_window += inc
            if self._conn_send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            if self._window_waiters:
                self._wake_windows()
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.send_window += inc
        if stream.send_window > MAX_WINDOW:
            # A stream error, not a connection error (§6.9.1): reset this stream only.
            self._end(stream_id)
            self._out += rst_stream_frame(stream_id, FLOW_CONTROL_ERROR)
            stream.fail(H2Error("server's WINDOW_UPDATE took the stream window above 2^31-1"))
            return
        waiter = self._window_waiters.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_goaway(self, away: GoAway) -> None:
        detail = away.debug.decode("utf-8", "replace")[:100] if away.debug else ""
        self._close_for_new(f"GOAWAY {error_name(away.code)}{': ' + detail if detail else ''}")
        for stream_id in [s for s in self._streams if s > away.last_stream_id]:
            stream = self._end(stream_id)
            if stream is not None:
                stream.fail(StreamRefused("server sent GOAWAY before processing the request"))
        self._end(0)  # closes the transport now if nothing is left to drain

    def _protocol_failure(self, code: int, why: str) -> None:
        self._out += goaway_frame(code, why.encode()[:100])
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
            stream.state = CLOSED
            stream.fail(exc)
        self._wake_all()
