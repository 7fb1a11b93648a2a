"""The work queue on a Redis Stream with one consumer group, plus the delayed (retry) set.

Delivery is at least once, and every step that could lose or duplicate a message is a single
atomic Redis operation:

- enqueue: one Lua call per batch checks each id against the idempotency window (SET NX EX) and
  XADDs only the new ones, so an id sent twice within the window is queued once;
- read: XREADGROUP in batches; an entry stays pending until its last delivery settles;
- settle: acks, per-delivery done marks, retries, dead letters and invalid-token events of many
  entries go in one MULTI/EXEC (`commit`), so an entry is never acked without its retry;
- retries wait in a sorted set; `move_due` (Lua) moves due ones back to the stream, atomically,
  so two workers never move the same item;
- crash recovery: a worker first re-reads its own pending entries; a janitor claims entries of
  dead consumers (XAUTOCLAIM) after an idle timeout; done marks make a redelivered entry skip the
  devices already settled;
- trimming uses MINID at the oldest entry still pending or undelivered, never MAXLEN, so it never
  drops an entry that was not processed (MAXLEN ~ can drop pending entries before Redis 8.2).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from pushgw.gateway.schema import Device, Message
from pushgw.queue.keys import Keys
from redis.exceptions import ResponseError

INVALID_TOKEN_EVENTS_MAXLEN = 1_000_000  # events are a feed for upstream services, not a record

# KEYS: stream, idem key 1..n   ARGV: window_s, now_ms, payload 1..n   -> {1|0,...}
_ENQUEUE = """
local out = {}
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[2], 'NX', 'EX', ARGV[1]) then
    redis.call('XADD', KEYS[1], '*', 'm', ARGV[i + 1], 'a', '1', 't', ARGV[2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: delayed zset, delayed data hash, stream   ARGV: now (s), limit   -> moved count
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local payload = redis.call('HGET', KEYS[2], member)
  if payload then
    local attempt, enq = string.match(member, '^(%d+):(%d+):')
    redis.call('XADD', KEYS[3], '*', 'm', payload, 'a', attempt or '1', 't', enq or '0')
    redis.call('HDEL', KEYS[2], member)
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as a worker sees it."""

    entry_id: str
    raw: bytes  # the message JSON
    attempt: int  # 1 for a first try; a retry entry carries the attempt it is
    enqueued_ms: int  # when the message was first accepted (for end-to-end latency and ttl)
    redelivered: bool = False  # read again after a crash: some deliveries may have settled already


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery (or an undecodable entry) that will not be tried again without an operator."""

    message: Message
    reason: str
    attempts: int
    provider: str | None
    enqueued_ms: int
    raw: bytes | None = None  # set for poison entries whose message could not be decoded


@dataclass(slots=True)
class Commit:
    """Everything settled since the last flush; written in one MULTI/EXEC."""

    acks: list[str] = field(default_factory=list)
    done: list[tuple[str, str]] = field(default_factory=list)  # (entry id, device key)
    retries: list[tuple[float, Message, int, int]] = field(default_factory=list)  # (due, message, attempt, enqueued_ms)
    dead: list[DeadLetter] = field(default_factory=list)
    invalid_tokens: list[tuple[str | None, Device, str]] = field(default_factory=list)  # (user, device, reason)

    def __len__(self) -> int:
        return len(self.acks) + len(self.done) + len(self.retries) + len(self.dead) + len(self.invalid_tokens)


@dataclass(frozen=True, slots=True)
class QueueStats:
    lag: int  # entries not yet read by any worker
    pending: int  # entries read and not yet acknowledged
    delayed: int  # retries and deferred messages waiting for their time
    dead_letters: int
    length: int  # entries held in the stream (including acknowledged history not yet trimmed)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class StreamQueue:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        idempotency_window_s: int = 86400,
        done_ttl_s: int = 86400,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.idempotency_window_s = max(1, int(idempotency_window_s))
        self.done_ttl_s = max(1, int(done_ttl_s))
        self._enqueue = redis.register_script(_ENQUEUE)
        self._move_due = redis.register_script(_MOVE_DUE)
        self._claim_cursor = "0-0"

    # ------------------------------------------------------------------ producers

    async def ensure_group(self) -> None:
        """Create the stream and the group; from id 0, so messages enqueued before any worker ran are delivered."""
        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def enqueue(self, messages: Sequence[Message], now_ms: int | None = None) -> list[bool]:
        """Queue validated messages in one round trip; False for an id already accepted within the window."""
        if not messages:
            return []
        now = int(time.time() * 1000) if now_ms is None else int(now_ms)
        keys = [self.keys.stream, *(self.keys.idem(m.id) for m in messages)]
        args: list[Any] = [self.idempotency_window_s, now, *(m.dumps() for m in messages)]
        flags = await self._enqueue(keys=keys, args=args)
        return [bool(f) for f in flags]

    async def enqueue_raw(self, fields: dict[str, bytes | str]) -> str:
        """Append an entry as-is (tests of poison entries; replays of dead letters)."""
        return _s(await self.redis.xadd(self.keys.stream, fields))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ consumers

    async def read_new(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Entries never delivered to any consumer, up to `count`, waiting at most `block_ms`."""
        try:
            reply = await self.redis.xreadgroup(
                self.keys.group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as e:
            if "NOGROUP" in str(e):  # Redis lost its data (no AOF) or someone deleted the stream
                await self.ensure_group()
                return []
            raise
        return await self._entries(reply, redelivered=False)

    async def read_own_pending(self, consumer: str, count: int, after: str = "0") -> list[Entry]:
        """This consumer's entries that were read but never acknowledged (it crashed or was killed)."""
        try:
            reply = await self.redis.xreadgroup(self.keys.group, consumer, {self.keys.stream: after}, count=count)
        except ResponseError as e:
            if "NOGROUP" in str(e):
                await self.ensure_group()
                return []
            raise
        return await self._entries(reply, redelivered=True)

    async def claim_stale(self, consumer: str, idle_ms: int, count: int) -> list[Entry]:
        """Take over entries another consumer has held for `idle_ms` without acknowledging (it died)."""
        start = self._claim_cursor
        while True:
            reply = await self.redis.xautoclaim(
                self.keys.stream, self.keys.group, consumer, min_idle_time=idle_ms, start_id=start, count=count
            )
            cursor = _s(reply[0])
            entries = await self._entries([[self.keys.stream, reply[1]]], redelivered=True)
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:  # trimmed or XDELed while pending: nothing left to deliver
                await self.redis.xack(self.keys.stream, self.keys.group, *deleted)
            self._claim_cursor = cursor
            if entries or cursor == "0-0":
                return entries
            start = cursor

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries this consumer is still working on, so no janitor claims them."""
        for i in range(0, len(entry_ids), 1000):
            chunk = entry_ids[i : i + 1000]
            await self.redis.xclaim(self.keys.stream, self.keys.group, consumer, 0, list(chunk), justid=True)

    async def _entries(self, reply: Any, *, redelivered: bool) -> list[Entry]:
        out: list[Entry] = []
        gone: list[Any] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                if not fields:  # pending entry whose data was deleted
                    gone.append(entry_id)
                    continue
                raw = fields.get(b"m") or fields.get("m") or b""
                try:
                    attempt = int(fields.get(b"a") or fields.get("a") or 1)
                    enq = int(fields.get(b"t") or fields.get("t") or 0)
                except ValueError:
                    attempt, enq = 1, 0
                out.append(Entry(_s(entry_id), raw if isinstance(raw, bytes) else raw.encode(), attempt, enq, redelivered))
        if gone:
            await self.redis.xack(self.keys.stream, self.keys.group, *gone)
        return out

    async def done_marks(self, entry_ids: Sequence[str]) -> dict[str, set[str]]:
        """Device keys already settled for each of these (redelivered) entries; one round trip."""
        if not entry_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for eid in entry_ids:
                pipe.smembers(self.keys.done(eid))
            replies = await pipe.execute()
        return {eid: {_s(k) for k in r} for eid, r in zip(entry_ids, replies, strict=True) if r}

    async def commit(self, c: Commit, now: float | None = None) -> None:
        """Write acks, done marks, retries, dead letters and token removals atomically (MULTI/EXEC)."""
        if not len(c):
            return
        k = self.keys
        now_ms = int((time.time() if now is None else now) * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            if c.done:
                touched: set[str] = set()
                for eid, device_key in c.done:
                    pipe.sadd(k.done(eid), device_key)
                    touched.add(eid)
                for eid in touched:
                    pipe.expire(k.done(eid), self.done_ttl_s)
            if c.retries:
                scores: dict[str, float] = {}
                data: dict[str, bytes] = {}
                for due, msg, attempt, enq in c.retries:
                    member = f"{attempt}:{enq}:{uuid.uuid4().hex}"
                    scores[member] = due
                    data[member] = msg.dumps()
                pipe.hset(k.delayed_data, mapping=data)  # type: ignore[arg-type]
                pipe.zadd(k.delayed, scores)
            for d in c.dead:
                fields: dict[Any, Any] = {
                    "reason": d.reason,
                    "attempts": d.attempts,
                    "provider": d.provider or "",
                    "t": d.enqueued_ms,
                    "at": now_ms,
                }
                if d.raw is not None:
                    fields["raw"] = d.raw
                else:
                    fields["m"] = d.message.dumps()
                pipe.xadd(k.dead, fields)
            for user, device, reason in c.invalid_tokens:
                if user:
                    pipe.hdel(k.devices(user), device.key)
                event = {"user": user or "", "key": device.key, "provider": device.provider, "reason": reason, "at": now_ms}
                pipe.xadd(k.invalid_tokens, event, maxlen=INVALID_TOKEN_EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
            if c.acks:
                pipe.xack(k.stream, k.group, *c.acks)
            await pipe.execute()

    # ------------------------------------------------------------------ scheduling and upkeep

    async def schedule(self, due: float, message: Message, attempt: int = 1, enqueued_ms: int | None = None) -> None:
        """Put a message in the delayed set to enter the stream at `due` (unix seconds)."""
        enq = int(time.time() * 1000) if enqueued_ms is None else enqueued_ms
        await self.commit(Commit(retries=[(due, message, attempt, enq)]))

    async def move_due(self, now: float, limit: int = 1000) -> int:
        """Move retries whose time has come back to the stream; atomic, safe with many workers."""
        moved = await self._move_due(keys=[self.keys.delayed, self.keys.delayed_data, self.keys.stream], args=[now, limit])
        return int(moved)

    async def trim(self) -> int:
        """Drop acknowledged history: everything before the oldest entry that is pending or not yet read."""
        k = self.keys
        try:
            groups = await self.redis.xinfo_groups(k.stream)
        except ResponseError:
            return 0
        group = next((g for g in groups if _s(g.get("name")) == k.group), None)
        if group is None:
            return 0
        last = _s(group.get("last-delivered-id") or "0-0")
        floor = last
        summary = await self.redis.xpending(k.stream, k.group)
        if summary and summary.get("pending"):
            oldest = _s(summary["min"])
            if _id_lt(oldest, floor):
                floor = oldest
        if floor == "0-0":
            return 0
        # MINID keeps every entry with id >= floor; entries below it were all read and acknowledged.
        return int(await self.redis.xtrim(k.stream, minid=floor, approximate=False))

    async def delete_idle_consumers(self, idle_ms: int) -> int:
        """Forget consumers that hold nothing and were idle this long (old process names pile up otherwise)."""
        k = self.keys
        try:
            consumers = await self.redis.xinfo_consumers(k.stream, k.group)
        except ResponseError:
            return 0
        removed = 0
        for c in consumers:
            if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > idle_ms:
                await self.redis.xgroup_delconsumer(k.stream, k.group, _s(c["name"]))
                removed += 1
        return removed

    async def stats(self) -> QueueStats:
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_groups(k.stream)
            pipe.zcard(k.delayed)
            pipe.xlen(k.dead)
            pipe.xlen(k.stream)
            groups, delayed, dead, length = await pipe.execute(raise_on_error=False)
        lag = pending = 0
        if isinstance(groups, list):
            for g in groups:
                if _s(g.get("name")) == k.group:
                    pending = int(g.get("pending") or 0)
                    raw_lag = g.get("lag")
                    lag = int(raw_lag) if raw_lag is not None else int(length if isinstance(length, int) else 0)
        return QueueStats(
            lag=lag,
            pending=pending,
            delayed=int(delayed) if isinstance(delayed, int) else 0,
            dead_letters=int(dead) if isinstance(dead, int) else 0,
            length=int(length) if isinstance(length, int) else 0,
        )


def _id_lt(a: str, b: str) -> bool:
    am, _, asq = a.partition("-")
    bm, _, bsq = b.partition("-")
    return (int(am), int(asq or 0)) < (int(bm), int(bsq or 0))


def loads_fields(fields: dict[Any, Any]) -> dict[str, Any]:
    """Decode a stream entry's fields (bytes keys and values) for display."""
    return {_s(k): (orjson.loads(v) if _s(k) == "m" else _s(v)) for k, v in fields.items()}
