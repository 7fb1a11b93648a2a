"""Metrics the worker holds between flushes (`metrics.Deferred`) add up to what direct updates give."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from pushgw.core import metrics
from pushgw.core.metrics import AutoDeferred, Deferred

BUCKETS = (0.005, 0.01, 0.1, 1, 10)
# Below, on and just above bounds, past the last finite one, and zero.
VALUES = [0.0, 0.004, 0.005, 0.0051, 0.01, 0.099, 0.5, 1.0, 9.99, 10.0, 10.5, 3600.0]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in registry.collect() for s in metric.samples if not s.name.endswith("_created")}


def test_held_counts_and_observations_equal_direct_updates_once_applied() -> None:
    direct, held = CollectorRegistry(), CollectorRegistry()
    c1 = Counter("deliveries", "d", ["provider"], registry=direct)
    h1 = Histogram("e2e", "e", ["provider"], buckets=BUCKETS, registry=direct)
    c2 = Counter("deliveries", "d", ["provider"], registry=held)
    h2 = Histogram("e2e", "e", ["provider"], buckets=BUCKETS, registry=held)
    d = Deferred()
    for v in VALUES:
        c1.labels("fcm").inc()
        h1.labels("fcm").observe(v)
        d.inc(c2.labels("fcm"))
        d.observe(h2.labels("fcm"), v)
    c1.labels("apns").inc(3)
    d.inc(c2.labels("apns"), 3)
    h1.labels("apns").observe(0.02)
    d.observe(h2.labels("apns"), 0.02)

    assert all(value == 0 for value in samples(held).values())  # nothing written before `apply`
    d.apply()
    want = samples(direct)
    assert samples(held) == pytest.approx(want)
    d.apply()  # nothing held any more: applying again changes nothing
    assert samples(held) == pytest.approx(want)


def count(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("req_seconds_count") or 0.0


def test_auto_deferred_writes_at_once_outside_an_event_loop() -> None:
    registry = CollectorRegistry()
    h = Histogram("req_seconds", "r", buckets=BUCKETS, registry=registry)
    held = AutoDeferred()
    held.observe(h, 0.02)
    assert count(registry) == 1


def test_auto_deferred_writes_itself_on_each_loop_even_after_a_loop_ended_with_a_write_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    h = Histogram("req_seconds", "r", buckets=BUCKETS, registry=registry)
    held = AutoDeferred()

    async def observe_then_end_at_once() -> None:
        held.observe(h, 0.02)  # its write is scheduled on this loop, which ends before it runs

    async def observe_then_wait(n: int) -> None:
        for _ in range(n):
            held.observe(h, 0.02)
        assert count(registry) == 0  # held, not yet written
        for _ in range(200):
            if count(registry) == n + 1:
                return
            await asyncio.sleep(0.005)

    # The first loop's write is due an hour on, so its shutdown (which runs the loop a little longer) cannot
    # write it however slowly this machine runs: the loop ends with the write pending.
    monkeypatch.setattr(metrics, "HOLD_S", 3600.0)
    asyncio.run(observe_then_end_at_once())
    assert count(registry) == 0
    monkeypatch.setattr(metrics, "HOLD_S", 0.005)
    asyncio.run(observe_then_wait(3))  # a new loop gets its own write, which also writes the leftover
    assert count(registry) == 4
    assert registry.get_sample_value("req_seconds_bucket", {"le": "0.1"}) == 4
