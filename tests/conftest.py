"""Shared fixtures: a private redis-server for the whole run, and a local TLS CA for the fakes.

The Redis is started by this test run on a unix socket in a temporary folder; tests may flush it
because nothing else uses it. No test ever touches a Redis it did not start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from pushgw.core.config import ApnsApp, FcmApp, ProviderSettings, RedisSettings, Settings, WebPushSettings
from pushgw.core.schema import Device
from pushgw.gateway.api import create_app
from pushgw.gateway.embedded import EmbeddedRedis
from pushgw.gateway.topology import LocalCluster
from pushgw.providers.apns import ApnsProvider
from pushgw.providers.fakes.apns import ApnsKey, FakeApns, make_apns_key
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA, make_local_ca
from pushgw.providers.fakes.webpush import FakePushService
from pushgw.providers.fcm import FcmProvider
from pushgw.providers.vapid import make_vapid_key
from pushgw.providers.webpush import WebPushProvider
from pushgw.queue.connection import redis_from_url, redis_url_for
from pushgw.queue.keys import Keys


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), aof=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def redis(request: pytest.FixtureRequest, redis_url: str, redis_mode: str) -> AsyncIterator[Any]:
    """The test's Redis, emptied first: the run's own server (as the gateway connects: commands packed by hiredis),
    or in a module with `ALSO_ON_CLUSTER` also the run's 1-node cluster through the cluster client."""
    if redis_mode == "single":
        client = redis_from_url(redis_url)
        await client.flushall()  # our own private server: every test starts empty
    else:
        cluster: LocalCluster = request.getfixturevalue("cluster1")
        for node in cluster.nodes:
            with node.client() as r:
                r.flushall()
        client = redis_from_url(redis_url_for(RedisSettings(cluster=True, cluster_nodes=cluster.seeds)))
    yield client
    await client.aclose()


# Redis Clusters on loopback (gateway/topology.py), one per run each: a 1-node cluster owning every slot catches
# any cross-slot command as cheaply as one Redis; 3 masters add MOVED redirections between nodes.
@pytest.fixture(scope="session")
def cluster1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster1"), masters=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster3"), masters=3).start()
    yield cluster
    cluster.stop()


# The delivery, policy and campaign suites (test_worker.py, test_policy.py, test_campaigns.py, ...) also run on the
# run's 1-node Redis Cluster through the gateway's cluster client: a module opts in with `ALSO_ON_CLUSTER = True`
# (its tests that use `redis` run twice) and builds its keys from the `prefix`/`keys` fixtures, hash-tagged on the
# cluster (what one shard's worker sees: queue/shards.py; the module's `KEY_PREFIX`, default "pushgw"). There a
# script or transaction over two slots, a key built outside the prefix, or a command redis-py's cluster client
# refuses fails the test; the 1-node cluster is started once per run and emptied before each test.
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "ALSO_ON_CLUSTER", False) and "redis" in metafunc.fixturenames:
        metafunc.parametrize("redis_mode", ["single", "cluster1"], indirect=True)


@pytest.fixture
def redis_mode(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "single")


@pytest.fixture
def in_cluster(redis_mode: str) -> bool:
    """Whether this test's Redis is the 1-node cluster (its keys then need one hash tag)."""
    return redis_mode != "single"


@pytest.fixture
def prefix(request: pytest.FixtureRequest, in_cluster: bool) -> str:
    base: str = getattr(request.module, "KEY_PREFIX", "pushgw")
    return "{" + base + "}" if in_cluster else base


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture(scope="session")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return make_local_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


# Provider clients against their fakes over TLS (the app topic is APNS_TOPIC): for the payload tests.
APNS_TOPIC = "org.example.campus"


@pytest.fixture
def apns_key(tmp_path: Path) -> ApnsKey:
    return make_apns_key(tmp_path / "apns")


@pytest.fixture
async def apns(local_ca: LocalCA, apns_key: ApnsKey) -> AsyncIterator[tuple[FakeApns, ApnsProvider]]:
    async with FakeApns(local_ca, keys=[apns_key], topics=[APNS_TOPIC]) as fake:
        app = ApnsApp("default", APNS_TOPIC, team_id=apns_key.team_id, key_id=apns_key.key_id,
                      key_file=str(apns_key.key_file), host="127.0.0.1", port=fake.port, ca_file=str(local_ca.ca_file))
        provider = ApnsProvider([app], ProviderSettings(timeout_s=5.0))
        yield fake, provider
        await provider.close()


@pytest.fixture
async def fcm(local_ca: LocalCA, tmp_path: Path) -> AsyncIterator[tuple[FakeFcm, FcmProvider]]:
    async with FakeFcm(local_ca) as fake:
        account = fake.service_account(tmp_path / "sa", "demo-project")
        app = FcmApp("default", service_account_file=str(account), base_url=fake.base_url, ca_file=str(local_ca.ca_file))
        provider = FcmProvider([app], ProviderSettings(timeout_s=5.0))
        yield fake, provider
        await provider.close()


@pytest.fixture
async def web(local_ca: LocalCA, tmp_path: Path) -> AsyncIterator[tuple[FakePushService, WebPushProvider, Device]]:
    async with FakePushService(local_ca) as svc:
        settings = WebPushSettings(vapid_private_key_file=str(make_vapid_key(tmp_path / "vapid")),
                                   allowed_hosts=("127.0.0.1",), allow_private=True, ca_file=str(local_ca.ca_file))
        provider = WebPushProvider(settings, ProviderSettings(timeout_s=5.0))
        sub = svc.new_subscription()
        yield svc, provider, Device("webpush", sub["endpoint"], None, sub["keys"]["p256dh"], sub["keys"]["auth"])
        await provider.close()


# An HTTP API per settings on a real loopback server, closed after the test.
@pytest.fixture
async def make_client(redis: aioredis.Redis) -> AsyncIterator[Callable[..., Any]]:
    made: list[TestClient[Any, Any]] = []

    async def factory(s: Settings) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(s, redis)))
        await client.start_server()
        made.append(client)
        return client

    yield factory
    for c in made:
        await c.close()
