"""The dead-letter stream: deliveries that will not be tried again without an operator.

Each entry keeps the message (aimed at exactly the device that failed), the reason, the number
of attempts, the provider and when it was first enqueued, so an operator can see why and replay
it once the cause is fixed (credentials renewed, provider back). Poison entries (not decodable)
keep their raw bytes; they can be listed and purged but not replayed.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
import redis.asyncio as aioredis

from .keys import Keys
from .sharded import read_shards_in_turn, sharded_id, split_sharded_id
from .shards import ShardMap


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    entry_id: str
    reason: str
    attempts: int
    provider: str
    enqueued_ms: int
    dead_at_ms: int
    message: dict[str, Any] | None  # None for a poison entry
    raw: str | None  # the undecodable entry, for poison entries only

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "entry_id": self.entry_id,
            "reason": self.reason,
            "attempts": self.attempts,
            "provider": self.provider or None,
            "enqueued_ms": self.enqueued_ms,
            "dead_at_ms": self.dead_at_ms,
            "message": self.message,
        }
        if self.raw is not None:
            out["raw"] = self.raw
        return out


def _entry(entry_id: Any, fields: dict[Any, Any]) -> DeadLetterEntry:
    f = {_s(k): v for k, v in fields.items()}
    message: dict[str, Any] | None = None
    if "m" in f:
        try:
            message = orjson.loads(f["m"])
        except orjson.JSONDecodeError:
            message = None
    raw = f.get("raw")
    return DeadLetterEntry(
        entry_id=_s(entry_id),
        reason=_s(f.get("reason", b"")),
        attempts=int(f.get("attempts", 0) or 0),
        provider=_s(f.get("provider", b"")),
        enqueued_ms=int(f.get("t", 0) or 0),
        dead_at_ms=int(f.get("at", 0) or 0),
        message=message,
        raw=raw.decode("utf-8", "replace")[:4096] if isinstance(raw, bytes) else (None if raw is None else str(raw)),
    )


class DeadLetters:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def count(self) -> int:
        return int(await self.redis.xlen(self.keys.dead))

    async def list(self, count: int = 50, start: str = "-") -> list[DeadLetterEntry]:
        """Oldest first, from entry id `start` (use the last id seen + "(" prefix-free paging: pass the next id)."""
        items: Any = await self.redis.xrange(self.keys.dead, min=start, max="+", count=max(1, count))
        return [_entry(i, f) for i, f in items]

    async def get(self, ids: Sequence[str]) -> builtins.list[DeadLetterEntry]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.xrange(self.keys.dead, min=i, max=i, count=1)
            replies: Any = await pipe.execute()
        return [_entry(i, f) for r in replies for i, f in r]

    async def replay(self, ids: Sequence[str] | None, limit: int | None = None) -> int:
        """Put dead letters back on the work stream as first attempts; all of them when `ids` is None.

        The re-queue and the removal from the dead-letter stream happen in one transaction per
        entry batch, so a replay never loses or doubles a dead letter. Poison entries are skipped.
        """
        replayed = 0
        start = "-"
        while limit is None or replayed < limit:
            if ids is not None:
                batch = await self.get(ids)
            else:
                batch = await self.list(500, start)
            if not batch:
                break
            now_ms = int(time.time() * 1000)
            todo = [e for e in batch if e.message is not None]
            if limit is not None:
                todo = todo[: limit - replayed]
            if todo:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for e in todo:
                        high = isinstance(e.message, dict) and e.message.get("priority") == "high"
                        pipe.xadd(self.keys.stream_high if high else self.keys.stream,
                                  {"m": orjson.dumps(e.message), "a": 1, "t": now_ms})
                        pipe.xdel(self.keys.dead, e.entry_id)
                    await pipe.execute()
                replayed += len(todo)
            if ids is not None:
                break
            # next page: after the last id of this batch (poison entries stay where they are)
            last = batch[-1].entry_id
            start = "(" + last
        return replayed

    async def purge(self, ids: Sequence[str] | None) -> int:
        """Delete the named dead letters, or all of them when `ids` is None."""
        if ids is None:
            n = await self.count()
            await self.redis.delete(self.keys.dead)
            return n
        if not ids:
            return 0
        return int(await self.redis.xdel(self.keys.dead, *ids))


class ShardedDeadLetters:
    """The dead letters of every shard (queue/shards.py): each shard's workers write their own stream.

    With one Redis this is exactly `DeadLetters` under today's keys and ids. On Redis Cluster an entry's id names its
    shard, `<shard>/<stream id>` (a stream id alone is only unique within its shard); listing walks the shards in
    order (a `start` id resumes in its shard), counting sums them, and a replay or purge runs per shard, each
    shard's re-queue and removal in one transaction on that shard's slot."""

    def __init__(self, redis: aioredis.Redis, shards: ShardMap) -> None:
        self.shards = shards
        self.parts = [DeadLetters(redis, k) for k in shards.all_keys()]

    @property
    def clustered(self) -> bool:
        return len(self.parts) > 1

    def _split(self, ids: Sequence[str]) -> dict[int, builtins.list[str]]:
        out: dict[int, builtins.list[str]] = {}
        for i in ids:
            shard, entry = split_sharded_id(i, len(self.parts))
            out.setdefault(shard, []).append(entry)
        return out

    async def count(self) -> int:
        return sum(await asyncio.gather(*(p.count() for p in self.parts)))

    async def list(self, count: int = 50, start: str = "-") -> builtins.list[DeadLetterEntry]:
        """Oldest first within a shard, shard after shard; `start`: "-" or an entry id to resume from."""
        if not self.clustered:
            return await self.parts[0].list(count, start)
        found = await read_shards_in_turn(len(self.parts), count, start, lambda n, c, s: self.parts[n].list(c, s))
        return [replace(e, entry_id=sharded_id(n, e.entry_id)) for n, e in found]

    async def get(self, ids: Sequence[str]) -> builtins.list[DeadLetterEntry]:
        if not self.clustered:
            return await self.parts[0].get(ids)
        parts = self._split(ids)
        found = await asyncio.gather(*(self.parts[n].get(e) for n, e in parts.items()))
        return [replace(e, entry_id=sharded_id(n, e.entry_id)) for n, entries in zip(parts, found, strict=True)
                for e in entries]

    async def replay(self, ids: Sequence[str] | None, limit: int | None = None) -> int:
        """`DeadLetters.replay` on every shard named (all shards when `ids` is None), at most `limit` in all."""
        if not self.clustered:
            return await self.parts[0].replay(ids, limit)
        todo: dict[int, builtins.list[str] | None] = (
            dict.fromkeys(range(len(self.parts))) if ids is None else dict(self._split(ids)))
        replayed = 0
        for n, entries in todo.items():
            if limit is not None and replayed >= limit:
                break
            replayed += await self.parts[n].replay(entries, None if limit is None else limit - replayed)
        return replayed

    async def purge(self, ids: Sequence[str] | None) -> int:
        if not self.clustered:
            return await self.parts[0].purge(ids)
        todo: dict[int, builtins.list[str] | None] = (
            dict.fromkeys(range(len(self.parts))) if ids is None else dict(self._split(ids)))
        return sum(await asyncio.gather(*(self.parts[n].purge(e) for n, e in todo.items())))
