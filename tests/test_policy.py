"""Delivery policy end to end on a real Redis: opt-outs, send windows, expiry, scheduling; API, client and CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from pushgw.core.config import (
    ApiClient,
    ApiSettings,
    CategoryCap,
    ConfigError,
    PolicySettings,
    RedisSettings,
    Settings,
    WorkerSettings,
    load_settings,
)
from pushgw.core.schema import Device, Message, MessageInvalid, parse_message
from pushgw.core.windows import zone
from pushgw.gateway.api.app import create_app
from pushgw.gateway.cli import main
from pushgw.gateway.client import PushClient
from pushgw.gateway.worker import Worker
from pushgw.providers.base import Delivered, Delivery, Outcome
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue
from pushgw.ratelimit.base import Admit, Defer, Drop
from pushgw.ratelimit.policy import DeliveryPolicy
from pushgw.users.profiles import Preferences, Profiles
from pushgw.users.registry import DeviceRegistry

PREFIX = "policytest"
ALSO_ON_CLUSTER = True  # every test using `redis` also runs on the 1-node cluster (tests/conftest.py)
KEY_PREFIX = PREFIX


TOKEN = "policy-test-token-0123456789"
LEARNING = PolicySettings(
    windows=("07:30-09:00", "12:00-13:30", "17:30-21:00"), timezone="Europe/Paris", window_jitter_s=900,
    category_windows=(("account", ()), ("reward", ("07:00-22:00",))), opt_out_exempt=("account",),
    caps=(CategoryCap("reminder", 2, 7 * 86400.0),), categories=("new_content",),
)


def paris(*args: int) -> float:
    return datetime(*args, tzinfo=zone("Europe/Paris")).timestamp()  # type: ignore[misc]


def msg(i: int | str, category: str = "reminder", user: str | None = "learner-1", **kw: Any) -> Message:
    return Message(id=f"m-{i}", user=user, body="b", category=category, **kw)


def count(rule: str, action: str, category: str) -> float:
    labels = {"category": category, "rule": rule, "action": action}
    return REGISTRY.get_sample_value("pushgw_policy_decisions_total", labels) or 0.0


async def test_opt_outs_drop_only_what_the_user_refused(redis: aioredis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    profiles = Profiles(redis, keys)
    await profiles.update("learner-1", {"opt_out": {"categories": ["new_content"]}})
    await profiles.update("learner-2", {"opt_out": {"all": True}})
    policy = DeliveryPolicy(redis, keys, LEARNING)
    lunch = paris(2026, 11, 25, 12, 30)
    before = count("opt_out", "dropped", "new_content"), count("opt_out", "dropped", "reminder")
    out = await policy.decide([
        msg(1, "new_content"), msg(2, "reminder"),  # learner-1: new_content refused, reminders welcome
        msg(3, "reminder", "learner-2"), msg(4, "account", "learner-2"),  # learner-2: all, but account is exempt
        msg(5, "new_content", "learner-3"),  # no preferences stored
        msg(6, "new_content", None, devices=(Device("fcm", "t"),)),  # device-targeted: no user to ask
    ], lunch)
    assert out == [Drop("opted_out"), Admit(), Drop("opted_out"), Admit(), Admit(), Admit()]
    assert count("opt_out", "dropped", "new_content") - before[0] == 1
    assert count("opt_out", "dropped", "reminder") - before[1] == 1


async def test_windows_defer_to_the_learners_next_window_with_jitter(redis: aioredis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    await Profiles(redis, keys).update("learner-ny", {"timezone": "America/New_York"})
    policy = DeliveryPolicy(redis, keys, LEARNING)
    night = paris(2026, 11, 25, 23, 15)  # 17:15 in New York
    before = count("window", "deferred", "reminder")
    out = await policy.decide([
        msg(1), msg(2, user="learner-ny"), msg(3, priority="high"), msg(4, "account"), msg(5, "reward"),
    ], night, members=["m-1:1", "m-2:1", "m-3:1", "m-4:1", "m-5:1"])
    d1, d2 = out[0], out[1]
    assert isinstance(d1, Defer) and d1.reason == "window"
    assert paris(2026, 11, 26, 7, 30) <= d1.until <= paris(2026, 11, 26, 7, 45)  # jitter <= 900 s
    assert isinstance(d2, Defer) and night + 15 * 60 <= d2.until <= night + 30 * 60  # 17:30 New York time
    assert out[2:] == [Admit(), Admit(), Defer(out[4].until, "window")]  # type: ignore[union-attr]
    assert isinstance(out[4], Defer) and paris(2026, 11, 26, 7, 0) <= out[4].until <= paris(2026, 11, 26, 7, 15)
    assert count("window", "deferred", "reminder") - before == 2
    # The same message decided again gets the same time (its jitter is a hash, not a draw).
    again = await policy.decide([msg(1)], night + 60, members=["m-1:1"])
    assert again == [d1]
    # ...and the answer remembered per (category, zone) is the one a policy computing afresh gives.
    fresh = DeliveryPolicy(redis, keys, LEARNING)
    for later in (night + 3600, paris(2026, 11, 26, 7, 29), paris(2026, 11, 26, 9, 30)):
        assert await policy.decide([msg(7)], later, members=["m-7:1"]) == await fresh.decide([msg(7)], later,
                                                                                          members=["m-7:1"])
        fresh = DeliveryPolicy(redis, keys, LEARNING)
    # With bypass off, high priority waits too.
    strict = DeliveryPolicy(redis, keys, PolicySettings(windows=LEARNING.windows, high_bypasses_windows=False))
    [d] = await strict.decide([msg(3, priority="high")], night)
    assert isinstance(d, Defer)


async def test_opt_outs_also_stop_retries_and_re_reads_but_windows_do_not(redis: aioredis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    await Profiles(redis, keys).update("learner-1", {"opt_out": {"categories": ["reminder"]}})
    policy = DeliveryPolicy(redis, keys, LEARNING)
    night = paris(2026, 11, 25, 23, 15)
    retry = msg(1).with_devices((Device("fcm", "t"),))  # a retry aims at one device, `resolved`
    out = await policy.decide([retry, msg(2), msg(3, "reward"), msg(4, "reward")], night,
                              first_read=[True, False, False, True])
    # opted out: dropped, even as a retry or a re-read; a re-read reward is not held for the window again
    assert out[:3] == [Drop("opted_out"), Drop("opted_out"), Admit()]
    assert isinstance(out[3], Defer)


async def test_preferences_validation(redis: aioredis.Redis, prefix: str) -> None:
    profiles = Profiles(redis, Keys(prefix))
    with pytest.raises(MessageInvalid) as e:
        await profiles.update("learner-1", {"timezone": "Europe/Atlantis", "opt_out": {"all": "yes", "categories": ["A B"]},
                                            "colour": 1})
    assert {err.field for err in e.value.errors} == {"$", "timezone", "opt_out.all", "opt_out.categories"}
    with pytest.raises(MessageInvalid):
        await profiles.update("not a user id", {})
    assert await profiles.get("learner-1") == Preferences()  # nothing stored by a rejected update
    # PATCH semantics by default: fields not named are kept; merge=False replaces.
    await profiles.update("learner-1", {"timezone": "Asia/Kolkata"})
    await profiles.update("learner-1", {"opt_out": {"categories": ["reward"]}})
    assert await profiles.get("learner-1") == Preferences("Asia/Kolkata", False, frozenset({"reward"}))
    await profiles.update("learner-1", {"opt_out": {"all": True}}, merge=False)
    assert await profiles.get("learner-1") == Preferences(None, True, frozenset())


class _Sink:
    name = "fcm"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, delivery: Delivery) -> Outcome:
        self.sent.append(delivery.message.id)
        return Delivered()

    async def close(self) -> None:
        return None


async def _run_until(worker: Worker, done: Callable[[], Any], rounds: int = 300) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(rounds):
            if await done():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the worker did not reach the expected state")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_worker_holds_night_messages_until_the_morning_and_drops_what_would_expire(
    redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    await DeviceRegistry(redis, keys).register("learner-1", Device("fcm", "tok-1"))
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    now = [paris(2026, 11, 25, 23, 15)]
    settings = Settings(redis=RedisSettings(prefix=prefix), worker=WorkerSettings(block_ms=20, janitor_interval_s=0.05),
                        policy=LEARNING)
    sink = _Sink()
    worker = Worker(settings, redis, {"fcm": sink}, consumer="w", limiter=DeliveryPolicy(redis, keys, LEARNING),
                    clock=lambda: now[0])
    expired_before = count("expired", "dropped", "reminder")
    await q.enqueue([
        msg("tonight"),  # waits for 07:30 Paris
        msg("short", ttl=3600),  # would be useless by the morning: dropped now
        msg("urgent", priority="high"),  # a session starting now: bypasses the window
    ], now_ms=int(now[0] * 1000))

    async def settled() -> bool:
        st = await q.stats()
        return st.lag == 0 and st.pending == 0 and await redis.zcard(keys.delayed) == 1 and sink.sent == ["m-urgent"]

    await _run_until(worker, settled)
    assert count("expired", "dropped", "reminder") - expired_before == 1
    [(_member, due)] = await redis.zrange(keys.delayed, 0, -1, withscores=True)
    assert paris(2026, 11, 26, 7, 30) <= due <= paris(2026, 11, 26, 7, 45)
    # Morning: the mover brings it back, the window is open, the cap has room: delivered once.
    now[0] = due + 1

    async def delivered() -> bool:
        return sink.sent == ["m-urgent", "m-tonight"] and await redis.zcard(keys.delayed) == 0

    await _run_until(worker, delivered)


async def test_send_at_holds_a_message_and_ttl_counts_from_then(redis: aioredis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    t0 = 1_900_000_000.0
    m = parse_message({"id": "s1", "user": "u", "body": "Live session at 9", "send_at": t0 + 3600, "ttl": 900}, now=t0)
    assert m.expiry(t0) == t0 + 3600 + 900  # ttl from send_at, not from the enqueue
    assert await q.enqueue([m], now_ms=int(t0 * 1000)) == [True]
    assert await q.enqueue([m], now_ms=int(t0 * 1000)) == [False]  # idempotent like any enqueue
    assert await redis.xlen(keys.stream) == 0 and await redis.zcard(keys.delayed) == 1
    assert await q.move_due(t0 + 3599) == 0
    assert await q.move_due(t0 + 3600) == 1
    [entry] = await q.read_new("c", 10, None)
    assert entry.enqueued_ms == int((t0 + 3600) * 1000)  # latency and ttl count from when it became due
    # send_at in the past means now; validation errors name the field
    past = parse_message({"id": "s2", "user": "u", "body": "b", "send_at": t0 - 5}, now=t0)
    assert await q.enqueue([past], now_ms=int(t0 * 1000)) == [True] and await redis.xlen(keys.stream) == 2
    for bad, field in (({"send_at": "tomorrow"}, "send_at"), ({"send_at": t0 + 400 * 86400}, "send_at"),
                       ({"send_at": t0 + 100, "expires_at": t0 + 50}, "send_at")):
        with pytest.raises(MessageInvalid) as e:
            parse_message({"id": "x", "user": "u", "body": "b", **bad}, now=t0)
        assert [err.field for err in e.value.errors] == [field]


async def test_scheduler_moves_each_item_exactly_once_with_concurrent_movers(redis: aioredis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    q = StreamQueue(redis, keys)
    await q.ensure_group()
    t0 = 1_900_000_000.0
    n = 20_000
    messages = [Message(id=f"sched-{i}", user=f"u{i % 50}", body="b", send_at=t0 + 60 + (i % 100),
                        priority="high" if i % 10 == 0 else "normal") for i in range(n)]
    for i in range(0, n, 500):
        await q.enqueue(messages[i:i + 500], now_ms=int(t0 * 1000))
    assert await redis.zcard(keys.delayed) == n
    assert await q.move_due(t0 + 59) == 0  # nothing is due early

    async def mover() -> int:
        moved = 0
        while True:
            k = await q.move_due(t0 + 200, 500)
            moved += k
            if k == 0:
                return moved

    counts = await asyncio.gather(*(mover() for _ in range(4)))
    assert sum(counts) == n
    ids = []
    for stream in (keys.stream, keys.stream_high):
        ids += [json.loads(f[b"m"])["id"] for _, f in await redis.xrange(stream)]
    assert len(ids) == n and len(set(ids)) == n
    assert await redis.xlen(keys.stream_high) == n // 10  # each went to its priority's lane
    assert await redis.zcard(keys.delayed) == 0 and await redis.hlen(keys.delayed_data) == 0


async def test_preferences_through_the_api_and_the_client(redis: aioredis.Redis, prefix: str) -> None:
    settings = Settings(redis=RedisSettings(prefix=prefix),
                        api=ApiSettings(clients=(ApiClient("app", TOKEN, ("enqueue", "devices")),
                                                 ApiClient("sender", TOKEN[::-1], ("enqueue",)))))
    client = TestClient(TestServer(create_app(settings, redis)))
    await client.start_server()
    try:
        h = {"Authorization": f"Bearer {TOKEN}"}
        resp = await client.put("/v1/users/learner-9/preferences", json={"timezone": "Europe/Paris"}, headers=h)
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"timezone": "Europe/Paris", "opt_out": {"all": False, "categories": []}}
        resp = await client.patch("/v1/users/learner-9/preferences", json={"opt_out": {"categories": ["reward"]}},
                                  headers=h)
        assert (await resp.json())["timezone"] == "Europe/Paris"
        resp = await client.get("/v1/users/learner-9/preferences", headers=h)
        assert await resp.json() == {"timezone": "Europe/Paris", "opt_out": {"all": False, "categories": ["reward"]}}
        resp = await client.patch("/v1/users/learner-9/preferences", json={"timezone": "Nowhere/City"}, headers=h)
        assert resp.status == 422 and (await resp.json())["error"]["fields"][0]["field"] == "timezone"
        resp = await client.get("/v1/users/learner-9/preferences", headers={"Authorization": f"Bearer {TOKEN[::-1]}"})
        assert resp.status == 403  # the enqueue-only client may not read preferences
        resp = await client.get("/v1/users/learner-9/preferences")
        assert resp.status == 401
    finally:
        await client.close()
    pc = PushClient(redis, settings)
    prefs = await pc.set_preferences("learner-9", opt_out_all=True)
    assert prefs == Preferences("Europe/Paris", True, frozenset({"reward"}))
    assert await pc.set_preferences("learner-9", timezone=None) == Preferences(None, True, frozenset({"reward"}))


def test_preferences_through_the_cli(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}cli"\n')
    assert main(["--config", str(cfg), "prefs", "learner-9", "--opt-out-all"]) == 0
    assert json.loads(capsys.readouterr().out) == {"timezone": None, "opt_out": {"all": True, "categories": []}}
    assert main(["--config", str(cfg), "prefs", "learner-9", "--timezone", "Asia/Kolkata", "--opt-in-all",
                 "--opt-out", "reward,new_content"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"timezone": "Asia/Kolkata", "opt_out": {"all": False, "categories": ["new_content", "reward"]}}
    assert main(["--config", str(cfg), "prefs", "learner-9"]) == 0  # no option: show
    assert json.loads(capsys.readouterr().out) == out
    assert main(["--config", str(cfg), "prefs", "learner-9", "--timezone", "Mars/Base"]) == 2
    assert "timezone" in capsys.readouterr().err


def test_policy_config_from_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text("""
[policy]
windows = ["07:30-09:00", "17:30-21:00"]
timezone = "Europe/Paris"
opt_out_exempt = ["account"]
[policy.category_windows]
account = []
reward = ["07:00-22:00"]
[policy.provider_rates]
fcm = 10000
"apns:learner-ios" = 500
""")
    s = load_settings(cfg, env={})
    assert s.policy.enabled and s.policy.windows_for("reward") == ("07:00-22:00",)
    assert s.policy.windows_for("account") == () and s.policy.windows_for("reminder") == ("07:30-09:00", "17:30-21:00")
    assert s.policy.provider_rates == (("fcm", 10000.0), ("apns:learner-ios", 500.0))
    for bad, needle in (('[policy]\nwindows = ["7-9"]', "send window"), ('[policy]\ntimezone = "Mars/Base"', "time zone"),
                        ('[policy.provider_rates]\nsms = 5', "name a provider"), ('[policy.provider_rates]\nfcm = 0', "> 0"),
                        ('[policy.category_windows]\nreward = "07:00-22:00"', "list"),
                        ('[policy]\nopt_out_exempt = ["Account"]', "not a category"),
                        ('[policy.category_windows]\nRewards = []', "not a category"),
                        ('[worker]\nhigh_weight = 0', "high_weight")):
        cfg.write_text(bad)
        with pytest.raises(ConfigError, match=needle):
            load_settings(cfg, env={})


async def test_a_batchs_devices_and_preferences_come_in_one_command(redis: aioredis.Redis, keys: Keys) -> None:
    """The worker's read for a batch with the policy on: what `Profiles.get_many` and `devices_many` answer
    apart, in one Redis command (on a cluster, one shard's keys)."""
    profiles, registry = Profiles(redis, keys), DeviceRegistry(redis, keys)
    await profiles.update("learner-1", {"timezone": "Asia/Kolkata", "opt_out": {"categories": ["new_content"]}})
    await profiles.update("learner-2", {"opt_out": {"all": True}})
    await registry.register("learner-1", Device("fcm", "tok-1"))
    await registry.register("learner-1", Device("apns", "a" * 64))
    await registry.register("learner-3", Device("fcm", "tok-3"))
    users, pref_users = ["learner-1", "learner-3", "learner-4"], ["learner-1", "learner-2", "learner-3"]
    await registry.devices_and_preferences(users, pref_users)  # loads the script
    before = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    batch = await registry.devices_and_preferences(users, pref_users)
    assert (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"] - before == 1
    assert batch.preferences == await profiles.get_many(pref_users)
    assert batch.preferences["learner-1"] == Preferences("Asia/Kolkata", False, frozenset({"new_content"}))
    assert "learner-3" not in batch.preferences  # nothing stored: the policy's defaults
    assert {u: sorted(d.key for d in ds) for u, ds in batch.devices.items()} == {
        u: sorted(d.key for d in ds) for u, ds in (await registry.devices_many(users)).items()}
    assert set(batch.devices) == {"learner-1", "learner-3"} and len(batch.devices["learner-1"]) == 2
