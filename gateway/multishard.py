"""One worker over every shard this process owns (Redis Cluster): one reader, one set of lanes, one flusher.

On Redis Cluster a process owns several shards (gateway/shard_owner.py) and runs ONE `Worker` (gateway/worker.py)
for all of them: one in-flight budget, one set of senders per provider, one flusher. The worker sees the owned
shards through three small adapters that keep its single-Redis interface:

- `OwnedShards`, its queue: reads every owned shard, routes each commit, ack, touch and done-mark lookup to the
  shard of its entry, and runs the mover's and janitor's calls on the owned shards only.
- `ShardedRegistry`, its device registry: a batch's users grouped by shard, one call per shard, concurrently.
- `ShardedPolicy`, its limiter: a batch's messages grouped by shard, one decision call per shard, concurrently.

Entries carry their shard: `OwnedShards` prefixes every entry's `ref` with `<shard>@` (stream ids of two shards
may be equal), and strips it again for the shard's own `StreamQueue`.

Reading (XREADGROUP cannot span slots): each call sends one non-blocking XREADGROUP per owned shard (both lanes'
streams, which share the shard's slot) in one cluster pipeline, which redis-py sends as one pipeline per node,
the nodes concurrently. Each shard may return its share of the worker's room (`count` divided by the owned
shards, rounded up), so every owned shard is read at every call and a busy shard starves none. Only when every
owned shard was empty does the reader wait: it polls again after a pause that doubles from `IDLE_POLL_MIN_S` to
`IDLE_POLL_MAX_S` (and never longer than the worker's `block_ms`), reset by the first entry read. An idle worker
thus sends at most 1/`IDLE_POLL_MAX_S` pipelines a second, and a message arriving at an idle worker waits at
most `IDLE_POLL_MAX_S` for its read. (A blocking read per shard would need a connection per shard held for the
block, and a read cancelled after it took entries leaves them pending unseen until a janitor claims them.)

Ownership changes (`own`): a shard gained is first read from this consumer's own pending entries (a process that
restarted under the same name), then for new entries. A shard given up is no longer read, moved or claimed; what
this process holds of it stays in flight here, is touched by the janitor like any other entry, and its acks are
written by the one flusher: the handover drains that shard only, and nothing else waits for it.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AskError, MovedError, RedisError, ResponseError, TryAgainError

from ..core.config import PolicySettings
from ..core.schema import Device, Message
from ..queue.connection import ShardedCluster, SlotClient
from ..queue.shards import ShardMap, key_slot
from ..queue.streams import LANES, Commit, Entry, QueueStats, StreamQueue
from ..ratelimit.base import Decision
from ..ratelimit.policy import DeliveryPolicy
from ..users.registry import DeviceRegistry

IDLE_POLL_MIN_S = 0.002
IDLE_POLL_MAX_S = 0.05
SEP = "@"  # between an entry's shard and its ref within the shard: "3@high/1733300000000-0"


def qualified(shard: int, ref: str) -> str:
    return f"{shard}{SEP}{ref}"


def split_qualified(ref: str) -> tuple[int, str]:
    """`<shard>@<ref>` -> (shard, the ref within the shard)."""
    shard, _, inner = ref.partition(SEP)
    return int(shard), inner


class ShardQueue(StreamQueue):
    """One shard's queue, with the reply parsing of a read made by `OwnedShards`' pipeline."""

    async def parse_read(self, reply: Any, shard: int, *, redelivered: bool) -> list[Entry]:
        entries = await self._entries(reply, redelivered=redelivered)
        for e in entries:  # `Entry` is a slots class at run time (core/records.py)
            object.__setattr__(e, "ref", qualified(shard, e.ref))
        return entries

    def lane_of(self, stream: Any) -> str:
        return self._lane_by_stream.get(stream, "normal")


@dataclass(slots=True)
class _Recovery:
    """A shard gained: its lanes still to be read from this consumer's own pending entries, with their cursors."""

    cursors: dict[str, str]


class OwnedShards(StreamQueue):
    """The worker's queue over the shards this process owns; see the module docstring.

    It is a `StreamQueue` for the worker and its settler, which call `read_new`, `read_own_pending`, `claim_stale`,
    `touch`, `done_marks`, `commit`, `move_due`, `trim`, `delete_idle_consumers`, `stats` and `ensure_group`; those
    are overridden here. Producers use `queue/sharded.py`'s `ShardedQueue`, not this class."""

    def __init__(self, redis: Any, shards: ShardMap, clients: Sequence[Any] | None = None, **options: Any) -> None:
        super().__init__(redis, shards.shared, **options)
        self.shards = shards
        self.parts = [ShardQueue(c, k, **options) for c, k in zip(clients or _each(redis, shards), shards.all_keys(),
                                                                   strict=True)]
        self.owned: tuple[int, ...] = ()
        self.recovering: dict[int, _Recovery] = {}
        # Entries this process finished whose acks are not written yet (the worker's settler): a shard given up
        # and gained back re-reads its own pending entries, and must not send those again.
        self.held: Callable[[], Container[str]] = frozenset
        self._idle_s = IDLE_POLL_MIN_S

    def own(self, shards: Iterable[int]) -> None:
        """The shards this process reads from now on; a shard gained starts with its own pending entries."""
        owned = tuple(sorted(shards))
        for s in set(owned) - set(self.owned):
            self.recovering[s] = _Recovery({lane: "0" for lane in LANES})
        for s in set(self.recovering) - set(owned):
            del self.recovering[s]
        self.owned = owned

    # ------------------------------------------------------------------ reading

    async def ensure_group(self) -> None:
        await asyncio.gather(*(q.ensure_group() for q in self.parts))

    async def read_new(self, consumer: str, count: int, block_ms: int | None,
                       lanes: Sequence[str] = LANES) -> list[Entry]:
        """New entries of every owned shard (own pending entries first for a shard just gained), high lane first;
        each shard up to `ceil(count / owned)` per lane. With none anywhere, a pause of at most `block_ms`."""
        if self.recovering:
            entries = await self._recover(consumer, count)
            if entries:
                return entries
        owned = self.owned
        if owned:
            per = -(-count // len(owned))

            def read(pipe: Any, s: int) -> None:
                k = self.parts[s].keys
                pipe.xreadgroup(k.group, consumer, {k.lane_stream(lane): ">" for lane in lanes}, count=per)

            replies = await self._pipelined(owned, read)
            entries = await self._parse(owned, replies, redelivered=False)
            if entries:
                self._idle_s = IDLE_POLL_MIN_S
                return entries
        if block_ms is not None:
            pause = min(self._idle_s, block_ms / 1000)
            self._idle_s = min(self._idle_s * 2, IDLE_POLL_MAX_S)
            await asyncio.sleep(pause)
        return []

    async def read_own_pending(self, consumer: str, count: int, lane: str = "normal", after: str = "0") -> list[Entry]:
        """This consumer's pending entries on the owned shards it has not re-read yet (both lanes, whatever
        `lane` and `after` say: the cursors are kept per shard and lane here); [] once all were read."""
        return await self._recover(consumer, count)

    async def _recover(self, consumer: str, count: int) -> list[Entry]:
        shards = list(self.recovering)
        def read(pipe: Any, s: int) -> None:
            k = self.parts[s].keys
            pipe.xreadgroup(k.group, consumer, {k.lane_stream(lane): cursor
                                                for lane, cursor in self.recovering[s].cursors.items()}, count=count)

        replies = await self._pipelined(shards, read)
        out: list[Entry] = []
        for s, reply in zip(shards, replies, strict=True):
            recovery = self.recovering.get(s)
            if recovery is None:  # given up meanwhile
                continue
            if isinstance(reply, Exception):
                await self._failed(s, reply)
                continue
            got = {self.parts[s].lane_of(stream): items for stream, items in reply or []}
            for lane in list(recovery.cursors):
                items = got.get(lane)
                if items:
                    recovery.cursors[lane] = _decode(items[-1][0])
                else:  # this lane's own pending entries were all read again
                    del recovery.cursors[lane]
            if not recovery.cursors:
                del self.recovering[s]
            out += await self.parts[s].parse_read(reply, s, redelivered=True)
        if out:
            held = self.held()
            out = [e for e in out if e.ref not in held]
        return out

    async def _parse(self, shards: Sequence[int], replies: Sequence[Any], *, redelivered: bool) -> list[Entry]:
        high: list[Entry] = []
        normal: list[Entry] = []
        for s, reply in zip(shards, replies, strict=True):
            if isinstance(reply, Exception):
                await self._failed(s, reply)
                continue
            if not reply:
                continue
            for e in await self.parts[s].parse_read(reply, s, redelivered=redelivered):
                (high if e.lane == "high" else normal).append(e)
        return high + normal if high else normal

    async def _pipelined(self, shards: Sequence[int], add: Callable[[Any, int], None]) -> list[Any]:
        """One command per shard (`add`), in one pipeline per node, the nodes concurrently; the replies in the
        order of `shards`, an error in place of a shard's reply."""
        by_client: dict[int, list[int]] = {}
        for s in shards:
            by_client.setdefault(id(self.parts[s].redis.connection_pool), []).append(s)
        groups = list(by_client.values())

        async def send(group: list[int]) -> list[Any]:
            async with self.parts[group[0]].redis.pipeline(transaction=False) as pipe:
                for s in group:
                    add(pipe, s)
                return list(await pipe.execute(raise_on_error=False))

        found = await asyncio.gather(*(send(g) for g in groups))
        replies: dict[int, Any] = {}
        for group, got in zip(groups, found, strict=True):
            replies.update(zip(group, got, strict=True))
        return [replies[s] for s in shards]

    async def _failed(self, shard: int, error: Exception) -> None:
        """A shard's read failed: NOGROUP creates its group again (its streams were lost or deleted); MOVED follows
        its slot to the new master; ASK or TRYAGAIN (the slot is moving) skip it this round."""
        client = self.parts[shard].redis
        if isinstance(error, MovedError) and isinstance(client, SlotClient):
            await client.follow()
        elif isinstance(error, AskError | TryAgainError):
            pass
        elif isinstance(error, ResponseError) and "NOGROUP" in str(error):
            await self.parts[shard].ensure_group()
        else:
            raise error

    async def claim_stale(self, consumer: str, idle_ms: int, count: int, lane: str = "normal") -> list[Entry]:
        """Entries of dead consumers on the owned shards, up to `count` per shard."""
        owned = self.owned
        found = await asyncio.gather(*(self.parts[s].claim_stale(consumer, idle_ms, count, lane) for s in owned))
        out: list[Entry] = []
        for s, entries in zip(owned, found, strict=True):
            for e in entries:
                object.__setattr__(e, "ref", qualified(s, e.ref))
            out += entries
        return out

    # ------------------------------------------------------------------ per entry, on its own shard

    async def touch(self, consumer: str, refs: Sequence[str]) -> None:
        by_shard = _by_shard(refs)
        await asyncio.gather(*(self.parts[s].touch(consumer, inner) for s, inner in by_shard.items()))

    async def done_marks(self, refs: Sequence[str]) -> dict[str, set[str]]:
        by_shard = _by_shard(refs)
        shards = list(by_shard)
        found = await asyncio.gather(*(self.parts[s].done_marks(by_shard[s]) for s in shards))
        return {qualified(s, ref): m for s, part in zip(shards, found, strict=True) for ref, m in part.items()}

    async def commit(self, c: Commit, now: float | None = None) -> None:
        """Each shard's part of `c` in one MULTI/EXEC on that shard; the parts on one node in one pipeline, the nodes
        concurrently. The parts written are removed from `c`; if any failed, the first error is raised with `c`
        holding the rest (the settler retries it, so no part is written twice)."""
        parts = self.split(c)
        groups: dict[int, list[int]] = {}
        for s in parts:
            groups.setdefault(id(self.parts[s].redis.connection_pool), []).append(s)
        found = await asyncio.gather(*(self._commit_on_node(g, parts, now) for g in groups.values()))
        failed = [(s, e) for errors in found for s, e in errors.items()]
        if not failed:
            return
        rest = Commit()
        for s, _ in failed:
            _extend(rest, parts[s], s)
        for name in _FIELDS:
            setattr(c, name, getattr(rest, name))
        raise failed[0][1]

    async def _commit_on_node(self, shards: list[int], parts: dict[int, Commit], now: float | None,
                              ) -> dict[int, BaseException]:
        """The shards' MULTI/EXEC blocks (each built by `StreamQueue.commit`) in one pipeline to their node; the
        error of each shard whose block did not run."""
        client = self.parts[shards[0]].redis
        if not isinstance(client, aioredis.Redis):  # the cluster client itself: one call per shard
            results = await asyncio.gather(*(self.parts[s].commit(parts[s], now) for s in shards),
                                           return_exceptions=True)
            return {s: r for s, r in zip(shards, results, strict=True) if isinstance(r, BaseException)}
        spans: dict[int, tuple[int, int]] = {}
        # No reply callbacks: the commands inside a block answer QUEUED, which theirs cannot parse.
        async with aioredis.client.Pipeline(client.connection_pool, {}, False, None) as pipe:
            for s in shards:
                writer = copy.copy(self.parts[s])
                writer.redis = _Into(pipe)  # type: ignore[assignment]
                start = len(pipe)
                await writer.commit(parts[s], now)
                spans[s] = (start, len(pipe))
            try:
                replies = await pipe.execute(raise_on_error=False)
            except (ConnectionError, OSError, RedisError) as e:
                return dict.fromkeys(shards, e)
        errors: dict[int, BaseException] = {}
        for s, (start, end) in spans.items():
            mine = replies[start:end]
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is None and mine and mine[-1] is None:
                error = RedisError("EXEC aborted")
            if error is not None:
                if isinstance(error, MovedError) and isinstance(client, SlotClient):
                    await client.follow()
                errors[s] = error
        return errors

    def split(self, c: Commit) -> dict[int, Commit]:
        """`c` by shard: acks and done marks by their entry's shard, retries, dead letters, token removals and
        campaign figures by their message's (user's) shard, as `ShardedQueue` queues messages; refs unqualified."""
        shard_of = self.shards.shard_of
        parts: dict[int, Commit] = {}

        def part(s: int) -> Commit:
            p = parts.get(s)
            if p is None:
                p = parts[s] = Commit()
            return p

        for ref in c.acks:
            s, inner = split_qualified(ref)
            part(s).acks.append(inner)
        for ref, device_key in c.done:
            s, inner = split_qualified(ref)
            part(s).done.append((inner, device_key))
        for retry in c.retries:
            msg = retry[1]
            part(shard_of(msg.user or msg.id)).retries.append(retry)
        for dead in c.dead:
            part(shard_of(dead.message.user or dead.message.id)).dead.append(dead)
        for token in c.invalid_tokens:
            part(shard_of(token[0] or token[1].key)).invalid_tokens.append(token)
        for kpi in c.kpi:
            part(shard_of(kpi[3])).kpi.append(kpi)
        for step in c.steps:
            part(shard_of(step.shard_key or step.message)).steps.append(step)
        for started in c.started:
            part(shard_of(started.shard_key)).started.append(started)
        for outcome in c.outcomes:
            part(shard_of(outcome.message.user or outcome.message.id)).outcomes.append(outcome)
        return parts

    # ------------------------------------------------------------------ upkeep, on the owned shards

    async def move_due(self, now: float, limit: int = 1000) -> int:
        owned = self.owned
        return sum(await asyncio.gather(*(self.parts[s].move_due(now, limit) for s in owned)))

    async def trim(self) -> int:
        return sum([await self.parts[s].trim() for s in self.owned])

    async def delete_idle_consumers(self, idle_ms: int) -> int:
        return sum([await self.parts[s].delete_idle_consumers(idle_ms) for s in self.owned])

    async def stats(self) -> QueueStats:
        """The owned shards' figures summed (each process reports its own share)."""
        found = await asyncio.gather(*(self.parts[s].stats() for s in self.owned))
        return QueueStats(
            lag=sum(x.lag for x in found), lag_high=sum(x.lag_high for x in found),
            pending=sum(x.pending for x in found), delayed=sum(x.delayed for x in found),
            dead_letters=sum(x.dead_letters for x in found), length=sum(x.length for x in found),
        )


_FIELDS = ("acks", "done", "retries", "dead", "invalid_tokens", "kpi", "steps", "started", "outcomes")


def _extend(into: Commit, part: Commit, shard: int) -> None:
    """Add a shard's part (unqualified refs) back into a commit of qualified refs."""
    into.acks += [qualified(shard, ref) for ref in part.acks]
    into.done += [(qualified(shard, ref), key) for ref, key in part.done]
    into.retries += part.retries
    into.dead += part.dead
    into.invalid_tokens += part.invalid_tokens
    into.kpi += part.kpi
    into.steps += part.steps
    into.started += part.started
    into.outcomes += part.outcomes


def _by_shard(refs: Iterable[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ref in refs:
        s, inner = split_qualified(ref)
        out.setdefault(s, []).append(inner)
    return out


class _Into:
    """Stands in for a client in `StreamQueue.commit`: its MULTI/EXEC block is queued into a node's pipeline."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def pipeline(self, transaction: bool = True) -> _Block:
        return _Block(self.pipe)


class _Block:
    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    async def __aenter__(self) -> Any:
        self.pipe.execute_command("MULTI")
        return _Queue(self.pipe)

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Queue:
    """The commands of one block, then EXEC at `execute` (sent with the node's pipeline)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.pipe.execute_command("EXEC")
        return []


def _each(redis: Any, shards: ShardMap) -> list[Any]:
    return [redis] * shards.count


async def key_client(redis: Any, key: str) -> Any:
    """The client for one key: on Redis Cluster a `SlotClient` of its slot's master, else `redis` itself."""
    return await redis.slot_client(key_slot(key)) if isinstance(redis, ShardedCluster) else redis


def _decode(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class ShardedRegistry(DeviceRegistry):
    """The worker's device lookups over every shard: a batch's users grouped by shard, the shards concurrently."""

    def __init__(self, redis: Any, shards: ShardMap, clients: Sequence[Any] | None = None) -> None:
        super().__init__(redis, shards.shared)
        self.shards = shards
        self.parts = [DeviceRegistry(c, k) for c, k in zip(clients or _each(redis, shards), shards.all_keys(),
                                                           strict=True)]

    async def devices_many(self, users: Sequence[str] | Iterable[str]) -> dict[str, list[Device]]:
        by_shard: dict[int, list[str]] = {}
        for u in users:
            by_shard.setdefault(self.shards.shard_of(u), []).append(u)
        found = await asyncio.gather(*(self.parts[s].devices_many(us) for s, us in by_shard.items()))
        out: dict[str, list[Device]] = {}
        for part in found:
            out.update(part)
        return out


class ShardedPolicy:
    """The delivery policy (ratelimit/policy.py) over every shard: each message decided on its user's shard."""

    def __init__(self, redis: Any, shards: ShardMap, policy: PolicySettings, clients: Sequence[Any] | None = None,
                 ) -> None:
        self.shards = shards
        self.parts = [DeliveryPolicy(c, k, policy) for c, k in zip(clients or _each(redis, shards), shards.all_keys(),
                                                                   strict=True)]

    async def decide(self, messages: Sequence[Message], now: float, members: Sequence[str] | None = None,
                     first_read: Sequence[bool] | None = None) -> list[Decision]:
        positions: dict[int, list[int]] = {}
        for i, m in enumerate(messages):
            positions.setdefault(self.shards.shard_of(m.user or m.id), []).append(i)
        if len(positions) == 1:
            (s,) = positions
            return await self.parts[s].decide(messages, now, members, first_read)
        parts = list(positions.items())
        found = await asyncio.gather(*(
            self.parts[s].decide([messages[i] for i in idx], now,
                                 None if members is None else [members[i] for i in idx],
                                 None if first_read is None else [first_read[i] for i in idx])
            for s, idx in parts))
        out: list[Decision] = [None] * len(messages)  # type: ignore[list-item]
        for (_, idx), decisions in zip(parts, found, strict=True):
            for i, d in zip(idx, decisions, strict=True):
                out[i] = d
        return out

