"""`pushgw migrate`: move a single-Redis deployment onto Redis Cluster shards (queue/shards.py) without losing a queued
or scheduled message.

The destination is the deployment the config describes (`redis.cluster = true`, its seed nodes, `redis.shards`,
`redis.prefix`); the source is the old Redis (`--from`), whose keys carry the same prefix unless `--from-prefix`
names another. The source is only read: an operator can go back to it until the cluster is in service.

What moves, each item to its shard (a learner's shard, or a message's: its user's, else its id's):

- devices (`<prefix>:devices:<user>`) and preferences/attributes (`<prefix>:user:<user>`), copied field by field;
- the audience index sets (`<prefix>:aud:<attribute>:<value>`), each member into its own shard's set;
- saved templates, into the home of global records (queue/sharded.py `home_keys`);
- queued messages: the stream entries the old workers had not read (after the group's last-delivered id) and those
  they had read but not acknowledged (pending: in flight when they stopped), both lanes, fields as they were
  (attempt and enqueue time kept). A pending entry may have reached some of its devices before the old workers
  stopped: it is delivered again to all of them (at least once, as after any worker crash);
- scheduled, deferred and retried messages (the delayed set), with their due time, so `DELETE /v1/messages/{id}`
  still finds a scheduled one;
- dead letters, so they can still be listed and replayed;
- each moved message's idempotency key with the time it had left, so a client resending the same id gets
  `duplicate`.

Each item moves in one Lua call on its destination shard that first adds the item's source reference (stream and
entry id, or delayed member) to the shard's `migrated` set and does nothing if it was there: running the command
again (after an interruption, or to pick up what the old workers left pending at their stop) moves nothing twice.

Not moved: campaigns, automations and app events (not sharded on Redis Cluster yet), frequency-cap and burst history
(the caps count again from the migration), message status and outcome events (a message's status restarts on the
cluster), cancel-by-ref sets (a migrated scheduled message is withdrawn by its id).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson

from ..core.config import Settings
from ..queue.keys import Keys
from ..queue.sharded import home_keys, shard_map
from ..queue.shards import ShardMap

BATCH = 500
MIGRATED_TTL_S = 30 * 86400  # the rerun markers outlive any migration window

# KEYS: migrated set, destination stream, idem key   ARGV: source ref, idem owner, idem ttl ms (0: none), field/values
_MOVE_ENTRY = f"""
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], {MIGRATED_TTL_S})
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3], 'NX') end
return 1
"""

# KEYS: migrated set, delayed zset, delayed data, delayed ids, idem key
# ARGV: member, score, payload, message id ('' when the member is not a whole waiting message), idem owner, idem ttl ms
_MOVE_DELAYED = f"""
if redis.call('SADD', KEYS[1], 'delayed/' .. ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], {MIGRATED_TTL_S})
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], ARGV[4], ARGV[1]) end
if tonumber(ARGV[6]) > 0 then redis.call('SET', KEYS[5], ARGV[5], 'PX', ARGV[6], 'NX') end
return 1
"""


class MigrationError(Exception):
    """The destination is not a Redis Cluster deployment, or the source is the destination."""


@dataclass
class MigrationReport:
    """What one run moved (items already moved by an earlier run are counted in `skipped`)."""

    devices: int = 0
    users: int = 0
    audience_entries: int = 0
    templates: int = 0
    queued: int = 0
    scheduled: int = 0
    dead_letters: int = 0
    skipped: int = 0
    poison: list[str] = field(default_factory=list)  # source entries without a readable message, moved to shard 0

    def to_json(self) -> dict[str, Any]:
        return {"devices": self.devices, "users": self.users, "audience_entries": self.audience_entries,
                "templates": self.templates, "queued": self.queued, "scheduled": self.scheduled,
                "dead_letters": self.dead_letters, "skipped": self.skipped, "poison": self.poison}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _glob(literal: str) -> str:
    """A SCAN MATCH pattern for the keys that start with `literal`."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in literal) + "*"


def _message_shard(shards: ShardMap, payload: Any) -> tuple[int, str] | None:
    """(shard, message id) of a stored message JSON; None when it cannot be read."""
    try:
        obj = orjson.loads(payload)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        return None
    user = obj.get("user")
    return shards.shard_of(user if isinstance(user, str) and user else obj["id"]), obj["id"]


class Migration:
    """One run from `source` (a single Redis client) to `dest` (the cluster client of `settings`)."""

    def __init__(self, source: Any, dest: Any, settings: Settings, *, source_prefix: str | None = None,
                 out: TextIO = sys.stderr) -> None:
        if not settings.redis.cluster:
            raise MigrationError("the destination must be Redis Cluster: set redis.cluster = true and "
                                 "redis.cluster_nodes in the config")
        self.source, self.dest = source, dest
        self.src = Keys(source_prefix or settings.redis.prefix)
        self.shards = shard_map(settings.redis)
        self.home = home_keys(self.shards)
        self.window_s = settings.worker.idempotency_window_s
        self.out = out
        self.report = MigrationReport()
        self._entry = dest.register_script(_MOVE_ENTRY)
        self._delayed = dest.register_script(_MOVE_DELAYED)

    def _progress(self, what: str, n: int) -> None:
        self.out.write(f"migrate: {what}: {n}\n")
        self.out.flush()

    async def run(self) -> MigrationReport:
        await self.copy_users()
        await self.copy_audiences()
        await self.copy_templates()
        for lane in ("high", "normal"):
            await self.move_stream(lane)
        await self.move_delayed()
        await self.move_dead_letters()
        return self.report

    async def _scan(self, pattern: str) -> AsyncIterator[list[str]]:
        batch: list[str] = []
        async for key in self.source.scan_iter(match=pattern, count=BATCH):
            batch.append(_s(key))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    # ------------------------------------------------------------------ learners and templates

    async def copy_users(self) -> None:
        """Devices and preferences/attributes hashes, field by field, onto each learner's shard (idempotent: HSET)."""
        for kind, build in (("devices", Keys.devices), ("user", Keys.user)):
            head = build(self.src, "")
            async for keys in self._scan(_glob(head)):
                async with self.source.pipeline(transaction=False) as pipe:
                    for k in keys:
                        pipe.hgetall(k)
                    hashes = await pipe.execute()
                async with self.dest.pipeline(transaction=False) as pipe:
                    for k, fields in zip(keys, hashes, strict=True):
                        user = k[len(head):]
                        if fields:
                            pipe.hset(build(self.shards.user_keys(user), user), mapping=fields)
                    await pipe.execute()
                if kind == "devices":
                    self.report.devices += len(keys)
                    self._progress("learners with devices", self.report.devices)
                else:
                    self.report.users += len(keys)
                    self._progress("learners with preferences or attributes", self.report.users)

    async def copy_audiences(self) -> None:
        """Each audience index set's members into the same set on each member's shard."""
        head = self.src.audience_index("", "")[:-1]  # `<prefix>:aud:`
        async for keys in self._scan(_glob(head)):
            for k in keys:
                attr, sep, value = k[len(head):].partition(":")
                if not sep or attr == "count":  # a count's temporary set
                    continue
                members: dict[int, list[str]] = {}
                async for user in self.source.sscan_iter(k, count=BATCH):
                    u = _s(user)
                    members.setdefault(self.shards.shard_of(u), []).append(u)
                for n, users in members.items():
                    await self.dest.sadd(self.shards.keys(n).audience_index(attr, value), *users)
                    self.report.audience_entries += len(users)
        self._progress("audience index entries", self.report.audience_entries)

    async def copy_templates(self) -> None:
        names = sorted(_s(n) for n in await self.source.smembers(self.src.templates))
        for name in names:
            raw = await self.source.get(self.src.template(name))
            if raw is None:
                continue
            async with self.dest.pipeline(transaction=True) as pipe:
                pipe.set(self.home.template(name), raw)
                pipe.sadd(self.home.templates, name)
                await pipe.execute()
            self.report.templates += 1
        self._progress("templates", self.report.templates)

    # ------------------------------------------------------------------ messages

    async def _idem(self, message_ids: list[str]) -> list[tuple[str, int]]:
        """Each message id's idempotency key in the source: (owner, ms left); ("", 0) when gone."""
        async with self.source.pipeline(transaction=False) as pipe:
            for i in message_ids:
                pipe.get(self.src.idem(i))
                pipe.pttl(self.src.idem(i))
            replies = await pipe.execute()
        return [("" if owner is None else _s(owner), max(0, int(ttl)) if owner is not None else 0)
                for owner, ttl in zip(replies[::2], replies[1::2], strict=True)]

    async def _move_entries(self, entries: list[tuple[str, dict[Any, Any]]], source_stream: str,
                            dest_stream: Callable[[Keys], str], what: str) -> int:
        """Entries of a source stream onto their shards' `dest_stream`; returns how many moved this run."""
        moved = 0
        for i in range(0, len(entries), BATCH):
            part = entries[i:i + BATCH]
            where = [_message_shard(self.shards, fields.get(b"m", fields.get("m"))) for _, fields in part]
            idem = await self._idem([w[1] for w in where if w is not None])
            it = iter(idem)
            for (entry_id, fields), w in zip(part, where, strict=True):
                shard, mid = w if w is not None else (0, "")
                owner, ttl = next(it) if w is not None else ("", 0)
                if w is None:
                    self.report.poison.append(f"{source_stream}/{entry_id}")
                k = self.shards.keys(shard)
                args: list[Any] = [f"{source_stream}/{entry_id}", owner, ttl]
                for name, value in fields.items():
                    args += [name, value]
                if await self._entry(keys=[k.migrated, dest_stream(k), k.idem(mid or "-")], args=args):
                    moved += 1
                else:
                    self.report.skipped += 1
            self._progress(what, moved)
        return moved

    async def move_stream(self, lane: str) -> None:
        """A lane's unread entries (after the group's last-delivered id) and pending ones, onto the shards' lane."""
        stream = self.src.lane_stream(lane)
        if not await self.source.exists(stream):
            return
        last = "0-0"
        pending: list[str] = []
        groups = {_s(g["name"]): g for g in await self.source.xinfo_groups(stream)}
        group = groups.get(self.src.group)
        if group is not None:
            last = _s(group["last-delivered-id"])
            start = "-"
            while True:
                page = await self.source.xpending_range(stream, self.src.group, min=start, max="+", count=BATCH)
                pending += [_s(p["message_id"]) for p in page]
                if len(page) < BATCH:
                    break
                start = "(" + pending[-1]
        entries: list[tuple[str, dict[Any, Any]]] = []
        for entry_id in pending:  # read by the old workers, not acknowledged: in flight at their stop
            entries += [(_s(i), f) for i, f in await self.source.xrange(stream, entry_id, entry_id)]
        start = "(" + last
        while True:
            page = await self.source.xrange(stream, start, "+", count=BATCH)
            entries += [(_s(i), f) for i, f in page]
            if len(page) < BATCH:
                break
            start = "(" + _s(page[-1][0])
        self.report.queued += await self._move_entries(entries, stream, lambda k: k.lane_stream(lane),
                                                       f"queued messages ({lane} lane)")

    async def move_delayed(self) -> None:
        """The delayed set (scheduled, deferred, retried): each member with its due time and payload."""
        start = 0
        while True:
            page = await self.source.zrange(self.src.delayed, start, start + BATCH - 1, withscores=True)
            if not page:
                break
            start += len(page)
            members = [_s(m) for m, _ in page]
            payloads = await self.source.hmget(self.src.delayed_data, members)
            where = [_message_shard(self.shards, p) for p in payloads]
            idem = iter(await self._idem([w[1] for w in where if w is not None]))
            for (member, score), payload, w in zip(page, payloads, where, strict=True):
                if payload is None:  # moved to its stream meanwhile: `move_stream` of a rerun takes it
                    continue
                shard, mid = w if w is not None else (0, "")
                owner, ttl = next(idem) if w is not None else ("", 0)
                k = self.shards.keys(shard)
                m = _s(member)
                whole = mid if m.endswith("#" + mid) and mid else ""  # a whole waiting message: cancel finds it
                if await self._delayed(keys=[k.migrated, k.delayed, k.delayed_data, k.delayed_ids, k.idem(mid or "-")],
                                       args=[m, score, payload, whole, owner, ttl]):
                    self.report.scheduled += 1
                else:
                    self.report.skipped += 1
            self._progress("scheduled messages", self.report.scheduled)

    async def move_dead_letters(self) -> None:
        entries: list[tuple[str, dict[Any, Any]]] = []
        start = "-"
        while True:
            page = await self.source.xrange(self.src.dead, start, "+", count=BATCH)
            entries += [(_s(i), f) for i, f in page]
            if len(page) < BATCH:
                break
            start = "(" + _s(page[-1][0])
        self.report.dead_letters += await self._move_entries(entries, self.src.dead, lambda k: k.dead, "dead letters")
