"""The HTTP/2 client's framing against a scripted server that writes frames by hand over TLS + ALPN h2.

The APNs and FCM fakes (jh2 on the server side) cover the common paths; this server sends what they
never do: CONTINUATION, padding, a priority block, a 1xx answer, trailers, PING, tiny flow-control
windows, large bodies, and protocol violations. Its frames are packed here with `struct` and its
header blocks encoded by jh2's HPACK encoder (Huffman and the dynamic table on), so nothing on the
server side is the client's own code.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jh2.hpack import Decoder as RefDecoder
from jh2.hpack import Encoder as RefEncoder
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.h2 import (
    ConnectionLost,
    H2ClientConnection,
    H2Error,
    StreamRefused,
    encode_field,
    encode_headers,
    field_name,
    value_length,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20

REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"localhost"),
           (b":path", b"/3/device/abc"), (b"authorization", b"bearer secret"), (b"apns-topic", b"org.example")]


def pack(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">I", stream_id) + payload


@dataclass
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes


@dataclass
class Peer:
    """The server's side of one connection, for a script to drive."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    encoder: RefEncoder = field(default_factory=RefEncoder)
    decoder: RefDecoder = field(default_factory=RefDecoder)
    seen: list[Frame] = field(default_factory=list)

    async def frame(self) -> Frame:
        head = await self.reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        f = Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, await self.reader.readexactly(length))
        self.seen.append(f)
        return f

    async def until(self, ftype: int, flags: int | None = None) -> Frame:
        while True:
            f = await self.frame()
            if f.type == ftype and (flags is None or f.flags & flags == flags):
                return f

    async def request(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """Read one whole request: (stream id, headers, body)."""
        f = await self.until(HEADERS)
        headers = dict(self.decoder.decode(f.payload, raw=True))
        body = b""
        ended = bool(f.flags & END_STREAM)
        while not ended:
            d = await self.frame()
            if d.type == DATA and d.stream == f.stream:
                body += d.payload
                ended = bool(d.flags & END_STREAM)
        return f.stream, headers, body

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    def block(self, headers: list[tuple[str, str]]) -> bytes:
        return bytes(self.encoder.encode(headers, huffman=True))


Script = Callable[[Peer], Awaitable[None]]


@pytest.fixture
async def serve(local_ca: LocalCA) -> AsyncIterator[Callable[..., Awaitable[H2ClientConnection]]]:
    """`await serve(script, settings=...)`: start a server running `script` per connection, return a client."""
    servers: list[asyncio.Server] = []
    clients: list[H2ClientConnection] = []
    tasks: list[asyncio.Task[None]] = []

    async def start(script: Script, settings: bytes = b"") -> H2ClientConnection:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert await reader.readexactly(len(PREFACE)) == PREFACE
            peer = Peer(reader, writer)
            writer.write(pack(SETTINGS, 0, 0, settings))
            tasks.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await script(peer)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=local_ca.server_context(alpn=["h2"]))
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        conn = await H2ClientConnection.connect("127.0.0.1", port, local_ca.client_context(alpn=["h2"]), timeout_s=5)
        clients.append(conn)
        return conn

    yield start
    for c in clients:
        c.close()  # its GOAWAY ends the scripts that wait for one
    if tasks:
        await asyncio.wait(tasks, timeout=5)
    for s in servers:
        s.close()


def _setting(key: int, value: int) -> bytes:
    return struct.pack(">HI", key, value)


async def test_continuation_padding_priority_informational_and_trailers(serve) -> None:  # type: ignore[no-untyped-def]
    async def script(peer: Peer) -> None:
        sid, headers, body = await peer.request()
        assert headers[b":path"] == b"/3/device/abc" and body == b'{"aps":{}}'
        peer.send(pack(HEADERS, END_HEADERS, sid, peer.block([(":status", "100")])))
        block = peer.block([(":status", "200"), ("apns-id", "1234-abcd"), ("x-long", "v" * 300)])
        pad = 7
        first = bytes((pad,)) + b"\x00\x00\x00\x00\x10" + block[:10] + b"\x00" * pad  # padded, with a priority block
        peer.send(pack(HEADERS, PADDED | PRIORITY, sid, first),
                  pack(CONTINUATION, 0, sid, block[10:20]),
                  pack(CONTINUATION, END_HEADERS, sid, block[20:]),
                  pack(DATA, PADDED, sid, bytes((3,)) + b"hello " + b"\x00" * 3),
                  pack(DATA, 0, sid, b"world"),
                  pack(HEADERS, END_HEADERS | END_STREAM, sid, peer.block([("grpc-status", "0")])))
        await peer.until(GOAWAY)

    conn = await serve(script)
    resp = await conn.request(REQUEST, b'{"aps":{}}')
    assert resp.status == 200
    assert resp.headers[b"apns-id"] == b"1234-abcd" and resp.headers[b"x-long"] == b"v" * 300
    assert resp.body == b"hello world"
    assert conn.active == 0 and conn.completed == 1


async def test_header_block_decodes_with_a_reference_decoder_and_hides_credentials(serve) -> None:  # type: ignore[no-untyped-def]
    blocks: list[bytes] = []

    async def script(peer: Peer) -> None:
        for _ in range(2):
            f = await peer.until(HEADERS)
            blocks.append(f.payload)
            peer.send(pack(HEADERS, END_HEADERS | END_STREAM, f.stream, peer.block([(":status", "204")])))
        await peer.until(GOAWAY)

    conn = await serve(script)
    assert (await conn.request(REQUEST, b"")).status == 204
    assert (await conn.request(REQUEST, b"")).status == 204
    ref = RefDecoder()
    assert blocks[0][0] == 0x20  # the first block says: no dynamic table
    for block in blocks:
        fields = ref.decode(block, raw=True)
        assert [(bytes(n), bytes(v)) for n, v in fields] == REQUEST
        auth = next(f for f in fields if f[0] == b"authorization")
        assert type(auth).__name__ == "NeverIndexedHeaderTuple"
    assert len(ref.header_table.dynamic_entries) == 0  # nothing was added to the server's table


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=300), st.binary(max_size=2000)), min_size=1, max_size=8))
def test_any_header_list_round_trips_through_a_reference_decoder(headers: list[tuple[bytes, bytes]]) -> None:
    fields = RefDecoder(max_header_list_size=1 << 20).decode(encode_headers(headers), raw=True)
    assert [(bytes(n), bytes(v)) for n, v in fields] == headers


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([b":path", b"apns-id", b"apns-collapse-id", b"authorization", b"topic", b"x-custom"]),
       st.binary(max_size=400))
def test_a_field_from_its_prebuilt_name_is_the_field_encoded_whole(name: bytes, value: bytes) -> None:
    assume((name, value) != (b":path", b"/"))  # a static-table pair: encoded as its index instead
    assert field_name(name) + value_length(len(value)) + value == encode_field(name, value)
    fields = RefDecoder(max_header_list_size=1 << 20).decode(field_name(name) + value_length(len(value)) + value, raw=True)
    assert [(bytes(n), bytes(v)) for n, v in fields] == [(name, value)]


async def test_ping_is_answered_with_its_payload(serve) -> None:  # type: ignore[no-untyped-def]
    acks: list[bytes] = []

    async def script(peer: Peer) -> None:
        peer.send(pack(PING, 0, 0, b"12345678"))
        acks.append((await peer.until(PING, ACK)).payload)
        sid, _, _ = await peer.request()
        peer.send(pack(HEADERS, END_HEADERS | END_STREAM, sid, peer.block([(":status", "200")])))
        await peer.until(GOAWAY)

    conn = await serve(script)
    assert (await conn.request(REQUEST, b"x")).status == 200
    assert acks == [b"12345678"]


async def test_body_waits_for_window_updates_of_a_tiny_window(serve) -> None:  # type: ignore[no-untyped-def]
    chunks: list[int] = []
    body = bytes(range(256)) * 4  # 1024 bytes through a 100-byte stream window

    async def script(peer: Peer) -> None:
        f = await peer.until(HEADERS)
        got = b""
        while True:
            d = await peer.until(DATA)
            chunks.append(len(d.payload))
            got += d.payload
            if d.flags & END_STREAM:
                break
            peer.send(pack(WINDOW_UPDATE, 0, f.stream, struct.pack(">I", len(d.payload))),
                      pack(WINDOW_UPDATE, 0, 0, struct.pack(">I", len(d.payload))))
        assert got == body
        peer.send(pack(HEADERS, END_HEADERS | END_STREAM, f.stream, peer.block([(":status", "200")])))
        await peer.until(GOAWAY)

    conn = await serve(script, settings=_setting(0x4, 100))  # INITIAL_WINDOW_SIZE
    assert (await asyncio.wait_for(conn.request(REQUEST, body), 5)).status == 200
    assert max(chunks) <= 100 and sum(chunks) == len(body)


async def test_large_answer_is_read_with_window_updates_and_a_huge_one_is_refused(serve) -> None:  # type: ignore[no-untyped-def]
    updates: list[tuple[int, int]] = []

    async def script(peer: Peer) -> None:
        for size in (700_000, 1_200_000):
            sid, _, _ = await peer.request()
            peer.send(pack(HEADERS, END_HEADERS, sid, peer.block([(":status", "200")])))
            sent = 0
            while sent < size:
                n = min(16_384, size - sent)
                sent += n
                peer.send(pack(DATA, END_STREAM if sent == size else 0, sid, b"z" * n))
                await peer.writer.drain()
            if size == 700_000:
                # read until the client returned the window for this stream
                while not any(s == sid for s, _ in updates):
                    f = await peer.until(WINDOW_UPDATE)
                    updates.append((f.stream, int.from_bytes(f.payload, "big")))
        await peer.until(GOAWAY)

    conn = await serve(script)
    resp = await asyncio.wait_for(conn.request(REQUEST, b""), 10)
    assert len(resp.body) == 700_000 and set(resp.body) == {ord("z")}
    assert updates and updates[0][1] >= 1 << 19  # returned in one update of at least half the window
    with pytest.raises(H2Error, match="body over"):
        await asyncio.wait_for(conn.request(REQUEST, b""), 10)
    assert not conn.closed  # one bad answer costs its stream, not the connection


async def test_protocol_violation_ends_the_connection_with_goaway(serve) -> None:  # type: ignore[no-untyped-def]
    goaways: list[bytes] = []

    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(pack(DATA, 0, 0, b"data on stream zero"))
        goaways.append((await peer.until(GOAWAY)).payload)

    conn = await serve(script)
    with pytest.raises(ConnectionLost, match="DATA on stream 0"):
        await asyncio.wait_for(conn.request(REQUEST, b"x"), 5)
    assert conn.closed
    assert int.from_bytes(goaways[0][4:8], "big") == 0x1  # PROTOCOL_ERROR


async def test_refused_stream_and_goaway_tell_what_may_be_resent(serve) -> None:  # type: ignore[no-untyped-def]
    async def script(peer: Peer) -> None:
        first, _, _ = await peer.request()
        peer.send(pack(RST_STREAM, 0, first, struct.pack(">I", 0x7)))  # REFUSED_STREAM
        a, _, _ = await peer.request()
        await peer.request()  # b: never processed
        # GOAWAY naming `a` as the last processed: `b` was never processed; `a` still gets its answer.
        peer.send(pack(GOAWAY, 0, 0, struct.pack(">II", a, 0) + b"maintenance"),
                  pack(HEADERS, END_HEADERS | END_STREAM, a, peer.block([(":status", "200")])))
        await asyncio.sleep(0.5)

    conn = await serve(script)
    with pytest.raises(StreamRefused):
        await conn.request(REQUEST, b"x")
    ta = asyncio.ensure_future(conn.request(REQUEST, b"a"))
    await asyncio.sleep(0.05)
    tb = asyncio.ensure_future(conn.request(REQUEST, b"b"))
    assert (await asyncio.wait_for(ta, 5)).status == 200
    with pytest.raises(StreamRefused, match="GOAWAY"):
        await asyncio.wait_for(tb, 5)
    assert conn.closed and "maintenance" in conn.close_reason
    with pytest.raises(StreamRefused):
        await conn.request(REQUEST, b"c")


async def test_stream_limit_from_settings_is_respected(serve) -> None:  # type: ignore[no-untyped-def]
    peak = 0

    async def script(peer: Peer) -> None:
        nonlocal peak
        open_ids: set[int] = set()
        done = 0
        while done < 6:
            f = await peer.until(HEADERS)
            open_ids.add(f.stream)
            peak = max(peak, len(open_ids))
            await asyncio.sleep(0.01)
            for sid in sorted(open_ids):
                peer.send(pack(HEADERS, END_HEADERS | END_STREAM, sid, peer.block([(":status", "200")])))
                done += 1
            open_ids.clear()
        await peer.until(GOAWAY)

    conn = await serve(script, settings=_setting(0x3, 2))  # MAX_CONCURRENT_STREAMS
    assert conn.capacity == 2
    answers = await asyncio.wait_for(asyncio.gather(*(conn.request(REQUEST, b"") for _ in range(6))), 5)
    assert [a.status for a in answers] == [200] * 6
    assert peak <= 2


async def test_deadline_fails_a_late_stream_with_a_reset_and_keeps_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    resets: list[tuple[int, int]] = []

    async def script(peer: Peer) -> None:
        late, _, _ = await peer.request()  # never answered
        f = await peer.until(RST_STREAM)
        resets.append((f.stream, int.from_bytes(f.payload, "big")))
        assert f.stream == late
        sid, _, _ = await peer.request()
        peer.send(pack(HEADERS, END_HEADERS | END_STREAM, sid, peer.block([(":status", "200")])))
        await peer.until(GOAWAY)

    conn = await serve(script, settings=_setting(0x3, 1))  # one stream at a time
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await conn.request(REQUEST, b"x", loop.time() + 0.2)
    assert 0.2 <= loop.time() - started < 1.0
    # A request waiting for the single stream slot is bound by its deadline too.
    blocker = asyncio.ensure_future(conn.request(REQUEST, b"y", loop.time() + 5))
    await asyncio.sleep(0)
    assert (await asyncio.wait_for(blocker, 5)).status == 200
    assert resets == [(1, 0x8)]  # CANCEL
    assert not conn.closed and conn.active == 0


async def test_waiting_for_a_stream_slot_ends_at_the_deadline(serve) -> None:  # type: ignore[no-untyped-def]
    async def script(peer: Peer) -> None:
        await peer.request()  # holds the only stream
        await peer.until(GOAWAY)

    conn = await serve(script, settings=_setting(0x3, 1))
    loop = asyncio.get_running_loop()
    holder = asyncio.ensure_future(conn.request(REQUEST, b"x", loop.time() + 5))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await conn.request(REQUEST, b"y", loop.time() + 0.1)
    holder.cancel()


async def test_an_earlier_deadline_than_the_armed_sweep_is_still_kept(serve) -> None:  # type: ignore[no-untyped-def]
    async def script(peer: Peer) -> None:
        await peer.until(GOAWAY)  # answers nothing

    conn = await serve(script)
    loop = asyncio.get_running_loop()
    slow = asyncio.ensure_future(conn.request(REQUEST, b"x", loop.time() + 30))
    await asyncio.sleep(0.01)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(conn.request(REQUEST, b"y", loop.time() + 0.2), 5)
    assert loop.time() - started < 1.0
    assert not slow.done()
    slow.cancel()


async def test_an_answer_before_the_whole_body_closes_our_half_with_a_reset(serve) -> None:  # type: ignore[no-untyped-def]
    resets: list[tuple[int, int]] = []

    async def script(peer: Peer) -> None:
        f = await peer.until(HEADERS)
        await peer.until(DATA)  # the first 100 bytes; the rest waits for a window we never give
        peer.send(pack(HEADERS, END_HEADERS | END_STREAM, f.stream, peer.block([(":status", "413")])))
        r = await peer.until(RST_STREAM)
        resets.append((r.stream, int.from_bytes(r.payload, "big")))
        await peer.until(GOAWAY)

    conn = await serve(script, settings=_setting(0x4, 100))  # INITIAL_WINDOW_SIZE
    resp = await asyncio.wait_for(conn.request(REQUEST, b"x" * 1000), 5)
    assert resp.status == 413
    await asyncio.sleep(0.1)
    conn.close()
    await asyncio.sleep(0.1)
    assert resets == [(1, 0x8)]


async def test_refused_stream_after_the_answer_began_is_not_a_safe_resend(serve) -> None:  # type: ignore[no-untyped-def]
    async def script(peer: Peer) -> None:
        sid, _, _ = await peer.request()
        peer.send(pack(HEADERS, END_HEADERS, sid, peer.block([(":status", "200")])),
                  pack(RST_STREAM, 0, sid, struct.pack(">I", 0x7)))
        await peer.until(GOAWAY)

    conn = await serve(script)
    with pytest.raises(H2Error) as info:
        await asyncio.wait_for(conn.request(REQUEST, b"x"), 5)
    assert not isinstance(info.value, StreamRefused)  # it was processed: resending could duplicate it


async def test_slot_waiters_that_gave_up_no_longer_count_as_load(serve) -> None:  # type: ignore[no-untyped-def]
    async def script(peer: Peer) -> None:
        await peer.until(GOAWAY)

    conn = await serve(script, settings=_setting(0x3, 1))
    loop = asyncio.get_running_loop()
    holder = asyncio.ensure_future(conn.request(REQUEST, b"x", loop.time() + 5))
    await asyncio.sleep(0.05)
    for _ in range(5):
        with pytest.raises(TimeoutError):
            await conn.request(REQUEST, b"y", loop.time() + 0.05)
    assert conn.load == 1.0  # the one stream in flight, not the five that left
    holder.cancel()


async def test_max_concurrent_streams_zero_holds_requests_until_the_server_raises_it(serve) -> None:  # type: ignore[no-untyped-def]
    opened_while_zero: list[int] = []

    async def script(peer: Peer) -> None:
        # Any HEADERS before our SETTINGS raise the limit would break RFC 9113 6.5.2.
        try:
            f = await asyncio.wait_for(peer.until(HEADERS), 0.3)
            opened_while_zero.append(f.stream)
        except TimeoutError:
            pass
        peer.send(pack(SETTINGS, 0, 0, _setting(0x3, 10)))
        sid, _, _ = await peer.request()
        peer.send(pack(HEADERS, END_HEADERS | END_STREAM, sid, peer.block([(":status", "200")])))
        await peer.until(GOAWAY)

    conn = await serve(script, settings=_setting(0x3, 0))
    await asyncio.sleep(0.05)  # the server's SETTINGS are in
    assert conn.capacity == 0 and conn.load == float("inf")
    answer = await asyncio.wait_for(conn.request(REQUEST, b"x"), 5)
    assert answer.status == 200 and opened_while_zero == []
    assert conn.capacity == 10


async def test_initial_window_change_past_the_maximum_is_a_connection_error(serve) -> None:  # type: ignore[no-untyped-def]
    codes: list[int] = []

    async def script(peer: Peer) -> None:
        f = await peer.until(HEADERS)  # the body waits: the stream window is 0
        # +2^31-1 on the stream, then a new initial window of 2^31-1 adds 2^31-1 more: too much.
        peer.send(pack(WINDOW_UPDATE, 0, f.stream, struct.pack(">I", 0x7FFFFFFF)),
                  pack(SETTINGS, 0, 0, _setting(0x4, 0x7FFFFFFF)))
        g = await peer.until(GOAWAY)
        codes.append(int.from_bytes(g.payload[4:8], "big"))

    conn = await serve(script, settings=_setting(0x4, 0))  # INITIAL_WINDOW_SIZE 0
    with pytest.raises(H2Error):
        await asyncio.wait_for(conn.request(REQUEST, b"body"), 5)
    await asyncio.sleep(0.05)
    assert codes == [0x3]  # FLOW_CONTROL_ERROR
    assert conn.closed


async def test_stream_window_overflow_resets_that_stream_and_keeps_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    resets: list[tuple[int, int]] = []

    async def script(peer: Peer) -> None:
        f = await peer.until(HEADERS)  # the body waits: the stream window is 0
        peer.send(pack(WINDOW_UPDATE, 0, f.stream, struct.pack(">I", 0x7FFFFFFF)),
                  pack(WINDOW_UPDATE, 0, f.stream, struct.pack(">I", 1)))
        r = await peer.until(RST_STREAM)
        resets.append((r.stream, int.from_bytes(r.payload, "big")))
        peer.send(pack(SETTINGS, 0, 0, _setting(0x4, 65535)))
        sid, _, _ = await peer.request()
        peer.send(pack(HEADERS, END_HEADERS | END_STREAM, sid, peer.block([(":status", "200")])))
        await peer.until(GOAWAY)

    conn = await serve(script, settings=_setting(0x4, 0))
    with pytest.raises(H2Error) as bad:
        await asyncio.wait_for(conn.request(REQUEST, b"body"), 5)
    assert not isinstance(bad.value, StreamRefused | ConnectionLost)  # maybe processed: not a safe resend
    assert (await asyncio.wait_for(conn.request(REQUEST, b"again"), 5)).status == 200
    assert resets == [(1, 0x3)] and not conn.closed
