"""The HTTP/2 client's parts on their own: frame payload checks, a stream's response headers and
state, and how the modules of providers/h2/ may import one another.

The whole client against a server that writes frames by hand is in test_h2.py.
"""

from __future__ import annotations

import ast
import asyncio
import struct
from pathlib import Path

import pytest
from pushgw.providers.h2 import errors, frames
from pushgw.providers.h2.stream import CLOSED, HALF_CLOSED_LOCAL, OPEN, Stream, StreamState

H2_DIR = Path(frames.__file__).parent
MODULES = ["errors", "frames", "headers", "stream", "connection", "pool"]  # leaves first


def test_a_built_frame_has_the_rfc_header_layout() -> None:
    built = frames.frame(frames.HEADERS, frames.END_HEADERS | frames.END_STREAM, 5, b"abc")
    assert built == b"\x00\x00\x03" + bytes((frames.HEADERS, 0x5)) + struct.pack(">I", 5) + b"abc"


def test_padding_and_priority_are_stripped_from_a_headers_payload() -> None:
    payload = bytes((2,)) + b"\x00\x00\x00\x03\x10" + b"block" + b"\x00\x00"
    assert frames.header_block_fragment(frames.PADDED | frames.PRIORITY_FLAG, payload) == b"block"
    with pytest.raises(errors.ProtocolError) as e:
        frames.header_block_fragment(frames.PADDED, bytes((9,)) + b"ab")
    assert e.value.code == errors.PROTOCOL_ERROR


def test_data_padding_as_long_as_the_frame_is_a_protocol_error() -> None:
    assert frames.unpadded_data(bytes((1,)) + b"hi" + b"\x00") == b"hi"
    for bad in (b"", bytes((3,)) + b"ab"):
        with pytest.raises(errors.ProtocolError):
            frames.unpadded_data(bad)


def test_control_frame_checks_raise_the_rfc_error_codes() -> None:
    with pytest.raises(errors.ProtocolError) as e:
        frames.window_increment(struct.pack(">I", 0))
    assert e.value.code == errors.PROTOCOL_ERROR
    with pytest.raises(errors.ProtocolError) as e:
        frames.rst_stream_code(1, b"\x00")
    assert e.value.code == errors.FRAME_SIZE_ERROR
    with pytest.raises(errors.ProtocolError) as e:
        frames.check_ping(1, b"12345678")
    assert e.value.code == errors.PROTOCOL_ERROR
    with pytest.raises(errors.ProtocolError) as e:
        frames.settings_entries(b"\x00" * 7)
    assert e.value.code == errors.FRAME_SIZE_ERROR
    assert frames.window_increment(struct.pack(">I", 0x80000010)) == 0x10  # the reserved bit is ignored


def test_goaway_and_settings_payloads_read_as_named_fields() -> None:
    away = frames.goaway(0, struct.pack(">LL", 0x80000007, errors.NO_ERROR) + b"bye")
    assert (away.last_stream_id, away.code, away.debug) == (7, errors.NO_ERROR, b"bye")
    entries = frames.settings_entries(struct.pack(">HLHL", frames.MAX_CONCURRENT_STREAMS, 10, frames.ENABLE_PUSH, 0))
    assert [(s.key, s.value) for s in entries] == [(frames.MAX_CONCURRENT_STREAMS, 10), (frames.ENABLE_PUSH, 0)]


async def test_a_stream_keeps_only_its_final_response_headers() -> None:
    stream = Stream(asyncio.get_running_loop().create_future(), 65_535, 0.0, HALF_CLOSED_LOCAL, 1)
    stream.receive_headers([(b":status", b"100"), (b"x-early", b"1")])
    assert stream.status == 0 and stream.headers == {}
    stream.receive_headers([(b":status", b"200"), (b"apns-id", b"abc")])
    assert stream.status == 200 and stream.headers == {b"apns-id": b"abc"}


async def test_a_response_without_a_numeric_status_is_a_protocol_error() -> None:
    stream = Stream(asyncio.get_running_loop().create_future(), 65_535, 0.0, OPEN, 1)
    for fields in ([(b"apns-id", b"abc")], [(b":status", b"ok")]):
        with pytest.raises(errors.ProtocolError) as e:
            stream.receive_headers(fields)
        assert e.value.code == errors.PROTOCOL_ERROR


def test_stream_states_are_rfc_9113_states_compared_by_identity() -> None:
    assert [s.value for s in StreamState] == ["open", "half-closed (local)", "closed"]
    assert (OPEN, HALF_CLOSED_LOCAL, CLOSED) == (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED)


def _relative_imports(module: str) -> list[ast.ImportFrom]:
    tree = ast.parse((H2_DIR / f"{module}.py").read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]


def test_h2_modules_import_only_earlier_modules_and_no_private_names() -> None:
    for i, module in enumerate(MODULES):
        for node in _relative_imports(module):
            assert node.level == 1 and node.module in MODULES[:i], f"{module} imports .{node.module}"
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{module} imports private names {private} from .{node.module}"


def test_h2_modules_import_only_at_the_top() -> None:
    for module in [*MODULES, "__init__"]:
        tree = ast.parse((H2_DIR / f"{module}.py").read_text())
        top = {id(n) for n in tree.body}
        for t in tree.body:  # a top-level try/except ImportError choosing between two imports
            if isinstance(t, ast.Try):
                top |= {id(n) for n in [*t.body, *(x for h in t.handlers for x in h.body)]}
        nested = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in top]
        assert not nested, f"{module}.py imports inside a function or class at lines {nested}"
