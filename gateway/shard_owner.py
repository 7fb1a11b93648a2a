"""Which shards this worker process reads on Redis Cluster: an even share of the live worker processes.

Each worker process heartbeats into one sorted set (`Keys.live_workers`: member its consumer name, score the
time its lease ends, `LEASE_S` after its last beat) every `BEAT_S`, drops the expired members, and reads the set
back in the same transaction. The live members, sorted, give each a rank; the process of rank r among n owns the
shards s with s % n == r. Every process computes the same split from the same set, so the shares are disjoint
and cover every shard, and they differ by at most one shard.

- A process that joins beats and is counted at once; the others give up the shards that are now its share.
- A process that stops removes itself (ZREM): the others take its shards at their next beat.
- A process that dies stops beating: its lease ends after `LEASE_S` and the others take its shards then. Its
  pending entries are claimed by the new owner's janitor after `worker.claim_idle_s` (XAUTOCLAIM), as with one
  Redis.

A shard being handed over drains first (its worker stops reading, finishes what it holds and writes its acks)
while the new owner already reads it: for a moment two processes read one shard, which its consumer group
allows (each entry goes to one reader). A shard is unread at most between a process's departure and the
others' next beat (`BEAT_S`), or `LEASE_S` after a crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..queue.keys import Keys

BEAT_S = 1.0
LEASE_S = 30.0  # a crashed process's shards wait this long; a short lease expired under load (docs/benchmarks.md)


def share(members: list[str], me: str, shards: int) -> frozenset[int]:
    """The shards of `me` among the live `members` (an even split by rank; all of them if `me` is alone)."""
    live = sorted(set(members) | {me})
    rank, n = live.index(me), len(live)
    return frozenset(s for s in range(shards) if s % n == rank)


@dataclass
class ShardOwner:
    redis: Any
    keys: Keys
    consumer: str
    shards: int
    owned: frozenset[int] = field(default_factory=frozenset)

    async def beat(self, now: float | None = None) -> frozenset[int]:
        """Renew this process's lease, forget expired ones, and return (and keep) this process's share now."""
        now = time.time() if now is None else now
        key = self.keys.live_workers
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {self.consumer: int((now + LEASE_S) * 1000)})
            pipe.zremrangebyscore(key, "-inf", int(now * 1000))
            pipe.zrange(key, 0, -1)
            replies = await pipe.execute()
        members = [m.decode() if isinstance(m, bytes) else str(m) for m in replies[2]]
        self.owned = share(members, self.consumer, self.shards)
        return self.owned

    async def leave(self) -> None:
        """Give the shards back now (a drained stop), instead of when the lease ends."""
        await self.redis.zrem(self.keys.live_workers, self.consumer)
        self.owned = frozenset()
