"""Withdrawing messages through the HTTP API: `DELETE /v1/messages/{id}` and `DELETE /v1/messages?ref=`.

The race between a cancel and the scheduler's move is decided by Redis running one script at a time: the
tests run both orders explicitly instead of hoping a timing produces them.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from pushgw.core.config import ApiClient, ApiSettings, RedisSettings, Settings
from pushgw.core.schema import loads_message, parse_message
from pushgw.queue.keys import Keys
from pushgw.queue.streams import Commit, StreamQueue

ALSO_ON_CLUSTER = True  # every test using `redis` also runs on the 1-node cluster (tests/conftest.py)
KEY_PREFIX = "cancel"

COURSES = "courses-token-0123456789"
QUIZZES = "quizzes-token-0123456789"
ADMIN = "admin-token-0123456789ab"




def settings(keys: Keys) -> Settings:
    clients = (
        ApiClient("course-service", COURSES, ("enqueue",)),
        ApiClient("quiz-service", QUIZZES, ("enqueue",)),
        ApiClient("ops", ADMIN, ("enqueue", "admin")),
    )
    return Settings(redis=RedisSettings(prefix=keys.prefix), api=ApiSettings(clients=clients))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def reminder(mid: str, *, ref: str | None = "session-812", ahead_s: float = 3600) -> dict[str, Any]:
    out: dict[str, Any] = {"id": mid, "user": "learner-1", "title": "Live session soon", "send_at": time.time() + ahead_s}
    if ref is not None:
        out["ref"] = ref
    return out


async def stream_ids(redis: aioredis.Redis, keys: Keys) -> list[str]:
    entries = [*await redis.xrange(keys.stream_high), *await redis.xrange(keys.stream)]
    return [loads_message(f[b"m"]).id for _, f in entries]


async def delete(c: TestClient[Any, Any], path: str, token: str = COURSES) -> tuple[int, dict[str, Any]]:
    resp = await c.delete(path, headers=auth(token))
    return resp.status, await resp.json()


async def test_a_scheduled_message_is_withdrawn_and_never_reaches_the_stream(make_client: Any, keys: Keys,
                                                                             redis: aioredis.Redis) -> None:
    c = await make_client(settings(keys))
    assert (await c.post("/v1/messages", json=reminder("r-1"), headers=auth(COURSES))).status == 202
    assert await delete(c, "/v1/messages/r-1") == (200, {"id": "r-1", "status": "cancelled"})
    assert await delete(c, "/v1/messages/r-1") == (200, {"id": "r-1", "status": "cancelled"})  # asking again
    await StreamQueue(redis, keys).move_due(time.time() + 7200)
    assert await stream_ids(redis, keys) == []
    assert await redis.zcard(keys.delayed) == 0 and await redis.hlen(keys.delayed_ids) == 0
    # the id stays taken: the same message sent again is a duplicate, not a new push
    resp = await c.post("/v1/messages", json=reminder("r-1"), headers=auth(COURSES))
    assert (await resp.json())["status"] == "duplicate"


async def test_cancel_answers_sent_for_a_message_already_handed_to_the_workers(make_client: Any, keys: Keys,
                                                                               redis: aioredis.Redis) -> None:
    c = await make_client(settings(keys))
    await c.post("/v1/messages", json=reminder("now-1", ahead_s=-1), headers=auth(COURSES))
    assert await delete(c, "/v1/messages/now-1") == (409, {"id": "now-1", "status": "sent"})
    assert await delete(c, "/v1/messages/never-seen") == (404, {"id": "never-seen", "status": "unknown"})


async def test_another_client_cannot_see_or_withdraw_a_message_but_an_admin_can(make_client: Any, keys: Keys,
                                                                                 redis: aioredis.Redis) -> None:
    c = await make_client(settings(keys))
    await c.post("/v1/messages", json=reminder("r-2"), headers=auth(COURSES))
    assert await delete(c, "/v1/messages/r-2", QUIZZES) == (404, {"id": "r-2", "status": "unknown"})
    assert await delete(c, "/v1/messages?ref=session-812", QUIZZES) == (
        200, {"ref": "session-812", "cancelled": 0, "ids": []})
    assert await redis.zcard(keys.delayed) == 1
    assert await delete(c, "/v1/messages/r-2", ADMIN) == (200, {"id": "r-2", "status": "cancelled"})


async def test_cancel_racing_the_scheduler_either_wins_or_reports_sent(make_client: Any, keys: Keys,
                                                                       redis: aioredis.Redis) -> None:
    c = await make_client(settings(keys))
    q = StreamQueue(redis, keys)
    for mid in ("race-a", "race-b"):
        await c.post("/v1/messages", json=reminder(mid, ahead_s=60), headers=auth(COURSES))
    # cancel first: the move finds nothing for it
    assert (await delete(c, "/v1/messages/race-a"))[1]["status"] == "cancelled"
    # the move first (race-b is due): the cancel finds it gone and says so
    assert await q.move_due(time.time() + 120) == 1
    assert await delete(c, "/v1/messages/race-b") == (409, {"id": "race-b", "status": "sent"})
    assert await stream_ids(redis, keys) == ["race-b"]


async def test_a_message_held_by_the_policy_can_be_withdrawn(make_client: Any, keys: Keys, redis: aioredis.Redis) -> None:
    c = await make_client(settings(keys))
    q = StreamQueue(redis, keys)
    await c.post("/v1/messages", json=reminder("held-1", ahead_s=-1), headers=auth(COURSES))
    [(_, fields)] = await redis.xrange(keys.stream)
    # what the worker's settler writes when a window defers the whole message (gateway/settle.py `defer`)
    await q.commit(Commit(retries=[(time.time() + 3600, loads_message(fields[b"m"]), 1, 0)]))
    # a retry of one device of another message is not withdrawable: it is being sent
    other = parse_message({"id": "other", "user": "learner-2", "body": "x"})
    await q.commit(Commit(retries=[(time.time() + 3600, other.with_devices(()), 2, 0)]))
    assert await delete(c, "/v1/messages/held-1") == (200, {"id": "held-1", "status": "cancelled"})
    assert await redis.zcard(keys.delayed) == 1


async def test_delete_by_ref_withdraws_all_pending_of_that_client_and_only_those(make_client: Any, keys: Keys,
                                                                                redis: aioredis.Redis) -> None:
    c = await make_client(settings(keys))
    await c.post("/v1/messages/batch", json={"messages": [
        reminder("s812-24h"), reminder("s812-15m", ahead_s=7200), reminder("s900-24h", ref="session-900"),
        reminder("s812-now", ahead_s=-1)]}, headers=auth(COURSES))
    await c.post("/v1/messages", json=reminder("quiz-s812"), headers=auth(QUIZZES))  # same ref, another client
    status, body = await delete(c, "/v1/messages?ref=session-812")
    assert status == 200 and body["cancelled"] == 2 and sorted(body["ids"]) == ["s812-15m", "s812-24h"]
    assert (await delete(c, "/v1/messages?ref=session-812"))[1]["cancelled"] == 0
    await StreamQueue(redis, keys).move_due(time.time() + 10_000)
    assert sorted(await stream_ids(redis, keys)) == ["quiz-s812", "s812-now", "s900-24h"]


async def test_bad_ids_and_refs_are_422_naming_the_field(make_client: Any, keys: Keys) -> None:
    c = await make_client(settings(keys))
    status, body = await delete(c, "/v1/messages?ref=" + "x" * 200)
    assert status == 422 and body["error"]["fields"][0]["field"] == "ref"
    status, body = await delete(c, "/v1/messages")
    assert status == 422 and body["error"]["fields"][0]["field"] == "ref"
    resp = await c.post("/v1/messages", json=reminder("r-3", ref="has space"), headers=auth(COURSES))
    assert resp.status == 422 and (await resp.json())["error"]["fields"][0]["field"] == "ref"
    status, body = await delete(c, "/v1/messages/" + "y" * 200)
    assert status == 422 and body["error"]["fields"][0]["field"] == "id"
