"""The provider-wide rate, shared by workers through Redis, on a simulated clock."""

from __future__ import annotations

import asyncio
import bisect

import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from pushgw.queue.keys import Keys
from pushgw.ratelimit.provider_rate import SharedRate, rates_for


class _Clock:
    def __init__(self, t: float) -> None:
        self.t = t
        self.pending: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        """Sleepers overlap in time, as processes do: the earliest pending wake-up moves the clock."""
        target = self.t + s
        self.pending.append(target)
        while self.t < target:
            await asyncio.sleep(0)
            if min(self.pending) == target:
                self.t = max(self.t, target)
        self.pending.remove(target)


async def test_two_workers_share_one_rate(redis: aioredis.Redis) -> None:
    clock = _Clock(1_900_000_000.0)
    rate = 500.0
    workers = [SharedRate(redis, Keys("rate"), "fcm", rate, clock=clock, sleep=clock.sleep) for _ in range(2)]
    block = max(1, int(rate * 0.02))
    grants: list[float] = []
    waits_before = REGISTRY.get_sample_value("pushgw_provider_rate_waits_total", {"scope": "fcm"}) or 0.0

    async def sender(limiter: SharedRate) -> None:
        for _ in range(2500):  # bounded: 5000 requests in all
            await limiter.acquire()
            grants.append(clock())

    await asyncio.gather(*(sender(w) for w in workers))
    grants.sort()
    span = grants[-1] - grants[0]
    # 5000 requests at 500/s take about 10 s of (simulated) time, whichever worker sent them.
    assert 9.5 <= span <= 10.5, span
    # In any 1-second window: at most the rate plus one reserved block per worker.
    worst = max(bisect.bisect_right(grants, t + 1.0) - i for i, t in enumerate(grants))
    assert worst <= rate + 2 * block, worst
    assert (REGISTRY.get_sample_value("pushgw_provider_rate_waits_total", {"scope": "fcm"}) or 0) > waits_before


async def test_an_unspent_reservation_lapses(redis: aioredis.Redis) -> None:
    clock = _Clock(1_900_000_000.0)
    a = SharedRate(redis, Keys("rate"), "apns:app", 100.0, clock=clock, sleep=clock.sleep)
    await a.acquire()  # reserves a block of 2 (20 ms at 100/s), spends 1
    assert a._tokens == 1
    clock.t += 5  # quiet for 5 s: the unspent request is not kept for a later burst
    assert not a.take_now()


def test_scopes_from_settings(redis: aioredis.Redis) -> None:
    rates = rates_for(redis, Keys(), (("fcm", 1000.0), ("apns:ios", 50.0)))
    assert set(rates) == {"fcm", "apns:ios"} and rates["apns:ios"].rate == 50.0


async def test_the_worker_takes_the_shared_rate_before_each_request(redis: aioredis.Redis) -> None:
    from pushgw.core.config import RedisSettings, Settings, WorkerSettings
    from pushgw.core.schema import Device, Message
    from pushgw.gateway.worker import Worker
    from pushgw.providers.base import Delivered, Delivery, Outcome
    from pushgw.queue.streams import StreamQueue

    class Sink:
        name = "fcm"
        sent = 0

        async def send(self, delivery: Delivery) -> Outcome:
            Sink.sent += 1
            return Delivered()

        async def close(self) -> None:
            return None

    keys = Keys("ratew")
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    await q.enqueue([Message(id=f"m{i}", devices=(Device("fcm", f"t{i}"),), body="b") for i in range(200)])
    clock = _Clock(1_900_000_000.0)
    start = clock.t
    limiter = SharedRate(redis, keys, "fcm", 100.0, clock=clock, sleep=clock.sleep)
    settings = Settings(redis=RedisSettings(prefix="ratew"), worker=WorkerSettings(block_ms=20))
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(settings, redis, {"fcm": Sink()}, consumer="w", rates={"fcm": limiter}).run(stop))
    for _ in range(1000):
        if Sink.sent == 200:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert Sink.sent == 200
    # 200 requests at 100/s: the (simulated) clock had to move about 2 s while they went out.
    assert 1.9 <= clock.t - start <= 2.2, clock.t - start


async def test_when_redis_cannot_answer_for_the_rate_the_delivery_is_parked_not_stuck(redis: aioredis.Redis,
                                                                                      tmp_path: object) -> None:
    from pushgw.core.config import RedisSettings, Settings, WorkerSettings
    from pushgw.core.schema import Device, Message
    from pushgw.gateway.worker import Worker
    from pushgw.providers.base import Delivery, Outcome
    from pushgw.queue.streams import StreamQueue

    class Sink:
        name = "fcm"

        async def send(self, delivery: Delivery) -> Outcome:
            raise AssertionError("nothing may be sent without the rate")

        async def close(self) -> None:
            return None

    keys = Keys("rateerr")
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    await q.enqueue([Message(id="m1", devices=(Device("fcm", "t1"),), body="b")])
    dead = aioredis.from_url(f"unix://{tmp_path}/no-redis-here.sock")  # the rate's Redis is unreachable
    limiter = SharedRate(dead, keys, "fcm", 100.0)
    settings = Settings(redis=RedisSettings(prefix="rateerr"), worker=WorkerSettings(block_ms=20))
    parked_before = REGISTRY.get_sample_value("pushgw_deliveries_skipped_total", {"reason": "rate_unavailable"}) or 0
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(settings, redis, {"fcm": Sink()}, consumer="w", rates={"fcm": limiter}).run(stop))
    for _ in range(500):
        st = await q.stats()
        if st.pending == 0 and st.lag == 0 and st.delayed == 1:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 10)
    await dead.aclose()
    st = await q.stats()
    assert (st.pending, st.lag, st.delayed) == (0, 0, 1)  # acked, and waiting in the delayed set for another try
    [(member, _)] = await redis.zrange(keys.delayed, 0, -1, withscores=True)
    assert member.startswith(b"1:")  # no attempt spent
    parked = REGISTRY.get_sample_value("pushgw_deliveries_skipped_total", {"reason": "rate_unavailable"}) or 0
    assert parked == parked_before + 1
