"""HTTP/2 frames: the constants, building a frame, and checking the payloads of the control frames (RFC 9113 §4, §6).

The connection reads the 9-byte frame header itself (`FRAME_HEADER`) and dispatches on the type;
the functions here check one frame's payload and raise `ProtocolError` with the RFC's error code
when the server sent something malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import FRAME_SIZE_ERROR, PROTOCOL_ERROR, ProtocolError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the client connection preface (§3.4)

# Frame types (§6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags (§6): END_STREAM on DATA and HEADERS, ACK on SETTINGS and PING.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS identifiers (§6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = (
    range(1, 7)
)

DEFAULT_WINDOW = 65_535  # initial flow-control window of a stream and of the connection (§6.9.2)
MAX_WINDOW = 2**31 - 1  # a window may never exceed this (§6.9.1)
MAX_STREAM_ID = 2**31 - 1  # stream identifiers are 31 bits (§5.1.1); also the mask for the reserved bit
DEFAULT_MAX_FRAME = 16_384  # SETTINGS_MAX_FRAME_SIZE until a peer announces more, and its lowest value (§6.5.2)
LARGEST_MAX_FRAME = 16_777_215  # the highest SETTINGS_MAX_FRAME_SIZE allowed (§6.5.2)

# The frame header (§4.1): a 24-bit length read as 16 + 8 bits, type, flags, and a stream id whose
# top bit is reserved (masked with MAX_STREAM_ID after unpacking).
FRAME_HEADER = struct.Struct(">HBBBL")
U32 = struct.Struct(">L")  # RST_STREAM's error code, WINDOW_UPDATE's increment
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: its 9-byte header (§4.1) and payload."""
    n = len(payload)
    return FRAME_HEADER.pack(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


@dataclass(frozen=True, slots=True)
class Setting:
    """One parameter of a SETTINGS frame (§6.5.1)."""

    key: int
    value: int


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


def rst_stream_frame(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, U32.pack(code))


def goaway_frame(code: int, debug: bytes = b"") -> bytes:
    """GOAWAY naming stream 0 as the last processed: the client never processes streams the server opens."""
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(0, code) + debug)


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, U32.pack(increment))


# --- reading: payload checks ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GoAway:
    """A GOAWAY frame's payload (§6.8)."""

    last_stream_id: int  # streams above it were not processed and may be retried
    code: int
    debug: bytes


def header_block_fragment(flags: int, payload: bytes) -> bytes:
    """A HEADERS payload without its padding and priority fields (§6.2); call it only when
    PADDED or PRIORITY is set (otherwise the payload is the fragment)."""
    start, stop = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise ProtocolError(PROTOCOL_ERROR, "padded HEADERS without a pad length")
        start, stop = 1, stop - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    if stop < start:
        raise ProtocolError(PROTOCOL_ERROR, "HEADERS padding longer than the frame")
    return payload[start:stop] if start or stop != len(payload) else payload


def unpadded_data(payload: bytes) -> bytes:
    """A PADDED DATA frame's data (§6.1)."""
    n = len(payload)
    if not n or payload[0] >= n:
        raise ProtocolError(PROTOCOL_ERROR, "bad DATA padding")
    return payload[1:n - payload[0]]


def rst_stream_code(stream_id: int, payload: bytes) -> int:
    """RST_STREAM's error code (§6.4)."""
    if stream_id == 0 or len(payload) != 4:
        raise ProtocolError(PROTOCOL_ERROR if stream_id == 0 else FRAME_SIZE_ERROR, "bad RST_STREAM")
    code: int = U32.unpack(payload)[0]
    return code


def settings_entries(payload: bytes) -> list[Setting]:
    """The parameters of a SETTINGS frame that is not an ACK (§6.5), in the order sent (a later
    value for the same parameter replaces an earlier one)."""
    if len(payload) % 6:
        raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    return [Setting(*_SETTING.unpack_from(payload, i)) for i in range(0, len(payload), 6)]


def check_settings_ack(payload: bytes) -> None:
    if payload:
        raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")


def window_increment(payload: bytes) -> int:
    """WINDOW_UPDATE's increment (§6.9); 0 is a protocol error."""
    if len(payload) != 4:
        raise ProtocolError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
    increment: int = U32.unpack(payload)[0] & MAX_WINDOW
    if increment == 0:
        raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
    return increment


def check_ping(stream_id: int, payload: bytes) -> None:
    """PING belongs to the connection and carries 8 bytes (§6.7)."""
    if stream_id != 0 or len(payload) != 8:
        raise ProtocolError(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "bad PING")


def goaway(stream_id: int, payload: bytes) -> GoAway:
    """A GOAWAY frame's fields (§6.8)."""
    if stream_id != 0 or len(payload) < 8:
        raise ProtocolError(PROTOCOL_ERROR, "bad GOAWAY")
    last, code = _GOAWAY.unpack_from(payload)
    return GoAway(last & MAX_STREAM_ID, code, payload[8:])
