"""The dead-letter stream: deliveries that will not be tried again without an operator.

Each entry keeps the message (aimed at exactly the device that failed), the reason, the number
of attempts, the provider and when it was first enqueued, so an operator can see why and replay
it once the cause is fixed (credentials renewed, provider back). Poison entries (not decodable)
keep their raw bytes; they can be listed and purged but not replayed.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from .keys import Keys


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
