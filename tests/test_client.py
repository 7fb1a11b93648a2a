"""PushClient: enqueue straight into Redis with the same validation and idempotency as the API."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from pushgw.core.config import RedisSettings, Settings
from pushgw.core.schema import MessageInvalid, loads_message
from pushgw.gateway.client import PushClient
from pushgw.queue.keys import Keys
from pushgw.users.registry import RegistryFull

SETTINGS = Settings(redis=RedisSettings(prefix="clienttest"))


async def test_send_many_is_all_or_nothing_and_idempotent(redis: aioredis.Redis) -> None:
    client = PushClient(redis, SETTINGS)
    with pytest.raises(MessageInvalid) as e:
        await client.send_many([{"id": "a", "user": "u1", "body": "x"}, {"id": "b", "user": "u1"}])
    assert [err.field for err in e.value.errors] == ["messages[1].body"]
    assert await redis.xlen(Keys("clienttest").stream) == 0
    assert await client.send_many([{"id": "a", "user": "u1", "body": "x"}, {"id": "b", "user": "u2", "title": "t"}]) == [
        ("a", True), ("b", True)]
    assert await client.send({"id": "a", "user": "u1", "body": "x"}) == ("a", False)
    entries = await redis.xrange(Keys("clienttest").stream)
    assert [loads_message(f[b"m"]).id for _, f in entries] == ["a", "b"]


async def test_devices(redis: aioredis.Redis) -> None:
    client = PushClient(redis, SETTINGS)
    dev = await client.register_device("learner-1", {"apns": "ab" * 32})
    assert dev.key == f"apns:{'ab' * 32}" and [d.key for d in await client.devices("learner-1")] == [dev.key]
    with pytest.raises(MessageInvalid):
        await client.register_device("learner-1", {"apns": "zz"})
    with pytest.raises(MessageInvalid) as bad_user:
        await client.register_device("learner 1", {"fcm": "t"})
    assert [e.field for e in bad_user.value.errors] == ["user"]
    for i in range(99):
        await client.register_device("learner-1", {"fcm": f"t-{i}"})
    with pytest.raises(RegistryFull):
        await client.register_device("learner-1", {"fcm": "one-too-many"})
    assert await client.unregister_device("learner-1", dev.key) is True
    assert await client.unregister_device("learner-1", dev.key) is False


async def test_from_url_owns_its_connection(redis_url: str) -> None:
    client = PushClient.from_url(redis_url, SETTINGS)
    assert (await client.send({"user": "u", "body": "b"}))[1] is True
    await client.aclose()
