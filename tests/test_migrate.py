"""`pushgw migrate` on real servers: a single redis-server holding a stopped deployment's data (queued, in-flight,
delivered and scheduled messages, devices, preferences, attributes, a template) moved onto the run's 3-master
Redis Cluster, then delivered there by a cluster worker: nothing queued or scheduled is lost, nothing delivered
before is sent again, and a second run moves nothing twice."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pushgw.campaigns.audiences import ShardedAttributes, count_all, parse_audience
from pushgw.campaigns.templates import Templates
from pushgw.core.config import FcmApp, ProviderSettings, RedisSettings, Settings, WorkerSettings
from pushgw.gateway.cli import main
from pushgw.gateway.client import PushClient
from pushgw.gateway.pool import make_redis, run_worker
from pushgw.gateway.topology import LocalCluster
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA
from pushgw.queue.connection import redis_url_for
from pushgw.queue.keys import Keys
from pushgw.queue.sharded import ShardedQueue, home_keys, shard_map
from pushgw.queue.streams import StreamQueue

PREFIX = "mig"
USERS = [f"learner-{i}" for i in range(30)]
WORKER = WorkerSettings(processes=1, batch_size=100, block_ms=50, claim_idle_s=2.0, janitor_interval_s=0.2,
                        drain_deadline_s=5, backoff_base_s=0.05, backoff_cap_s=0.2)


def old_settings(url: str, fcm: FcmApp) -> Settings:
    return Settings(redis=RedisSettings(url=url, prefix=PREFIX), fcm=(fcm,), worker=WORKER,
                    providers=ProviderSettings(timeout_s=5.0))


def new_settings(cluster: LocalCluster, fcm: FcmApp) -> Settings:
    return Settings(redis=RedisSettings(prefix=PREFIX, cluster=True, cluster_nodes=cluster.seeds, shards=16),
                    fcm=(fcm,), worker=WORKER, providers=ProviderSettings(timeout_s=5.0))


@pytest.fixture
def cluster(cluster3: LocalCluster) -> LocalCluster:
    for n in cluster3.nodes:
        with n.client() as r:
            r.flushall()
    return cluster3


async def test_migrate_moves_everything_queued_and_scheduled_onto_the_shards_and_a_rerun_moves_nothing_twice(
    redis: aioredis.Redis, redis_url: str, cluster: LocalCluster, local_ca: LocalCA, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with FakeFcm(local_ca) as fake:
        account = fake.service_account(tmp_path / "sa", "demo-project")
        fcm = FcmApp("default", service_account_file=str(account), base_url=fake.base_url, ca_file=str(local_ca.ca_file))
        old = PushClient(redis, old_settings(redis_url, fcm))
        # The old deployment's learners, a template, and its queue in every state.
        for u in USERS:
            await old.register_device(u, {"fcm": f"tok-{u}"})
            await old.set_attributes(u, {"cohort": "c1" if int(u.split("-")[1]) % 3 else "c2", "first_name": u})
        await old.set_preferences(USERS[0], opt_out_all=True)
        await old.save_template("hello", {"default_locale": "en", "variables": {"first_name": "there"},
                                          "locales": {"en": {"title": "Hi", "body": "Hello {first_name}"}}})
        now = time.time()
        sent = await old.send_many(
            [{"id": f"q-{u}", "user": u, "title": "t", "body": "b", **({"priority": "high"} if i % 4 == 0 else {})}
             for i, u in enumerate(USERS)]
            + [{"id": f"d-{i}", "devices": [{"fcm": f"direct-{i}"}], "title": "t", "body": "b"} for i in range(5)]
            + [{"id": f"s-{u}", "user": u, "template": "hello", "send_at": now + 2} for u in USERS[1:6]]
            + [{"id": "later", "user": USERS[7], "title": "t", "body": "b", "send_at": now + 3600}])
        assert all(ok for _, ok in sent)
        # The old workers had read 10 normal-lane entries when they stopped: 6 delivered and acknowledged, 4 in flight.
        queue = StreamQueue(redis, Keys(PREFIX))
        read = await queue.read_new("old-worker", 10, None, lanes=("normal",))
        assert len(read) == 10
        done = read[:6]
        await redis.xack(Keys(PREFIX).stream, Keys(PREFIX).group, *[e.entry_id for e in done])
        delivered_before = {json.loads(e.raw)["id"] for e in done}

        cfg = tmp_path / "pushgw.toml"
        nodes = ", ".join(f'"{s}"' for s in cluster.seeds)
        cfg.write_text(f'[redis]\nprefix = "{PREFIX}"\ncluster = true\ncluster_nodes = [{nodes}]\n')
        assert await asyncio.to_thread(main, ["-c", str(cfg), "migrate", "--from", redis_url]) == 0
        captured = capsys.readouterr()
        report = json.loads(captured.out)
        assert "migrate: queued messages (normal lane)" in captured.err  # progress as it goes
        assert report["queued"] == 30 + 5 - 6 and report["scheduled"] == 6 and report["skipped"] == 0
        assert report["devices"] == len(USERS) and report["templates"] == 1 and report["poison"] == []
        # a rerun: everything is there already
        assert await asyncio.to_thread(main, ["-c", str(cfg), "migrate", "--from", redis_url]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["queued"] == again["scheduled"] == 0 and again["skipped"] == 30 + 5 - 6 + 6

        settings = new_settings(cluster, fcm)
        url = redis_url_for(settings.redis)
        dest = make_redis(url)
        try:
            shards = shard_map(settings.redis)
            new = PushClient(dest, settings)
            assert [d.token for d in await new.devices(USERS[3])] == [f"tok-{USERS[3]}"]
            assert (await new.preferences(USERS[0])).opt_out_all
            assert (await ShardedAttributes(dest, shards).get(USERS[4])).first_name == USERS[4]
            assert await count_all(dest, shards, parse_audience({"filter": {"cohort": "c2"}})) == 10
            assert await Templates(dest, home_keys(shards)).names() == ["hello"]
            # the ids are still taken, and a scheduled message can still be withdrawn by its id
            assert await new.send({"id": "q-learner-9", "user": "learner-9", "body": "again"}) == ("q-learner-9", False)
            [cancelled] = await ShardedQueue(dest, shards).cancel(["later"], "", admin=True)
            assert cancelled.status == "cancelled"

            stop = asyncio.Event()
            worker = asyncio.create_task(run_worker(settings, url, "w0", stop))
            expected = ({f"q-{u}" for u in USERS[1:]} | {f"d-{i}" for i in range(5)} | {f"s-{u}" for u in USERS[1:6]}
                        ) - delivered_before
            try:
                deadline = time.monotonic() + 30
                while {r.message["data"]["pushgw_id"] for r in fake.received} < expected:
                    assert time.monotonic() < deadline, f"{len(fake.received)} delivered of {len(expected)}"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # nothing more comes
            finally:
                stop.set()
                await asyncio.wait_for(worker, 20)
            got = [r.message["data"]["pushgw_id"] for r in fake.received]
            assert sorted(got) == sorted(expected)  # each once; none of the 6 delivered before; not the opted-out one
            bodies = {r.message["data"]["pushgw_id"]: r.message["notification"]["body"] for r in fake.received}
            assert bodies[f"s-{USERS[2]}"] == f"Hello {USERS[2]}"  # rendered at enqueue, moved as it was
        finally:
            await dest.aclose()


def test_migrate_refuses_a_destination_that_is_not_a_cluster_and_a_cluster_source(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "single.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\n')
    assert main(["-c", str(cfg), "migrate", "--from", redis_url]) == 2
    assert "redis.cluster = true" in capsys.readouterr().err
    cfg.write_text('[redis]\ncluster = true\ncluster_nodes = ["127.0.0.1:1"]\n')
    assert main(["-c", str(cfg), "migrate", "--from", "redis+cluster://127.0.0.1:1"]) == 2
    assert "--from takes the old single Redis" in capsys.readouterr().err
