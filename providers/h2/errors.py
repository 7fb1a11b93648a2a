"""What can go wrong on an HTTP/2 connection: the exceptions callers see, and the error codes (RFC 9113 §7)."""

from __future__ import annotations

# Error codes (RFC 9113 §7) that the client sends or acts on.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9

ERROR_NAMES = {
    0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM",
    0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR", 0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED",
}


def error_name(code: int) -> str:
    """The RFC's name for an error code, or its number when the RFC has none."""
    return ERROR_NAMES.get(code, f"error {code:#x}")


class H2Error(Exception):
    """A request failed at the HTTP/2 layer; `str()` says why."""


class NoHttp2(H2Error):
    """The server finished the TLS handshake without choosing ALPN "h2": it does not speak HTTP/2 there."""


class StreamRefused(H2Error):
    """The server did not process the request (GOAWAY above it, or REFUSED_STREAM): resend it."""


class ConnectionLost(H2Error):
    """The connection closed with the request in flight: it may or may not have been processed."""


class ProtocolError(Exception):
    """The server broke the protocol (a connection error, RFC 9113 §5.4.1): the connection ends with
    GOAWAY(code). Raised while reading frames; never reaches a caller of `request`."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code
