"""Redis connections that pack commands in C (hiredis) instead of redis-py's per-argument Python loop.

redis-py's asyncio client packs every command in Python, one `Encoder.encode` call and a few byte
joins per argument; only its synchronous client uses `hiredis.pack_command`. The gateway's commands
are long (an enqueue passes three arguments per message, a commit one per ack), so packing in C
matters to the API's and the workers' CPU (docs/decisions.md).

Encoding is the same: str as UTF-8, int and float as their `repr` (hiredis formats floats with
repr's shortest round-trip digits), bytes, bytearray and memoryview as they are (tests compare the
bytes with redis-py's). Anything hiredis refuses (bool, None, ...) goes through redis-py's own
packer, so its `DataError` is unchanged.

Where the gateway's processes pass "the Redis" around (API, worker pool, CLI) it is one URL string. Sentinel
mode has a URL of its own, `redis+sentinel://[:password@]host:port,host:port/<master>[/<db>]` (built from
`[redis.sentinel]` by `sentinel_url`); `redis_from_url` and `blocking_redis` turn it into redis-py's asyncio
Sentinel client for that master, which asks the sentinels for the master's address on every new connection and
drops connections to a demoted master (redis.asyncio.sentinel.SentinelManagedConnection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterUnreachableError,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from ..core.config import RedisSettings, SentinelSettings
from .shards import key_slot

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


class HiredisSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


_FASTER: dict[type, type] = {
    Connection: HiredisConnection,
    SSLConnection: HiredisSSLConnection,
    UnixDomainSocketConnection: HiredisUnixConnection,
    SentinelManagedConnection: HiredisSentinelConnection,
}


def use_hiredis_packing(pool: Any) -> None:
    """Switch a connection pool (before its first connection) to the C packer, if hiredis is there."""
    if _pack is not None:
        pool.connection_class = _FASTER.get(pool.connection_class, pool.connection_class)


SENTINEL_SCHEME = "redis+sentinel"
MASTER_CHECK_S = 1.0  # how often a Sentinel-mode client asks which node is the master

log = logging.getLogger("pushgw.redis")


class SentinelUrlError(ValueError):
    """A `redis+sentinel://` URL that does not name sentinels and a master."""


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    password: str | None
    sentinel_password: str | None
    db: int


def sentinel_url(s: SentinelSettings) -> str:
    """The URL the gateway's processes pass around for `[redis.sentinel]` (passwords percent-encoded)."""
    auth = f":{quote(s.password, safe='')}@" if s.password else ""
    query = f"?sentinel_password={quote(s.sentinel_password, safe='')}" if s.sentinel_password else ""
    return f"{SENTINEL_SCHEME}://{auth}{','.join(s.addresses)}/{quote(s.master, safe='')}/{s.db}{query}"


def parse_sentinel_url(url: str) -> SentinelTarget:
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise SentinelUrlError(f"{SENTINEL_SCHEME} URL: sentinel address {address!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise SentinelUrlError(f"{SENTINEL_SCHEME} URL: the path must be /<master name>[/<db>]")
    password = unquote(auth.partition(":")[2]) if auth else ""
    sentinel_password = parse_qs(parts.query).get("sentinel_password", [""])[0]
    return SentinelTarget(tuple(sentinels), path[0], password or None, sentinel_password or None,
                          int(path[1]) if len(path) == 2 else 0)


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master pool that waits for a free connection when all are busy, as the gateway's other pools do."""


class SentinelRedis(aioredis.Redis):
    """The master's client. From its first command on it asks the sentinels every `MASTER_CHECK_S` which node is
    the master (`follow_master`), so a promotion moves its connections within about a second instead of when
    the demoted master is reconfigured; closing it also closes its connections to the sentinels."""

    sentinel_manager: Sentinel | None = None
    _watch: asyncio.Task[None] | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self._watch is None:
            self._watch = asyncio.create_task(self._follow(), name="sentinel-master-check")
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(MASTER_CHECK_S)
            with contextlib.suppress(RedisError, OSError):
                if await follow_master(self):
                    log.warning("redis master changed; reconnecting", extra={"address": self._master_address()})

    def _master_address(self) -> str:
        host, port = self.connection_pool.master_address or ("", 0)  # type: ignore[attr-defined]
        return f"{host}:{port}"

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:  # (Sentinel.aclose is recent in redis-py; each client's is 5.0.1+)
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


async def follow_master(client: Any) -> bool:
    """After a write was not confirmed by enough replicas: if the sentinels now name another master, drop every
    connection of the client (in use or idle), so none keeps writing to a demoted master that has not been turned
    into a replica yet (the sentinels do that on their next check of it). True when the master had changed.

    redis-py reconnects a Sentinel-managed connection only when the old master refuses a write (READONLY) or
    unblocks a reader, which happens once the sentinels reconfigure it, seconds after the promotion."""

    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return False
    address = await pool.sentinel_manager.discover_master(pool.service_name)
    if address == pool.master_address:
        return False
    pool.master_address = address
    await pool.disconnect(inuse_connections=True)
    return True


def _sentinel_client(url: str, *, blocking: bool, **kwargs: Any) -> Any:
    t = parse_sentinel_url(url)
    timeouts = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if kwargs.get(k) is not None}
    manager = Sentinel(t.sentinels, sentinel_kwargs={"password": t.sentinel_password, **timeouts})
    pool_class = BlockingSentinelPool if blocking else SentinelConnectionPool
    client = manager.master_for(
        t.master, redis_class=SentinelRedis, connection_pool_class=pool_class,
        connection_class=HiredisSentinelConnection if _pack is not None else SentinelManagedConnection,
        password=t.password, db=t.db, **kwargs,
    )
    client.sentinel_manager = manager
    return client


CLUSTER_SCHEME = "redis+cluster"


def cluster_url(s: RedisSettings) -> str:
    """The URL the gateway's processes pass around for `redis.cluster = true`: its seed nodes."""
    return f"{CLUSTER_SCHEME}://{','.join(s.cluster_nodes)}"


def redis_url_for(s: RedisSettings) -> str:
    """The URL of a configured (not embedded) Redis: Sentinel, Cluster, or `redis.url`; "" for none."""
    if s.cluster:
        return cluster_url(s)
    if s.sentinel.addresses:
        return sentinel_url(s.sentinel)
    return s.url


def is_cluster_url(url: str) -> bool:
    return url.startswith(f"{CLUSTER_SCHEME}://")


_HOLDING: ContextVar[bool] = ContextVar("pushgw_cluster_call", default=False)


class BoundedCalls:
    """At most `limit` calls at once; a call made inside another one (same task) does not take a second place."""

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(max(1, limit))

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        if _HOLDING.get():
            yield
            return
        async with self.semaphore:
            token = _HOLDING.set(True)
            try:
                yield
            finally:
                _HOLDING.reset(token)


class ClusterUnavailable(RedisConnectionError):
    """The cluster cannot serve a slot now (a master failed and no replica took over yet, CLUSTERDOWN, TRYAGAIN
    while a slot moves): a connection error, like one Redis being down, so the API answers 503 and the workers
    retry, instead of an error type of redis-py's cluster client that neither knows."""


@contextlib.contextmanager
def _as_unavailable() -> Iterator[None]:
    try:
        yield
    except (SlotNotCoveredError, RedisClusterUnreachableError, ClusterDownError, TryAgainError) as e:
        raise ClusterUnavailable(str(e)) from e


class BoundedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self.cluster_client.bounded.place():  # type: ignore[attr-defined]
            with _as_unavailable():
                return await super().execute(raise_on_error, allow_redirections)


class ShardedCluster(RedisCluster):
    """redis-py's asyncio cluster client with the C packer on every node's connections, and the slot of XREADGROUP
    and XREAD computed here: redis-py asks a node (COMMAND GETKEYS, a round trip per read) for the keys of these
    commands, whose key positions move (after STREAMS); the first stream's slot is the command's, and a shard's
    streams share one slot (queue/shards.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node_pools: dict[str, BlockingConnectionPool] = {}  # `slot_client`'s pools, one per master
        self.max_per_node = int(kwargs.get("max_connections", 100))
        self._refreshed = 0.0
        # redis-py's cluster pool raises MaxConnectionsError when a node's `max_connections` are all busy; commands
        # and pipelines wait here instead, so no node ever has more than that many in use by this client.
        self.bounded = BoundedCalls(int(kwargs.get("max_connections", 100)))
        if _pack is not None:
            # One dict shared with the nodes manager: nodes discovered later get the same class.
            self.connection_kwargs["connection_class"] = HiredisConnection
            for node in self.startup_nodes:
                node.connection_class = HiredisConnection


    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.bounded.place():
            with _as_unavailable():
                return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises as redis-py does
        return BoundedPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py builds its own

    async def slot_client(self, slot: int) -> SlotClient:
        """A plain client of the master serving `slot` (see `SlotClient`)."""
        await self.initialize()
        return SlotClient(self, slot)

    def node_pool(self, slot: int) -> BlockingConnectionPool:
        """The pool of the master serving `slot` now, shared by every `SlotClient` of that master."""
        node = self.nodes_manager.get_node_from_slot(slot, False)
        pool = self.node_pools.get(node.name)
        if pool is None:
            options = {k: v for k, v in self.connection_kwargs.items() if k in _NODE_OPTIONS}
            pool = self.node_pools[node.name] = BlockingConnectionPool(
                host=node.host, port=node.port, max_connections=self.max_per_node,
                connection_class=HiredisConnection if _pack is not None else Connection, **options)
        return pool

    async def refresh_slots(self) -> None:
        """Read the slot map again (after MOVED or a lost node), at most every REFRESH_GAP_S."""
        now = asyncio.get_running_loop().time()
        if now - self._refreshed < REFRESH_GAP_S:
            return
        self._refreshed = now
        with _as_unavailable():
            await self.nodes_manager.initialize()

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        for pool in self.node_pools.values():
            await pool.disconnect()
        await super().aclose(*args, **kwargs)

    async def _determine_slot(self, command: str, *args: Any) -> int:
        name = command.upper() if isinstance(command, str) else command.decode().upper()
        if name in ("XREADGROUP", "XREAD"):
            for i, arg in enumerate(args):
                if isinstance(arg, str | bytes) and (arg if isinstance(arg, str) else arg.decode()).upper() == "STREAMS":
                    return key_slot(args[i + 1])
        return await super()._determine_slot(command, *args)


REFRESH_GAP_S = 0.1
REDIRECTS = 3  # MOVED answers followed for one call before it fails as ClusterUnavailable
_NODE_OPTIONS = frozenset({"socket_timeout", "socket_connect_timeout", "health_check_interval", "password",
                           "username", "db", "decode_responses", "encoding", "encoding_errors"})


class SlotClient(aioredis.Redis):
    """A plain client of the master that serves one slot, for the keys of one shard (queue/shards.py).

    redis-py's cluster client works out a command's slot and node on every call, and its transactions run each
    queued command on a new thread with its own event loop (redis-py 8.2, `ClusterPipeline` with
    `transaction=True`): `python -m pushgw.bench.cluster_client` measures the costs (docs/benchmarks.md). A
    shard's keys all hash to one slot, so its node is looked up once, and commands, scripts, pipelines and
    MULTI/EXEC go to that node's connections as with one Redis.

    MOVED (the slot has a new master: a failover or a resharding) reads the slot map again and sends the call
    again to the new master; MOVED means the old one ran none of it. ASK and TRYAGAIN (the slot is being
    migrated): a command goes through the cluster client, which follows them; a pipeline fails as
    `ClusterUnavailable`, which its callers retry like a lost connection. A lost connection reads the slot map
    again and raises (the call may have run)."""

    def __init__(self, cluster: ShardedCluster, slot: int) -> None:
        super().__init__(connection_pool=cluster.node_pool(slot))
        self.sharded = cluster
        self.slot = slot

    async def follow(self) -> None:
        await self.sharded.refresh_slots()
        self.connection_pool = self.sharded.node_pool(self.slot)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        for _ in range(REDIRECTS):
            try:
                return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
            except MovedError:
                await self.follow()
            except (AskError, TryAgainError):
                return await self.sharded.execute_command(*args, **options)
            except ClusterDownError as e:
                raise ClusterUnavailable(str(e)) from e
            except (RedisConnectionError, OSError):
                await self.follow()
                raise
        raise ClusterUnavailable(f"slot {self.slot} kept moving")

    def pipeline(self, transaction: bool = True, shard_hint: Any | None = None) -> SlotPipeline:
        return SlotPipeline(self, transaction)


class SlotPipeline(aioredis.client.Pipeline):
    """A `SlotClient`'s pipeline or MULTI/EXEC; MOVED sends it again to the slot's new master."""

    def __init__(self, client: SlotClient, transaction: bool) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, transaction, None)
        self.slot_client = client

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = list(self.command_stack)
        for _ in range(REDIRECTS):
            try:
                return await super().execute(raise_on_error)
            except MovedError:  # every command of one slot was refused: none ran
                await self.slot_client.follow()
                self.connection_pool = self.slot_client.connection_pool
                self.command_stack = list(stack)
            except (AskError, TryAgainError, ClusterDownError) as e:
                raise ClusterUnavailable(str(e)) from e
            except (RedisConnectionError, OSError):
                await self.slot_client.follow()
                raise
        raise ClusterUnavailable(f"slot {self.slot_client.slot} kept moving")


def _cluster_client(url: str, **kwargs: Any) -> Any:
    nodes = []
    for address in urlsplit(url).netloc.split(","):
        host, _, port = address.rpartition(":")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    return ShardedCluster(startup_nodes=nodes, **kwargs)


def redis_from_url(url: str, **kwargs: Any) -> Any:
    """`redis.asyncio.from_url` with the C packer (the gateway's clients and the tests use this); a
    `redis+sentinel://` URL gives the Sentinel-managed client of its master, a `redis+cluster://` URL the
    cluster client."""

    if url.startswith(f"{SENTINEL_SCHEME}://"):
        return _sentinel_client(url, blocking=False, **kwargs)
    if is_cluster_url(url):
        return _cluster_client(url, **kwargs)
    client = aioredis.from_url(url, **kwargs)
    use_hiredis_packing(client.connection_pool)
    return client


def blocking_redis(url: str, max_connections: int = 64, timeout_s: float | None = None) -> Any:
    """A Redis client on a blocking pool: redis-py's default pool raises when every connection is
    busy instead of waiting. `timeout_s` bounds connect and each command (the API's 503 path)."""

    options: dict[str, Any] = {
        "max_connections": max_connections, "timeout": timeout_s, "health_check_interval": 30,
        "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s,
    }
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        return _sentinel_client(url, blocking=True, **options)
    if is_cluster_url(url):
        # redis-py's cluster client has no blocking pool: `max_connections` is per node and a command past it
        # raises MaxConnectionsError (see docs/decisions.md, "Redis Cluster").
        return _cluster_client(url, max_connections=max_connections, health_check_interval=30,
                               socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    pool = aioredis.BlockingConnectionPool.from_url(url, **options)
    use_hiredis_packing(pool)
    return aioredis.Redis(connection_pool=pool)
