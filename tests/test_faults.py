"""Fault tests on loopback, bounded in time: a worker killed mid-load, Redis killed mid-load, a hung provider.

Each prints its figures (recovery time, duplicates, attempts); none asserts a wall-clock bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from pushgw.core.config import ApiClient, ApiSettings, FcmApp, ProviderSettings, RedisSettings, Settings, WorkerSettings
from pushgw.core.schema import Device, Message
from pushgw.gateway.api.app import create_app
from pushgw.gateway.embedded import EmbeddedRedis
from pushgw.gateway.pool import Pool
from pushgw.gateway.worker import Worker
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.fcm import FcmProvider
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue


def _settings(fcm: FakeFcm, account: Path, ca: LocalCA, prefix: str, url: str = "", **worker: object) -> Settings:
    ws = replace(WorkerSettings(block_ms=20, janitor_interval_s=0.2, claim_idle_s=1.0, drain_deadline_s=10), **worker)  # type: ignore[arg-type]
    return Settings(
        redis=RedisSettings(url=url, prefix=prefix),
        worker=ws,
        providers=ProviderSettings(timeout_s=3, concurrency=16),
        fcm=(FcmApp("default", str(account), base_url=fcm.base_url, ca_file=ca.ca_file),),
    )


def _messages(n: int, tag: str) -> list[Message]:
    return [Message(id=f"{tag}-{i}", body="Your quiz closes tonight", devices=(Device("fcm", f"{tag}{i}"),)) for i in range(n)]


def _circuit_opens() -> float:
    return REGISTRY.get_sample_value("pushgw_circuit_opens_total", {"provider": "fcm", "app": "default"}) or 0.0


async def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_sigkilled_worker_is_taken_over_nothing_lost(
    redis: aioredis.Redis, redis_url: str, local_ca: LocalCA, tmp: Path
) -> None:
    n = 200
    async with FakeFcm(local_ca) as fcm:
        fcm.delay_s = 0.2
        account = fcm.service_account(tmp)
        settings = _settings(fcm, account, local_ca, "kill", url=redis_url, max_inflight=64)
        q = StreamQueue(redis, Keys("kill"))
        await q.ensure_group()
        await q.enqueue(_messages(n, "k"))
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(tmp / "metrics"))
        (tmp / "metrics").mkdir(exist_ok=True)
        pool = Pool(settings, redis_url, 1, consumer_prefix="victim")
        pool.start()
        try:
            await _wait(lambda: len(fcm.received) >= 30, 60, "the victim to deliver")
            victim = pool.children[0]
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.to_thread(victim.join, 10)
            killed_at = time.monotonic()
            delivered_before = len(fcm.received)
            pending_at_kill = (await q.stats()).pending
        finally:
            pool.stopping = True
            pool.stop(5)
        assert pending_at_kill > 0  # the kill left entries read but not acknowledged

        fcm.delay_s = 0.0
        provider = FcmProvider(settings.fcm, settings.providers)
        stop = asyncio.Event()
        rescuer = asyncio.create_task(Worker(settings, redis, {"fcm": provider}, consumer="rescuer").run(stop))
        try:
            await _wait(lambda: len({r.message["token"] for r in fcm.received}) == n, 60, "every message")
            recovered_in = time.monotonic() - killed_at
            await _wait(lambda: True, 0.5, "settle")
        finally:
            stop.set()
            await asyncio.wait_for(rescuer, 30)
            await provider.close()
        counts = Counter(r.message["token"] for r in fcm.received)
        duplicates = sum(c - 1 for c in counts.values())
        print(f"\nSIGKILL: {delivered_before} delivered before the kill, {pending_at_kill} pending at the kill, "
              f"all {n} delivered {recovered_in:.2f} s after it, duplicates {duplicates}")
        assert set(counts) == {f"k{i}" for i in range(n)}  # nothing lost
        assert duplicates <= settings.providers.concurrency + pending_at_kill  # only what was in flight at the kill
        assert (await q.stats()).pending == 0


async def test_redis_killed_and_restarted_with_aof_loses_no_acknowledged_enqueue(local_ca: LocalCA, tmp: Path) -> None:
    server = EmbeddedRedis(tmp / "redis-aof", aof=True, fsync="always")
    url = server.start()
    producer_client = aioredis.from_url(url)
    worker_client = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(url, max_connections=16, timeout=None)
    )
    try:
        async with FakeFcm(local_ca) as fcm:
            account = fcm.service_account(tmp)
            settings = _settings(fcm, account, local_ca, "aof", url=url)
            provider = FcmProvider(settings.fcm, settings.providers)
            stop = asyncio.Event()
            worker = asyncio.create_task(Worker(settings, worker_client, {"fcm": provider}, consumer="w").run(stop))
            # The producer is an upstream service on the HTTP API: it must see 503 during the outage,
            # then 202 again once the API's Redis client has reconnected by itself.
            token = "faults-api-token-0123456789"
            api_settings = replace(settings, api=ApiSettings(clients=(ApiClient("svc", token, ("enqueue",)),)))
            api: TestClient[object, object] = TestClient(TestServer(create_app(api_settings, producer_client)))
            await api.start_server()
            statuses: Counter[int] = Counter()
            acknowledged: list[str] = []
            failures = 0
            outage: dict[str, float] = {}

            async def crash_and_restart() -> None:
                server.kill()  # SIGKILL, as a crash would
                t0 = time.monotonic()
                await asyncio.sleep(0.5)
                await asyncio.to_thread(server.start)
                outage["s"] = time.monotonic() - t0

            crasher: asyncio.Task[None] | None = None
            try:
                for batch in range(30):
                    msgs = _messages(10, f"b{batch}-")
                    if batch == 12:  # in the middle of the load
                        crasher = asyncio.create_task(crash_and_restart())
                        await asyncio.sleep(0.05)
                    for _attempt in range(100):
                        resp = await api.post("/v1/messages/batch", json={"messages": [m.to_json() for m in msgs]},
                                              headers={"Authorization": f"Bearer {token}"})
                        statuses[resp.status] += 1
                        if resp.status == 202:
                            acknowledged += [m.devices[0].token for m in msgs]
                            break
                        assert resp.status == 503 and resp.headers["Retry-After"] == "1", await resp.text()
                        failures += 1
                        await asyncio.sleep(0.1)
                    await asyncio.sleep(0.02)
                assert crasher is not None
                await crasher
                t0 = time.monotonic()
                await _wait(lambda: set(acknowledged) <= {r.message["token"] for r in fcm.received}, 60,
                            "every acknowledged message")
                caught_up = time.monotonic() - t0
            finally:
                stop.set()
                await asyncio.wait_for(worker, 30)
                await provider.close()
                await api.close()
            counts = Counter(r.message["token"] for r in fcm.received)
            print(f"\nRedis crash: back after {outage['s']:.2f} s, API answers {dict(statuses)}, "
                  f"{failures} enqueue calls failed and were retried, "
                  f"{len(acknowledged)} acknowledged, all delivered ({caught_up:.2f} s after the load), "
                  f"duplicates {sum(c - 1 for c in counts.values())}")
            assert failures > 0  # the producer did see the outage
            assert len(acknowledged) == 300
            assert set(acknowledged) <= set(counts)
    finally:
        await producer_client.aclose()
        await worker_client.aclose()
        server.stop()


async def test_hung_provider_times_out_retries_and_delivers_after_it_recovers(
    redis: aioredis.Redis, local_ca: LocalCA, tmp: Path
) -> None:
    async with FakeFcm(local_ca) as fcm:
        account = fcm.service_account(tmp)
        settings = _settings(fcm, account, local_ca, "hang", backoff_base_s=0.05, backoff_cap_s=0.2, max_attempts=50)
        settings = replace(settings, providers=ProviderSettings(timeout_s=0.3, concurrency=8))
        q = StreamQueue(redis, Keys("hang"))
        await q.enqueue(_messages(20, "h"))
        provider = FcmProvider(settings.fcm, settings.providers)
        fcm.hang = True
        opened_before = _circuit_opens()
        stop = asyncio.Event()
        task = asyncio.create_task(Worker(settings, redis, {"fcm": provider}, consumer="w").run(stop))
        try:
            await _wait(lambda: _circuit_opens() > opened_before, 30, "the circuit to open after repeated timeouts")
            requests_when_open = fcm.send_requests
            await asyncio.sleep(1.0)
            # While open, deliveries wait for the probe instead of spending attempts on a dead provider.
            assert fcm.send_requests <= requests_when_open + settings.providers.concurrency
            assert fcm.received == []
            assert not task.done()  # the worker is alive and retrying, not stuck
            fcm.hang = False
            await _wait(lambda: len({r.message["token"] for r in fcm.received}) == 20, 30, "delivery after recovery")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await provider.close()
        print(f"\nhung provider: {fcm.send_requests} requests for 20 messages before and after it recovered; "
              f"circuit opened {_circuit_opens() - opened_before} time(s)")
        assert (await q.stats()).dead_letters == 0


async def test_429_retry_after_no_request_for_that_target_before_the_named_time(
    redis: aioredis.Redis, local_ca: LocalCA, tmp: Path
) -> None:
    async with FakeFcm(local_ca) as fcm:
        account = fcm.service_account(tmp)
        # Backoff alone would retry within 10 ms; only Retry-After can make the worker wait longer.
        settings = _settings(fcm, account, local_ca, "ra", backoff_base_s=0.01, backoff_cap_s=0.01)
        fcm.program("ra0", [(429, "QUOTA_EXCEEDED", 2)])
        fcm.program("ra1", [(503, "UNAVAILABLE", 1), (429, "QUOTA_EXCEEDED", 1)])
        q = StreamQueue(redis, Keys("ra"))
        await q.enqueue(_messages(3, "ra"))
        provider = FcmProvider(settings.fcm, settings.providers)
        stop = asyncio.Event()
        task = asyncio.create_task(Worker(settings, redis, {"fcm": provider}, consumer="w").run(stop))
        try:
            await _wait(lambda: len({r.message["token"] for r in fcm.received}) == 3, 30, "all three delivered")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await provider.close()
    by_token: dict[str, list[tuple[float, int]]] = {}
    for token, at, status in fcm.answers:
        by_token.setdefault(token, []).append((at, status))
    for token, named in (("ra0", [2.0]), ("ra1", [1.0, 1.0])):
        answers = by_token[token]
        assert [s for _, s in answers] == ([429, 200] if token == "ra0" else [503, 429, 200])
        for (t_prev, _), (t_next, _), wait in zip(answers[:-1], answers[1:], named, strict=True):
            print(f"\n{token}: Retry-After {wait:.0f} s, next request after {t_next - t_prev:.2f} s")
            assert t_next - t_prev >= wait  # never before the time the provider named
    assert [s for _, s in by_token["ra2"]] == [200]
