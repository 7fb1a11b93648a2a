"""Priority lanes: a reminder is not stuck behind a campaign backlog, and the campaign is never starved."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from pushgw.core.config import ProviderSettings, RedisSettings, Settings, WorkerSettings
from pushgw.core.schema import Device, Message
from pushgw.gateway.lanequeue import LaneQueue
from pushgw.gateway.worker import Worker
from pushgw.providers.base import Delivered, Delivery, Outcome
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue

ALSO_ON_CLUSTER = True  # every test using `redis` also runs on the 1-node cluster (tests/conftest.py)
KEY_PREFIX = "lanes"





def test_the_lane_queue_serves_high_first_and_gives_normal_one_in_weight_plus_one() -> None:
    q: LaneQueue[str] = LaneQueue(weight=3)
    for i in range(3):
        q.put(f"n{i}", high=False)
    for i in range(9):
        q.put(f"h{i}", high=True)
    assert q.waiting == (9, 3) and len(q) == 12
    order = [q.take() for _ in range(12)]
    assert order == ["h0", "h1", "h2", "n0", "h3", "h4", "h5", "n1", "h6", "h7", "h8", "n2"]
    assert q.take() is None and q.waiting == (0, 0)


def test_high_alone_does_not_build_a_streak_that_delays_normal_later() -> None:
    q: LaneQueue[str] = LaneQueue(weight=2)
    for i in range(5):  # no normal item waiting: these do not count towards the streak
        q.put(f"h{i}", high=True)
    assert [q.take() for _ in range(5)] == ["h0", "h1", "h2", "h3", "h4"]
    q.put("n0", high=False)
    q.put("h5", high=True)
    q.put("h6", high=True)
    q.put("h7", high=True)
    assert [q.take() for _ in range(4)] == ["h5", "h6", "n0", "h7"]


class _SlowSink:
    """Answers after 2 ms; records the order deliveries arrived in."""

    name = "fcm"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, delivery: Delivery) -> Outcome:
        await asyncio.sleep(0.002)
        self.sent.append(delivery.message.id)
        return Delivered()

    async def close(self) -> None:
        return None


async def test_a_bulk_backlog_does_not_delay_a_high_priority_message(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    bulk = [Message(id=f"bulk-{i}", devices=(Device("fcm", f"tok-{i}"),), body="New module", category="new_content")
            for i in range(3000)]
    for i in range(0, len(bulk), 500):
        await q.enqueue(bulk[i:i + 500])
    ws = WorkerSettings(block_ms=50, batch_size=32, max_inflight=64, high_reserve=32, janitor_interval_s=0.5)
    settings = Settings(redis=RedisSettings(prefix=keys.prefix), worker=ws, providers=ProviderSettings(concurrency=8))
    sink = _SlowSink()
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(settings, redis, {"fcm": sink}, consumer="w").run(stop))
    try:
        while len(sink.sent) < 300:
            await asyncio.sleep(0.005)
        sent_before = len(sink.sent)
        reminder = Message(id="reminder", devices=(Device("fcm", "tok-r"),), body="Live session in 15 minutes",
                           category="reminder", priority="high")
        await q.enqueue([reminder])
        for _ in range(2000):
            if "reminder" in sink.sent:
                break
            await asyncio.sleep(0.005)
        position = sink.sent.index("reminder")
        behind = position - sent_before
        print(f"\nreminder delivered after {behind} bulk deliveries; {len(bulk) - position} bulk still queued")
        # FIFO would put it behind the whole backlog (~2700). The bound: what was already in flight
        # (max_inflight) plus what finished while the high lane was polled; far below the backlog.
        assert behind <= ws.max_inflight + ws.batch_size
        assert len(bulk) - position > 2000
        while len(sink.sent) < len(bulk) + 1:  # and bulk completes: nothing lost or starved
            await asyncio.sleep(0.01)
        assert sorted(sink.sent) == sorted([m.id for m in bulk] + ["reminder"])
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_retries_and_deferrals_return_to_their_own_lane(redis: aioredis.Redis, keys: Keys) -> None:
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    high = Message(id="h", user="u", body="b", priority="high")
    normal = Message(id="n", user="u", body="b")
    await q.schedule(100.0, high, attempt=2, enqueued_ms=5)
    await q.schedule(100.0, normal, attempt=2, enqueued_ms=5)
    assert await q.move_due(101.0) == 2
    [eh] = await q.read_new("c", 10, None, lanes=("high",))
    [en] = await q.read_new("c", 10, None, lanes=("normal",))
    assert (eh.lane, eh.attempt, en.lane, en.attempt) == ("high", 2, "normal", 2)
    assert eh.ref == f"high/{eh.entry_id}" and en.ref == en.entry_id
    st = await q.stats()
    assert (st.pending, st.lag, st.lag_high) == (2, 0, 0)
