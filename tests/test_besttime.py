"""Best send time, measured on a simulation: learners in several time zones who each open their pushes at
their own hour (plus noise, plus a night owl outside the send windows) report those opens through the API;
then a message, a campaign variant and an automation rule ask for `send_time: "best"`, and each learner's
push is scheduled in their hour. The fallbacks (cohort, window start) are pinned at fixed instants.
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from pushgw.campaigns.besttime import HALF_LIFE_S, MIN_OPENS, BestTimes, best_hour, weight
from pushgw.campaigns.fanout import FanoutRunner
from pushgw.core.config import ApiClient, ApiSettings, PolicySettings, RedisSettings, Settings
from pushgw.core.schema import MessageInvalid
from pushgw.gateway.api.app import create_app
from pushgw.gateway.intake import Intake
from pushgw.queue.keys import Keys

PREFIX = "besttest"
K = Keys(PREFIX)
TOKEN = "besttime-token-0123456789"
SETTINGS = Settings(redis=RedisSettings(prefix=PREFIX),
                    policy=PolicySettings(windows=("07:00-22:00",), timezone="UTC"),
                    api=ApiSettings(clients=(ApiClient("lms", TOKEN, ("enqueue", "devices", "campaigns", "events")),)))
H = {"Authorization": f"Bearer {TOKEN}"}
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney", "America/Sao_Paulo")
TEMPLATE = {"default_locale": "en", "variables": {"quiz": "a quiz", "score": "a good score"},
            "locales": {"en": {"title": "New module", "body": "It is open ({quiz}, {score})"}}}


def simulated_learners(rng: random.Random) -> dict[str, tuple[str, int]]:
    """learner -> (time zone, the local hour they open at); hours inside the 07:00-22:00 window."""
    return {f"learner-{i}": (ZONES[i % len(ZONES)], rng.randrange(7, 22)) for i in range(12)}


def opens_of(tz: str, hour: int, days: int, now: float, rng: random.Random, noise: float = 0.3) -> list[float]:
    """One open a day at `hour` local (a random minute), and on some days one at another hour of the window."""
    zone = ZoneInfo(tz)
    today = datetime.fromtimestamp(now, zone).replace(minute=0, second=0, microsecond=0)
    out = []
    for d in range(1, days + 1):
        day = today - timedelta(days=d)
        out.append(day.replace(hour=hour, minute=rng.randrange(60)).timestamp())
        if rng.random() < noise:
            out.append(day.replace(hour=rng.randrange(7, 22), minute=rng.randrange(60)).timestamp())
    return out


async def waiting(redis: aioredis.Redis) -> dict[str, dict[str, Any]]:
    """user -> the scheduled message (the delayed set's data)."""
    return {m["user"]: m for m in (json.loads(v) for v in (await redis.hgetall(K.delayed_data)).values())}


def local_hour(ts: float, tz: str) -> int:
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).hour


async def test_best_time_lands_each_simulated_learners_push_in_their_hour(redis: aioredis.Redis) -> None:
    rng = random.Random(16)
    learners = simulated_learners(rng)
    learners["owl"] = ("Europe/Paris", 20)  # opens at 02:00 most nights: outside the window, so 20:00 wins
    api = TestClient(TestServer(create_app(SETTINGS, redis)))
    await api.start_server()
    try:
        assert (await api.put("/v1/templates/news", headers=H, json=TEMPLATE)).status == 200
        now = time.time()
        events = []
        for user, (tz, hour) in learners.items():
            assert (await api.put(f"/v1/users/{user}/attributes", headers=H, json={"timezone": tz})).status == 200
            ats = opens_of(tz, hour, 12, now, rng) if user != "owl" else (
                opens_of(tz, 2, 12, now, rng, noise=0) + opens_of(tz, 20, 5, now, rng, noise=0))
            events += [{"type": "opened", "campaign": "weekly-news", "user": user, "at": at} for at in ats]
        resp = await api.post("/v1/events", headers=H, json={"events": events})
        assert resp.status == 202, await resp.text()
        # 1. a message asking for the best time
        msgs = [{"id": f"best-{u}", "user": u, "body": "New module", "send_time": "best"} for u in learners]
        resp = await api.post("/v1/messages/batch", headers=H, json={"messages": msgs})
        assert resp.status == 202, await resp.text()
        scheduled = await waiting(redis)
        for user, (tz, hour) in learners.items():
            send_at = scheduled[user]["send_at"]
            assert local_hour(send_at, tz) == hour, (user, tz, hour)
            assert now < send_at <= now + 86400 + 1800  # within the next 24 h (plus the jitter inside the hour)
        await redis.delete(K.delayed, K.delayed_data)
        # 2. a campaign comparing a best-time variant with a fixed local time
        campaign = {"id": "best-vs-fixed", "template": "news", "audience": {"topic": "news"},
                    "variants": [{"name": "best", "send_time": "best"}, {"name": "evening", "local_time": "18:00"}]}
        for user in learners:
            await api.patch(f"/v1/users/{user}/attributes", headers=H, json={"topics": ["news"]})
        assert (await api.post("/v1/campaigns", headers=H, json=campaign)).status == 201
        assert (await api.post("/v1/campaigns/best-vs-fixed/launch", headers=H, json={"percent": 100})).status == 202
        assert await FanoutRunner(redis, SETTINGS).run_pending() == 1
        scheduled = await waiting(redis)
        arms = {m["variant"] for m in scheduled.values()}
        assert arms == {"best", "evening"}
        for user, m in scheduled.items():
            tz, hour = learners[user]
            assert local_hour(m["send_at"], tz) == (hour if m["variant"] == "best" else 18)
        resp = await api.get("/v1/campaigns/best-vs-fixed/report", headers=H)
        assert [a["arm"] for a in (await resp.json())["arms"]] == ["best", "evening"]
        await redis.delete(K.delayed, K.delayed_data)
        # 3. an automation rule whose timing is the best time
        rule = {"trigger": "quiz_completed", "template": "news", "timing": {"send_time": "best"}}
        assert (await api.put("/v1/automations/quiz-best", headers=H, json=rule)).status == 201
        quizzes = [{"type": "quiz_completed", "id": f"q-{u}", "user": u, "quiz": "q1", "score": 90} for u in learners]
        assert (await api.post("/v1/events", headers=H, json={"events": quizzes})).status == 202
        scheduled = await waiting(redis)
        assert {u: local_hour(m["send_at"], learners[u][0]) for u, m in scheduled.items()} == {
            u: hour for u, (_, hour) in learners.items()}
    finally:
        await api.close()


async def test_fallbacks_the_cohort_then_the_window_start(redis: aioredis.Redis) -> None:
    intake = Intake(redis, SETTINGS)
    rng = random.Random(7)
    now = datetime(2026, 12, 4, 23, 30, tzinfo=ZoneInfo("UTC")).timestamp()  # the window (07-22) is closed
    attrs = {"a1": 19, "a2": 19, "a3": 9}
    for user in (*attrs, "newbie"):
        await redis.hset(K.user(user), mapping={"attrs": json.dumps({"cohort": "2026-a"})})
    await redis.hset(K.user("stranger"), mapping={"attrs": "{}"})
    best = BestTimes(redis, K, SETTINGS.policy)
    for user, hour in attrs.items():
        await best.record_opens([(user, at) for at in opens_of("UTC", hour, 5, now, rng, noise=0)], now)
    # a made-up learner's opens are not kept (the events scope cannot grow Redis)
    await best.record_opens([("made-up", now - 60)], now)
    assert not await redis.exists(K.opens("made-up"))
    objs = [{"id": f"m-{u}", "user": u, "body": "x", "send_time": "best"} for u in ("a3", "newbie", "stranger")]
    out = await intake.best_times(objs, now)
    assert [local_hour(o["send_at"], "UTC") for o in out] == [9, 19, 7]  # own hour, the cohort's, the window start
    assert all("send_time" not in o for o in out)
    objs[0] = objs[0] | {"send_at": now + 60}
    with pytest.raises(MessageInvalid) as refused:
        await intake.best_times([*objs, {"user": "x", "body": "y", "send_time": "soon"}], now)
    assert [f.field for f in refused.value.errors] == ["messages[0].send_time", "messages[3].send_time"]


def test_old_opens_weigh_half_per_half_life_and_too_few_opens_decide_nothing() -> None:
    now = 1_800_000_000.0
    assert abs(weight(now - HALF_LIFE_S) / weight(now) - 0.5) < 1e-12
    # 8 opens at 08:00 two half-lives ago (2 today) lose to 3 recent ones at 18:00
    counts = {8: 8 * weight(now - 2 * HALF_LIFE_S), 18: 3 * weight(now)}
    assert best_hour(counts, list(range(24)), now) == 18
    assert best_hour(counts, [8, 9], now) is None  # only 2 decayed opens inside these hours: too few
    assert best_hour({18: (MIN_OPENS - 0.5) * weight(now)}, list(range(24)), now) is None
