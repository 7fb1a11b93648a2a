"""The C command packer (queue/connection.py) writes the bytes redis-py's own packer writes, and
falls back to it for what hiredis refuses; a real Redis answers commands packed either way."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from pushgw.gateway.pool import make_redis
from pushgw.queue.connection import HiredisConnection, HiredisUnixConnection, redis_from_url
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

PLAIN, FAST = Connection(), HiredisConnection()

args_strategy = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.binary(max_size=40),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["SET", "XADD", "CONFIG GET", "CONFIG\tGET", b"CLIENT SETNAME", b"GET"]), args=args_strategy)
def test_same_bytes_as_redis_py(name: Any, args: list[Any]) -> None:
    assert b"".join(FAST.pack_command(name, *args)) == b"".join(PLAIN.pack_command(name, *args))


def test_memoryviews_pack_alike_and_what_hiredis_refuses_raises_redis_pys_error() -> None:
    view = memoryview(b"payload")
    assert b"".join(bytes(c) for c in FAST.pack_command("SET", "k", view)) == b"".join(
        bytes(c) for c in PLAIN.pack_command("SET", "k", view)
    )
    for bad in (True, None, object()):
        with pytest.raises(DataError):
            FAST.pack_command("SET", "k", bad)


def test_pools_use_the_c_packer(redis_url: str) -> None:
    kind = HiredisUnixConnection if redis_url.startswith("unix") else HiredisConnection
    plain = UnixDomainSocketConnection if redis_url.startswith("unix") else Connection
    assert make_redis(redis_url).connection_pool.connection_class is kind
    assert redis_from_url(redis_url).connection_pool.connection_class is kind
    assert aioredis.from_url(redis_url).connection_pool.connection_class is plain  # the switch is ours
    assert redis_from_url("redis://127.0.0.1:1/0").connection_pool.connection_class is HiredisConnection


async def test_a_real_redis_reads_back_what_was_packed(redis: aioredis.Redis) -> None:
    conn = await redis.connection_pool.get_connection()
    assert isinstance(conn, (HiredisConnection, HiredisUnixConnection))
    await redis.connection_pool.release(conn)
    values: dict[str, Any] = {"s": "ünïcode text", "b": b"\x00\xffbytes", "i": -42, "f": 0.1}
    await redis.hset("h", mapping=values)
    assert await redis.hgetall("h") == {b"s": "ünïcode text".encode(), b"b": b"\x00\xffbytes", b"i": b"-42", b"f": b"0.1"}
    await redis.xadd("s", {"m": b"{}", "a": 2})
    [[_, [(_, fields)]]] = await redis.xread({"s": "0"})
    assert fields == {b"m": b"{}", b"a": b"2"}
    assert "maxmemory-policy" in await redis.execute_command("CONFIG GET", "maxmemory-policy")  # split in two
