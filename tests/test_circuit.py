"""The provider circuit: opens on a run of failures, probes one request, closes on success."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import redis.asyncio as aioredis
from pushgw.core.config import ProviderSettings, Settings, WorkerSettings
from pushgw.core.schema import Device, Message
from pushgw.gateway.worker import Worker
from pushgw.providers.base import Delivered, Delivery, Outcome, Retry
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue
from pushgw.ratelimit.circuit import Circuit, State


def test_opens_after_threshold_then_probes_once_and_closes() -> None:
    c = Circuit(threshold=3, open_s=2.0, max_open_s=8.0)
    for _ in range(2):
        assert c.allow(0.0)
        assert c.failure(0.0) is False
    assert c.failure(0.0) is True and c.state is State.OPEN
    assert not c.allow(1.9)
    assert c.retry_at(1.0) == 2.0
    assert c.allow(2.0) and c.state is State.HALF_OPEN  # the probe
    assert not c.allow(2.0)  # only one probe at a time
    c.success()
    assert c.state is State.CLOSED and c.allow(2.1)


def test_failed_probe_doubles_the_open_period_up_to_the_cap() -> None:
    c = Circuit(threshold=1, open_s=2.0, max_open_s=5.0)
    c.failure(0.0)
    periods = []
    now = 0.0
    for _ in range(4):
        now = c.opened_until
        assert c.allow(now)
        c.failure(now)
        periods.append(c.opened_until - now)
    assert periods == [4.0, 5.0, 5.0, 5.0]


def test_a_success_resets_the_failure_run() -> None:
    c = Circuit(threshold=3)
    c.failure(0.0)
    c.failure(0.0)
    c.success()
    c.failure(0.0)
    c.failure(0.0)
    assert c.state is State.CLOSED


class Outage:
    """A provider that answers 503 until `down_until`, then accepts."""

    def __init__(self, name: str, down_until: float) -> None:
        self.name = name
        self.down_until = down_until
        self.calls: list[tuple[str, float]] = []
        self.delivered: Counter[str] = Counter()

    async def send(self, delivery: Delivery) -> Outcome:
        now = time.monotonic()
        self.calls.append((delivery.device.token, now))
        await asyncio.sleep(0.001)
        if now < self.down_until:
            return Retry("503 ServiceUnavailable", status=503)
        self.delivered[delivery.device.token] += 1
        return Delivered()

    async def close(self) -> None:
        return None


async def test_outage_of_one_provider_opens_its_circuit_others_keep_delivering(redis: aioredis.Redis) -> None:
    outage_s = 30.0  # the 30 s outage of one provider
    fcm = Outage("fcm", time.monotonic() + outage_s)
    apns = Outage("apns", 0.0)
    settings = Settings(
        worker=WorkerSettings(block_ms=20, janitor_interval_s=0.2, max_attempts=6, backoff_base_s=0.2, backoff_cap_s=1.0),
        providers=ProviderSettings(timeout_s=2, concurrency=16, circuit_failures=10, circuit_open_s=0.5,
                                   circuit_max_open_s=2.0),
    )
    q = StreamQueue(redis, Keys())
    n = 100
    await q.enqueue([Message(id=f"f{i}", body="b", devices=(Device("fcm", f"f{i}"),)) for i in range(n)])
    await q.enqueue([Message(id=f"a{i}", body="b", devices=(Device("apns", f"{i:064x}"),)) for i in range(n)])
    stop = asyncio.Event()
    worker = Worker(settings, redis, {"fcm": fcm, "apns": apns}, consumer="w", clock=time.time)
    task = asyncio.create_task(worker.run(stop))
    started = time.monotonic()
    try:
        while len(apns.delivered) < n and time.monotonic() - started < 20:
            await asyncio.sleep(0.02)
        apns_done_at = time.monotonic() - started
        assert len(apns.delivered) == n
        assert max(t for _, t in apns.calls) < fcm.down_until  # every APNs push went out during the FCM outage
        while len(fcm.delivered) < n and time.monotonic() - started < outage_s + 20:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert set(fcm.delivered) == {f"f{i}" for i in range(n)}
    attempts_in_outage = sum(1 for _, t in fcm.calls if t < fcm.down_until)
    stats = await q.stats()
    circuit = worker.lanes["fcm"].circuits["default"]
    print(f"\noutage {outage_s} s: {attempts_in_outage} FCM requests during it for {n} messages "
          f"(without a circuit: about {n} per backoff round), circuit opened {circuit.opened_count} times, "
          f"APNs all delivered after {apns_done_at:.2f} s, FCM all delivered "
          f"{max(t for _, t in fcm.calls) - fcm.down_until:.2f} s after it recovered")
    assert circuit.opened_count >= 1
    assert attempts_in_outage < n  # fewer requests than messages: parked while open, one probe at a time
    assert stats.dead_letters == 0  # a provider outage spends no attempts while the circuit is open
