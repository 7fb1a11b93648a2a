"""The one reader over a process's owned shards (gateway/multishard.py), on the test run's Redis Clusters (1 master,
and 3): every owned shard read at each call, a busy shard starving none, a shard given up no longer read while
what was read of it still settles, a shard gained read from its own pending entries first, commits routed to each
entry's shard, and each shard's direct client following its slot to a new master."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pushgw.core.config import RedisSettings
from pushgw.core.schema import Device, Message, parse_message
from pushgw.gateway.multishard import OwnedShards, ShardedRegistry, split_qualified
from pushgw.gateway.topology import LocalCluster
from pushgw.queue.connection import ShardedCluster, SlotClient, blocking_redis, redis_url_for
from pushgw.queue.sharded import ShardedQueue, shard_clients, shard_map
from pushgw.queue.shards import ShardMap, key_slot
from pushgw.queue.status import InFlight, Step
from pushgw.queue.streams import Commit

SHARDS = 16


@pytest.fixture(params=["cluster1", "cluster3"])
def cluster(request: pytest.FixtureRequest) -> LocalCluster:
    c: LocalCluster = request.getfixturevalue(request.param)
    for n in c.nodes:
        with n.client() as r:
            r.flushall()
    return c


def settings(cluster: LocalCluster) -> RedisSettings:
    return RedisSettings(prefix="ms", cluster=True, cluster_nodes=cluster.seeds, shards=SHARDS)


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[ShardedCluster]:
    r = blocking_redis(redis_url_for(settings(cluster)), max_connections=16)
    yield r
    await r.aclose()


async def owned_shards(client: ShardedCluster, shards: ShardMap) -> OwnedShards:
    q = OwnedShards(client, shards, await shard_clients(client, shards))
    await q.ensure_group()
    return q


def user_on(shards: ShardMap, shard: int, n: int = 0) -> str:
    """The n-th user name (of `u-0`, `u-1`, ...) that hashes to `shard`."""
    found = (u for u in (f"u-{i}" for i in range(100_000)) if shards.shard_of(u) == shard)
    for _ in range(n):
        next(found)
    return next(found)


def message(user: str, i: int) -> Message:
    return parse_message({"id": f"{user}-{i}", "user": user, "body": "b"})


async def test_every_owned_shard_is_read_in_one_call_and_no_other(client: ShardedCluster) -> None:
    shards = shard_map(settings_of(client))
    producer = ShardedQueue(client, shards)
    await producer.enqueue([message(user_on(shards, s), 0) for s in range(SHARDS)])
    q = await owned_shards(client, shards)
    q.own(range(0, SHARDS, 2))  # the even shards only
    entries = await q.read_new("c1", 256, None)
    assert sorted(split_qualified(e.ref)[0] for e in entries) == list(range(0, SHARDS, 2))
    assert not any(e.redelivered for e in entries)
    lags = [(await p.stats()).lag for p in q.parts]
    assert lags == [0 if s % 2 == 0 else 1 for s in range(SHARDS)]  # the odd shards' entries wait for their owner


async def test_a_busy_shard_starves_none_of_the_others(client: ShardedCluster) -> None:
    shards = shard_map(settings_of(client))
    producer = ShardedQueue(client, shards)
    busy = user_on(shards, 3)
    await producer.enqueue([message(busy, i) for i in range(500)])
    await producer.enqueue([message(user_on(shards, s), 0) for s in range(SHARDS) if s != 3])
    q = await owned_shards(client, shards)
    q.own(range(SHARDS))
    entries = await q.read_new("c1", 32, None)  # room for 32: 2 per shard and lane
    by_shard = [split_qualified(e.ref)[0] for e in entries]
    assert sorted(set(by_shard)) == list(range(SHARDS))  # every quiet shard's message in the first read
    assert by_shard.count(3) == 2  # the busy shard gets its share, not the whole room


async def test_a_shard_given_up_is_no_longer_read_while_what_was_read_of_it_settles(client: ShardedCluster) -> None:
    shards = shard_map(settings_of(client))
    producer = ShardedQueue(client, shards)
    kept, given = user_on(shards, 2), user_on(shards, 5)
    await producer.enqueue([message(kept, 0), message(given, 0)])
    q = await owned_shards(client, shards)
    q.own({2, 5})
    first = await q.read_new("old", 10, None)
    assert sorted(split_qualified(e.ref)[0] for e in first) == [2, 5]
    q.own({2})  # shard 5 handed over
    await producer.enqueue([message(kept, 1), message(given, 1)])
    second = await q.read_new("old", 10, None)
    assert [split_qualified(e.ref)[0] for e in second] == [2]
    # What was read of shard 5 still settles here: its ack goes to shard 5.
    await q.commit(Commit(acks=[e.ref for e in first + second]))
    given_part = q.parts[5]
    assert ((await given_part.stats()).pending, (await given_part.stats()).lag) == (0, 1)
    # The new owner reads shard 5's new entry, and nothing of what the old owner held.
    new_owner = await owned_shards(client, shards)
    new_owner.own({5})
    taken = await new_owner.read_new("new", 10, None)
    assert [(split_qualified(e.ref)[0], e.raw) for e in taken] == [(5, second_raw(given, 1))]


def second_raw(user: str, i: int) -> bytes:
    return message(user, i).dumps()  # type: ignore[no-any-return]


async def test_a_shard_gained_is_read_from_its_own_pending_entries_first(client: ShardedCluster) -> None:
    shards = shard_map(settings_of(client))
    producer = ShardedQueue(client, shards)
    user = user_on(shards, 7)
    await producer.enqueue([message(user, i) for i in range(3)])
    before = await owned_shards(client, shards)
    before.own({7})
    held = await before.read_new("host:0", 10, None)  # read, then the process dies without acking
    assert len(held) == 3
    await producer.enqueue([message(user, 3)])
    after = await owned_shards(client, shards)  # the same consumer name after a restart
    after.own({7})
    again = await after.read_new("host:0", 10, None)
    assert [e.ref for e in again] == [e.ref for e in held] and all(e.redelivered for e in again)
    fresh = await after.read_new("host:0", 10, None)
    assert len(fresh) == 1 and not fresh[0].redelivered


async def test_a_commit_goes_to_each_entrys_and_each_messages_shard(client: ShardedCluster) -> None:
    shards = shard_map(settings_of(client))
    producer = ShardedQueue(client, shards)
    users = [user_on(shards, s) for s in (1, 9, 14)]
    await producer.enqueue([message(u, 0) for u in users])
    q = await owned_shards(client, shards)
    q.own(range(SHARDS))
    entries = await q.read_new("c1", 64, None)
    retry = message(users[1], 1)
    first = entries[0]
    await q.commit(Commit(acks=[e.ref for e in entries[1:]], done=[(first.ref, "fcm:t")],
                          retries=[(time.time() + 60, retry, 2, 0)]))
    stats = [await p.stats() for p in q.parts]
    assert [s for s, st in enumerate(stats) if st.pending] == [split_qualified(first.ref)[0]]  # the one not acked
    assert [s for s, st in enumerate(stats) if st.delayed] == [9]  # the retry on its user's shard
    assert await q.done_marks([first.ref]) == {first.ref: {"fcm:t"}}  # its done mark, on its shard


async def test_status_steps_go_to_their_messages_shard_which_is_its_users(client: ShardedCluster) -> None:
    shards = shard_map(settings_of(client))
    user = user_on(shards, 3)
    msg_id = next(f"m-{i}" for i in range(1000) if shards.shard_of(f"m-{i}") != 3)  # its id alone names another
    q = OwnedShards(client, shards, await shard_clients(client, shards), status_retention_s=60)
    q.own(range(SHARDS))
    await q.commit(Commit(steps=[Step(msg_id, 1, "retrying", "fcm:t", {"attempt": 2}, 5, user)],
                          started=[InFlight(msg_id, 2, 1, [Device("fcm", "t")], user)]))
    written = [n for n in range(SHARDS) if await client.exists(shards.keys(n).status(msg_id))]
    assert written == [3]
    assert b"retrying" in await client.get(shards.keys(3).status(msg_id))


async def test_devices_of_users_on_every_shard_in_one_call(client: ShardedCluster) -> None:
    shards = shard_map(settings_of(client))
    registry = ShardedRegistry(client, shards, await shard_clients(client, shards))
    users = [user_on(shards, s) for s in range(SHARDS)]
    for i, u in enumerate(users):
        await registry.parts[shards.shard_of(u)].register(u, Device("fcm", f"t{i}"))
    found = await registry.devices_many(users)
    assert {u: [d.token for d in found[u]] for u in users} == {u: [f"t{i}"] for i, u in enumerate(users)}


async def test_a_shards_client_follows_its_slot_to_a_new_master(cluster3: LocalCluster) -> None:
    for n in cluster3.nodes:
        with n.client() as r:
            r.flushall()
    client = blocking_redis(redis_url_for(settings(cluster3)), max_connections=16)
    shards = ShardMap.cluster("ms", SHARDS)
    slot = key_slot(shards.keys(0).stream)
    home = cluster3.owner_of(slot)
    try:
        shard0: Any = (await shard_clients(client, shards))[0]
        assert isinstance(shard0, SlotClient)
        await shard0.set(shards.keys(0).stream + ":probe", "1")
        pool = shard0.connection_pool
        cluster3.move_slot(slot, (home + 1) % 3)
        assert await shard0.get(shards.keys(0).stream + ":probe") == b"1"  # MOVED: read the map again, resent
        async with shard0.pipeline(transaction=True) as pipe:
            pipe.incr(shards.keys(0).stream + ":n")
            pipe.incr(shards.keys(0).stream + ":n")
            assert await pipe.execute() == [1, 2]
        assert shard0.connection_pool is not pool
    finally:
        cluster3.move_slot(slot, home)
        await client.aclose()


def settings_of(client: ShardedCluster) -> RedisSettings:
    return RedisSettings(prefix="ms", cluster=True, cluster_nodes=tuple(n.name for n in client.get_primaries()),
                         shards=SHARDS)


async def test_a_shard_gained_back_skips_its_entries_finished_here_with_acks_unwritten(client: ShardedCluster) -> None:
    shards = shard_map(settings_of(client))
    user = user_on(shards, 4)
    await ShardedQueue(client, shards).enqueue([message(user, i) for i in range(2)])
    q = await owned_shards(client, shards)
    q.own({4})
    done, pending = await q.read_new("host:0", 10, None)
    q.held = lambda: {done.ref}  # finished here, its ack still in the settler's next commit
    q.own(())
    q.own({4})  # given up and gained back before that commit
    assert [e.ref for e in await q.read_new("host:0", 10, None)] == [pending.ref]
