"""The HTTP API over a real socket and a real Redis: auth, scopes, limits, validation, dead letters, readiness."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from pushgw.core.config import ApiClient, ApiSettings, ConfigError, FcmApp, RedisSettings, Settings
from pushgw.core.schema import Device, Message, loads_message
from pushgw.gateway.api.app import create_app
from pushgw.gateway.api.auth import Authenticator
from pushgw.gateway.api.errors import ApiError
from pushgw.queue.keys import Keys
from pushgw.queue.streams import Commit, DeadLetter, StreamQueue

ALSO_ON_CLUSTER = True  # every test using `redis` also runs on the 1-node cluster (tests/conftest.py)
KEY_PREFIX = "apitest"

ENQUEUER = "enqueue-token-0123456789"
DEVICES = "devices-token-0123456789"
ADMIN = "admin-token-0123456789ab"
LIMITED = "limited-token-0123456789"
FCM_TOKEN = "fcm-token-abc"




def settings(prefix: str, **api: Any) -> Settings:
    clients = (
        ApiClient("course-service", ENQUEUER, ("enqueue",)),
        ApiClient("profile-service", DEVICES, ("devices",)),
        ApiClient("ops", ADMIN, ("enqueue", "devices", "admin")),
        ApiClient("quiz-service", LIMITED, ("enqueue",), rate_per_s=5.0, burst=10),
    )
    return Settings(redis=RedisSettings(prefix=prefix), api=ApiSettings(clients=clients, **api),
                    fcm=(FcmApp("campus"),))


Client = TestClient[Any, Any]


@pytest.fixture
async def make_client(redis: aioredis.Redis, prefix: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[Client] = []

    async def factory(s: Settings | None = None, r: aioredis.Redis | None = None) -> Client:
        client: Client = TestClient(TestServer(create_app(s or settings(prefix), r or redis)))
        await client.start_server()
        made.append(client)
        return client

    yield factory
    for c in made:
        await c.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error(resp: ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body: dict[str, Any] = (await resp.json())["error"]
    assert body["code"] == code and body["message"]
    return body


async def queued(redis: aioredis.Redis, prefix: str) -> list[Message]:
    k = Keys(prefix)
    entries = [*await redis.xrange(k.stream_high), *await redis.xrange(k.stream)]  # both lanes, high first
    return [loads_message(fields[b"m"]) for _, fields in entries]


MSG = {"id": "reminder-1", "user": "learner-1", "title": "Live session in 15 minutes", "category": "reminder",
       "priority": "high", "ttl": 900}


async def test_message_is_queued_and_duplicate_is_recognised(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    c = await make_client()
    resp = await c.post("/v1/messages", json=MSG, headers=auth(ENQUEUER))
    assert resp.status == 202 and await resp.json() == {"id": "reminder-1", "status": "queued"}
    resp = await c.post("/v1/messages", json=MSG, headers=auth(ENQUEUER))
    assert resp.status == 202 and (await resp.json())["status"] == "duplicate"
    [m] = await queued(redis, prefix)
    assert m.id == "reminder-1" and m.user == "learner-1" and m.ttl == 900 and m.priority == "high"


async def test_missing_and_wrong_tokens_are_401(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    c = await make_client()
    body = await error(await c.post("/v1/messages", json=MSG), 401, "unauthenticated")
    assert "Bearer" in body["message"]
    resp = await c.post("/v1/messages", json=MSG, headers=auth("x" * 24))
    await error(resp, 401, "unauthenticated")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    await error(await c.post("/v1/messages", json=MSG, headers={"Authorization": f"Basic {ENQUEUER}"}), 401,
                "unauthenticated")
    assert await queued(redis, prefix) == []


async def test_scopes(make_client: Any) -> None:
    c = await make_client()
    await error(await c.post("/v1/messages", json=MSG, headers=auth(DEVICES)), 403, "forbidden")
    await error(await c.put("/v1/users/u1/devices", json={"fcm": FCM_TOKEN}, headers=auth(ENQUEUER)), 403, "forbidden")
    await error(await c.get("/v1/deadletters", headers=auth(ENQUEUER)), 403, "forbidden")
    await error(await c.post("/v1/deadletters/replay", json={"all": True}, headers=auth(DEVICES)), 403, "forbidden")
    assert (await c.get("/v1/deadletters", headers=auth(ADMIN))).status == 200


async def test_public_routes_need_no_token(make_client: Any) -> None:
    c = await make_client()
    assert (await c.get("/healthz")).status == 200
    ready = await c.get("/readyz")
    assert ready.status == 200 and (await ready.json())["redis"] == "up"
    metrics = await c.get("/metrics")
    assert metrics.status == 200 and "pushgw_api_requests_total" in await metrics.text()
    spec = await c.get("/openapi.yaml")
    assert spec.status == 200 and "openapi: 3.0.3" in await spec.text()


async def test_invalid_message_names_every_field(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    c = await make_client()
    bad = {"user": "learner 1", "priority": "urgent", "ttl": -5, "data": {"n": 3}}
    body = await error(await c.post("/v1/messages", json=bad, headers=auth(ENQUEUER)), 422, "invalid_message")
    fields = {f["field"] for f in body["fields"]}
    assert {"user", "priority", "ttl", "data.n"} <= fields
    assert await queued(redis, prefix) == []


async def test_batch_is_all_or_nothing_with_indexed_errors(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    c = await make_client()
    good = [dict(MSG, id=f"m-{i}") for i in range(5)]
    batch = [*good[:3], {"user": "u", "title": "t", "devices": [{"apns": "not-hex"}]}, *good[3:]]
    body = await error(await c.post("/v1/messages/batch", json={"messages": batch}, headers=auth(ENQUEUER)), 422,
                       "invalid_message")
    assert body["fields"] == [{"field": "messages[3].devices[0].apns", "message": "must be a hex device token (64+ hex digits)"}]
    assert await queued(redis, prefix) == []
    resp = await c.post("/v1/messages/batch", json={"messages": good}, headers=auth(ENQUEUER))
    assert resp.status == 202
    doc = await resp.json()
    assert doc["queued"] == 5 and [r["id"] for r in doc["results"]] == [f"m-{i}" for i in range(5)]
    assert [m.id for m in await queued(redis, prefix)] == [f"m-{i}" for i in range(5)]


async def test_payload_over_the_provider_limit_is_refused_before_queueing(
    prefix: str, make_client: Any, redis: aioredis.Redis
) -> None:
    c = await make_client()
    big = dict(MSG, body="x" * 4000)
    body = await error(await c.post("/v1/messages", json=big, headers=auth(ENQUEUER)), 422, "invalid_message")
    assert "limit is" in body["message"]
    assert await queued(redis, prefix) == []


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_json"),
        (b"", "application/json", 400, "invalid_json"),
        (b"[1, 2]", "application/json", 422, "invalid_message"),
        (b'"text"', "application/json", 422, "invalid_message"),
        (b"user=u1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
async def test_malformed_bodies_are_4xx(make_client: Any, data: bytes, content_type: str, status: int, code: str) -> None:
    c = await make_client()
    resp = await c.post("/v1/messages", data=data, headers=auth(ENQUEUER) | {"Content-Type": content_type})
    await error(resp, status, code)


async def test_body_and_batch_limits(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    c = await make_client(settings(prefix, max_body_bytes=2048, max_batch=3))
    resp = await c.post("/v1/messages", data=b'{"user": "u", "body": "' + b"x" * 4096 + b'"}',
                        headers=auth(ENQUEUER) | {"Content-Type": "application/json"})
    await error(resp, 413, "body_too_large")
    batch = {"messages": [dict(MSG, id=f"b-{i}") for i in range(4)]}
    await error(await c.post("/v1/messages/batch", json=batch, headers=auth(ENQUEUER)), 413, "batch_too_large")
    await error(await c.post("/v1/messages/batch", json={"messages": []}, headers=auth(ENQUEUER)), 422, "invalid_message")
    assert await queued(redis, prefix) == []


async def test_per_client_rate_limit(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    c = await make_client()
    batch = {"messages": [dict(MSG, id=f"r-{i}") for i in range(8)]}
    assert (await c.post("/v1/messages/batch", json=batch, headers=auth(LIMITED))).status == 202
    batch = {"messages": [dict(MSG, id=f"s-{i}") for i in range(8)]}
    resp = await c.post("/v1/messages/batch", json=batch, headers=auth(LIMITED))
    await error(resp, 429, "rate_limited")
    assert int(resp.headers["Retry-After"]) >= 1
    # Another client is not affected by quiz-service's bucket.
    assert (await c.post("/v1/messages/batch", json=batch, headers=auth(ENQUEUER))).status == 202
    assert len(await queued(redis, prefix)) == 16


async def test_batch_larger_than_the_clients_burst_is_413_not_free(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    c = await make_client()
    batch = {"messages": [dict(MSG, id=f"big-{i}") for i in range(11)]}  # quiz-service: burst 10
    body = await error(await c.post("/v1/messages/batch", json=batch, headers=auth(LIMITED)), 413, "batch_too_large")
    assert "burst" in body["message"]
    assert await queued(redis, prefix) == []


async def test_token_that_is_not_utf8_is_401(make_client: Any) -> None:
    c = await make_client()
    resp = await c.post("/v1/messages", json=MSG, headers={"Authorization": "Bearer \udcff\udcfe-not-utf8"})
    await error(resp, 401, "unauthenticated")


async def test_client_rate_refills_at_its_rate(prefix: str, redis: aioredis.Redis) -> None:
    now = [1000.0]
    limited = settings(prefix).api.clients[3]  # quiz-service: 5/s, burst 10
    a = Authenticator(settings(prefix).api.clients, redis, Keys(prefix), clock=lambda: now[0])

    async def wait_for(n: int) -> float:
        try:
            await a.charge(limited, n)
        except ApiError as e:
            assert e.status == 429, e.code
            return float(e.headers["Retry-After"]) if e.headers else -1.0
        return 0.0

    with pytest.raises(ApiError) as too_big:  # more than the bucket holds can never be granted
        await a.charge(limited, 11)
    assert too_big.value.status == 413
    assert await wait_for(10) == 0.0
    assert await wait_for(1) == 1.0  # 0.2 s away, said in whole seconds
    now[0] += 1.0
    assert await wait_for(5) == 0.0 and await wait_for(1) > 0


async def test_client_rate_is_one_limit_shared_by_every_api_process(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    first, second = await make_client(), await make_client()  # two API processes on one Redis
    batch = {"messages": [dict(MSG, id=f"p-{i}") for i in range(8)]}
    assert (await first.post("/v1/messages/batch", json=batch, headers=auth(LIMITED))).status == 202
    batch = {"messages": [dict(MSG, id=f"q-{i}") for i in range(8)]}  # quiz-service's burst is 10, not 10 per process
    resp = await second.post("/v1/messages/batch", json=batch, headers=auth(LIMITED))
    await error(resp, 429, "rate_limited")
    assert int(resp.headers["Retry-After"]) >= 1
    assert len(await queued(redis, prefix)) == 8


async def test_devices_register_list_delete(make_client: Any) -> None:
    c = await make_client()
    resp = await c.put("/v1/users/learner-1/devices", json={"fcm": FCM_TOKEN, "app": "campus"}, headers=auth(DEVICES))
    assert resp.status == 201 and (await resp.json())["key"] == f"fcm:{FCM_TOKEN}"
    listed = await (await c.get("/v1/users/learner-1/devices", headers=auth(DEVICES))).json()
    assert listed == {"devices": [{"fcm": FCM_TOKEN, "app": "campus", "key": f"fcm:{FCM_TOKEN}"}]}
    assert (await c.delete(f"/v1/users/learner-1/devices/fcm:{FCM_TOKEN}", headers=auth(DEVICES))).status == 204
    await error(await c.delete(f"/v1/users/learner-1/devices/fcm:{FCM_TOKEN}", headers=auth(DEVICES)), 404, "not_found")
    body = await error(await c.put("/v1/users/learner-1/devices", json={"webpush": {"endpoint": "https://10.0.0.5/x",
                       "keys": {"p256dh": "A" * 87, "auth": "A" * 22}}}, headers=auth(DEVICES)), 422, "invalid_message")
    assert "not an allowed push service" in body["fields"][0]["message"]


async def test_dead_letters_list_and_replay(prefix: str, make_client: Any, redis: aioredis.Redis) -> None:
    c = await make_client()
    q = StreamQueue(redis, Keys(prefix))
    msg = Message(id="dead-1", body="b", devices=(Device("fcm", FCM_TOKEN),), resolved=True)
    await q.ensure_group()
    await q.commit(Commit(dead=[DeadLetter(msg, "fcm SENDER_ID_MISMATCH", 1, "fcm", 0)]))
    listing = await (await c.get("/v1/deadletters?count=10", headers=auth(ADMIN))).json()
    assert listing["total"] == 1 and listing["dead_letters"][0]["reason"] == "fcm SENDER_ID_MISMATCH"
    await error(await c.post("/v1/deadletters/replay", json={}, headers=auth(ADMIN)), 422, "invalid_request")
    await error(await c.get("/v1/deadletters?count=x", headers=auth(ADMIN)), 400, "invalid_query")
    resp = await c.post("/v1/deadletters/replay", json={"ids": [listing["dead_letters"][0]["entry_id"]]}, headers=auth(ADMIN))
    assert resp.status == 200 and await resp.json() == {"replayed": 1}
    assert [m.id for m in await queued(redis, prefix)] == ["dead-1"]


async def test_unknown_route_and_method_are_json_errors(make_client: Any) -> None:
    c = await make_client()
    await error(await c.get("/v1/nothing", headers=auth(ADMIN)), 404, "not_found")
    await error(await c.get("/v1/messages", headers=auth(ADMIN)), 405, "method_not_allowed")


async def test_redis_down_is_503_with_retry_after(make_client: Any) -> None:
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    c = await make_client(r=dead)
    resp = await c.post("/v1/messages", json=MSG, headers=auth(ENQUEUER))
    await error(resp, 503, "unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert (await c.get("/readyz")).status == 503
    await dead.aclose()


def test_api_refuses_to_start_without_clients(prefix: str, redis: aioredis.Redis) -> None:
    with pytest.raises(ConfigError, match="at least one client"):
        create_app(replace(settings(prefix), api=ApiSettings()), redis)


async def test_tokens_never_reach_metrics_or_responses(make_client: Any) -> None:
    c = await make_client()
    await c.post("/v1/messages", json=MSG, headers=auth("wrong-token-" + "z" * 20))
    texts = [await (await c.get("/metrics")).text(),
             orjson.dumps(await (await c.post("/v1/messages", json=MSG, headers=auth(DEVICES))).json()).decode()]
    for text in texts:
        for secret in (ENQUEUER, DEVICES, ADMIN, LIMITED, "wrong-token-"):
            assert secret not in text
