"""Cluster mode on real Redis Clusters started by the test run (tests/conftest.py: 1 master owning every slot, and
3 masters): the shards' scripts and transactions stay on one slot each, a batch is split by shard, the per-shard
workers deliver everything, and the costs of redis-py's cluster client measured in docs/decisions.md stay fixed
(no COMMAND GETKEYS round trip per read, no MaxConnectionsError when the pool is busy)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_sync
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pushgw.core.config import (
    SCOPES,
    ApiClient,
    ApiSettings,
    CategoryCap,
    FcmApp,
    PolicySettings,
    ProviderSettings,
    RedisSettings,
    Settings,
    WebhookSettings,
    WebhookSubscription,
    WorkerSettings,
)
from pushgw.core.schema import Device, parse_message
from pushgw.gateway.api import create_app
from pushgw.gateway.cli import main
from pushgw.gateway.client import PushClient
from pushgw.gateway.intake import Intake
from pushgw.gateway.pool import make_redis, run_worker
from pushgw.gateway.shard_owner import LEASE_S, ShardOwner, share
from pushgw.gateway.topology import LocalCluster
from pushgw.gateway.webhooks import WebhookDispatcher
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA
from pushgw.queue.connection import ShardedCluster, blocking_redis, redis_url_for
from pushgw.queue.sharded import ShardedQueue, ShardedStatus, shard_map
from pushgw.queue.shards import key_slot
from pushgw.queue.streams import Commit, DeadLetter
from pushgw.ratelimit.base import ADMIT
from pushgw.ratelimit.caps import FrequencyCaps
from redis.exceptions import RedisError

USERS = [f"learner-{i}" for i in range(48)]


@pytest.fixture(params=["cluster1", "cluster3"])
def cluster(request: pytest.FixtureRequest) -> LocalCluster:
    c: LocalCluster = request.getfixturevalue(request.param)
    for n in c.nodes:  # the run's own cluster: every test starts empty
        with n.client() as r:
            r.flushall()
    return c


def cluster_settings(cluster: LocalCluster, **more: Any) -> Settings:
    redis = RedisSettings(prefix="ct", cluster=True, cluster_nodes=cluster.seeds, shards=16)
    return replace(cluster_settings_for_mode(redis), **more)


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[Any]:
    r = blocking_redis(redis_url_for(cluster_settings(cluster).redis), max_connections=16)
    yield r
    await r.aclose()


@dataclass
class Deployment:
    """A gateway's settings on `redis` with FCM pointed at a local fake, its devices registered."""

    fake: FakeFcm
    settings: Settings
    url: str
    redis: Any
    client: PushClient

    def delivered(self) -> set[str]:
        return {r.message["data"]["pushgw_id"] for r in self.fake.received}


@contextlib.asynccontextmanager
async def deployment(redis: RedisSettings, local_ca: LocalCA, tmp_path: Path,
                     users: list[str]) -> AsyncIterator[Deployment]:
    async with FakeFcm(local_ca) as fake:
        account = fake.service_account(tmp_path / "sa", "demo-project")
        settings = replace(cluster_settings_for_mode(redis), fcm=(FcmApp(
            "default", service_account_file=str(account), base_url=fake.base_url, ca_file=str(local_ca.ca_file)),))
        url = redis_url_for(settings.redis)
        client = make_redis(url)
        try:
            d = Deployment(fake, settings, url, client, PushClient(client, settings))
            for u in users:
                await d.client.register_device(u, {"fcm": f"tok-{u}"})
            yield d
        finally:
            await client.aclose()


async def getkeys_calls(r: ShardedCluster) -> int:
    total = 0
    for node in r.get_primaries():
        stats = await r.info("commandstats", target_nodes=node)
        total += stats.get("cmdstat_command|getkeys", {}).get("calls", 0)
    return total


async def test_every_shard_queue_operation_stays_on_its_slot(client: ShardedCluster) -> None:
    queue = ShardedQueue(client, shard_map(cluster_settings_for(client).redis))
    await queue.ensure_group()
    now = time.time()
    msgs = [parse_message({"id": f"m-{u}", "user": u, "body": "b", **({"priority": "high"} if i % 3 == 0 else {})})
            for i, u in enumerate(USERS)]
    later = parse_message({"id": "later", "user": USERS[0], "body": "b", "send_at": now + 3600})
    assert await queue.enqueue([*msgs, later]) == [True] * (len(msgs) + 1)
    assert await queue.enqueue(msgs[:5]) == [False] * 5  # the idempotency keys are on the messages' shards
    read = 0
    for q in queue.queues:
        await q.schedule(now - 1, msgs[0])
        assert await q.move_due(now) == 1
        entries = await q.read_new("c1", 100, None)
        assert len({key_slot(k) for k in (q.keys.stream, q.keys.stream_high, q.keys.delayed, q.keys.idem("x"))}) == 1
        m = msgs[0]
        device = Device("fcm", "tok")
        await q.commit(Commit(acks=[e.ref for e in entries], done=[(entries[0].ref, device.key)],
                              retries=[(now + 60, m, 2, 0)], dead=[DeadLetter(m, "rejected", 1, "fcm", 0)],
                              invalid_tokens=[(m.user, device, "unregistered")], kpi=[("c1", "A", "delivered", "u")]))
        stats = await q.stats()
        assert (stats.pending, stats.delayed, stats.dead_letters) == (0, 2 if q is queue.queues[queue.shard_of(later)]
                                                                      else 1, 1)
        assert await q.done_marks([entries[0].ref]) == {entries[0].ref: {device.key}}
        read += len(entries)
    assert read == len(msgs) + 16  # every message, and each shard's moved retry
    assert await getkeys_calls(client) == 0  # XREADGROUP's slot is computed here, not asked of a node


async def test_cancel_by_id_and_by_ref_finds_messages_on_every_shard(client: ShardedCluster) -> None:
    queue = ShardedQueue(client, shard_map(cluster_settings_for(client).redis))
    await queue.ensure_group()
    later = time.time() + 3600
    msgs = [parse_message({"id": f"s-{u}", "user": u, "body": "b", "send_at": later, "ref": "session-812"})
            for u in USERS[:12]]
    assert len({queue.shard_of(m) for m in msgs}) > 1  # the withdrawals below cross shards
    assert await queue.enqueue(msgs, owner="course") == [True] * len(msgs)
    first, *rest = msgs
    found = await queue.cancel([first.id, "never-queued"], "course")
    assert [(c.id, c.status) for c in found] == [(first.id, "cancelled"), ("never-queued", "unknown")]
    assert [c.status for c in await queue.cancel([rest[0].id], "another-client")] == ["unknown"]
    assert await queue.cancel_ref("session-812", "course") == sorted(m.id for m in rest)
    assert await queue.cancel_ref("session-812", "course") == []
    assert sum([(await q.stats()).delayed for q in queue.queues]) == 0


def cluster_settings_for(client: ShardedCluster) -> Settings:
    seeds = tuple(f"{n.host}:{n.port}" for n in client.startup_nodes)
    return Settings(redis=RedisSettings(prefix="ct", cluster=True, cluster_nodes=seeds, shards=16))


async def test_a_busy_pool_waits_instead_of_raising(cluster: LocalCluster) -> None:
    r = blocking_redis(redis_url_for(cluster_settings(cluster).redis), max_connections=4)
    try:
        await r.set("k", "v")
        assert await asyncio.gather(*(r.get("k") for _ in range(200))) == [b"v"] * 200

        async def pipelined() -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                pipe.get("k")
                pipe.incr("n")
                return await pipe.execute()  # type: ignore[no-any-return]

        assert len(await asyncio.gather(*(pipelined() for _ in range(200)))) == 200
        assert int(await r.get("n")) == 200
    finally:
        await r.aclose()


async def test_workers_deliver_every_message_on_a_cluster(
    cluster: LocalCluster, local_ca: LocalCA, tmp_path: Path
) -> None:
    async with deployment(cluster_settings(cluster).redis, local_ca, tmp_path, USERS) as d:
        client = d.client
        assert [dev.token for dev in await client.devices(USERS[3])] == [f"tok-{USERS[3]}"]
        await client.set_preferences(USERS[0], opt_out_all=True)  # stored on the user's shard, read by its worker
        assert (await client.preferences(USERS[0])).opt_out_all
        sent = await client.send_many([{"id": f"m-{u}", "user": u, "title": "t", "body": "b"} for u in USERS])
        assert all(ok for _, ok in sent)
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(d.settings, d.url, "w0", stop))
        queues = ShardedQueue(d.redis, shard_map(d.settings.redis)).queues
        try:
            deadline = time.monotonic() + 30
            while True:
                stats = [await q.stats() for q in queues]
                if len(d.fake.received) >= len(USERS) - 1 and not any(s.lag or s.pending for s in stats):
                    break
                assert time.monotonic() < deadline, f"{len(d.fake.received)} of {len(USERS) - 1} delivered"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 20)
        assert d.delivered() == {f"m-{u}" for u in USERS[1:]}
        assert {r.message["token"] for r in d.fake.received} == {f"tok-{u}" for u in USERS[1:]}


@pytest.mark.parametrize("rules", ["cap only", "burst only"])
async def test_frequency_caps_keep_one_slot_per_shard(client: ShardedCluster, rules: str) -> None:
    cap = (CategoryCap("reminder", limit=1, period_s=60),) if rules == "cap only" else ()
    policy = PolicySettings(caps=cap, user_limit=0 if cap else 1, user_period_s=60)
    shards = shard_map(cluster_settings_for(client).redis)
    for u in USERS[:8]:
        caps = FrequencyCaps(client, shards.user_keys(u), policy)
        first, second = (parse_message({"id": f"{u}-{i}", "user": u, "body": "b", "category": "reminder"})
                         for i in range(2))
        decisions = await caps.decide([first, second], time.time())
        assert decisions[0] is ADMIT and decisions[1] is not ADMIT


@dataclass
class ClusterApi:
    """The HTTP API of a cluster deployment on a loopback server, with an admin client's headers."""

    api: TestClient[Any, Any]
    redis: Any
    settings: Settings
    auth: dict[str, str]


@contextlib.asynccontextmanager
async def cluster_api(cluster: LocalCluster) -> AsyncIterator[ClusterApi]:
    token = "cluster-test-token-0123456789"
    settings = replace(cluster_settings(cluster), api=ApiSettings(clients=(ApiClient("ops", token, SCOPES),)))
    redis = make_redis(redis_url_for(settings.redis), max_connections=16, timeout_s=5.0)
    api = TestClient(TestServer(create_app(settings, redis)))
    await api.start_server()
    try:
        yield ClusterApi(api, redis, settings, {"Authorization": f"Bearer {token}"})
    finally:
        await api.close()
        await redis.aclose()


async def test_api_on_a_cluster_serves_sharded_routes_and_refuses_the_rest(cluster: LocalCluster) -> None:
    async with cluster_api(cluster) as c:
        api, auth = c.api, c.auth
        assert (await api.put("/v1/users/learner-1/devices", json={"fcm": "t1"}, headers=auth)).status == 201
        assert (await api.put("/v1/users/learner-1/preferences", json={"timezone": "Europe/Paris"},
                              headers=auth)).status == 200
        resp = await api.post("/v1/messages/batch", headers=auth, json={"messages": [
            {"id": f"a-{i}", "user": f"learner-{i}", "body": "b"} for i in range(20)]})
        assert resp.status == 202 and (await resp.json())["queued"] == 20
        assert (await (await api.get("/v1/users/learner-1/devices", headers=auth)).json())["devices"][0]["fcm"] == "t1"
        # the best send time reads each learner's attributes on the learner's shard (one batch over many shards)
        resp = await api.post("/v1/messages/batch", headers=auth, json={"messages": [
            {"id": f"best-{i}", "user": f"learner-{i}", "body": "b", "send_time": "best"} for i in range(20)]})
        assert resp.status == 202 and (await resp.json())["queued"] == 20
        status = await api.get("/v1/messages/a-1", headers=auth)  # read from the message's shard
        assert status.status == 200 and (await status.json())["state"] == "queued"
        for path in ("/v1/automations", "/v1/automations/x/report"):
            resp = await api.get(path, headers=auth)
            assert resp.status == 501 and (await resp.json())["error"]["code"] == "not_in_cluster_mode", path
            assert path.split("/")[2] in (await resp.json())["error"]["message"]


async def test_attributes_audiences_templates_and_dead_letters_through_the_api_on_a_cluster(
    cluster: LocalCluster,
) -> None:
    async with cluster_api(cluster) as c:
        api, auth, redis = c.api, c.auth, c.redis
        shards = shard_map(c.settings.redis)
        learners = USERS[:20]
        assert len({shards.shard_of(u) for u in learners}) > 8  # the learners spread over the shards
        resp = await api.post("/v1/attributes/batch", headers=auth, json={"users": [
            {"user": u, "attributes": {"cohort": "c1" if i % 2 else "c2", "first_name": f"N{i}", "locale": "fr"}}
            for i, u in enumerate(learners)]})
        assert resp.status == 200 and await resp.json() == {"imported": 20}
        resp = await api.patch(f"/v1/users/{learners[1]}/attributes", headers=auth, json={"cohort": "c2"})
        assert resp.status == 200 and (await resp.json())["cohort"] == "c2"
        got = await (await api.get(f"/v1/users/{learners[1]}/attributes", headers=auth)).json()
        assert got["first_name"] == "N1" and got["cohort"] == "c2"
        # each learner's attributes hash lives on the learner's shard, beside its preferences
        assert await redis.exists(shards.user_keys(learners[1]).user(learners[1])) == 1
        for cohort, size in (("c1", 9), ("c2", 11)):
            audience = {"filter": {"cohort": [cohort, "none"]}}  # a union of index sets, then the count
            resp = await api.post("/v1/audiences/count", headers=auth, json={"audience": audience})
            assert resp.status == 200 and (await resp.json())["count"] == size, cohort
        template = {"default_locale": "en", "variables": {"first_name": "there"},
                    "locales": {"en": {"title": "Hi", "body": "Hello {first_name}"},
                                "fr": {"title": "Salut", "body": "Bonjour {first_name}"}}}
        assert (await api.put("/v1/templates/hello", headers=auth, json=template)).status == 200
        assert await (await api.get("/v1/templates", headers=auth)).json() == {"templates": ["hello"]}
        rendered = await (await api.post("/v1/templates/hello/render", headers=auth,
                                          json={"vars": {"first_name": "Ada"}, "locale": "fr"})).json()
        assert rendered["body"] == "Bonjour Ada"
        resp = await api.post("/v1/messages/batch", headers=auth, json={"messages": [
            {"id": f"t-{u}", "user": u, "template": "hello"} for u in learners]})
        assert resp.status == 202 and (await resp.json())["queued"] == 20
        queue = ShardedQueue(redis, shards)
        for u in learners[:3]:  # rendered with each learner's own attributes, read from the learner's shard
            entries = await redis.xrange(queue.keys_of(parse_message({"id": "x", "user": u, "body": "b"})).stream)
            bodies = {orjson.loads(f[b"m"])["body"] for _, f in entries if orjson.loads(f[b"m"])["id"] == f"t-{u}"}
            assert bodies == {f"Bonjour N{learners.index(u)}"}, u
        # a dead letter on two shards each: listed with shard-qualified ids, paged, then replayed
        dead = [learners[0], next(u for u in learners if shards.shard_of(u) != shards.shard_of(learners[0]))]
        for u in dead:
            k = shards.user_keys(u)
            await redis.xadd(k.dead, {"m": orjson.dumps({"id": f"d-{u}", "user": u, "body": "b"}), "reason": "r",
                                      "attempts": 3, "provider": "fcm", "t": 1, "at": 2})
        listed = (await (await api.get("/v1/deadletters?count=1", headers=auth)).json())
        assert listed["total"] == 2 and len(listed["dead_letters"]) == 1
        first = listed["dead_letters"][0]["entry_id"]
        rest = await (await api.get("/v1/deadletters", headers=auth, params={"start": "(" + first})).json()
        ids = [first] + [e["entry_id"] for e in rest["dead_letters"]]
        assert sorted(int(i.split("/")[0]) for i in ids) == sorted(shards.shard_of(u) for u in dead)
        bad = await api.post("/v1/deadletters/replay", headers=auth, json={"ids": ["1-0"]})
        assert bad.status == 400 and "<shard>/<stream id>" in (await bad.json())["error"]["message"]
        resp = await api.post("/v1/deadletters/replay", headers=auth, json={"ids": ids})
        assert resp.status == 200 and await resp.json() == {"replayed": 2}
        assert (await (await api.get("/v1/deadletters", headers=auth)).json())["total"] == 0
        for u in dead:  # back on the stream of the shard it died on
            back = await redis.xrange(shards.user_keys(u).stream)
            assert any(orjson.loads(f[b"m"])["id"] == f"d-{u}" for _, f in back), u
        assert (await api.get("/v1/events/invalid-tokens", headers=auth)).status == 200


async def test_a_campaign_fans_out_over_every_shard_from_the_cluster_workers_and_its_report_sums_them(
    cluster: LocalCluster, local_ca: LocalCA, tmp_path: Path
) -> None:
    async with deployment(cluster_settings(cluster).redis, local_ca, tmp_path, USERS) as d:
        client, shards = d.client, shard_map(d.settings.redis)
        for i, u in enumerate(USERS):
            await client.set_attributes(u, {"cohort": "c1" if i % 4 else "c2", "first_name": f"N{i}"})
        cohort = [u for i, u in enumerate(USERS) if i % 4]
        assert len({shards.shard_of(u) for u in cohort}) > 8  # the audience spreads over the shards
        await client.save_template("hello", {"default_locale": "en", "variables": {"first_name": "there"},
                                             "locales": {"en": {"title": "Hi", "body": "Hello {first_name}"}}})
        await client.create_campaign({"id": "spring", "template": "hello", "audience": {"filter": {"cohort": "c1"}},
                                      "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]})
        status = await client.launch_campaign("spring", 100)
        assert status["fanout"]["members"] == len(cohort)  # every shard's learners, frozen in one member set
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(d.settings, d.url, "w0", stop))  # runs the fan-out too
        try:
            deadline = time.monotonic() + 30
            while len(d.fake.received) < len(cohort):
                assert time.monotonic() < deadline, f"{len(d.fake.received)} of {len(cohort)} delivered"
                await asyncio.sleep(0.05)
            report = await client.wait_for_delivery("spring", timeout_s=30, poll_s=0.05)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 20)
        status = await client.campaign_status("spring")
        assert status["fanout"]["state"] == "done" and status["fanout"]["sent"] == len(cohort)
        assert {r.message["token"] for r in d.fake.received} == {f"tok-{u}" for u in cohort}
        assert {r.message["notification"]["body"] for r in d.fake.received} == {
            f"Hello N{i}" for i, u in enumerate(USERS) if i % 4}
        # the workers counted each learner's delivery on its own shard; events are kept with the campaign
        opened = cohort[:10]
        results = await client.report_events([{"type": "opened", "campaign": "spring", "user": u} for u in opened])
        assert [r["status"] for r in results] == ["counted"] * 10
        report = await client.campaign_report("spring")
        arms = {a["arm"]: a for a in report["arms"]}
        assert sum(a["delivered"] for a in arms.values()) == sum(a["sent"] for a in arms.values()) == len(cohort)
        assert sum(a["opened_delivered"] for a in arms.values()) == sum(a["opened"] for a in arms.values()) == 10


def test_cli_on_a_cluster_runs_sharded_commands_and_refuses_the_rest(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "pushgw.toml"
    nodes = ", ".join(f'"{s}"' for s in cluster.seeds)
    cfg.write_text(f'[redis]\nprefix = "ctcli"\ncluster = true\ncluster_nodes = [{nodes}]\n')
    assert main(["-c", str(cfg), "devices", "add", "learner-9", "--device", '{"fcm": "tok-9"}']) == 0
    assert main(["-c", str(cfg), "devices", "list", "learner-9"]) == 0
    assert '"fcm": "tok-9"' in capsys.readouterr().out
    assert main(["-c", str(cfg), "prefs", "learner-9", "--opt-out-all"]) == 0
    assert main(["-c", str(cfg), "users", "set", "learner-9", "--attributes", '{"first_name": "Ada"}']) == 0
    template = tmp_path / "t.json"
    template.write_text('{"default_locale": "en", "locales": {"en": {"title": "Hi", "body": "Hello {first_name}"}}, '
                        '"variables": {"first_name": "there"}}')
    assert main(["-c", str(cfg), "templates", "put", "hi", str(template)]) == 0
    assert main(["-c", str(cfg), "send", "--user", "learner-9", "--body", "b", "--id", "cli-c1"]) == 0
    assert '"status": "queued"' in capsys.readouterr().out
    assert main(["-c", str(cfg), "dlq", "count"]) == 0
    assert '"dead_letters": 0' in capsys.readouterr().out
    assert main(["-c", str(cfg), "dlq", "replay", "1-0"]) == 2
    assert "<shard>/<stream id>" in capsys.readouterr().err
    assert main(["-c", str(cfg), "campaigns", "list"]) == 0
    assert main(["-c", str(cfg), "automations", "list"]) == 2
    assert "`pushgw automations` does not work on Redis Cluster yet" in capsys.readouterr().err


def blocking_redis_sync(url: str) -> redis_sync.Redis:
    return redis_sync.Redis.from_url(url)


@pytest.fixture(params=["single", "cluster1", "cluster3"])
def mode(request: pytest.FixtureRequest) -> RedisSettings:
    """The same deployment on one Redis and on both clusters (each emptied first)."""
    if request.param == "single":
        url: str = request.getfixturevalue("redis_url")
        with blocking_redis_sync(url) as r:
            r.flushall()
        return RedisSettings(url=url, prefix="modes")
    c: LocalCluster = request.getfixturevalue(request.param)
    for n in c.nodes:
        with n.client() as r:
            r.flushall()
    return RedisSettings(prefix="modes", cluster=True, cluster_nodes=c.seeds, shards=16)


async def test_retries_token_removal_dead_letters_and_schedules_in_every_mode(
    mode: RedisSettings, local_ca: LocalCA, tmp_path: Path
) -> None:
    users = USERS[:12]
    async with deployment(mode, local_ca, tmp_path, users) as d:
        d.fake.program(f"tok-{users[0]}", [(503, "UNAVAILABLE", None)])  # retried, then delivered
        d.fake.program(f"tok-{users[1]}", [(404, "UNREGISTERED", None)])  # the token is removed
        d.fake.program(f"tok-{users[2]}", [(403, "SENDER_ID_MISMATCH", None)])  # dead letter on the user's shard
        soon = time.time() + 1.0
        await d.client.send_many([
            {"id": f"m-{u}", "user": u, "title": "t", "body": "b",
             **({"send_at": soon} if u == users[3] else {}), **({"priority": "high"} if u == users[4] else {})}
            for u in users])
        queue = ShardedQueue(d.redis, shard_map(d.settings.redis))
        expected = {f"m-{u}" for u in users} - {f"m-{users[1]}", f"m-{users[2]}"}
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(d.settings, d.url, "w0", stop))
        try:
            deadline = time.monotonic() + 30
            while True:
                stats = [await q.stats() for q in queue.queues]
                if d.delivered() >= expected and not any(s.lag or s.pending or s.delayed for s in stats):
                    break
                assert time.monotonic() < deadline, f"delivered {len(d.delivered())} of {len(expected)}; {stats}"
                await asyncio.sleep(0.05)
            assert d.delivered() == expected
            assert await d.client.devices(users[1]) == []
            dead_on = [i for i, s in enumerate(stats) if s.dead_letters]
            assert dead_on == [queue.shards.shard_of(users[2])] and stats[dead_on[0]].dead_letters == 1
        finally:
            stop.set()
            await asyncio.wait_for(worker, 20)


class Hooks:
    """An HTTPS webhook receiver on loopback that keeps every posted event."""

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca
        self.events: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.events += orjson.loads(await request.read())["events"]
        return web.Response(status=204)

    async def __aenter__(self) -> Hooks:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ca.server_context()).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_message_status_outcome_events_and_webhooks_per_shard_in_every_mode(
    mode: RedisSettings, local_ca: LocalCA, tmp_path: Path
) -> None:
    users = USERS[:16]
    async with deployment(mode, local_ca, tmp_path, users) as d, Hooks(local_ca) as hooks:
        settings = replace(
            d.settings, api=ApiSettings(clients=(ApiClient("svc", "svc-token-0123456789"),)),
            webhooks=WebhookSettings(subscriptions=(WebhookSubscription(
                "lms", "svc", f"https://127.0.0.1:{hooks.port}/hook", "whsec-0123456789abcdef", ("delivered",)),),
                allowed_hosts=("127.0.0.1",), allow_private=True, ca_file=str(local_ca.ca_file),
                backoff_base_s=0.05, backoff_cap_s=0.2))
        assert settings.status.enabled and settings.status.events
        dispatcher = WebhookDispatcher(settings, d.redis, consumer="d1")
        await dispatcher.ensure_groups()
        await Intake(d.redis, settings).submit(
            [{"id": f"s-{u}", "user": u, "title": "t", "body": "b"} for u in users], client="svc")
        statuses = ShardedStatus(d.redis, shard_map(settings.redis), settings.status.retention_s)
        assert (await statuses.message(f"s-{users[5]}") or {}).get("state") == "queued"
        stop = asyncio.Event()
        tasks = [asyncio.create_task(run_worker(settings, d.url, "w0", stop)),
                 asyncio.create_task(dispatcher.run(stop))]
        try:
            deadline = time.monotonic() + 30
            while len({e["message"] for e in hooks.events}) < len(users):
                assert time.monotonic() < deadline, f"{len(hooks.events)} webhook events of {len(users)}"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert sorted(e["message"] for e in hooks.events) == sorted(f"s-{u}" for u in users)
        shards = shard_map(settings.redis)
        on = {n for n, k in enumerate(shards.all_keys()) if await d.redis.xlen(k.outcome_events)}
        assert on == {shards.shard_of(u) for u in users}  # each shard's worker wrote its own shard's stream
        for u in users:
            status = await statuses.message(f"s-{u}")
            assert status is not None and status["state"] == "delivered", u
            assert [m["id"] for m in await statuses.user(u, 10)] == [f"s-{u}"]
        assert await statuses.message("no-such-message") is None


def cluster_settings_for_mode(redis: RedisSettings) -> Settings:
    return replace(Settings(), redis=redis, worker=WorkerSettings(
        processes=1, batch_size=100, block_ms=50, claim_idle_s=2.0, janitor_interval_s=0.2, drain_deadline_s=5,
        backoff_base_s=0.05, backoff_cap_s=0.2), providers=ProviderSettings(timeout_s=5.0))


@pytest.mark.parametrize("members", range(1, 8))
def test_shares_are_even_disjoint_and_cover_every_shard(members: int) -> None:
    names = [f"host:{i}" for i in range(members)]
    shares = [share(names, me, 16) for me in names]
    assert frozenset().union(*shares) == frozenset(range(16))
    assert sum(len(s) for s in shares) == 16  # disjoint
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


async def test_shards_rebalance_when_workers_join_leave_or_die(client: ShardedCluster) -> None:
    keys = shard_map(cluster_settings_for(client).redis).shared
    a, b, c = (ShardOwner(client, keys, name, 16) for name in ("host:a", "host:b", "host:c"))
    now = time.time()
    assert len(await a.beat(now)) == 16  # alone: every shard
    await b.beat(now)
    assert (len(await a.beat(now)), len(b.owned)) == (8, 8)  # a joins: half each
    await c.beat(now)
    await a.beat(now)
    await b.beat(now)
    assert sorted(len(o.owned) for o in (a, b, c)) == [5, 5, 6] and a.owned | b.owned | c.owned == set(range(16))
    await c.leave()  # a drained stop gives its shards back at once
    assert (len(await a.beat(now)), len(await b.beat(now))) == (8, 8)
    # b dies without leaving: once its lease ends, a takes every shard
    assert len(await a.beat(now + LEASE_S - 1)) == 8
    assert len(await a.beat(now + LEASE_S + 1)) == 16


async def test_two_worker_processes_split_the_shards_and_one_delivers_all_after_the_other_stops(
    cluster: LocalCluster, local_ca: LocalCA, tmp_path: Path
) -> None:
    async with deployment(cluster_settings(cluster).redis, local_ca, tmp_path, USERS) as d:
        live_key = shard_map(d.settings.redis).shared.live_workers  # the worker processes the owners see
        stops = [asyncio.Event(), asyncio.Event()]
        workers = [asyncio.create_task(run_worker(d.settings, d.url, f"w{i}", stops[i])) for i in range(2)]

        async def delivered(ids: set[str]) -> None:
            deadline = time.monotonic() + 30
            while not ids <= d.delivered():
                assert time.monotonic() < deadline, "not delivered in time"
                await asyncio.sleep(0.05)

        try:
            deadline = time.monotonic() + 10
            while len(await d.redis.zrange(live_key, 0, -1)) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await d.client.send_many([{"id": f"a-{u}", "user": u, "body": "b"} for u in USERS])
            await delivered({f"a-{u}" for u in USERS})
            stops[1].set()
            await asyncio.wait_for(workers[1], 20)
            assert await d.redis.zrange(live_key, 0, -1) == [b"w0"]  # w1 left: its shards are w0's at its next beat
            await d.client.send_many([{"id": f"b-{u}", "user": u, "body": "b"} for u in USERS])
            await delivered({f"b-{u}" for u in USERS})
        finally:
            for s in stops:
                s.set()
            await asyncio.wait_for(asyncio.gather(*workers), 20)


@pytest.fixture
def cluster_with_replicas(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster", masters=3, replicas=1).start()
    try:
        yield c
    finally:
        c.stop()


async def test_a_killed_master_is_replaced_and_the_gateway_recovers(
    cluster_with_replicas: LocalCluster, local_ca: LocalCA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = cluster_with_replicas
    redis = RedisSettings(prefix="kill", cluster=True, cluster_nodes=c.seeds, shards=16)
    async with deployment(redis, local_ca, tmp_path, USERS) as d:
        stop_worker, stop_load = asyncio.Event(), asyncio.Event()
        worker = asyncio.create_task(run_worker(d.settings, d.url, "w0", stop_worker))
        acked: dict[str, float] = {}  # message id -> when the enqueue was acknowledged
        failures: list[float] = []

        async def load() -> None:
            n = 0
            while not stop_load.is_set():
                batch = [{"id": f"k-{n}-{u}", "user": u, "body": "b"} for u in USERS[:12]]
                n += 1
                while not stop_load.is_set():  # resend until acknowledged: ids make it idempotent
                    try:
                        await d.client.send_many(batch)
                    except (RedisError, OSError):
                        failures.append(time.monotonic())
                        await asyncio.sleep(0.1)
                        continue
                    acked.update(dict.fromkeys((m["id"] for m in batch), time.monotonic()))
                    break
                await asyncio.sleep(0.02)

        producer = asyncio.create_task(load())
        try:
            deadline = time.monotonic() + 20
            while len(acked) < 120:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            killed_at = time.monotonic()
            await asyncio.to_thread(c.kill_master, 0)
            promoted_s = time.monotonic() - killed_at
            deadline = time.monotonic() + 60
            while len([t for t in acked.values() if t > killed_at + promoted_s]) < 120:
                assert time.monotonic() < deadline, "enqueues did not resume after the promotion"
                await asyncio.sleep(0.05)
            stop_load.set()
            await producer
            after = {i for i, t in acked.items() if t > killed_at + promoted_s}
            deadline = time.monotonic() + 60
            while not after <= d.delivered():
                if time.monotonic() > deadline:
                    missing = sorted(after - d.delivered())
                    q = ShardedQueue(d.redis, shard_map(d.settings.redis))
                    where = {q.shard_of(parse_message({"id": i, "user": i.split("-", 2)[2], "body": "b"}))
                             for i in missing}
                    stats = {n: await q.queues[n].stats() for n in where}
                    stats["devices"] = {u: await d.client.devices(u) for u in {i.split("-", 2)[2] for i in missing}}
                    stats["kill-before"] = len([i for i in acked if i.split("-", 2)[2] in stats["devices"]
                                                and i in d.delivered()])
                    raise AssertionError(f"{len(missing)} acknowledged after the promotion not delivered: {missing[:5]} "
                                         f"on shards {stats}")
                await asyncio.sleep(0.05)
            delivered_s = time.monotonic() - killed_at
        finally:
            stop_load.set()
            stop_worker.set()
            await asyncio.wait_for(worker, 30)
        lost = set(acked) - d.delivered()
        times = sorted({t for t in acked.values() if t > killed_at - 1})
        stall = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
        with capsys.disabled():
            print(f"\ncluster master SIGKILLed: replica promoted after {promoted_s:.2f} s; longest time without an "
                  f"acknowledged enqueue {stall:.2f} s ({len(failures)} failed attempts); everything acknowledged "
                  f"after the promotion "
                  f"delivered {delivered_s:.2f} s after the kill; {len(acked)} acknowledged, {len(lost)} not delivered "
                  f"(acknowledged before the kill and not yet replicated: asynchronous replication)")


async def test_resharding_a_shards_slot_under_load_loses_nothing(
    cluster3: LocalCluster, local_ca: LocalCA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = cluster3
    for n in c.nodes:
        with n.client() as r:
            r.flushall()
    redis = RedisSettings(prefix="move", cluster=True, cluster_nodes=c.seeds, shards=16)
    shards = shard_map(redis)
    users = [u for u in (f"mover-{i}" for i in range(400)) if shards.shard_of(u) == 5][:12]
    slot = key_slot(shards.keys(5).stream)
    async with deployment(redis, local_ca, tmp_path, users) as d:
        stop_worker, stop_load = asyncio.Event(), asyncio.Event()
        worker = asyncio.create_task(run_worker(d.settings, d.url, "w0", stop_worker))
        acked: set[str] = set()

        async def load() -> None:
            n = 0
            while not stop_load.is_set():
                batch = [{"id": f"r-{n}-{u}", "user": u, "body": "b"} for u in users]
                n += 1
                while not stop_load.is_set():
                    try:
                        await d.client.send_many(batch)
                    except (RedisError, OSError):
                        await asyncio.sleep(0.05)
                        continue
                    acked.update(m["id"] for m in batch)
                    break
                await asyncio.sleep(0.01)

        producer = asyncio.create_task(load())
        before = c.owner_of(slot)
        try:
            while len(acked) < 100:
                await asyncio.sleep(0.02)
            moved = await asyncio.to_thread(c.move_slot, slot, (before + 1) % 3)
            assert c.owner_of(slot) == (before + 1) % 3
            at_move = len(acked)
            deadline = time.monotonic() + 30
            while len(acked) < at_move + 100:
                assert time.monotonic() < deadline, "enqueues to the moved shard did not resume"
                await asyncio.sleep(0.02)
            stop_load.set()
            await producer
            deadline = time.monotonic() + 30
            while not acked <= d.delivered():
                assert time.monotonic() < deadline, f"{len(acked - d.delivered())} acknowledged not delivered"
                await asyncio.sleep(0.05)
        finally:
            stop_load.set()
            stop_worker.set()
            await asyncio.wait_for(worker, 30)
            await asyncio.to_thread(c.move_slot, slot, before)  # the run's cluster as the other tests expect it
        with capsys.disabled():
            print(f"\nresharding under load: slot {slot} (shard 5, {moved} keys) moved from node {before} to "
                  f"{(before + 1) % 3}; {len(acked)} acknowledged, all delivered")


async def test_shards_changing_hands_every_second_under_load_lose_nothing(
    cluster3: LocalCluster, local_ca: LocalCA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two worker processes while a third member joins and leaves the lease set every 1.2 s: the shares move
    at every beat, so shards are handed over with entries in flight. Every message is delivered; a repeat is
    allowed (at-least-once) and counted."""
    for n in cluster3.nodes:
        with n.client() as r:
            r.flushall()
    async with deployment(cluster_settings(cluster3).redis, local_ca, tmp_path, USERS) as d:
        keys = shard_map(d.settings.redis).shared
        flapper = ShardOwner(d.redis, keys, "flapper", 16)
        stops = [asyncio.Event(), asyncio.Event()]
        workers = [asyncio.create_task(run_worker(d.settings, d.url, f"w{i}", stops[i])) for i in range(2)]
        sent: set[str] = set()
        try:
            for round_ in range(8):
                if round_ % 2 == 0:
                    await flapper.beat()
                else:
                    await flapper.leave()
                batch = [{"id": f"r{round_}-{i}-{u}", "user": u, "body": "b"} for i in range(3) for u in USERS]
                await d.client.send_many(batch)
                sent |= {m["id"] for m in batch}
                await asyncio.sleep(1.2)
            await flapper.leave()
            deadline = time.monotonic() + 60
            while not sent <= d.delivered():
                assert time.monotonic() < deadline, f"{len(sent - d.delivered())} of {len(sent)} not delivered"
                await asyncio.sleep(0.1)
        finally:
            for s in stops:
                s.set()
            await asyncio.wait_for(asyncio.gather(*workers), 30)
        counts = collections.Counter(r.message["data"]["pushgw_id"] for r in d.fake.received)
        twice = sum(n - 1 for n in counts.values() if n > 1)
        with capsys.disabled():
            print(f"\nshards changing hands: {len(sent)} messages over 8 lease changes, all delivered, {twice} twice")
        assert set(counts) == sent
