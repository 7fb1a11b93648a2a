"""One request's stream: its state (RFC 9113 §5.1), its flow-control windows, and the response it collects."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import PROTOCOL_ERROR, ProtocolError


class StreamState(enum.Enum):
    """The states of RFC 9113 §5.1 that a client stream passes through here.

    A stream is created as its HEADERS frame is queued, so it is never `idle`; the client disables
    server push, so no stream is ever `reserved`. It is `OPEN` while its request body is still being
    sent, `HALF_CLOSED_LOCAL` once its END_STREAM is queued (it waits for the answer), and `CLOSED`
    once it has been answered, reset by either side, or given up. When the server's END_STREAM
    arrives while the request body is still going out (an early answer, e.g. 413), the client
    resets its own half at once (§8.1), so `half-closed (remote)` is never kept either.

    Compare with the module-level aliases (`stream.state is OPEN`): they are plain globals, where
    `StreamState.OPEN` is an attribute lookup on the enum class on every use.
    """

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    CLOSED = "closed"


OPEN = StreamState.OPEN
HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
CLOSED = StreamState.CLOSED


@dataclass(frozen=True, slots=True)
class H2Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class Stream:
    """A request in flight on one connection (the connection keeps it by stream id while not CLOSED)."""

    __slots__ = ("body", "deadline", "future", "headers", "id", "send_window", "state", "status", "unacked")

    def __init__(self, future: asyncio.Future[H2Response], send_window: int, deadline: float,
                 state: StreamState, stream_id: int) -> None:
        self.id = stream_id
        self.future = future
        self.state = state  # OPEN or HALF_CLOSED_LOCAL: what the queued HEADERS frame made it
        self.deadline = deadline  # loop time after which the request fails with TimeoutError
        self.status = 0  # the final (non-1xx) response status; 0 until the final response headers arrive
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.send_window = send_window  # what we may still send on this stream
        self.unacked = 0  # DATA bytes received and not yet returned by WINDOW_UPDATE

    def receive_headers(self, fields: Sequence[tuple[Any, ...]]) -> None:
        """Take a decoded header block that arrived before the final response headers: an
        informational (1xx) block is dropped, a final one sets `status` and `headers` (RFC 9113 §8.1).
        `fields`: the HPACK decoder's (name, value, ...) tuples of bytes (raw, as decoded)."""
        status = 0
        headers = self.headers
        for field in fields:
            name = field[0]
            value = field[1]
            if name == b":status":
                try:
                    status = int(value)
                except ValueError:
                    raise ProtocolError(PROTOCOL_ERROR, "non-numeric :status") from None
            else:
                headers[name] = value
        if 100 <= status < 200:
            headers.clear()  # informational (100 Continue): the final answer follows
        elif status:
            self.status = status
        else:
            raise ProtocolError(PROTOCOL_ERROR, "response without :status")

    def fail(self, exc: BaseException) -> None:
        """End the caller's wait with `exc`, unless it already has its answer or gave up."""
        if not self.future.done():
            self.future.set_exception(exc)
