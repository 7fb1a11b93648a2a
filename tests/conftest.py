"""Shared fixtures: a private redis-server for the whole run, and a local TLS CA for the fakes.

The Redis is started by this test run on a unix socket in a temporary folder; tests may flush it
because nothing else uses it. No test ever touches a Redis it did not start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pushgw.gateway.embedded import EmbeddedRedis
from pushgw.providers.fakes.tls import LocalCA, make_local_ca
from pushgw.queue.connection import redis_from_url


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
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = redis_from_url(redis_url)  # as the gateway connects: commands packed by hiredis
    await client.flushall()  # our own private server: every test starts empty
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return make_local_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
