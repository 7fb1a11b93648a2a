"""Engagement campaigns on a real Redis: assignment, pilots and control groups, templates, fan-out, events, reports.

Figures the tests compare against are computed here, independently: assignment by re-implementing
the documented hash rule, report counts from the events the test itself sent, intervals by solving
the Wilson quadratic directly, p-values with `statistics.NormalDist` instead of `math.erfc`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from pushgw.campaigns.audiences import UserAttributes, parse_audience
from pushgw.campaigns.experiments import CONTROL, Stage, message_id, parse_campaign, parse_message_id
from pushgw.campaigns.fanout import CampaignError, FanoutRunner
from pushgw.campaigns.report import two_proportion, wilson
from pushgw.campaigns.templates import RenderError, parse_template
from pushgw.core.config import ApiClient, ApiSettings, RedisSettings, Settings, WorkerSettings
from pushgw.core.schema import Device, MessageInvalid
from pushgw.gateway.api.app import create_app
from pushgw.gateway.cli import main
from pushgw.gateway.client import PushClient
from pushgw.gateway.worker import Worker
from pushgw.providers.base import Delivered, Delivery, Outcome, Retry, TokenInvalid
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA
from pushgw.queue.connection import redis_from_url
from pushgw.queue.keys import Keys
from pushgw.ratelimit.policy import DeliveryPolicy
from pushgw.users.profiles import Profiles
from pushgw.users.registry import DeviceRegistry

ALSO_ON_CLUSTER = True  # every test using `redis` also runs on the 1-node cluster (tests/conftest.py)

PREFIX = "cmptest"
TOKEN = "campaign-test-token-0123456789"
EVENTS_TOKEN = "events-only-token-0123456789"
SETTINGS = Settings(
    redis=RedisSettings(prefix=PREFIX),
    worker=WorkerSettings(block_ms=20, janitor_interval_s=0.05, backoff_base_s=0.01, backoff_cap_s=0.05),
    api=ApiSettings(clients=(ApiClient("marketing", TOKEN, ("enqueue", "devices", "campaigns", "events")),
                             ApiClient("app-backend", EVENTS_TOKEN, ("events",)))),
)
KEYS = Keys(PREFIX)



@dataclass(frozen=True)
class Mode:
    """The deployment's settings and keys: on the cluster every key under one hash tag, as one shard's are."""

    settings: Settings
    keys: Keys


@pytest.fixture
def mode(in_cluster: bool) -> Mode:
    if not in_cluster:
        return Mode(SETTINGS, KEYS)
    prefix = "{" + PREFIX + "}"
    return Mode(replace(SETTINGS, redis=RedisSettings(prefix=prefix)), Keys(prefix))


@pytest.fixture
async def single_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """One Redis only: for a test that also starts `pushgw worker` processes on `redis_url`."""
    client = redis_from_url(redis_url)
    await client.flushall()
    yield client
    await client.aclose()

TEMPLATE = {
    "default_locale": "en",
    "variables": {"first_name": "there", "module_title": None, "link": None, "score": "80"},
    "locales": {
        "en": {"title": "New module: {module_title}", "body": "Hi {first_name}, {module_title} is open",
               "data": {"link": "{link}"}},
        "fr": {"title": "Nouveau module : {module_title}", "body": "Bonjour {first_name}, {module_title} est ouvert",
               "data": {"link": "{link}"}},
        "pt": {"title": "Novo módulo: {module_title}", "body": "Olá {first_name}, {{novo}} {module_title}"},
    },
}


def h64(campaign: str, user: str, salt: str) -> int:
    """The documented rule, written again: blake2b-64 of campaign, salt and user, separated by 0x1f."""
    return int.from_bytes(hashlib.blake2b(f"{campaign}\x1f{salt}\x1f{user}".encode(), digest_size=8).digest(), "big")


def expected_arm(campaign: str, user: str, control: float, stages: list[tuple[float, dict[str, float]]]) -> str | None:
    if h64(campaign, user, "control") < int(control * 100) * 2**64 // 10000:
        return CONTROL
    s = h64(campaign, user, "stage")
    for percent, weights in sorted(stages, key=lambda st: st[0]):
        if s < int(percent * 100) * 2**64 // 10000:
            names = [n for n, w in weights.items() if w > 0]
            total = sum(weights[n] for n in names)
            x = h64(campaign, user, "variant") / 2**64 * total
            acc = 0.0
            for n in names:
                acc += weights[n]
                if x < acc:
                    return n
            return names[-1]
    return None


async def queued_messages(redis: aioredis.Redis, keys: Keys = KEYS) -> list[dict[str, Any]]:
    """Every message in both lanes' streams and the delayed set (what the fan-out queued)."""
    out = []
    for stream in (keys.stream, keys.stream_high):
        out += [json.loads(f[b"m"]) for _, f in await redis.xrange(stream)]
    out += [json.loads(v) for v in (await redis.hgetall(keys.delayed_data)).values()]
    return out


# ---------------------------------------------------------------------------- assignment


def test_assignment_is_deterministic_and_matches_the_weights() -> None:
    c = parse_campaign({"id": "ab-weights", "template": "t", "audience": {"topic": "news"}, "control_percent": 10,
                        "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}, now=0)
    users = [f"learner-{i}" for i in range(40_000)]
    stages = [Stage(100.0)]
    arms = [c.arm(u, stages) for u in users]
    assert arms == [c.arm(u, stages) for u in users]  # same learner, same arm, every time
    assert arms == [expected_arm("ab-weights", u, 10, [(100, {"a": 1, "b": 3})]) for u in users]
    n = Counter(arms)
    # Binomial bounds at 4.5 standard deviations (a false alarm about once in 150,000 runs of a new hash).
    def within(count: int, total: int, p: float) -> bool:
        return abs(count - total * p) <= 4.5 * math.sqrt(total * p * (1 - p))

    assert within(n[CONTROL], len(users), 0.10)
    treated = n["a"] + n["b"]
    assert within(n["b"], treated, 0.75) and within(n["a"], treated, 0.25)
    # The variant does not depend on the stage: a pilot learner keeps their variant at rollout.
    pilot = [c.arm(u, [Stage(10.0)]) for u in users]
    for p, full in zip(pilot, arms, strict=True):
        if p is not None:
            assert p == full
    # Message ids carry campaign and user, and parse back.
    assert parse_message_id(message_id("ab-weights", "u:1")) == ("ab-weights", "u:1")
    assert parse_message_id(message_id("ab-weights", "u:1", 2)) == ("ab-weights", "u:1")
    assert parse_message_id("quiz-42") is None


# ---------------------------------------------------------------------------- templates


def test_templates_render_every_locale_and_refuse_broken_texts() -> None:
    t = parse_template("new-module", TEMPLATE)
    for loc in t.locales:
        r = t.render({"module_title": "Statistics 2", "link": "/m/2", "first_name": "Ana"}, loc)
        assert r.locale == loc
        for text in (r.title, r.body, *r.data.values()):
            assert text and "Statistics 2" in (r.title or "") and "{" not in text.replace("{novo}", "")
    assert t.render({"module_title": "S", "link": "/l"}, "pt").body == "Olá there, {novo} S"  # fallback and literal brace
    assert t.render({"module_title": "S", "link": "/l"}, "pt-BR").locale == "pt"  # language fallback
    assert t.render({"module_title": "S", "link": "/l"}, "de").locale == "en"  # missing locale: the default
    strict = parse_template("strict", TEMPLATE | {"missing_locale": "error"})
    with pytest.raises(RenderError) as e:
        strict.render({"module_title": "S", "link": "/l"}, "de")
    assert e.value.field == "locale"
    with pytest.raises(RenderError) as e:
        t.render({"link": "/l"}, "fr")  # module_title is required: never "Nouveau module : "
    assert e.value.field == "vars.module_title"
    # Validation names every field at fault.
    bad = {"default_locale": "es", "variables": {"first_name": None, "Bad": "x"},
           "locales": {"en": {"title": "Hi {frist_name}", "body": "{first_name} } oops"}, "EN_us": {"body": "x"},
                       "fr": {"data": {"k": "v"}}}}
    with pytest.raises(MessageInvalid) as err:
        parse_template("t", bad)
    fields = {x.field for x in err.value.errors}
    assert {"default_locale", "variables.Bad", "locales.en.title", "locales.en.body", "locales.EN_us", "locales.fr"} <= fields


async def test_a_message_may_name_a_template_instead_of_a_text(mode: Mode, redis: aioredis.Redis) -> None:
    client = PushClient(redis, mode.settings)
    await client.save_template("quiz-passed", {
        "default_locale": "en", "variables": {"first_name": "there", "score": None},
        "locales": {"en": {"title": "Well done {first_name}!", "body": "You scored {score}%"},
                    "fr": {"title": "Bravo {first_name} !", "body": "Vous avez obtenu {score} %"}}})
    await client.set_attributes("learner-7", {"first_name": "Léa", "locale": "fr-FR"})
    [(mid, queued)] = await client.send_many([{"id": "quiz-1", "user": "learner-7", "template": "quiz-passed",
                                                "vars": {"score": "87"}, "category": "reward"}])
    assert queued and mid == "quiz-1"
    [m] = await queued_messages(redis, mode.keys)
    assert (m["title"], m["body"]) == ("Bravo Léa !", "Vous avez obtenu 87 %")
    with pytest.raises(MessageInvalid) as e:
        await client.send_many([{"user": "learner-7", "template": "quiz-passed"},
                                {"user": "learner-7", "template": "nope"},
                                {"user": "learner-7", "template": "quiz-passed", "vars": {"score": "1"}, "body": "x"}])
    assert [x.field for x in e.value.errors] == ["messages[0].vars.score", "messages[1].template", "messages[2].body"]
    assert len(await queued_messages(redis, mode.keys)) == 1  # all or nothing


# ---------------------------------------------------------------------------- audiences and fan-out


async def test_audience_filters_and_attribute_indexes(mode: Mode, redis: aioredis.Redis) -> None:
    attrs = UserAttributes(redis, mode.keys)
    await attrs.update("u1", {"cohort": "intermediate", "track": "data", "skills": ["python", "sql"], "topics": ["news"]})
    await attrs.update("u2", {"cohort": "intermediate", "track": "web", "skills": ["js"], "locale": "fr"})
    await attrs.update("u3", {"cohort": "advanced", "track": "data", "skills": ["python"], "topics": ["news"]})
    client = PushClient(redis, mode.settings)
    assert await client.audience_size({"filter": {"cohort": "intermediate"}}) == 2
    assert await client.audience_size({"filter": {"cohort": ["intermediate", "advanced"], "skill": "python"}}) == 2
    assert await client.audience_size({"filter": {"track": "data", "cohort": "advanced"}}) == 1
    assert await client.audience_size({"topic": "news"}) == 2
    # A change moves the learner between index sets; time zone and opt-outs (preferences) are kept apart.
    await Profiles(redis, mode.keys).update("u1", {"opt_out": {"categories": ["reward"]}})
    await attrs.update("u1", {"cohort": "advanced", "timezone": "Asia/Tokyo"})
    assert await client.audience_size({"filter": {"cohort": "intermediate"}}) == 1
    assert (await Profiles(redis, mode.keys).get("u1")).opt_out_categories == {"reward"}
    assert (await Profiles(redis, mode.keys).get("u1")).timezone == "Asia/Tokyo"  # the send-window policy sees it
    assert (await attrs.get("u1")).skills == ("python", "sql")  # PATCH keeps what it does not name
    await attrs.update("u1", {"cohort": "beginner"}, merge=False)
    assert (await attrs.get("u1")).skills == () and await client.audience_size({"filter": {"skill": "sql"}}) == 0
    with pytest.raises(MessageInvalid) as e:
        await attrs.update("u1", {"cohort": "Not Valid", "timezone": "Mars/Base", "colour": 1})
    assert {x.field for x in e.value.errors} == {"$", "cohort", "timezone"}
    with pytest.raises(MessageInvalid):
        parse_audience({"filter": {"shoe_size": "42"}})


async def _import(client: PushClient, n: int, cohort: Callable[[int], str] = lambda i: "intermediate") -> list[str]:
    users = [f"learner-{i}" for i in range(n)]
    await client.import_attributes((u, {"first_name": f"L{i}", "cohort": cohort(i), "locale": ("en", "fr", "pt-BR")[i % 3],
                                        "topics": ["module-news"]}) for i, u in enumerate(users))
    return users


async def _setup_campaign(client: PushClient, cid: str, control: float = 10, **extra: Any) -> None:
    await client.save_template("new-module", TEMPLATE)
    await client.save_template("new-module-social", TEMPLATE | {"locales": {
        "en": {"title": "{module_title}", "body": "{first_name}, 200 learners of your cohort started {module_title}"},
        "fr": {"title": "{module_title}", "body": "{first_name}, 200 personnes de votre promo ont commencé {module_title}"}}})
    await client.create_campaign({
        "id": cid, "template": "new-module", "audience": {"filter": {"cohort": "intermediate"}},
        "vars": {"module_title": "Statistics 2", "link": "/modules/stats-2"}, "control_percent": control,
        "variants": [{"name": "plain", "weight": 1}, {"name": "social", "weight": 1, "template": "new-module-social"}],
        **extra})


async def test_pilot_control_group_and_rollout_get_exactly_their_share(mode: Mode, redis: aioredis.Redis) -> None:
    client = PushClient(redis, mode.settings)
    users = await _import(client, 6000, lambda i: "beginner" if i % 5 == 0 else "intermediate")
    audience = [u for i, u in enumerate(users) if i % 5]
    await _setup_campaign(client, "pilot-share", control=10)
    status = await client.launch_campaign("pilot-share", 10)
    assert status["fanout"]["state"] == "queued" and status["fanout"]["members"] == len(audience)
    with pytest.raises(CampaignError):
        await client.launch_campaign("pilot-share", 50)  # one fan-out at a time
    assert await FanoutRunner(redis, mode.settings, chunk=500).run_pending() == 1
    pilot_weights = {"plain": 1.0, "social": 1.0}
    expected = {u: expected_arm("pilot-share", u, 10, [(10, pilot_weights)]) for u in audience}
    got = {m["user"]: m["variant"] for m in await queued_messages(redis, mode.keys)}
    assert got == {u: a for u, a in expected.items() if a not in (None, CONTROL)}  # exactly the hash rule's pilot
    control = [u for u, a in expected.items() if a == CONTROL]
    job = (await client.campaign_status("pilot-share"))["fanout"]
    assert job["state"] == "done" and job["scanned"] == len(audience)
    assert (job["sent"], job["control"], job["failed"]) == (len(got), len(control), 0)
    assert job["sent"] + job["control"] + job["outside"] == len(audience)  # every member accounted for
    assert abs(len(got) - 0.1 * (len(audience) - len(control))) < 4.5 * math.sqrt(0.09 * len(audience))
    for m in await queued_messages(redis, mode.keys):
        assert m["campaign"] == "pilot-share" and m["id"] == message_id("pilot-share", m["user"])
        assert m["category"] == "new_content" and m["title"].endswith("Statistics 2")
    with pytest.raises(CampaignError):
        await client.launch_campaign("pilot-share", 10)  # a stage must grow
    # Rollout of the winner: the learners the pilot did not reach all get "social"; nobody gets a second message.
    await client.launch_campaign("pilot-share", 100, {"social": 1})
    assert await FanoutRunner(redis, mode.settings, chunk=700).run_pending() == 1
    stages = [(10.0, pilot_weights), (100.0, {"social": 1.0})]
    expected = {u: expected_arm("pilot-share", u, 10, stages) for u in audience}
    messages = await queued_messages(redis, mode.keys)
    assert len(messages) == len({m["id"] for m in messages}) == len({m["user"] for m in messages})
    got = {m["user"]: m["variant"] for m in messages}
    assert got == {u: a for u, a in expected.items() if a != CONTROL}
    assert {await client.assignment("pilot-share", u) for u in control} == {CONTROL}
    rollout = (await client.campaign_status("pilot-share"))["fanout"]
    assert rollout["sent"] == len(audience) - len(control) - job["sent"] and rollout["duplicates"] == 0
    kpi = {k.decode(): int(v) for k, v in (await redis.hgetall(mode.keys.kpi("pilot-share"))).items()}
    assert kpi[f"{CONTROL}:assigned"] == len(control)  # counted once, at the first stage
    assert kpi["plain:sent"] + kpi["social:sent"] == len(got)


async def test_fanout_of_100k_learners_survives_a_crash_and_accounts_for_everyone(mode: Mode, redis: aioredis.Redis) -> None:
    client = PushClient(redis, mode.settings)
    n = 100_000
    t0 = time.perf_counter()
    await _import(client, n)
    imported_s = time.perf_counter() - t0
    await _setup_campaign(client, "big-launch", control=5)
    await client.launch_campaign("big-launch", 100)
    # A runner dies after queueing its first chunk, before committing it: its lease expires, another runner redoes it.
    crashing = FanoutRunner(redis, mode.settings, lease_ms=300)
    crashing.crash_after_enqueue = True
    with pytest.raises(RuntimeError):
        await crashing.run_pending()
    t1 = time.perf_counter()
    stop = asyncio.Event()
    runners = [FanoutRunner(redis, mode.settings) for _ in range(2)]
    tasks = [asyncio.create_task(r.run(stop, poll_s=0.05)) for r in runners]
    try:
        status = await client.wait_for_fanout("big-launch", timeout_s=300, poll_s=0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t1
    job = status["fanout"]
    messages = await queued_messages(redis, mode.keys)
    ids = [m["id"] for m in messages]
    control = sum(1 for i in range(n) if expected_arm("big-launch", f"learner-{i}", 5, []) == CONTROL)
    assert job["members"] == job["scanned"] == n
    assert (job["control"], job["failed"], job["outside"]) == (control, 0, 0)
    assert job["sent"] == n - control == len(ids) == len(set(ids))  # every learner once, the redone chunk deduplicated
    assert job["duplicates"] > 0 and job["queued"] + job["duplicates"] == job["messages"]
    assert {m["user"] for m in messages} == {f"learner-{i}" for i in range(n)
                                             if expected_arm("big-launch", f"learner-{i}", 5, []) != CONTROL}
    print(f"\nimport of {n} learners: {imported_s:.1f} s; fan-out after the crash: {elapsed:.1f} s "
          f"({n / elapsed:,.0f} learners/s, runner's own time {job['seconds']:.1f} s)")


# ---------------------------------------------------------------------------- delivery, events and the report


class _Sink:
    """FCM stand-in: "gone" tokens are invalid, "flaky" ones need a retry, the rest are delivered."""

    name = "fcm"

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.flaky_seen: set[str] = set()

    async def send(self, delivery: Delivery) -> Outcome:
        token = delivery.device.token
        self.sent[delivery.message.id] += 1
        if token.startswith("gone"):
            return TokenInvalid("unregistered")
        if token.startswith("flaky") and token not in self.flaky_seen:
            self.flaky_seen.add(token)
            return Retry("503", after=0.0, status=503)
        return Delivered()

    async def close(self) -> None:
        return None


def _device_plan(i: int) -> list[str]:
    """Learner i's devices: 0 none, 1 an invalid token, 2 two devices, 3 a flaky one, 4 opted out, else one."""
    kind = i % 10
    return {0: [], 1: [f"gone-{i}"], 2: [f"a-{i}", f"b-{i}"], 3: [f"flaky-{i}"]}.get(kind, [f"tok-{i}"])


def _wilson_by_quadratic(x: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson interval as the roots of (p̂ - p)² = z² p (1 - p) / n (not the closed form report.py uses)."""
    ph = x / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


async def test_report_matches_the_events_sent(mode: Mode, redis: aioredis.Redis) -> None:
    client = PushClient(redis, mode.settings)
    n = 3000
    users = await _import(client, n)
    registry = DeviceRegistry(redis, mode.keys)
    for i, u in enumerate(users):
        for tok in _device_plan(i):
            await registry.register(u, Device("fcm", tok))
        if i % 10 == 4:
            await client.set_preferences(u, opt_out_all=True)  # the same policy as any message: dropped
    await _setup_campaign(client, "stats-2", control=20)
    await client.launch_campaign("stats-2", 100)
    assert await FanoutRunner(redis, mode.settings).run_pending() == 1
    sink = _Sink()
    policy = DeliveryPolicy(redis, mode.keys, mode.settings.policy)
    worker = Worker(mode.settings, redis, {"fcm": sink}, consumer="w1", limiter=policy)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    delivered_before = REGISTRY.get_sample_value(
        "pushgw_campaign_messages_total", {"campaign": "stats-2", "variant": "social", "outcome": "delivered"}) or 0.0
    try:
        await client.wait_for_delivery("stats-2", timeout_s=60, poll_s=0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    arm = {u: expected_arm("stats-2", u, 20, [(100, {"plain": 1, "social": 1})]) for u in users}
    # The apps' events, with retries of the same report, clicks that count as opens, and a few for outsiders.
    rng = random.Random(42)
    events: list[dict[str, Any]] = []
    truth: dict[str, dict[str, set[str]]] = {a: {t: set() for t in ("opened", "converted", "dismissed", "opt_out")}
                                             for a in ("plain", "social", CONTROL)}
    p_open = {"plain": 0.2, "social": 0.35}
    for i, u in enumerate(users):
        a = arm[u]
        if a == CONTROL:
            if rng.random() < 0.05:
                events.append({"type": "converted", "campaign": "stats-2", "user": u})
                truth[CONTROL]["converted"].add(u)
            continue
        if i % 10 in (0, 1, 4):
            continue  # not reached: nothing to report
        mid = message_id("stats-2", u)
        for kind, p in (("opened", p_open[str(a)]), ("dismissed", 0.3), ("opt_out", 0.02)):
            if rng.random() < p:
                events.append({"type": "clicked" if kind == "opened" and rng.random() < 0.3 else kind, "message_id": mid,
                               "variant": "plain"})  # a wrong variant from the app: the hash decides
                truth[str(a)][kind].add(u)
                if kind == "opened" and rng.random() < 0.5:
                    events.append({"type": "converted", "message_id": mid})
                    truth[str(a)]["converted"].add(u)
    retried = rng.sample(events, 200)
    outsiders = [{"type": "opened", "campaign": "stats-2", "user": "stranger"}]
    app = TestClient(TestServer(create_app(mode.settings, redis)))
    await app.start_server()
    try:
        h = {"Authorization": f"Bearer {EVENTS_TOKEN}"}
        counted = duplicate = ignored = 0
        batch = events + retried + outsiders
        rng.shuffle(batch)
        for i in range(0, len(batch), 1000):
            resp = await app.post("/v1/events", json={"events": batch[i:i + 1000]}, headers=h)
            assert resp.status == 202, await resp.text()
            body = await resp.json()
            counted, duplicate, ignored = counted + body["counted"], duplicate + body["duplicate"], ignored + body["ignored"]
        assert (counted, ignored) == (sum(len(s) for t in truth.values() for s in t.values()), 1)
        assert duplicate == len(batch) - counted - ignored
        resp = await app.post("/v1/events", json={"events": [{"type": "liked", "campaign": "stats-2", "user": "u"}]}, headers=h)
        assert resp.status == 422 and {f["field"] for f in (await resp.json())["error"]["fields"]} == {"events[0].type"}
        resp = await app.get("/v1/campaigns/stats-2/report", headers=h)
        assert resp.status == 403  # the events scope reports, it does not read
        resp = await app.get("/v1/campaigns/stats-2/report", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 200
        report = await resp.json()
        resp = await app.get("/v1/campaigns/stats-2/report.png", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 200 and (await resp.read())[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        await app.close()
    arms = {a["arm"]: a for a in report["arms"]}
    assert set(arms) == {"plain", "social", CONTROL}
    for name, a in arms.items():
        members = [i for i, u in enumerate(users) if arm[u] == name]
        assert a["assigned"] == len(members)
        if name == CONTROL:
            assert (a["sent"], a["delivered"]) == (0, 0)
        else:
            assert a["sent"] == len(members)
            assert a["delivered"] == sum(1 for i in members if i % 10 not in (0, 1, 4))  # two devices or a retry: once
            assert a["failed"] == sum(1 for i in members if i % 10 in (0, 1))
            assert a["dropped"] == sum(1 for i in members if i % 10 == 4)
        for kind in ("opened", "converted", "dismissed", "opt_out"):
            assert a[kind] == len(truth[name][kind]), (name, kind)
        for rate, kind in (("ctr", "opened"), ("cr", "converted"), ("opt_out_rate", "opt_out")):
            if a["delivered"]:
                lo, hi = _wilson_by_quadratic(a[kind], a["delivered"])
                assert a[rate]["value"] == pytest.approx(a[kind] / a["delivered"])
                assert a[rate]["ci95"] == pytest.approx([lo, hi], abs=1e-9)
        assert a["conversion_itt"]["value"] == pytest.approx(a["converted"] / a["assigned"])
    ctr = next(c for c in report["comparisons"] if c["metric"] == "ctr")
    x1, n1, x2, n2 = arms["plain"]["opened"], arms["plain"]["delivered"], arms["social"]["opened"], arms["social"]["delivered"]
    pooled = (x1 + x2) / (n1 + n2)
    z = (x1 / n1 - x2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    assert (ctr["a"], ctr["b"]) == ("plain", "social")
    assert ctr["z"] == pytest.approx(z) and ctr["p_value"] == pytest.approx(2 * (1 - NormalDist().cdf(abs(z))), abs=1e-9)
    assert ctr["significant"] and ctr["p_value"] < 0.05  # 20% vs 35% over ~700 learners each
    vs_control = [c for c in report["comparisons"] if c["b"] == CONTROL]
    assert {c["a"] for c in vs_control} == {"plain", "social"} and all(c["metric"] == "conversion_itt" for c in vs_control)
    # Workers counted campaign outcomes in Prometheus too (bounded labels).
    delivered_after = REGISTRY.get_sample_value(
        "pushgw_campaign_messages_total", {"campaign": "stats-2", "variant": "social", "outcome": "delivered"}) or 0.0
    assert delivered_after - delivered_before >= arms["social"]["delivered"]
    assert sink.sent.total() >= arms["plain"]["delivered"] + arms["social"]["delivered"]


def test_statistics_against_published_values() -> None:
    # Newcombe (1998), Table I, example: 81 successes of 263 -> Wilson 95% interval 0.2553-0.3662.
    lo, hi = wilson(81, 263)  # type: ignore[misc]
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson(0, 0) is None and wilson(0, 10)[0] == 0.0  # type: ignore[index]
    z, p = two_proportion(30, 100, 30, 100)  # type: ignore[misc]
    assert (z, p) == (0.0, 1.0)
    z, p = two_proportion(0, 50, 0, 50)  # type: ignore[misc]
    assert p == 1.0
    # By hand: pooled 0.375, se = sqrt(0.375 * 0.625 * (1/100 + 1/100)) = 0.068465, z = 0.15 / se; p from a normal table.
    z, p = two_proportion(45, 100, 30, 100)  # type: ignore[misc]
    assert z == pytest.approx(2.1909, abs=1e-4) and p == pytest.approx(0.0285, abs=1e-4)


def test_campaign_metric_labels_are_bounded() -> None:
    from pushgw.core import metrics

    labels = {metrics.campaign_labels(f"one-off-{i}", f"v{i}", stored=False) for i in range(200)}
    assert labels == {("other", "other")}  # upstream labels never get a value of their own


# ---------------------------------------------------------------------------- API, client and CLI end to end


async def test_campaign_through_the_api(mode: Mode, redis: aioredis.Redis) -> None:
    app = TestClient(TestServer(create_app(mode.settings, redis)))
    await app.start_server()
    h = {"Authorization": f"Bearer {TOKEN}"}
    try:
        for i, cohort in enumerate(("intermediate", "intermediate", "beginner")):
            resp = await app.put(f"/v1/users/learner-{i}/attributes", headers=h,
                                 json={"first_name": f"L{i}", "cohort": cohort, "locale": "fr"})
            assert resp.status == 200, await resp.text()
        resp = await app.patch("/v1/users/learner-0/attributes", headers=h, json={"skills": ["python"], "cohort": "Bad!"})
        assert resp.status == 422 and [f["field"] for f in (await resp.json())["error"]["fields"]] == ["cohort"]
        resp = await app.put("/v1/templates/new-module", headers=h, json=TEMPLATE)
        assert resp.status == 200 and (await resp.json())["version"] == 1
        resp = await app.put("/v1/templates/broken", headers=h, json={"default_locale": "en",
                                                                       "locales": {"en": {"body": "Hi {name"}}})
        assert resp.status == 422 and (await resp.json())["error"]["fields"][0]["field"] == "locales.en.body"
        resp = await app.post("/v1/templates/new-module/render", headers=h, json={"vars": {"module_title": "Stats"},
                                                                                   "locale": "fr-CA"})
        assert resp.status == 422 and (await resp.json())["error"]["fields"][0]["field"] == "vars.link"
        resp = await app.post("/v1/templates/new-module/render", headers=h, json={"vars": {"module_title": "Stats",
                                                                                            "link": "/m"}, "locale": "fr-CA"})
        assert await resp.json() == {"locale": "fr", "title": "Nouveau module : Stats",
                                     "body": "Bonjour there, Stats est ouvert", "data": {"link": "/m"}}
        bad = {"id": "Bad Id", "audience": {"filter": {"cohort": []}}, "template": "new-module",
               "variants": [{"name": "a"}, {"name": "b", "weight": -1}], "control_percent": 90}
        resp = await app.post("/v1/campaigns", headers=h, json=bad)
        fields = {f["field"] for f in (await resp.json())["error"]["fields"]}
        assert resp.status == 422 and fields == {"id", "audience.filter.cohort", "variants[1].weight", "control_percent"}
        campaign = {"id": "api-launch", "template": "new-module", "audience": {"filter": {"cohort": "intermediate"}},
                    "vars": {"module_title": "Stats", "link": "/m"}}
        resp = await app.post("/v1/campaigns", headers=h, json=campaign)
        assert resp.status == 201, await resp.text()
        resp = await app.post("/v1/campaigns", headers=h, json=campaign)
        assert resp.status == 409
        resp = await app.post("/v1/campaigns", headers=h, json=campaign | {"id": "api-2", "vars": {"link": "/m"}})
        assert resp.status == 422  # module_title is required by the template and nobody gives it
        assert (await resp.json())["error"]["fields"][0]["field"] == "template"
        resp = await app.post("/v1/campaigns/api-launch/launch", headers=h, json={"percent": 100})
        assert resp.status == 202 and (await resp.json())["fanout"]["members"] == 2
        resp = await app.post("/v1/campaigns/nope/launch", headers=h, json={"percent": 100})
        assert resp.status == 404
        resp = await app.get("/v1/campaigns/api-launch/status", headers={"Authorization": f"Bearer {EVENTS_TOKEN}"})
        assert resp.status == 403
        assert await FanoutRunner(redis, mode.settings).run_pending() == 1  # what a worker process does in the background
        resp = await app.get("/v1/campaigns/api-launch/status", headers=h)
        status = await resp.json()
        assert status["fanout"]["state"] == "done" and status["fanout"]["sent"] == 2
        texts = sorted(m["body"] for m in await queued_messages(redis, mode.keys))
        assert texts == ["Bonjour L0, Stats est ouvert", "Bonjour L1, Stats est ouvert"]
    finally:
        await app.close()


def test_campaign_through_the_cli(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}cli"\n')

    def run(*args: str) -> Any:
        assert main(["--config", str(cfg), *args]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            return out

    learners = tmp_path / "learners.jsonl"
    learners.write_text("".join(json.dumps({"user": f"learner-{i}", "attributes": {
        "first_name": f"L{i}", "cohort": "intermediate" if i % 2 else "advanced", "locale": "en"}}) + "\n" for i in range(400)))
    assert run("users", "import", str(learners)) == {"imported": 400}
    assert run("users", "set", "learner-1", "--attributes", '{"locale": "fr"}')["locale"] == "fr"
    assert run("users", "show", "learner-1")["cohort"] == "intermediate"
    (tmp_path / "t.json").write_text(json.dumps(TEMPLATE))
    assert run("templates", "put", "new-module", str(tmp_path / "t.json"))["version"] == 1
    assert run("templates", "list") == ["new-module"]
    assert run("templates", "render", "new-module", "--locale", "fr", "--vars", '{"module_title": "S", "link": "/l"}')[
        "title"] == "Nouveau module : S"
    assert main(["--config", str(cfg), "templates", "render", "new-module", "--vars", "{}"]) == 2
    assert "vars.module_title" in capsys.readouterr().err
    assert run("send", "--user", "learner-1", "--template", "new-module", "--vars", '{"module_title": "S", "link": "/l"}',
               "--id", "one-off")[0] == {"id": "one-off", "status": "queued"}
    assert main(["--config", str(cfg), "send", "--user", "learner-1", "--template", "new-module"]) == 2
    assert "vars.module_title" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({
        "id": "cli-launch", "template": "new-module", "audience": {"filter": {"cohort": "intermediate"}},
        "vars": {"module_title": "Stats", "link": "/m"}, "control_percent": 10,
        "variants": [{"name": "a"}, {"name": "b", "local_time": "18:00"}]}))
    assert run("campaigns", "create", str(tmp_path / "c.json"))["id"] == "cli-launch"
    assert run("campaigns", "launch", "cli-launch", "--percent", "50")["fanout"]["state"] == "queued"
    assert run("campaigns", "run") == {"finished": 1}
    status = run("campaigns", "status", "cli-launch", "--wait", "--timeout", "10")
    job = status["fanout"]
    assert job["state"] == "done" and job["sent"] + job["control"] + job["outside"] == 200
    users = []

    async def sent() -> None:
        r = aioredis.from_url(redis_url)
        for _, f in await r.xrange(Keys(f"{PREFIX}cli").stream):
            users.append(json.loads(f[b"m"]))
        users.extend(json.loads(v) for v in (await r.hgetall(Keys(f"{PREFIX}cli").delayed_data)).values())
        await r.aclose()

    asyncio.run(sent())
    users = [m for m in users if m["id"] != "one-off"]
    assert len(users) == job["sent"]
    assert all(("send_at" in m) == (m["variant"] == "b") for m in users)  # b: at 18:00 local time
    mid = users[0]["id"]
    assert run("events", "send", "--type", "opened", "--message-id", mid)["status"] == "counted"
    assert run("events", "send", "--type", "opened", "--message-id", mid)["status"] == "duplicate"
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"type": "converted", "message_id": m["id"]}) + "\n" for m in users[:10]))
    assert run("events", "import", str(events)) == {"counted": 10, "duplicate": 0, "ignored": 0}
    table = run("campaigns", "report", "cli-launch", "--chart", str(tmp_path / "r.png"))
    assert "CTR [95% CI]" in table and "control" in table
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    report = run("campaigns", "report", "cli-launch", "--json")
    assert sum(a["converted"] for a in report["arms"]) == 10 and sum(a["opened"] for a in report["arms"]) == 1
    assert main(["--config", str(cfg), "campaigns", "launch", "cli-launch", "--percent", "20"]) == 2
    assert "already launched" in capsys.readouterr().err


def test_campaign_scopes_in_the_configuration(tmp_path: Path) -> None:
    from pushgw.core.config import ConfigError, load_settings

    cfg = tmp_path / "gw.toml"
    cfg.write_text('[[api.clients]]\nname = "app"\ntoken = "app-token-0123456789"\nscopes = ["events"]\n'
                   '[[api.clients]]\nname = "mkt"\ntoken = "mkt-token-0123456789"\nscopes = ["campaigns", "devices"]\n')
    assert [c.scopes for c in load_settings(cfg, env={}).api.clients] == [("events",), ("campaigns", "devices")]
    cfg.write_text('[[api.clients]]\nname = "app"\ntoken = "app-token-0123456789"\nscopes = ["campaign"]\n')
    with pytest.raises(ConfigError, match="scopes"):
        load_settings(cfg, env={})


async def test_variants_by_send_time_and_frequency_and_a_learner_who_cannot_be_rendered(
    mode: Mode, redis: aioredis.Redis
) -> None:
    client = PushClient(redis, mode.settings)
    users = await _import(client, 300)
    await client.set_attributes("learner-5", {"locale": "de"})  # the strict template has no German and no fallback
    await client.set_attributes("learner-6", {"timezone": "America/New_York"})
    await client.save_template("strict", TEMPLATE | {"missing_locale": "error"})
    t0 = time.time()
    await client.create_campaign({
        "id": "timing", "template": "strict", "audience": {"filter": {"cohort": "intermediate"}},
        "vars": {"module_title": "Stats", "link": "/m"}, "send_at": t0 + 3600,
        "variants": [{"name": "once"}, {"name": "evening", "local_time": "18:00"},
                     {"name": "twice", "repeat": {"count": 2, "interval_s": 86400}}]})
    await client.launch_campaign("timing", 100)
    assert await FanoutRunner(redis, mode.settings).run_pending() == 1
    status = (await client.campaign_status("timing"))["fanout"]
    assert status["failed"] == 1 and status["errors"][0].startswith("learner-5: locale:")  # refused, with the reason
    assert status["sent"] + status["failed"] == len(users)
    messages = await queued_messages(redis, mode.keys)
    assert "learner-5" not in {m["user"] for m in messages}
    by_user: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        by_user.setdefault(m["user"], []).append(m)
    for user, ms in by_user.items():
        variant = ms[0]["variant"]
        if variant == "twice":
            first, second = sorted(ms, key=lambda m: m["send_at"])
            assert (first["send_at"], second["send_at"]) == (pytest.approx(t0 + 3600, abs=5), first["send_at"] + 86400)
            assert {first["id"], second["id"]} == {message_id("timing", user), message_id("timing", user, 1)}
        elif variant == "evening":
            [m] = ms
            tz = "America/New_York" if user == "learner-6" else "UTC"
            local = datetime.fromtimestamp(m["send_at"], ZoneInfo(tz))
            assert (local.hour, local.minute) == (18, 0) and t0 + 3600 <= m["send_at"] < t0 + 3600 + 86400
        else:
            [m] = ms
            assert m["send_at"] == pytest.approx(t0 + 3600, abs=5)
    kpi = {k.decode(): int(v) for k, v in (await redis.hgetall(mode.keys.kpi("timing"))).items()}
    assert kpi["twice:messages"] == 2 * kpi["twice:sent"] and kpi["once:messages"] == kpi["once:sent"]


async def test_the_chart_says_clearly_when_matplotlib_is_missing(mode: Mode, redis: aioredis.Redis,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from pushgw.campaigns.report import ChartUnavailable, chart_png

    client = PushClient(redis, mode.settings)
    # A campaign label from upstream messages: the workers' figures make a report; app events for it are ignored
    # (only stored campaigns count events, so the events scope cannot grow Redis with made-up campaigns).
    (r,) = await client.report_events([{"type": "opened", "campaign": "adhoc", "user": "u1", "variant": "a"}])
    assert (r["status"], r["reason"]) == ("ignored", "unknown_campaign")
    figures = mode.keys.upstream_campaign("adhoc")  # what a worker's commit writes for upstream-labelled messages
    await redis.sadd(mode.keys.kpi_users(figures, "a", "delivered"), "u1")
    await redis.sadd(mode.keys.campaign_variants(figures), "a")
    report = await client.campaign_report("adhoc")
    assert [(a["arm"], a["delivered"], a["opened"]) for a in report["arms"]] == [("a", 1, 0)]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without matplotlib looks like
    with pytest.raises(ChartUnavailable, match="pip install matplotlib"):
        chart_png(report)
    app = TestClient(TestServer(create_app(mode.settings, redis)))
    await app.start_server()
    try:
        resp = await app.get("/v1/campaigns/adhoc/report.png", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 501 and (await resp.json())["error"]["code"] == "chart_unavailable"
    finally:
        await app.close()


async def test_a_real_worker_process_fans_out_and_delivers_a_campaign(
    single_redis: aioredis.Redis, redis_url: str, local_ca: LocalCA, tmp_path: Path
) -> None:
    """`pushgw worker` (gateway/pool.py) runs the fan-out next to the deliveries: launch, and the process does the rest."""
    async with FakeFcm(local_ca) as fcm:
        account = fcm.service_account(tmp_path)
        cfg = tmp_path / "pushgw.toml"
        cfg.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}"\n[worker]\nprocesses = 1\nblock_ms = 50\n'
                       f'[fcm.default]\nservice_account_file = "{account}"\nbase_url = "{fcm.base_url}"\n'
                       f'ca_file = "{local_ca.ca_file}"\n[log]\nlevel = "WARNING"\n')
        client = PushClient(single_redis, SETTINGS)
        users = await _import(client, 600)
        registry = DeviceRegistry(single_redis, KEYS)
        for u in users:
            await registry.register(u, Device("fcm", f"fcm-{u}"))
        await _setup_campaign(client, "process-launch", control=10)
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pushgw.gateway.cli", "--config", str(cfg), "worker", "--consumer-prefix", "cmp-test",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await client.launch_campaign("process-launch", 100)
            job = (await client.wait_for_fanout("process-launch", timeout_s=60, poll_s=0.05))["fanout"]
            report = await client.wait_for_delivery("process-launch", timeout_s=60, poll_s=0.05)
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        assert job["sent"] + job["control"] == len(users)
        delivered = sum(a["delivered"] for a in report["arms"])
        tokens = [r.message["token"] for r in fcm.received]
        assert delivered == job["sent"] == len(tokens) == len(set(tokens))  # each learner once, the control group never
        control = {f"fcm-{u}" for u in users if expected_arm("process-launch", u, 10, []) == CONTROL}
        assert len(control) == job["control"] and not control & set(tokens)
