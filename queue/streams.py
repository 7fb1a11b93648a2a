"""The work queue on a Redis Stream with one consumer group, plus the delayed (retry) set.

Delivery is at least once, and every step that could lose or duplicate a message is a single
atomic Redis operation:

- enqueue: one Lua call per batch checks each id against the idempotency window (SET NX EX) and
  XADDs only the new ones, so an id sent twice within the window is queued once;
- read: XREADGROUP in batches; an entry stays pending until its last delivery settles;
- settle: acks, per-delivery done marks, retries, dead letters and invalid-token events of many
  entries go in one MULTI/EXEC (`commit`), so an entry is never acked without its retry;
- two lanes, two streams: priority "high" entries go to their own stream, which workers read
  first (the worker's lane queues, gateway/lanequeue.py, keep normal deliveries from starving);
- scheduled (`send_at`), deferred (policy) and retried messages wait in one sorted set by due
  time; `move_due` (Lua) moves due ones to their lane's stream in batches, atomically, so two
  workers never move the same item;
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
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.records import record
from ..core.schema import Device, Message
from . import status
from .connection import follow_master
from .keys import Keys

INVALID_TOKEN_EVENTS_MAXLEN = 1_000_000  # events are a feed for upstream services, not a record
KPI_TTL_S = 180 * 86400  # campaign delivery sets outlive any experiment's reading period

LANES = ("high", "normal")  # read order: the high lane first (priority "high": reminders, transactional)

# KEYS: normal stream, high stream, delayed zset, delayed data hash, delayed ids hash, the idem key of each
#       message, then the ref set of each message that has a ref
# ARGV: window_s, now_ms, length of the idem keys' prefix, owner, then per message: payload, lane (h|n), due_ms
#       (0: now); a message with a ref or its own owner has its lane in capitals (H|N) and one more argument,
#       "<index in KEYS of its ref set, 0: none>[:<its own owner>]"   -> {1|0,...}
# A scheduled message (send_at ahead) goes to the delayed set with its due time as its enqueue time,
# so its latency, ttl and caps membership count from when it was meant to go; its member ends in `#<id>`
# and the ids hash points at it, so it can be withdrawn until `move_due` takes it. The idem key holds the
# owner (the API client), so a cancel tells "sent" (for its owner) from "unknown"; for a scheduled message
# it lasts the idempotency window past the due time, so its id stays taken while it waits.
_ENQUEUE = """
local out = {}
local now, window, cut = tonumber(ARGV[2]), tonumber(ARGV[1]), tonumber(ARGV[3]) + 1
local j = 5
local i = 6
while j <= #ARGV do
  local lane, due, owner, ref = ARGV[j + 1], tonumber(ARGV[j + 2]), ARGV[4], 0
  local step = 3
  if lane == 'H' or lane == 'N' then
    local r, o = string.match(ARGV[j + 3], '^(%d+):?(.*)$')
    ref = tonumber(r)
    if o ~= '' then owner = o end
    lane = string.lower(lane)
    step = 4
  end
  local ttl = window
  if due > 0 then ttl = window + math.floor((due - now) / 1000) end
  if redis.call('SET', KEYS[i], owner, 'NX', 'EX', ttl) then
    if due > 0 then
      local id = string.sub(KEYS[i], cut)
      local member = '1:' .. due .. ':' .. lane .. ':#' .. id
      redis.call('ZADD', KEYS[3], due / 1000, member)
      redis.call('HSET', KEYS[4], member, ARGV[j])
      redis.call('HSET', KEYS[5], id, member)
    else
      redis.call('XADD', lane == 'h' and KEYS[2] or KEYS[1], '*', 'm', ARGV[j], 'a', '1', 't', ARGV[2])
    end
    if ref > 0 then
      redis.call('SADD', KEYS[ref], string.sub(KEYS[i], cut))
      if redis.call('TTL', KEYS[ref]) < ttl then redis.call('EXPIRE', KEYS[ref], ttl) end
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  j = j + step
  i = i + 1
end
return out
"""

# KEYS: delayed zset, delayed data hash, normal stream, high stream, delayed ids hash   ARGV: now (s), limit
# -> moved count. Members are attempt:enqueued_ms:lane:uid (older members without the lane go to the normal
# lane); a member ending in `#<id>` is a whole waiting message, and leaves the ids hash in the same call, so a
# cancel (`_CANCEL`, also one call) either finds it before the move or reports it sent after.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local payload = redis.call('HGET', KEYS[2], member)
  if payload then
    local attempt, enq = string.match(member, '^(%d+):(%d+):')
    local lane = string.match(member, '^%d+:%d+:([hn]):')
    redis.call('XADD', lane == 'h' and KEYS[4] or KEYS[3], '*', 'm', payload, 'a', attempt or '1', 't', enq or '0')
    redis.call('HDEL', KEYS[2], member)
  end
  local id = string.match(member, '^%d+:%d+:[hn]:#(.+)$')
  if id and redis.call('HGET', KEYS[5], id) == member then
    redis.call('HDEL', KEYS[5], id)
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# KEYS: delayed zset, delayed data hash, delayed ids hash, then per message: its idem key
# ARGV: client, admin (1|0), then the message ids   -> per id: cancelled | cancelled_before | sent | unknown
# A message still waiting whole (scheduled or held) is withdrawn; its idem key keeps it a duplicate and
# remembers the withdrawal (`x:<owner>`), so asking again answers "cancelled" again. Only its owner (or an
# admin) sees it: for anyone else it is "unknown", which says nothing about other clients' messages.
_CANCEL = """
local out = {}
for i = 4, #KEYS do
  local id = ARGV[i - 1]
  local answer = 'unknown'
  local owner = redis.call('GET', KEYS[i])
  local member = redis.call('HGET', KEYS[3], id)
  if member and not owner and ARGV[2] == '1' then  -- held past its id's window: only an admin can tell
    owner = ''
  end
  if owner and (ARGV[2] == '1' or owner == ARGV[1] or owner == 'x:' .. ARGV[1]) then
    if member then
      redis.call('ZREM', KEYS[1], member)
      redis.call('HDEL', KEYS[2], member)
      redis.call('HDEL', KEYS[3], id)
      if owner ~= '' then redis.call('SET', KEYS[i], 'x:' .. owner, 'KEEPTTL') end
      answer = 'cancelled'
    elseif string.sub(owner, 1, 2) == 'x:' then
      answer = 'cancelled_before'
    else
      answer = 'sent'
    end
  end
  out[#out + 1] = answer
end
return out
"""


def lane_code(message: Message) -> str:
    """The lane a message's entries go to, as the one letter the Lua scripts and delayed members use."""
    return "h" if message.priority == "high" else "n"


def split_ref(ref: str) -> tuple[str, str]:
    """`Entry.ref` -> (lane, stream entry id)."""
    lane, sep, entry_id = ref.partition("/")
    return (lane, entry_id) if sep else ("normal", ref)


@record  # one per entry read: frozen for the type checker only (core/records.py)
class Entry:
    """One stream entry as a worker sees it."""

    entry_id: str
    raw: bytes  # the message JSON
    attempt: int  # 1 for a first try; a retry entry carries the attempt it is
    enqueued_ms: int  # when the message was first accepted, or became due (for end-to-end latency and ttl)
    redelivered: bool = False  # read again after a crash: some deliveries may have settled already
    lane: str = "normal"
    # Unique across lanes (ids of two streams may be equal): the id, prefixed `high/` in the high lane.
    # Set once here: the worker reads it several times per delivery.
    ref: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", self.entry_id if self.lane == "normal" else f"{self.lane}/{self.entry_id}")


@dataclass(frozen=True, slots=True)
class CancelStatus:
    """What a cancel found: `cancelled` (withdrawn now), `cancelled_before`, `sent` (handed to the workers:
    delivered, in flight or failed) or `unknown` (never accepted, past the idempotency window, or not the
    caller's)."""

    id: str
    status: str


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

    acks: list[str] = field(default_factory=list)  # entry refs
    done: list[tuple[str, str]] = field(default_factory=list)  # (entry ref, device key)
    retries: list[tuple[float, Message, int, int]] = field(default_factory=list)  # (due, message, attempt, enqueued_ms)
    dead: list[DeadLetter] = field(default_factory=list)
    invalid_tokens: list[tuple[str | None, Device, str]] = field(default_factory=list)  # (user, device, reason)
    # Campaign KPIs: (campaign, variant, outcome delivered|failed|dropped, user or message id); a set per
    # outcome, so a retry, a second device or a redelivered entry counts a learner once.
    kpi: list[tuple[str, str, str, str]] = field(default_factory=list)
    steps: list[status.Step] = field(default_factory=list)  # message status (queue/status.py)
    started: list[status.InFlight] = field(default_factory=list)  # in-flight steps of jobs still under way (gateway/tracking.py)
    outcomes: list[status.Outcome] = field(default_factory=list)  # final outcomes: status steps and events

    def __len__(self) -> int:
        return (len(self.acks) + len(self.done) + len(self.retries) + len(self.dead) + len(self.invalid_tokens)
                + len(self.kpi) + len(self.steps) + len(self.started) + len(self.outcomes))


@dataclass(frozen=True, slots=True)
class QueueStats:
    lag: int  # entries not yet read by any worker (both lanes)
    lag_high: int  # of which in the high lane
    pending: int  # entries read and not yet acknowledged
    delayed: int  # retries and deferred messages waiting for their time
    dead_letters: int
    length: int  # entries held in the stream (including acknowledged history not yet trimmed)


class ReplicationTimeout(RedisTimeoutError):
    """Fewer replicas than `redis.wait_replicas` confirmed an enqueue in time: it is on the master but may be
    lost by a failover, so it is not acknowledged (the API answers 503; resending the same ids is safe)."""


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
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        status_retention_s: int = 0,  # message status kept this long; 0: not written (queue/status.py)
        events_maxlen: int = 0,  # MAXLEN ~ of the outcome event stream; 0: no events
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.wait_replicas = max(0, int(wait_replicas))
        self.wait_timeout_ms = max(1, int(wait_timeout_ms))
        self.status_retention_s = status_retention_s
        self.events_maxlen = events_maxlen
        self.idempotency_window_s = max(1, int(idempotency_window_s))
        self.done_ttl_s = max(1, int(done_ttl_s))
        self._enqueue = redis.register_script(_ENQUEUE)
        self._move_due = redis.register_script(_MOVE_DUE)
        self._cancel = redis.register_script(_CANCEL)
        self._claim_cursor = {lane: "0-0" for lane in LANES}
        self._cluster = isinstance(redis, RedisCluster)
        self._lane_by_stream: dict[str | bytes, str] = {}
        for lane in LANES:
            self._lane_by_stream[keys.lane_stream(lane)] = self._lane_by_stream[keys.lane_stream(lane).encode()] = lane

    # ------------------------------------------------------------------ producers

    async def ensure_group(self) -> None:
        """Create both lanes' streams and the group; from id 0, so messages enqueued before any worker ran are delivered."""
        for lane in LANES:
            try:
                await self.redis.xgroup_create(self.keys.lane_stream(lane), self.keys.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def enqueue(self, messages: Sequence[Message], now_ms: int | None = None,
                      owner: str | Sequence[str] = "") -> list[bool]:
        """Queue validated messages in one round trip; False for an id already accepted within the window.

        A message goes to its priority's lane; one with `send_at` ahead waits in the delayed set. `owner` (the API
        client, or one per message) alone may withdraw it (`cancel`); a message with a `ref` joins its owner's set
        for that ref (`cancel_ref`)."""
        if not messages:
            return []
        now = int(time.time() * 1000) if now_ms is None else int(now_ms)
        k = self.keys
        default = owner if isinstance(owner, str) else ""
        owners = None if isinstance(owner, str) else list(owner)
        keys = [k.stream, k.stream_high, k.delayed, k.delayed_data, k.delayed_ids, *(k.idem(m.id) for m in messages)]
        args: list[Any] = [self.idempotency_window_s, now, len(k.idem("")), default]
        for i, m in enumerate(messages):
            due = int(m.send_at * 1000) if m.send_at is not None and m.send_at * 1000 > now else 0
            o = default if owners is None else owners[i]
            if m.ref is None and o == default:  # the common case: three arguments
                args += [m.dumps(), lane_code(m), due]
                continue
            ref = 0
            if m.ref is not None:
                keys.append(k.ref_ids(o, m.ref))
                ref = len(keys)
            args += [m.dumps(), lane_code(m).upper(), due, f"{ref}:{o}" if o != default else str(ref)]
        if not self.wait_replicas:
            flags = await self._enqueue(keys=keys, args=args)
            return [bool(f) for f in flags]
        # WAIT counts the replicas that have the writes of this connection: the script and WAIT share one
        # pipeline, so one connection (https://redis.io/docs/latest/commands/wait/).
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._enqueue(keys=keys, args=args, client=pipe)
            pipe.wait(self.wait_replicas, self.wait_timeout_ms)
            flags, acked = await pipe.execute()
        if int(acked) < self.wait_replicas:
            await follow_master(self.redis)  # a promotion, if that is why: the next attempt goes to the new master
            raise ReplicationTimeout(
                f"{int(acked)} of {self.wait_replicas} replicas confirmed the enqueue within {self.wait_timeout_ms} ms"
            )
        return [bool(f) for f in flags]

    async def enqueue_raw(self, fields: dict[str, bytes | str], lane: str = "normal") -> str:
        """Append an entry as-is (tests of poison entries; replays of dead letters)."""
        return _s(await self.redis.xadd(self.keys.lane_stream(lane), fields))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ consumers

    async def read_new(
        self, consumer: str, count: int, block_ms: int | None, lanes: Sequence[str] = LANES
    ) -> list[Entry]:
        """Entries never delivered to any consumer, up to `count` per lane, waiting at most `block_ms`
        (None: not at all). One XREADGROUP over the lanes' streams; high-lane entries come first."""
        streams = [self.keys.lane_stream(lane) for lane in lanes]
        try:
            reply = await self._xreadgroup(consumer, streams, [">"] * len(streams), count, block_ms)
        except ResponseError as e:
            if "NOGROUP" in str(e):  # Redis lost its data (no AOF) or someone deleted the stream
                await self.ensure_group()
                return []
            raise
        return await self._entries(reply, redelivered=False)

    async def read_own_pending(self, consumer: str, count: int, lane: str = "normal", after: str = "0") -> list[Entry]:
        """This consumer's entries in `lane` that were read but never acknowledged (it crashed or was killed)."""
        try:
            reply = await self._xreadgroup(consumer, [self.keys.lane_stream(lane)], [after], count, None)
        except ResponseError as e:
            if "NOGROUP" in str(e):
                await self.ensure_group()
                return []
            raise
        return await self._entries(reply, redelivered=True)

    async def _xreadgroup(
        self, consumer: str, streams: Sequence[str], ids: Sequence[str], count: int, block_ms: int | None
    ) -> Any:
        """XREADGROUP for `_entries`. On one Redis (or Sentinel) with its reply as Redis sent it: the command's
        name is passed as bytes, so redis-py applies no response callback (they are looked up by str name),
        which would build a dict per entry and a list per stream that `_entries` throws away at once. The
        cluster client routes by the command's str name: it gets redis-py's own call."""
        if self._cluster:
            return await self.redis.xreadgroup(self.keys.group, consumer, dict(zip(streams, ids, strict=True)),
                                               count=count, block=block_ms)
        block: list[Any] = [] if block_ms is None else ["BLOCK", block_ms]
        return await self.redis.execute_command(  # type: ignore[no-untyped-call]
            b"XREADGROUP", "GROUP", self.keys.group, consumer, "COUNT", count, *block, "STREAMS", *streams, *ids
        )

    async def claim_stale(self, consumer: str, idle_ms: int, count: int, lane: str = "normal") -> list[Entry]:
        """Take over entries another consumer has held for `idle_ms` without acknowledging (it died)."""
        stream = self.keys.lane_stream(lane)
        start = self._claim_cursor[lane]
        while True:
            reply = await self.redis.xautoclaim(
                stream, self.keys.group, consumer, min_idle_time=idle_ms, start_id=start, count=count
            )
            cursor = _s(reply[0])
            entries = await self._entries([[stream, reply[1]]], redelivered=True)
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:  # trimmed or XDELed while pending: nothing left to deliver
                await self.redis.xack(stream, self.keys.group, *deleted)
            self._claim_cursor[lane] = cursor
            if entries or cursor == "0-0":
                return entries
            start = cursor

    async def touch(self, consumer: str, refs: Sequence[str]) -> None:
        """Reset the idle time of entries this consumer is still working on, so no janitor claims them."""
        by_lane: dict[str, list[str]] = {}
        for ref in refs:
            lane, entry_id = split_ref(ref)
            by_lane.setdefault(lane, []).append(entry_id)
        for lane, ids in by_lane.items():
            for i in range(0, len(ids), 1000):
                chunk: list[Any] = ids[i : i + 1000]
                await self.redis.xclaim(self.keys.lane_stream(lane), self.keys.group, consumer, 0, chunk, justid=True)

    async def _entries(self, reply: Any, *, redelivered: bool) -> list[Entry]:
        """The entries of an XREADGROUP or XAUTOCLAIM reply, high lane first. `reply` maps each stream to its
        entries `[id, fields]`, as Redis sent it (a RESP3 map, or RESP2's list of [stream, entries]) or as
        redis-py's callbacks parse it (fields as a dict); fields None: a pending entry whose data was deleted."""
        out: list[Entry] = []
        gone: dict[Any, list[Any]] = {}
        by_stream = reply.items() if type(reply) is dict else (reply or ())
        lanes = self._lane_by_stream
        for stream, items in sorted(by_stream, key=lambda r: lanes.get(r[0]) != "high"):
            lane = lanes.get(stream, "normal")
            for entry_id, fields in items:
                if not fields:
                    gone.setdefault(stream, []).append(entry_id)
                    continue
                if type(fields) is list and len(fields) == 6 and fields[0] == b"m" and fields[2] == b"a" \
                        and fields[4] == b"t":  # as the gateway writes its entries (`_ENQUEUE`, `_MOVE_DUE`)
                    raw, a, t = fields[1], fields[3], fields[5]
                else:
                    f = fields if type(fields) is dict else dict(zip(fields[::2], fields[1::2], strict=False))
                    raw, a, t = f.get(b"m") or f.get("m") or b"", f.get(b"a") or f.get("a"), f.get(b"t") or f.get("t")
                try:
                    attempt, enq = int(a or 1), int(t or 0)
                except ValueError:
                    attempt, enq = 1, 0
                raw_b = raw if type(raw) is bytes else raw.encode()
                out.append(Entry(_s(entry_id), raw_b, attempt, enq, redelivered, lane))
        for stream, ids in gone.items():
            await self.redis.xack(stream, self.keys.group, *ids)
        return out

    async def done_marks(self, refs: Sequence[str]) -> dict[str, set[str]]:
        """Device keys already settled for each of these (redelivered) entries; one round trip."""
        if not refs:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                pipe.smembers(self.keys.done(ref))
            replies = await pipe.execute()
        return {ref: {_s(k) for k in r} for ref, r in zip(refs, replies, strict=True) if r}

    async def commit(self, c: Commit, now: float | None = None) -> None:
        """Write acks, done marks, retries, dead letters and token removals atomically (MULTI/EXEC)."""
        if not len(c):
            return
        k = self.keys
        now_ms = int((time.time() if now is None else now) * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            if c.done:
                marks: dict[str, list[str]] = {}  # one SADD per entry, not per device
                for ref, device_key in c.done:
                    marks.setdefault(ref, []).append(device_key)
                for ref, device_keys in marks.items():
                    pipe.sadd(k.done(ref), *device_keys)
                    pipe.expire(k.done(ref), self.done_ttl_s)
            if c.retries:
                scores: dict[str, float] = {}
                data: dict[str, bytes] = {}
                held: dict[str, str] = {}
                for due, msg, attempt, enq in c.retries:
                    if msg.resolved:  # a retry of some devices: the message is being sent
                        member = f"{attempt}:{enq}:{lane_code(msg)}:{uuid.uuid4().hex}"
                    else:  # the whole message, held by the policy: it can still be withdrawn (`cancel`)
                        member = held[msg.id] = f"{attempt}:{enq}:{lane_code(msg)}:#{msg.id}"
                    scores[member] = due
                    data[member] = msg.dumps()
                pipe.hset(k.delayed_data, mapping=data)  # type: ignore[arg-type]
                pipe.zadd(k.delayed, scores)
                if held:
                    pipe.hset(k.delayed_ids, mapping=held)  # type: ignore[arg-type]
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
            if c.kpi:
                sets: dict[str, list[str]] = {}
                for campaign, variant, outcome, subject in c.kpi:
                    sets.setdefault(k.kpi_users(campaign, variant, outcome), []).append(subject)
                    sets.setdefault(k.campaign_variants(campaign), []).append(variant)
                for key, members in sets.items():
                    pipe.sadd(key, *members)
                    pipe.expire(key, KPI_TTL_S)
            if c.steps or c.started or c.outcomes:
                status.write(pipe, k, c.steps, c.started, c.outcomes, retention_s=self.status_retention_s,
                             events_maxlen=self.events_maxlen)
            if c.acks:
                by_lane: dict[str, list[str]] = {}
                for ref in c.acks:
                    lane, entry_id = split_ref(ref)
                    by_lane.setdefault(lane, []).append(entry_id)
                for lane, ids in by_lane.items():
                    pipe.xack(k.lane_stream(lane), k.group, *ids)
            await pipe.execute()

    # ------------------------------------------------------------------ scheduling and upkeep

    async def schedule(self, due: float, message: Message, attempt: int = 1, enqueued_ms: int | None = None) -> None:
        """Put a message in the delayed set to enter its lane's stream at `due` (unix seconds)."""
        enq = int(time.time() * 1000) if enqueued_ms is None else enqueued_ms
        await self.commit(Commit(retries=[(due, message, attempt, enq)]))

    async def move_due(self, now: float, limit: int = 1000) -> int:
        """Move scheduled items whose time has come to their lane's stream; atomic (Lua), safe with many workers."""
        k = self.keys
        moved = await self._move_due(keys=[k.delayed, k.delayed_data, k.stream, k.stream_high, k.delayed_ids],
                                     args=[now, limit])
        return int(moved)

    async def cancel(self, ids: Sequence[str], client: str, *, admin: bool = False) -> list[CancelStatus]:
        """Withdraw messages still waiting whole (scheduled, or held by the policy), in one atomic call, so a
        cancel racing `move_due` either wins or finds the message gone and answers "sent"."""
        if not ids:
            return []
        k = self.keys
        out: list[CancelStatus] = []
        for i in range(0, len(ids), 500):
            chunk = list(ids[i:i + 500])
            replies = await self._cancel(keys=[k.delayed, k.delayed_data, k.delayed_ids, *(k.idem(m) for m in chunk)],
                                         args=[client, 1 if admin else 0, *chunk])
            out += [CancelStatus(m, _s(r)) for m, r in zip(chunk, replies, strict=True)]
        return out

    async def cancel_ref(self, ref: str, client: str) -> list[str]:
        """Withdraw every message `client` enqueued with this `ref` that is still waiting; the ids withdrawn."""
        key = self.keys.ref_ids(client, ref)
        ids = sorted(_s(m) for m in await self.redis.smembers(key))
        found = await self.cancel(ids, client)
        done = [c.id for c in found if c.status in ("cancelled", "cancelled_before")]
        if done:  # a message found "sent" stays: the policy may still hold it (a window), and then it can go
            await self.redis.srem(key, *done)
        return [c.id for c in found if c.status == "cancelled"]

    async def trim(self) -> int:
        """Drop acknowledged history of both lanes: everything before the oldest entry pending or not yet read."""
        return sum([await self._trim(self.keys.lane_stream(lane)) for lane in LANES])

    async def _trim(self, stream: str) -> int:
        k = self.keys
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return 0
        group = next((g for g in groups if _s(g.get("name")) == k.group), None)
        if group is None:
            return 0
        last = _s(group.get("last-delivered-id") or "0-0")
        floor = last
        summary = await self.redis.xpending(stream, k.group)
        if summary and summary.get("pending"):
            oldest = _s(summary["min"])
            if _id_lt(oldest, floor):
                floor = oldest
        if floor == "0-0":
            return 0
        # MINID keeps every entry with id >= floor; entries below it were all read and acknowledged.
        return int(await self.redis.xtrim(stream, minid=floor, approximate=False))

    async def delete_idle_consumers(self, idle_ms: int) -> int:
        """Forget consumers that hold nothing in either lane and were idle this long (old process names pile up)."""
        k = self.keys
        removed = 0
        for lane in LANES:
            stream = k.lane_stream(lane)
            try:
                consumers = await self.redis.xinfo_consumers(stream, k.group)
            except ResponseError:
                continue
            for c in consumers:
                if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > idle_ms:
                    await self.redis.xgroup_delconsumer(stream, k.group, _s(c["name"]))
                    removed += 1
        return removed

    async def stats(self) -> QueueStats:
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for lane in LANES:
                pipe.xinfo_groups(k.lane_stream(lane))
                pipe.xlen(k.lane_stream(lane))
            pipe.zcard(k.delayed)
            pipe.xlen(k.dead)
            replies = await pipe.execute(raise_on_error=False)
        lags: dict[str, int] = {}
        pending = length = 0
        for i, lane in enumerate(LANES):
            groups, n = replies[2 * i], replies[2 * i + 1]
            n = int(n) if isinstance(n, int) else 0
            length += n
            lags[lane] = 0
            if isinstance(groups, list):
                for g in groups:
                    if _s(g.get("name")) == k.group:
                        pending += int(g.get("pending") or 0)
                        raw_lag = g.get("lag")
                        lags[lane] = int(raw_lag) if raw_lag is not None else n
        delayed, dead = replies[-2], replies[-1]
        return QueueStats(
            lag=sum(lags.values()),
            lag_high=lags["high"],
            pending=pending,
            delayed=int(delayed) if isinstance(delayed, int) else 0,
            dead_letters=int(dead) if isinstance(dead, int) else 0,
            length=length,
        )


def _id_lt(a: str, b: str) -> bool:
    am, _, asq = a.partition("-")
    bm, _, bsq = b.partition("-")
    return (int(am), int(asq or 0)) < (int(bm), int(bsq or 0))


def loads_fields(fields: dict[Any, Any]) -> dict[str, Any]:
    """Decode a stream entry's fields (bytes keys and values) for display."""
    return {_s(k): (orjson.loads(v) if _s(k) == "m" else _s(v)) for k, v in fields.items()}
