"""core/queued.py: stream entries decode to the same message as `parse_message` gives, or are refused as it refuses them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from pushgw.bench.run import Bench, Options
from pushgw.core.queued import loads_queued
from pushgw.core.schema import Device, Message, MessageInvalid, loads_message


def _fields(m: Message) -> dict[str, Any]:
    return {name: getattr(m, name) for name in Message.__dataclass_fields__}


def test_the_benchmark_mix_and_its_retries_decode_as_parse_message_decodes_them(tmp_path: Path) -> None:
    bench = Bench(Options(messages=200, users=50, rich=0.3), tmp_path)
    msgs = bench.messages(200, "m")
    msgs += [m.with_devices((Device("fcm", "tok-1"),)) for m in msgs[:20]]  # retries aim at one device
    for m in msgs:
        raw = m.dumps()
        assert _fields(loads_queued(raw)) == _fields(loads_message(raw))


@pytest.mark.parametrize("obj", [
    {"v": 1, "id": "a", "user": "u", "body": "x", "ttl": 60, "category": "c"},
    {"v": 1, "id": "a", "user": "u", "body": "x", "expires_at": 1900000000},
    {"v": 1, "id": "a", "user": "u", "body": "x", "send_at": 100, "expires_at": 5e9, "data": {"k": "v"}},
    {"v": 1, "id": "a", "user": "u", "data": {"k": "v"}, "resolved": True, "fanout": True, "campaign": "c"},
    {"v": 1, "id": "a", "user": "u", "title": "t", "priority": "high", "collapse_key": "k", "app": "other"},
])
def test_plain_messages_with_every_scalar_option_decode_alike(obj: dict[str, Any]) -> None:
    raw = orjson.dumps(obj)
    assert _fields(loads_queued(raw)) == _fields(loads_message(raw))


@pytest.mark.parametrize("obj", [
    {"v": 1, "id": "a", "user": "u", "title": 5},
    {"v": 1, "id": "a", "user": "u", "body": "x", "ttl": True},
    {"v": 1, "id": "a", "user": "u", "body": "x", "priority": "urgent"},
    {"v": 1, "id": "a", "user": "u", "data": {"k": 1}},
    {"v": 1, "id": "a", "user": "u"},
    {"v": 2, "id": "a", "user": "u", "body": "x"},
    {"v": 1, "id": "a", "user": "u", "title": ""},
    {"v": 1, "id": "a", "user": "u", "body": "x", "ttl": 10, "expires_at": 2e9},
    [1, 2],
])
def test_an_entry_parse_message_refuses_is_refused(obj: Any) -> None:
    raw = orjson.dumps(obj)
    with pytest.raises(MessageInvalid):
        loads_message(raw)
    with pytest.raises(MessageInvalid):
        loads_queued(raw)


def test_bytes_that_are_not_json_raise_value_error() -> None:
    with pytest.raises(ValueError):
        loads_queued(b"\xff not json")
