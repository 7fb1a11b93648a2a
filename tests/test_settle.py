"""Settling on its own: the retry backoff and what one flush writes, against a real Redis."""

from __future__ import annotations

import random
import time

import redis.asyncio as aioredis
from pushgw.core.config import WorkerSettings
from pushgw.gateway.settle import Settler, backoff_delay
from pushgw.gateway.worker_metrics import WorkerMetrics
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue


def test_backoff_is_full_jitter_capped() -> None:
    assert backoff_delay(1, 1.0, 300, rng=lambda: 1.0) == 1.0
    assert backoff_delay(4, 1.0, 300, rng=lambda: 1.0) == 8.0
    assert backoff_delay(20, 1.0, 300, rng=lambda: 1.0) == 300
    assert backoff_delay(5, 1.0, 300, rng=lambda: 0.0) == 0.0


async def test_done_marks_of_an_entry_acked_in_the_same_flush_are_not_written(redis: aioredis.Redis) -> None:
    queue = StreamQueue(redis, Keys())
    await queue.ensure_group()
    settler = Settler(queue, WorkerSettings(), WorkerMetrics(["fcm"]), publish=lambda: None,
                      clock=time.time, rng=random.random)
    settler.commit.acks.append("1-1")
    settler.commit.done += [("1-1", "fcm:a"), ("high/2-1", "fcm:b")]
    await settler.flush()
    assert await redis.exists(Keys().done("1-1")) == 0  # acked: never read again
    assert await redis.smembers(Keys().done("high/2-1")) == {b"fcm:b"}  # still pending: kept
