"""Redis connections that pack commands in C (hiredis) instead of redis-py's per-argument Python loop.

redis-py's asyncio client packs every command in Python, one `Encoder.encode` call and a few byte
joins per argument; only its synchronous client uses `hiredis.pack_command`. The gateway's commands
are long (an enqueue passes three arguments per message, a commit one per ack), so packing in C
matters to the API's and the workers' CPU (docs/decisions.md).

Encoding is the same: str as UTF-8, int and float as their `repr` (hiredis formats floats with
repr's shortest round-trip digits), bytes, bytearray and memoryview as they are (tests compare the
bytes with redis-py's). Anything hiredis refuses (bool, None, ...) goes through redis-py's own
packer, so its `DataError` is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis], a dependency
    _pack = None


class _HiredisPacking:
    """Mixin for redis-py's asyncio connection classes (must come first in the bases)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py does: a str command name is split into words ("CONFIG GET"), bytes on spaces.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [_pack(args)]  # type: ignore[misc]  # only used when hiredis is there
        except TypeError:
            return super().pack_command(*args)  # type: ignore[misc, no-any-return]


class HiredisConnection(_HiredisPacking, Connection):
    pass


class HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


class HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


_FASTER: dict[type, type] = {
    Connection: HiredisConnection,
    SSLConnection: HiredisSSLConnection,
    UnixDomainSocketConnection: HiredisUnixConnection,
}


def use_hiredis_packing(pool: Any) -> None:
    """Switch a connection pool (before its first connection) to the C packer, if hiredis is there."""
    if _pack is not None:
        pool.connection_class = _FASTER.get(pool.connection_class, pool.connection_class)


def redis_from_url(url: str, **kwargs: Any) -> Any:
    """`redis.asyncio.from_url` with the C packer (the gateway's clients and the tests use this)."""

    client = aioredis.from_url(url, **kwargs)
    use_hiredis_packing(client.connection_pool)
    return client
