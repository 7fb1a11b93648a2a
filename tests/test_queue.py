"""The stream queue, delayed set, dead letters and device registry against a real Redis."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from pushgw.core.schema import Device, Message
from pushgw.queue.connection import redis_from_url
from pushgw.queue.deadletter import DeadLetters
from pushgw.queue.keys import Keys
from pushgw.queue.streams import Commit, DeadLetter, Entry, StreamQueue
from pushgw.users import registry as registry_module
from pushgw.users.registry import MAX_DEVICES_PER_USER, DeviceRegistry, RegistryFull

ALSO_ON_CLUSTER = True  # every test using `redis` also runs on the 1-node cluster (tests/conftest.py)
KEY_PREFIX = "t"




def m(i: int | str, **kw: object) -> Message:
    return Message(id=f"m{i}", user=kw.pop("user", None), body="hello", **kw)  # type: ignore[arg-type]


async def test_enqueue_is_idempotent_within_the_window(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys, idempotency_window_s=60)
    assert await q.enqueue([m(1), m(2), m(1)], now_ms=1000) == [True, True, False]
    assert await q.enqueue([m(2), m(3)]) == [False, True]
    assert await redis.xlen(keys.stream) == 3
    assert 0 < await redis.ttl(keys.idem("m1")) <= 60
    await redis.delete(keys.idem("m1"))  # the window has passed
    assert await q.enqueue([m(1)]) == [True]


async def test_entries_carry_message_attempt_and_enqueue_time(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    await q.enqueue([m(1)], now_ms=1234)
    [e] = await q.read_new("c1", 10, 10)
    assert (e.attempt, e.enqueued_ms, e.redelivered) == (1, 1234, False)
    assert b'"id":"m1"' in e.raw
    assert await q.read_new("c1", 10, 10) == []
    [again] = await q.read_own_pending("c1", 10)
    assert again.entry_id == e.entry_id and again.redelivered


@pytest.mark.parametrize("protocol", [2, 3])
async def test_read_takes_entries_of_any_field_order_over_either_protocol(redis_url: str, protocol: int) -> None:
    """The reply is parsed by the queue itself (no redis-py callback): the gateway's own field order, any
    other order with extra fields, a RESP2 and a RESP3 reply, both lanes with the high one first."""
    client = redis_from_url(redis_url, protocol=protocol)
    try:
        await client.flushall()
        q = StreamQueue(client, Keys(KEY_PREFIX))
        await q.ensure_group()
        await q.enqueue([m(1)], now_ms=1234)
        await q.enqueue_raw({"x": "y", "t": "77", "m": Message(id="m2", body="b").dumps(), "a": "3"})
        await q.enqueue([m(3, priority="high")], now_ms=99)
        read = await q.read_new("c1", 10, 10)
        assert [(e.lane, e.attempt, e.enqueued_ms) for e in read] == [("high", 1, 99), ("normal", 1, 1234), ("normal", 3, 77)]
        assert b'"id":"m3"' in read[0].raw and b'"id":"m2"' in read[2].raw
        again = await q.read_own_pending("c1", 10)
        assert [(e.entry_id, e.attempt, e.enqueued_ms, e.redelivered) for e in again] == [
            (e.entry_id, e.attempt, e.enqueued_ms, True) for e in read[1:]]
    finally:
        await client.aclose()


async def test_group_created_after_enqueue_still_sees_earlier_messages(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    await q.enqueue([m(1), m(2)])
    await q.ensure_group()
    await q.ensure_group()  # idempotent
    assert len(await q.read_new("c1", 10, 10)) == 2


async def test_commit_acks_retries_dead_letters_and_tokens_in_one_transaction(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    reg = DeviceRegistry(redis, keys)
    dev = Device("fcm", "tok-1")
    await reg.register("u1", dev)
    await q.ensure_group()
    await q.enqueue([m(1), m(2)])
    e1, e2 = await q.read_new("c1", 10, 10)
    c = Commit()
    c.acks += [e1.entry_id, e2.entry_id]
    c.done.append((e1.entry_id, dev.key))
    c.retries.append((1000.0, m(1).with_devices((dev,)), 2, 77))
    c.dead.append(DeadLetter(m(2), "rejected: BadPayload", 3, "apns", 88))
    c.invalid_tokens.append(("u1", dev, "UNREGISTERED"))
    await q.commit(c, now=5.0)
    stats = await q.stats()
    assert (stats.pending, stats.delayed, stats.dead_letters) == (0, 1, 1)
    assert await q.done_marks([e1.entry_id, e2.entry_id]) == {e1.entry_id: {dev.key}}
    assert await redis.ttl(keys.done(e1.entry_id)) > 0
    assert await reg.devices("u1") == []
    [event] = await reg.invalid_token_events()
    assert (event["user"], event["key"], event["reason"]) == ("u1", dev.key, "UNREGISTERED")


async def test_move_due_moves_each_item_once_with_many_movers(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    c = Commit(retries=[(float(i % 10), m(i), 2, 500) for i in range(300)])
    await q.commit(c)
    later = Commit(retries=[(10_000.0, m("late"), 2, 500)])
    await q.commit(later)
    movers = [StreamQueue(redis, keys) for _ in range(6)]
    moved = await asyncio.gather(*(mv.move_due(100.0, 25) for mv in movers for _ in range(4)))
    total = sum(moved)
    while True:  # finish whatever the bounded rounds left
        n = await q.move_due(100.0, 25)
        if n == 0:
            break
        total += n
    assert total == 300
    entries = await q.read_new("c1", 1000, 10)
    assert len(entries) == 300
    assert len({e.raw for e in entries}) == 300  # no item moved twice
    assert {e.attempt for e in entries} == {2} and {e.enqueued_ms for e in entries} == {500}
    assert await redis.zcard(keys.delayed) == 1 and await redis.hlen(keys.delayed_data) == 1


async def test_trim_keeps_every_pending_and_unread_entry(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    await q.enqueue([m(i) for i in range(10)])
    entries = await q.read_new("c1", 6, 10)  # 6 read, 4 never read
    await q.commit(Commit(acks=[e.entry_id for e in entries if e.entry_id != entries[2].entry_id]))
    removed = await q.trim()
    assert removed == 2  # only the acked entries older than the oldest pending one
    left = [i for i, _ in await redis.xrange(keys.stream)]
    assert entries[2].entry_id.encode() in left
    assert len(await q.read_new("c2", 10, 10)) == 4  # the unread ones are all still there
    [pending] = await q.read_own_pending("c1", 10)
    assert pending.entry_id == entries[2].entry_id


async def test_claim_stale_takes_over_only_idle_entries(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    await q.enqueue([m(1), m(2)])
    dead = await q.read_new("dead", 1, 10)
    await asyncio.sleep(1.2)  # idle past the 1 s below; the live reader's entry stays far from it on a loaded machine
    alive = await q.read_new("alive", 1, 10)
    claimed = await q.claim_stale("janitor", 1000, 10)
    assert [e.entry_id for e in claimed] == [dead[0].entry_id]
    assert claimed[0].redelivered
    await q.touch("alive", [alive[0].entry_id])
    assert await q.claim_stale("janitor", 1000, 10) == []


async def test_dead_letters_list_replay_purge(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    dl = DeadLetters(redis, keys)
    await q.ensure_group()
    dev = Device("apns", "a" * 64)
    c = Commit(dead=[DeadLetter(m(i).with_devices((dev,)), f"max_attempts: 503 #{i}", 8, "apns", 10) for i in range(3)])
    c.dead.append(DeadLetter(m("x"), "invalid_message: not JSON", 1, None, 0, raw=b"{nope"))
    await q.commit(c)
    entries = await dl.list(10)
    assert [e.reason for e in entries[:3]] == [f"max_attempts: 503 #{i}" for i in range(3)]
    assert entries[0].attempts == 8 and entries[0].provider == "apns"
    assert entries[0].message is not None and entries[0].message["devices"] == [{"apns": "a" * 64}]
    assert entries[3].message is None and entries[3].raw == "{nope"
    assert await dl.replay([entries[0].entry_id]) == 1
    assert await dl.count() == 3
    assert await dl.replay(None) == 2  # the poison entry cannot be replayed and stays
    assert await dl.count() == 1
    replayed = await q.read_new("c1", 10, 10)
    assert sorted(e.raw.count(b'"resolved":true') for e in replayed) == [1, 1, 1]
    assert {e.attempt for e in replayed} == {1}
    assert await dl.purge(None) == 1 and await dl.count() == 0


async def test_registry_register_list_unregister_and_cap(redis: aioredis.Redis, keys: Keys) -> None:
    reg = DeviceRegistry(redis, keys)
    a, b = Device("fcm", "t1"), Device("apns", "b" * 64, app="ios2")
    await reg.register("u1", a)
    await reg.register("u1", a)  # twice is once
    await reg.register("u1", b)
    await reg.register("u2", a)
    assert sorted(d.key for d in await reg.devices("u1")) == sorted([a.key, b.key])
    many = await reg.devices_many(["u1", "u2", "nobody"])
    assert set(many) == {"u1", "u2"} and [d.app for d in many["u1"] if d.provider == "apns"] == ["ios2"]
    assert await reg.unregister("u1", a.key) is True
    assert await reg.unregister("u1", a.key) is False
    for i in range(MAX_DEVICES_PER_USER):
        await reg.register("big", Device("fcm", f"t{i}"))
    try:
        await reg.register("big", Device("fcm", "one-too-many"))
    except RegistryFull:
        pass
    else:
        raise AssertionError("registry should be full")
    await reg.register("big", Device("fcm", "t0"))  # re-registering a known device is still fine


async def test_registry_parses_a_stored_device_once_and_follows_changes(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = DeviceRegistry(redis, keys)
    await reg.register("u1", Device("fcm", "t1"))
    [first] = await reg.devices("u1")
    [again] = await reg.devices("u1")
    assert again is first  # the same stored JSON is parsed once
    await reg.register("u1", Device("fcm", "t1", app="campus"))  # same device key, new content
    assert [d.app for d in await reg.devices("u1")] == ["campus"]
    await redis.hset(keys.devices("u2"), "junk", b"{not json")
    assert await reg.devices("u2") == [] and await reg.devices("u2") == []
    monkeypatch.setattr(registry_module, "PARSED_CACHE_SIZE", 2)
    for i in range(5):
        await reg.register(f"v{i}", Device("fcm", f"tok{i}"))
    many = await reg.devices_many([f"v{i}" for i in range(5)])
    assert [d.token for i in range(5) for d in many[f"v{i}"]] == [f"tok{i}" for i in range(5)]
    assert len(reg._parsed) <= 2


def test_entry_ref_follows_the_lane() -> None:
    e = Entry("5-1", b"{}", 1, 0)
    assert e.ref == "5-1" and replace(e, lane="high").ref == "high/5-1"
    assert replace(e, lane="high") == Entry("5-1", b"{}", 1, 0, lane="high")
