"""A small HTTP/2 client over asyncio TLS, for APNs, FCM and Web Push: one connection, and a pool of them per origin.

It reads and writes the frames itself (RFC 9113) and keeps jh2's compiled HPACK decoder for
responses (RFC 7541 state must be exact); requests are encoded without the dynamic table, so their
encoding is stateless. Why our own framing and not a library's state machine: docs/decisions.md,
"HTTP/2 client".

Modules, leaves first: `errors` (exceptions and error codes), `frames` (frame layout, building and
payload checks), `headers` (HPACK encoding and the decoder), `stream` (one stream's state and
answer), `connection` (settings, flow control, reading and writing), `pool` (`H2Pool`).
"""

from .connection import H2ClientConnection, Resolve
from .errors import ConnectionLost, H2Error, NoHttp2, StreamRefused
from .headers import Header, encode_field, encode_headers, field_name, value_length
from .pool import H2Pool
from .stream import H2Response

__all__ = [
    "ConnectionLost",
    "H2ClientConnection",
    "H2Error",
    "H2Pool",
    "H2Response",
    "Header",
    "NoHttp2",
    "Resolve",
    "StreamRefused",
    "encode_field",
    "encode_headers",
    "field_name",
    "value_length",
]
