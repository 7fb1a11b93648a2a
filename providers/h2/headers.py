"""Header blocks (RFC 7541, HPACK): the stateless encoding of requests, and the decoder for responses.

Requests are encoded without the dynamic table: every field is an indexed static-table pair or a
literal without indexing, after one dynamic table size update to 0 at the start of a connection's
first block (`TABLE_SIZE_ZERO`). The encoding therefore needs no per-connection state, and a
field's bytes can be computed once and reused across requests and connections.

Responses are decoded by jh2's HPACK decoder (compiled, where the build has it), one per
connection: the server may use its dynamic table, so the decoder's state must follow every block
the server sends.
"""

from __future__ import annotations

try:  # jh2's compiled HPACK; its pure-Python twin has the same interface
    from jh2._hazmat import Decoder as HpackDecoder
    from jh2._hazmat import HPACKError, OversizedHeaderListError
except ImportError:  # pragma: no cover - a jh2 build without the extension
    from jh2.hpack.exceptions import HPACKError, OversizedHeaderListError
    from jh2.hpack.hpack import Decoder as HpackDecoder

__all__ = ["HPACK_ERRORS", "TABLE_SIZE_ZERO", "Header", "HpackDecoder", "encode_field", "encode_headers", "field_name",
           "value_length"]

Header = tuple[bytes, bytes]

# What `HpackDecoder.decode` raises on a block it cannot decode (a COMPRESSION_ERROR, RFC 9113 §4.3).
HPACK_ERRORS = (HPACKError, OversizedHeaderListError, ValueError)

# Names of the static table (RFC 7541 Appendix A) that requests use; a field is sent as a literal
# with that name index, or with a literal name.
_STATIC_NAMES = {
    b":authority": 1, b":method": 2, b":path": 4, b":scheme": 6, b":status": 8, b"accept": 19,
    b"accept-encoding": 16, b"authorization": 23, b"content-length": 28, b"content-type": 31,
    b"user-agent": 58,
}
_STATIC_PAIRS = {(b":method", b"GET"): 2, (b":method", b"POST"): 3, (b":path", b"/"): 4, (b":scheme", b"http"): 6,
                 (b":scheme", b"https"): 7}
_SENSITIVE = {b"authorization"}  # never indexed by any intermediary (§7.1.3)
TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update to 0 (§6.3): the first bytes of a connection's first block


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (§5.1) in a `prefix_bits`-bit prefix; `first` carries the pattern bits."""
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
    """One header field as HPACK bytes: indexed when the static table has the pair (§6.1), else a
    literal without indexing (§6.2.2; never indexed for credentials, §6.2.3), with raw (not Huffman)
    strings."""
    index = _STATIC_PAIRS.get((name, value))
    if index is not None:
        return bytes((0x80 | index,))
    first = 0x10 if name in _SENSITIVE else 0x00
    name_index = _STATIC_NAMES.get(name)
    if name_index is None:  # a literal name
        return bytes((first,)) + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value
    return _hpack_int(name_index, 4, first) + _hpack_int(len(value), 7, 0) + value


def field_name(name: bytes) -> bytes:
    """The bytes of a literal field `name` (§6.2.2) before its value: for a value the static table has
    no pair for, `encode_field(name, value) == field_name(name) + value_length(len(value)) + value`. For
    the fields a provider adds per delivery (a device's :path, an apns-id), built once."""
    return encode_field(name, b"")[:-1]  # no static pair has an empty value; the last byte is its length 0


_LENGTHS = tuple(bytes((n,)) for n in range(127))  # a raw string's length below 127: one byte (§5.2, §5.1)


def value_length(n: int) -> bytes:
    """The HPACK length of an `n`-byte raw (not Huffman) string (§5.2)."""
    return _LENGTHS[n] if n < 127 else _hpack_int(n, 7, 0)


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
