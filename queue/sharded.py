"""The work queue over every shard (queue/shards.py): one `StreamQueue` per shard, a batch split by shard.

With one Redis there is one shard, whose queue is today's `StreamQueue` under today's key names, and `enqueue`
is that queue's single Lua call: a batch is queued all or nothing.

On Redis Cluster a batch is split by shard (a message's user's shard, or its id's when it has no user) and the
shards' calls run concurrently, each one Lua call on one slot. A batch is then all or nothing per shard only: if
one shard's call fails the whole call raises (the API answers 503) though other shards may have queued their
part. Resending the same batch is safe because ids are idempotent: what was queued comes back as a duplicate. A
message sent without an id gets a new one on each attempt, so clients of a cluster deployment should set ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ..core.config import RedisSettings
from ..core.schema import Message
from .connection import ShardedCluster
from .keys import Keys
from .shards import ShardMap, key_slot
from .status import StatusReader, record_accepted
from .streams import CancelStatus, StreamQueue

T = TypeVar("T")


class BadShardedId(ValueError):
    """An id that does not name a shard's stream entry: `<shard>/<stream id>` on Redis Cluster."""


def sharded_id(shard: int, entry_id: str) -> str:
    """The id of shard n's stream entry across shards (a stream id is only unique within its shard's stream)."""
    return f"{shard}/{entry_id}"


def split_sharded_id(text: str, shards: int) -> tuple[int, str]:
    """`<shard>/<stream id>` -> (shard, stream id); `BadShardedId` if it names no shard of `shards`."""
    shard, sep, entry = text.partition("/")
    if not sep or not shard.isdigit() or int(shard) >= shards or not entry:
        raise BadShardedId(f"ids on Redis Cluster are <shard>/<stream id> (from a listing), got {text!r}")
    return int(shard), entry


async def read_shards_in_turn(shards: int, count: int, start: str,
                              read: Callable[[int, int, str], Awaitable[list[T]]]) -> list[tuple[int, T]]:
    """At most `count` entries of a per-shard stream (dead letters, token events), shard 0's first, then shard 1's, ...
    `start` is "-" or a sharded id ("(" in front: after it); `read(shard, count, start)` reads one shard's stream
    from a stream id ("-", an id, or "(" + id) and returns its entries oldest first."""
    first, begin = 0, "-"
    if start != "-":
        first, entry = split_sharded_id(start.removeprefix("("), shards)
        begin = "(" + entry if start.startswith("(") else entry
    out: list[tuple[int, T]] = []
    for n in range(first, shards):
        out += [(n, e) for e in await read(n, count - len(out), begin if n == first else "-")]
        if len(out) >= count:
            break
    return out


def home_keys(shards: ShardMap) -> Keys:
    """Where the deployment's global records live (saved templates): with one Redis today's keys; on Redis Cluster
    every such key under the one fixed hash tag `{<prefix>}`, so a transaction over a record and its index set is
    legal and all of them stay on the one node serving that tag's slot."""
    return Keys("{" + shards.prefix + "}") if shards.clustered else Keys(shards.prefix)


def shard_map(s: RedisSettings) -> ShardMap:
    """The deployment's shards: `redis.shards` tags on Redis Cluster, one shard under today's names otherwise."""
    return ShardMap.cluster(s.prefix, s.shards) if s.cluster else ShardMap.single(s.prefix)


async def shard_clients(redis: Any, shards: ShardMap) -> list[Any]:
    """Each shard's client: on Redis Cluster a `SlotClient` of the master of the shard's slot (its node looked up
    once, not per call: queue/connection.py), else `redis` itself."""
    if not isinstance(redis, ShardedCluster):
        return [redis] * shards.count
    return [await redis.slot_client(key_slot(k.stream)) for k in shards.all_keys()]


class ShardedQueue:
    def __init__(self, redis: Any, shards: ShardMap, **options: Any) -> None:
        self.redis = redis
        self.shards = shards
        self.options = options
        self.queues = [StreamQueue(redis, k, **options) for k in shards.all_keys()]
        self.direct = not isinstance(redis, ShardedCluster)  # each shard's queue on its own node's client

    async def record_accepted(self, messages: Sequence[Message], now_ms: int, *, retention_s: int) -> None:
        """The accepted messages' first status step (queue/status.py `record_accepted`) on each message's shard,
        where its worker writes the rest: one call per shard, concurrently; with one Redis one call."""
        if self.shards.count == 1:
            await record_accepted(self.redis, self.shards.keys(0), messages, now_ms, retention_s=retention_s)
            return
        by_shard: dict[int, list[Message]] = {}
        for m in messages:
            by_shard.setdefault(self.shard_of(m), []).append(m)
        await asyncio.gather(*(record_accepted(self.redis, self.shards.keys(n), ms, now_ms, retention_s=retention_s)
                               for n, ms in by_shard.items()))

    async def _go_direct(self) -> None:
        """On Redis Cluster, each shard's queue moves to its `SlotClient` at the first enqueue (the cluster
        client's routing costs more client CPU per call: docs/benchmarks.md)."""
        self.direct = True
        clients = await shard_clients(self.redis, self.shards)
        self.queues = [StreamQueue(c, k, **self.options) for c, k in zip(clients, self.shards.all_keys(), strict=True)]

    def shard_of(self, message: Message) -> int:
        return self.shards.shard_of(message.user or message.id)

    def keys_of(self, message: Message) -> Keys:
        return self.shards.keys(self.shard_of(message))

    async def ensure_group(self) -> None:
        await asyncio.gather(*(q.ensure_group() for q in self.queues))

    async def enqueue(self, messages: Sequence[Message], now_ms: int | None = None,
                      owner: str | Sequence[str] = "") -> list[bool]:
        """Queue validated messages, one Lua call per shard (concurrently); False for an id already accepted.
        `owner`: the API client who alone may withdraw them, one for all or one per message."""
        if len(self.queues) == 1:
            return await self.queues[0].enqueue(messages, now_ms, owner=owner)
        if not self.direct:
            await self._go_direct()
        positions: dict[int, list[int]] = {}
        for i, m in enumerate(messages):
            positions.setdefault(self.shard_of(m), []).append(i)
        parts = list(positions.items())

        def owners(idx: list[int]) -> str | list[str]:
            return owner if isinstance(owner, str) else [owner[i] for i in idx]

        replies = await asyncio.gather(
            *(self.queues[n].enqueue([messages[i] for i in idx], now_ms, owner=owners(idx)) for n, idx in parts),
            return_exceptions=True,
        )
        flags = [False] * len(messages)
        for (_, idx), reply in zip(parts, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            for i, flag in zip(idx, reply, strict=True):
                flags[i] = flag
        return flags

    async def cancel(self, ids: Sequence[str], client: str, *, admin: bool = False) -> list[CancelStatus]:
        """Withdraw messages still waiting. An id alone does not name its shard (a message lives on its user's),
        so on Redis Cluster every shard is asked, each atomically, and the shard that knows the id answers."""
        if len(self.queues) == 1:
            return await self.queues[0].cancel(ids, client, admin=admin)
        answers = await asyncio.gather(*(q.cancel(ids, client, admin=admin) for q in self.queues))
        out: list[CancelStatus] = []
        for i, msg_id in enumerate(ids):
            found = [a[i].status for a in answers if a[i].status != "unknown"]
            out.append(CancelStatus(msg_id, found[0] if found else "unknown"))
        return out

    async def cancel_ref(self, ref: str, client: str) -> list[str]:
        """Withdraw every message `client` enqueued with this `ref` that is still waiting, on every shard."""
        if len(self.queues) == 1:
            return await self.queues[0].cancel_ref(ref, client)
        return sorted(i for ids in await asyncio.gather(*(q.cancel_ref(ref, client) for q in self.queues)) for i in ids)


class ShardedStatus:
    """Message status on every shard (queue/status.py): the intake and the workers write a message's status string on
    the message's shard (its user's, or its id's), and a learner's recent list on the learner's shard. With one Redis
    this is `StatusReader` under today's keys. On Redis Cluster a message id alone does not name its shard, so
    `message` asks every shard (one GET each, concurrently) and the shard that has it answers."""

    def __init__(self, redis: Any, shards: ShardMap, retention_s: int) -> None:
        self.shards = shards
        self.readers = [StatusReader(redis, k, retention_s) for k in shards.all_keys()]

    async def message(self, message_id: str) -> dict[str, Any] | None:
        if len(self.readers) == 1:
            return await self.readers[0].message(message_id)
        found = await asyncio.gather(*(r.message(message_id) for r in self.readers))
        return next((f for f in found if f is not None), None)

    async def user(self, user: str, limit: int) -> list[dict[str, Any]]:
        return await self.readers[self.shards.shard_of(user)].user(user, limit)
