"""Logical shards: which keys live together, so every Lua script and MULTI touches one Redis Cluster slot.

A deployment has S shards (`redis.shards`, default 16, fixed for its life: a user's shard is a function of S).
Shard n's keys are the keys of `queue/keys.py` under the prefix `{<tag n>}` instead of `<prefix>`: its two lane
streams, delayed set and data, dead letters, idempotency keys and done marks, and the per-user keys (devices,
preferences, caps, burst) of the users hashed to it. Redis Cluster hashes only the part between the first `{` and
the next `}` of a key (the hash tag), so all of a shard's keys share one slot and any script or transaction over
them is legal (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags).

Tags spread evenly over the 16384 slots: shard n's tag is the first of `<prefix>:<n>`, `<prefix>:<n>:1`,
`<prefix>:<n>:2`, ... whose slot lies in the n-th of S equal slot ranges, so a cluster whose masters own even
contiguous ranges (what `redis-cli --cluster create` makes) serves S/masters shards each, give or take one.

A message goes to its user's shard; one without a user (explicit devices, an FCM topic) to its id's shard.
Users hash to shards with CRC-32 (an independent hash from the slot's CRC16, so users spread evenly whatever the
tags are).

With one Redis (`ShardMap.single`) there is one shard whose keys are today's names, byte for byte: deployments
that never enabled cluster mode keep their data where it is.
"""

from __future__ import annotations

import zlib
from binascii import crc_hqx
from dataclasses import dataclass
from functools import lru_cache

from .keys import Keys

SLOTS = 16384
MAX_SHARDS = 1024  # finding S tags costs about S*S CRC16s (1M at 1024: a fraction of a second, once per process)


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag if it has a non-empty one, else of it all."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return crc_hqx(raw, 0) % SLOTS


def slot_range(shard: int, shards: int) -> range:
    """The n-th of `shards` equal slot ranges: the slots shard n's tag is chosen from."""
    return range(shard * SLOTS // shards, (shard + 1) * SLOTS // shards)


@lru_cache(maxsize=8)
def shard_tags(prefix: str, shards: int) -> tuple[str, ...]:
    """Each shard's hash tag (without braces), its slot in the shard's own slot range."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
    tags: list[str] = []
    for n in range(shards):
        wanted = slot_range(n, shards)
        tag, j = f"{prefix}:{n}", 0
        while crc_hqx(tag.encode(), 0) % SLOTS not in wanted:
            j += 1
            tag = f"{prefix}:{n}:{j}"
        tags.append(tag)
    return tuple(tags)


@dataclass(frozen=True, slots=True)
class ShardMap:
    """Which shard a user or message belongs to, and the keys of each shard."""

    prefix: str = "pushgw"
    shards: int = 1
    clustered: bool = False  # False: one Redis, one shard under today's key names

    @classmethod
    def single(cls, prefix: str = "pushgw") -> ShardMap:
        return cls(prefix, 1, False)

    @classmethod
    def cluster(cls, prefix: str = "pushgw", shards: int = 16) -> ShardMap:
        shard_tags(prefix, shards)  # validates `shards` and fills the cache once
        return cls(prefix, shards, True)

    @property
    def count(self) -> int:
        return self.shards if self.clustered else 1

    def keys(self, shard: int) -> Keys:
        """Shard n's keys: `{<tag>}:stream`, `{<tag>}:devices:<user>`, ...; with one Redis, today's `Keys(prefix)`."""
        if not self.clustered:
            return Keys(self.prefix)
        return Keys("{" + shard_tags(self.prefix, self.shards)[shard] + "}")

    def all_keys(self) -> list[Keys]:
        return [self.keys(n) for n in range(self.count)]

    def shard_of(self, name: str) -> int:
        """The shard of a user (or of a message id, for a message without a user)."""
        if not self.clustered:
            return 0
        return zlib.crc32(name.encode()) % self.shards

    def user_keys(self, user: str) -> Keys:
        return self.keys(self.shard_of(user))

    @property
    def shared(self) -> Keys:
        """Keys that are not per user or per shard (provider rates, API client rates, templates): each is used
        alone, so in a cluster it lives wherever its own name hashes."""
        return Keys(self.prefix)
