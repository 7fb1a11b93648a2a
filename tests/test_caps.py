"""Per-user frequency caps on a real Redis: exact sliding windows, one Lua call per batch, shared by workers."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pushgw.core.config import CategoryCap, ConfigError, PolicySettings, load_settings
from pushgw.core.schema import Device, Message
from pushgw.queue.keys import Keys
from pushgw.ratelimit.base import Admit, Defer, Drop
from pushgw.ratelimit.caps import FrequencyCaps

ALSO_ON_CLUSTER = True  # every test using `redis` also runs on the 1-node cluster (tests/conftest.py)
KEY_PREFIX = "caps"

WEEK = 7 * 86400.0
T0 = 1_800_000_000.0
POLICY = PolicySettings(
    enabled=True, user_limit=3, user_period_s=60.0,
    caps=(CategoryCap("reminder", 2, WEEK, "defer"), CategoryCap("new_content", 1, 86400.0, "drop")),
)




def msg(i: int | str, category: str = "reminder", user: str | None = "learner-1", **kw: object) -> Message:
    return Message(id=f"m-{i}", user=user, body="b", category=category, **kw)  # type: ignore[arg-type]


async def test_two_reminders_a_week_the_third_waits_for_the_first_to_leave_the_window(redis: aioredis.Redis, keys: Keys) -> None:
    caps = FrequencyCaps(redis, keys, POLICY)
    assert await caps.decide([msg(1)], T0) == [Admit()]
    assert await caps.decide([msg(2)], T0 + 3600) == [Admit()]
    [d] = await caps.decide([msg(3)], T0 + 2 * 86400)
    assert isinstance(d, Defer) and d.reason == "cap_reminder" and d.until == pytest.approx(T0 + WEEK)
    [d] = await caps.decide([msg(3)], T0 + WEEK - 1)  # still inside the window that holds m-1
    assert isinstance(d, Defer)
    assert await caps.decide([msg(3)], T0 + WEEK + 0.001) == [Admit()]
    [d] = await caps.decide([msg(4)], T0 + WEEK + 1)  # m-2 and m-3 are in the window now
    assert isinstance(d, Defer) and d.until == pytest.approx(T0 + 3600 + WEEK)


async def test_messages_of_one_batch_count_against_each_other(redis: aioredis.Redis, keys: Keys) -> None:
    caps = FrequencyCaps(redis, keys, POLICY)
    out = await caps.decide([msg(1), msg(2, user="learner-2"), msg(3), msg(4)], T0)
    assert [type(d) for d in out] == [Admit, Admit, Admit, Defer]


async def test_over_cap_drop_and_burst_defer(redis: aioredis.Redis, keys: Keys) -> None:
    caps = FrequencyCaps(redis, keys, POLICY)
    assert await caps.decide([msg(1, "new_content")], T0) == [Admit()]
    assert await caps.decide([msg(2, "new_content")], T0 + 10) == [Drop("cap_new_content")]
    # burst: 3 per minute across categories (new_content m-1 counts; reward has no cap of its own)
    out = await caps.decide([msg(3, "reward"), msg(4, "reward"), msg(5, "reward")], T0 + 20)
    assert [type(d) for d in out] == [Admit, Admit, Defer]
    assert isinstance(out[2], Defer) and out[2].reason == "burst" and out[2].until == pytest.approx(T0 + 60)


async def test_a_message_decided_again_after_a_crash_is_not_counted_twice(redis: aioredis.Redis, keys: Keys) -> None:
    caps = FrequencyCaps(redis, keys, POLICY)
    assert await caps.decide([msg(1)], T0) == [Admit()]
    assert await caps.decide([msg(1)], T0 + 5) == [Admit()]  # redelivered entry: same id
    assert await caps.decide([msg(2)], T0 + 6) == [Admit()]
    assert isinstance((await caps.decide([msg(3)], T0 + 7))[0], Defer)


async def test_members_tell_a_new_enqueue_from_a_deferred_copy_and_duplicates_in_a_batch_count(
    redis: aioredis.Redis, keys: Keys,
) -> None:
    caps = FrequencyCaps(redis, keys, POLICY)
    assert await caps.decide([msg(1)], T0, members=["m-1:100"]) == [Admit()]
    assert await caps.decide([msg(1)], T0 + 1, members=["m-1:100"]) == [Admit()]  # the same acceptance again
    assert await caps.decide([msg(1)], T0 + 2, members=["m-1:900"]) == [Admit()]  # enqueued anew: counted
    [d] = await caps.decide([msg(1)], T0 + 3, members=["m-1:999"])
    assert isinstance(d, Defer)
    out = await caps.decide([msg(5, user="learner-2")] * 3, T0, members=["m-5:1"] * 3)  # one id thrice in a batch
    assert [type(x) for x in out] == [Admit, Admit, Defer]


def test_zero_periods_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[policy]\nuser_limit = 3\nuser_period_s = 0\n")
    with pytest.raises(ConfigError, match="user_period_s"):
        load_settings(path, env={})
    path.write_text("[policy.caps.reward]\nlimit = 3\nperiod_s = 0.0001\n")
    with pytest.raises(ConfigError, match="period_s"):
        load_settings(path, env={})


async def test_retries_and_device_targeted_messages_are_not_limited(redis: aioredis.Redis, keys: Keys) -> None:
    caps = FrequencyCaps(redis, keys, POLICY)
    retries = [msg(i, resolved=True, devices=(Device("fcm", "t"),)) for i in range(5)]
    direct = [msg(i + 10, user=None, devices=(Device("fcm", "t"),)) for i in range(5)]
    assert await caps.decide(retries + direct, T0) == [Admit()] * 10
    assert await redis.exists(keys.cap("learner-1", "reminder")) == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.floats(0, 20), st.booleans()), min_size=5,
                  max_size=60),
)
async def test_concurrent_workers_never_let_a_user_exceed_a_cap_in_any_window(redis_url: str, plan: list) -> None:  # type: ignore[type-arg]
    """Four workers with their own connections decide interleaved messages while a shared clock moves
    forward by random steps (as NTP-synced hosts see time); afterwards, every window of every rule's
    period holds at most its limit of admitted messages for each user."""
    policy = PolicySettings(enabled=True, user_limit=4, user_period_s=30.0, caps=(CategoryCap("reminder", 2, 100.0),))
    clients = [aioredis.from_url(redis_url) for _ in range(4)]
    await clients[0].flushall()
    admitted: dict[tuple[str, str], list[float]] = defaultdict(list)
    clock = [T0]
    try:
        workers = [FrequencyCaps(c, Keys("prop"), policy) for c in clients]

        async def run(w: int) -> None:
            for i, (worker, user, step, reminder) in enumerate(plan):
                if worker != w:
                    continue
                clock[0] += step
                now = clock[0]
                m = msg(f"{i}", category="reminder" if reminder else "reward", user=f"u{user}")
                [d] = await workers[w].decide([m], now)
                if isinstance(d, Admit):
                    admitted[(m.user or "", m.category)].append(now)
                await asyncio.sleep(0)

        await asyncio.gather(*(run(w) for w in range(4)))
    finally:
        for c in clients:
            await c.aclose()
    per_user: dict[str, list[float]] = defaultdict(list)
    for (user, category), times in admitted.items():
        per_user[user] += times
        if category == "reminder":
            _assert_window(sorted(times), 2, 100.0)
    for times in per_user.values():
        _assert_window(sorted(times), 4, 30.0)
    assert sum(len(t) for t in admitted.values()) >= min(len(plan), 2)  # the caps admit, not only refuse


def _assert_window(times: list[float], limit: int, period: float) -> None:
    for i, start in enumerate(times):
        inside = [t for t in times[i:] if t < start + period]
        assert len(inside) <= limit, f"{len(inside)} in a {period}s window starting at {start}: {times}"


def test_policy_config(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("""
[policy]
enabled = true
user_limit = 3
user_period_s = 60
[policy.caps.reminder]
limit = 2
period_s = 604800
[policy.caps.new_content]
limit = 1
period_s = 86400
over = "drop"
""")
    s = load_settings(path, env={})
    assert s.policy.enabled and s.policy.user_limit == 3
    assert s.policy.caps == (CategoryCap("reminder", 2, 604800.0, "defer"), CategoryCap("new_content", 1, 86400.0, "drop"))
    path.write_text("[policy.caps.reminder]\nlimit = 2\nperiod_s = 60\nover = \"later\"\n")
    with pytest.raises(ConfigError, match=r"policy\.caps\.reminder\.over"):
        load_settings(path, env={})
    path.write_text("[policy.caps.reminder]\nlimit = 0\nperiod_s = 60\n")
    with pytest.raises(ConfigError, match=r"policy\.caps\.reminder\.limit"):
        load_settings(path, env={})


class _Sink:
    name = "fcm"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, delivery):  # type: ignore[no-untyped-def]
        from pushgw.providers.base import Delivered

        self.sent.append(delivery.message.id)
        return Delivered()

    async def close(self) -> None:
        return None


async def test_worker_applies_caps_defers_and_drops_with_metrics(redis: aioredis.Redis, keys: Keys) -> None:
    from prometheus_client import REGISTRY
    from pushgw.core.config import RedisSettings, Settings, WorkerSettings
    from pushgw.gateway.worker import Worker
    from pushgw.queue.streams import StreamQueue
    from pushgw.users.registry import DeviceRegistry

    def count(action: str, category: str) -> float:
        labels = {"category": category, "rule": "cap", "action": action}
        return REGISTRY.get_sample_value("pushgw_policy_decisions_total", labels) or 0.0

    await DeviceRegistry(redis, keys).register("learner-1", Device("fcm", "tok-1"))
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    await q.enqueue([msg(i) for i in range(5)] + [msg(f"n{i}", "new_content") for i in range(3)])
    before = (count("deferred", "reminder"), count("dropped", "new_content"))
    sink = _Sink()
    settings = Settings(redis=RedisSettings(prefix=keys.prefix), worker=WorkerSettings(block_ms=20, janitor_interval_s=0.05),
                        policy=POLICY)
    worker = Worker(settings, redis, {"fcm": sink}, consumer="w", limiter=FrequencyCaps(redis, keys, POLICY))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    for _ in range(200):
        stats = await q.stats()
        if stats.lag == 0 and stats.pending == 0 and len(sink.sent) >= 3:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)
    # reminders: 2 of 5 in the week, 3 deferred to the queue; new_content: 1 a day, the other 2 dropped
    # (their cap frees later than the burst limit, so the cap's action applies).
    assert sorted(sink.sent) == ["m-0", "m-1", "m-n0"]
    assert await redis.zcard(keys.delayed) == 3
    assert count("deferred", "reminder") - before[0] == 3
    assert count("dropped", "new_content") - before[1] == 2
