"""Automations end to end: learning events posted to the HTTP API, rules saved through it, a real worker
delivering to the fake FCM service (real HTTP/2 and TLS). Time is a clock the test moves: the worker's
scheduler and the engine read it, so "the reminder 5 minutes before" is checked at exact instants, never by
waiting for a timer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from pushgw.automations.engine import Engine
from pushgw.automations.events import LearningEvent
from pushgw.automations.rules import parse_rule
from pushgw.campaigns.audiences import Attributes
from pushgw.core.config import ApiClient, ApiSettings, RedisSettings, Settings, WorkerSettings
from pushgw.core.schema import loads_message
from pushgw.gateway.api.app import create_app
from pushgw.gateway.api.context import ENGINE
from pushgw.gateway.cli import main
from pushgw.gateway.worker import Worker
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fcm import FcmProvider
from pushgw.queue.keys import Keys
from pushgw.ratelimit.policy import DeliveryPolicy

PREFIX = "autotest"
K = Keys(PREFIX)
PLATFORM = "platform-token-0123456789"  # the learning platform: events, devices and attributes
ADMIN = "automations-token-0123456789"  # who writes the rules
SETTINGS = Settings(
    redis=RedisSettings(prefix=PREFIX),
    worker=WorkerSettings(block_ms=20, janitor_interval_s=0.05, backoff_base_s=0.01, backoff_cap_s=0.05),
    api=ApiSettings(clients=(ApiClient("lms", PLATFORM, ("events", "devices", "enqueue")),
                                           ApiClient("ops", ADMIN, ("campaigns",)))),
)
BADGE = {"default_locale": "en", "variables": {"first_name": "there", "score": None, "quiz": None},
         "locales": {"en": {"title": "Badge earned, {first_name}!", "body": "{score}% on {quiz}: well done"}}}
REMINDER = {"default_locale": "en", "variables": {"session": None, "starts_at": None},
            "locales": {"en": {"title": "Live session {session}", "body": "Starts at {starts_at}"}}}
NUDGE = {"default_locale": "en", "variables": {"first_name": "there"},
         "locales": {"en": {"title": "We miss you, {first_name}", "body": "Your course is waiting"}}}


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@dataclass
class Platform:
    api: TestClient[Any, Any]
    clock: Clock
    fcm: FakeFcm
    redis: aioredis.Redis

    async def call(self, method: str, path: str, token: str = PLATFORM, **kw: Any) -> tuple[int, Any]:
        resp = await self.api.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body

    async def events(self, *events: dict[str, Any]) -> Any:
        status, body = await self.call("POST", "/v1/events", json={"events": list(events)})
        assert status == 202, body
        return body

    async def rule(self, rule: dict[str, Any]) -> Any:
        status, body = await self.call("PUT", f"/v1/automations/{rule['id']}", ADMIN, json=rule)
        assert status in (200, 201), body
        return body

    async def learner(self, user: str, **attrs: Any) -> None:
        assert (await self.call("PUT", f"/v1/users/{user}/devices", json={"fcm": f"tok-{user}"}))[0] == 201
        assert (await self.call("PUT", f"/v1/users/{user}/attributes", json=attrs))[0] == 200

    async def waiting(self) -> list[tuple[float, Any]]:
        """The delayed set: (due time, message), earliest first."""
        out = []
        for member, score in await self.redis.zrange(K.delayed, 0, -1, withscores=True):
            out.append((score, loads_message(await self.redis.hget(K.delayed_data, member))))
        return out

    async def deliver(self, expected: int, worker_clock: Callable[[], float] | None = None) -> list[Any]:
        """Run a worker until the fake FCM has `expected` messages in all (bounded wait), then stop it."""
        provider = self.fcm_provider
        worker = Worker(SETTINGS, self.redis, {"fcm": provider}, consumer="w1", clock=worker_clock or self.clock,
                        limiter=DeliveryPolicy(self.redis, K, SETTINGS.policy))  # as every message: opt-outs, caps
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            for _ in range(400):
                if len(self.fcm.received) >= expected and await self._drained():
                    break
                await asyncio.sleep(0.025)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        return list(self.fcm.received)

    async def _drained(self) -> bool:
        stats = await Worker(SETTINGS, self.redis, {}, consumer="probe").queue.stats()
        return stats.lag == 0 and stats.pending == 0

    fcm_provider: Any = None


@pytest.fixture
async def platform(redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider]) -> AsyncIterator[Platform]:
    clock = Clock()
    app = create_app(SETTINGS, redis)
    app[ENGINE] = Engine(redis, SETTINGS, clock=clock)
    api: TestClient[Any, Any] = TestClient(TestServer(app))
    await api.start_server()
    p = Platform(api, clock, fcm[0], redis)
    p.fcm_provider = fcm[1]
    for name, t in (("quiz-badge", BADGE), ("session-reminder", REMINDER), ("nudge", NUDGE)):
        assert (await p.call("PUT", f"/v1/templates/{name}", ADMIN, json=t))[0] == 200
    try:
        yield p
    finally:
        await api.close()


def bodies(received: list[Any]) -> list[tuple[str, str]]:
    return sorted((r.message["token"], r.message["notification"]["body"]) for r in received)


QUIZ_RULE = {"id": "quiz-reward", "trigger": "quiz_completed", "template": "quiz-badge",
             "conditions": [{"field": "event.score", "op": ">=", "value": 80},
                            {"field": "learner.cohort", "op": "in", "value": ["2026-a", "2026-b"]}]}


async def test_a_quiz_at_85_sends_the_reward_once_and_a_quiz_at_75_nothing(platform: Platform) -> None:
    p = platform
    await p.learner("ada", first_name="Ada", cohort="2026-a")
    await p.learner("bob", first_name="Bob", cohort="2026-a")
    await p.learner("eve", first_name="Eve", cohort="2025-z")
    await p.learner("zoe", first_name="Zoe", cohort="2026-b")
    assert (await p.call("PATCH", "/v1/users/zoe/preferences", json={"opt_out": {"all": True}}))[0] == 200
    await p.rule(QUIZ_RULE)
    quiz = {"type": "quiz_completed", "quiz": "stats-1"}
    body = await p.events(quiz | {"id": "e1", "user": "ada", "score": 85}, quiz | {"id": "e2", "user": "bob", "score": 75},
                          quiz | {"id": "e3", "user": "eve", "score": 95})  # eve's cohort is not in the rule
    assert body["handled"] == 3
    again = await p.events(quiz | {"id": "e1", "user": "ada", "score": 85})  # the same event reported again
    assert again["results"] == [{"status": "duplicate", "id": "e1", "type": "quiz_completed"}]
    await p.events(quiz | {"id": "e4", "user": "ada", "score": 90})  # another attempt at the same quiz: once per entity
    await p.events(quiz | {"id": "e5", "user": "zoe", "score": 90})  # zoe opted out: the policy drops it
    received = await p.deliver(1)
    assert bodies(received) == [("tok-ada", "85% on stats-1: well done")]
    assert received[0].message["notification"]["title"] == "Badge earned, Ada!"
    status, report = await p.call("GET", "/v1/automations/quiz-reward/report", ADMIN)
    assert status == 200 and report["funnel"] == {"triggered": 2, "sent": 2, "delivered": 1, "opened": 0,
                                                  "converted": 0}
    assert report["arms"][0]["dropped"] == 1  # zoe
    # the app reports the open: the funnel moves, through the campaign machinery
    await p.events({"type": "opened", "campaign": "auto-quiz-reward", "user": "ada"})
    report = (await p.call("GET", "/v1/automations/quiz-reward/report", ADMIN))[1]
    assert report["funnel"]["opened"] == 1 and report["arms"][0]["ctr"]["value"] == 1.0
    assert REGISTRY.get_sample_value("pushgw_automation_events_total",
                                     {"rule": "quiz-reward", "outcome": "repeated"}) >= 1


SESSION_RULE = {"id": "session-reminders", "trigger": "session_scheduled", "template": "session-reminder",
                "category": "reminder", "timing": {"relative_to": "starts_at", "offsets_s": [-300, -60]}}


async def test_a_session_yields_two_reminders_that_a_cancel_withdraws_and_a_reschedule_moves(platform: Platform) -> None:
    p = platform
    t0 = p.clock.t
    for u in ("ada", "bob"):
        await p.learner(u, timezone="UTC")
    await p.rule(SESSION_RULE)
    session = {"type": "session_scheduled", "session": "s-812", "starts_at": t0 + 600}
    await p.events(session | {"id": "s1-ada", "user": "ada"}, session | {"id": "s1-bob", "user": "bob"})
    waiting = await p.waiting()
    assert sorted((round(due - t0), m.user) for due, m in waiting) == [(300, "ada"), (300, "bob"), (540, "ada"), (540, "bob")]
    assert {m.ref for _, m in waiting} == {"s-812"}
    # bob's session is cancelled: his two reminders are withdrawn, ada's stay
    body = await p.events({"type": "session_cancelled", "id": "c1", "user": "bob", "session": "s-812"})
    assert body["handled"] == 1
    assert sorted((round(due - t0), m.user) for due, m in await p.waiting()) == [(300, "ada"), (540, "ada")]
    # at t0+300 the first reminder is due and goes; the second waits
    p.clock.t = t0 + 300
    received = await p.deliver(1)
    assert [r.message["token"] for r in received] == ["tok-ada"]
    # ada's session moves an hour later: the pending reminder is withdrawn, both are planned from the new start
    await p.events({"type": "session_rescheduled", "id": "r1", "user": "ada", "session": "s-812",
                    "starts_at": t0 + 4200})
    assert sorted(round(due - t0) for due, _ in await p.waiting()) == [3900, 4140]
    # scheduled and cancelled in the same batch: the cancel sees the reminders the batch planned before it
    await p.events(session | {"id": "s1-cyd", "user": "cyd"},
                   {"type": "session_cancelled", "id": "c2", "user": "cyd", "session": "s-812"})
    assert {m.user for _, m in await p.waiting()} == {"ada"}
    p.clock.t = t0 + 4140
    received = await p.deliver(3)
    assert len(received) == 3 and {r.message["token"] for r in received} == {"tok-ada"}
    assert received[-1].message["notification"]["body"].startswith("Starts at ")
    assert await p.waiting() == []


async def test_an_inactivity_rule_fires_once_per_learner_per_spell(platform: Platform) -> None:
    p = platform
    t0 = p.clock.t
    for u in ("ada", "bob", "cyd"):
        await p.learner(u, first_name=u.title())
    await p.events({"type": "activity", "id": "a1", "user": "ada", "at": t0 - 7200},
                   {"type": "activity", "id": "b1", "user": "bob", "at": t0 - 5400})
    await p.rule({"id": "come-back", "trigger": "inactivity", "inactive_days": 1 / 24, "template": "nudge"})
    await p.events({"type": "module_started", "id": "c1", "user": "cyd", "module": "m1"})  # active now
    engine = Engine(p.redis, SETTINGS, clock=p.clock)  # what every worker process's runner calls
    p.clock.t = t0 - 3 * 3600
    assert await engine.sweep() == 0  # nobody idle for an hour at that time
    p.clock.t = t0
    assert await engine.sweep() == 2  # ada and bob
    assert await engine.sweep() == 0  # still idle, already nudged
    await p.events({"type": "activity", "id": "a2", "user": "ada"})  # ada comes back
    p.clock.t = t0 + 3600 + 600
    assert await engine.sweep() == 2  # cyd's first spell, ada's second
    assert await engine.sweep() == 0
    received = await p.deliver(4)
    assert sorted(r.message["token"] for r in received) == ["tok-ada", "tok-ada", "tok-bob", "tok-cyd"]


async def test_an_inactivity_sweep_in_small_batches_skips_no_learner_sharing_a_time(platform: Platform) -> None:
    p = platform
    users = [f"l{i}" for i in range(7)]
    await p.rule({"id": "come-back", "trigger": "inactivity", "inactive_days": 1 / 24, "template": "nudge"})
    # one request: its events share one `at`
    await p.events(*({"type": "activity", "id": f"a-{u}", "user": u} for u in users))
    await p.events({"type": "activity", "id": "late", "user": "l7", "at": time.time() + 1})
    p.clock.t = time.time() + 3600 + 600
    engine = Engine(p.redis, SETTINGS, clock=p.clock)
    assert await engine.sweep(limit=2) == 7  # the batch of 2 takes every learner of its last time
    assert await engine.sweep(limit=2) == 1  # then l7
    assert await engine.sweep(limit=2) == 0


async def test_rules_are_validated_listed_paused_and_deleted(platform: Platform) -> None:
    p = platform
    bad = {"trigger": "quiz_completed", "template": "quiz-badge",
           "conditions": [{"field": "event.starts_at", "op": ">=", "value": 1},
                          {"field": "event.score", "op": ">=", "value": "high"}],
           "timing": {"relative_to": "starts_at", "offsets_s": [-60]}}
    status, body = await p.call("PUT", "/v1/automations/bad", ADMIN, json=bad)
    assert status == 422
    assert [f["field"] for f in body["error"]["fields"]] == ["conditions[0].field", "conditions[1].value",
                                                              "timing.relative_to"]
    status, body = await p.call("PUT", "/v1/automations/nope", ADMIN, json=QUIZ_RULE | {"id": "nope",
                                                                                          "template": "missing"})
    assert status == 422 and body["error"]["fields"][0]["field"] == "template"
    status, body = await p.call("PUT", "/v1/automations/no-quiz", ADMIN,
                                json={"trigger": "module_completed", "template": "quiz-badge"})
    assert status == 422 and "score" in body["error"]["fields"][0]["message"]  # the template needs {score}
    assert (await p.call("PUT", "/v1/automations/quiz-reward", PLATFORM, json=QUIZ_RULE))[0] == 403
    assert (await p.rule(QUIZ_RULE))["paused"] is False
    assert [r["id"] for r in (await p.call("GET", "/v1/automations", ADMIN))[1]["automations"]] == ["quiz-reward"]
    assert (await p.call("POST", "/v1/automations/quiz-reward/pause", ADMIN))[1]["paused"] is True
    await p.learner("ada", cohort="2026-a")
    await p.events({"type": "quiz_completed", "id": "e1", "user": "ada", "quiz": "q", "score": 99})
    assert await p.waiting() == [] and await p.redis.xlen(K.stream) == 0  # paused: nothing
    assert (await p.call("POST", "/v1/automations/quiz-reward/resume", ADMIN))[1]["paused"] is False
    await p.events({"type": "quiz_completed", "id": "e2", "user": "ada", "quiz": "q", "score": 99})
    assert await p.redis.xlen(K.stream) == 1
    assert (await p.call("DELETE", "/v1/automations/quiz-reward", ADMIN))[0] == 204
    assert (await p.call("GET", "/v1/automations/quiz-reward", ADMIN))[0] == 404
    assert (await p.call("GET", "/v1/automations/Bad:Id", ADMIN))[0] == 404


async def test_learning_events_are_validated_at_the_door_naming_the_field(platform: Platform) -> None:
    p = platform
    status, body = await p.call("POST", "/v1/events", json={"events": [
        {"type": "opened", "campaign": "x", "user": "ada"},
        {"type": "quiz_completed", "id": "e1", "user": "ada", "quiz": "q", "score": 120},
        {"type": "session_scheduled", "id": "e2", "user": "ada", "session": "s"},
        {"type": "opened"},
        {"type": "activity", "id": "e3", "user": "ada", "colour": "red"},
    ]})
    assert status == 422
    assert [f["field"] for f in body["error"]["fields"]] == ["events[1].score", "events[2].starts_at",
                                                              "events[3].campaign", "events[4]"]
    assert await p.redis.keys(f"{PREFIX}:auto:*") == []  # nothing of the batch was recorded


RULES_TOML = """
[[automations]]
id = "quiz-reward"
trigger = "quiz_completed"
template = "quiz-badge"
conditions = [{ field = "event.score", op = ">=", value = 80 }]

[[automations]]
id = "deadline-48h"
trigger = "deadline_set"
template = "%s"
category = "reminder"
timing = { relative_to = "due_at", offsets_s = [-172800] }
"""


def test_rules_load_from_toml_through_the_cli_all_or_nothing(redis_url: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}cli"\n')

    def run(*args: str, code: int = 0) -> Any:
        assert main(["--config", str(cfg), *args]) == code
        out, err = capsys.readouterr()
        return json.loads(out) if code == 0 and out.startswith(("{", "[")) else out + err

    (tmp_path / "badge.json").write_text(json.dumps(BADGE))
    (tmp_path / "due.json").write_text(json.dumps({"default_locale": "en", "variables": {"assignment": None, "due_at": None},
                                                   "locales": {"en": {"body": "{assignment} is due {due_at}"}}}))
    run("templates", "put", "quiz-badge", str(tmp_path / "badge.json"))
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES_TOML % "no-such-template")
    err = run("automations", "load", str(rules), code=2)
    assert "automations[1].template" in err
    assert run("automations", "list") == []  # nothing saved: the first rule was valid but the file was not
    run("templates", "put", "assignment-due", str(tmp_path / "due.json"))
    rules.write_text(RULES_TOML % "assignment-due")
    assert run("automations", "load", str(rules)) == [{"id": "quiz-reward", "status": "created"},
                                                      {"id": "deadline-48h", "status": "created"}]
    assert [r["id"] for r in run("automations", "list")] == ["deadline-48h", "quiz-reward"]
    assert run("automations", "pause", "deadline-48h")["paused"] is True
    assert run("automations", "show", "deadline-48h")["timing"] == {"relative_to": "due_at", "offsets_s": [-172800]}
    assert "automation quiz-reward: triggered 0 -> sent 0" in run("automations", "report", "quiz-reward")
    assert "no automation" in run("automations", "pause", "nope", code=2)
    assert run("automations", "delete", "quiz-reward") == {"deleted": True}


def h64(campaign: str, user: str, salt: str) -> int:
    """The campaign assignment rule, written again (campaigns/experiments.py): blake2b-64 of campaign, salt, user."""
    return int.from_bytes(hashlib.blake2b(f"{campaign}\x1f{salt}\x1f{user}".encode(), digest_size=8).digest(), "big")


async def test_rule_variants_and_control_group_use_the_campaign_assignment(platform: Platform) -> None:
    p = platform
    users = [f"l{i}" for i in range(300)]
    await p.rule(QUIZ_RULE | {"conditions": [], "control_percent": 20,
                              "variants": [{"name": "plain", "vars": {"first_name": "friend"}},
                                           {"name": "named", "weight": 3}]})
    body = await p.events(*({"type": "quiz_completed", "id": f"e-{u}", "user": u, "quiz": "q", "score": 90}
                            for u in users))
    assert body["handled"] == len(users)

    def arm(u: str) -> str:
        if h64("auto-quiz-reward", u, "control") < 20 * 100 * 2**64 // 10000:
            return "control"
        return "plain" if h64("auto-quiz-reward", u, "variant") / 2**64 * 4 < 1 else "named"

    sent = {loads_message(f[b"m"]).user: loads_message(f[b"m"]).variant for _, f in await p.redis.xrange(K.stream)}
    expected = {u: arm(u) for u in users}
    assert sent == {u: a for u, a in expected.items() if a != "control"}
    counts = {a: list(expected.values()).count(a) for a in ("plain", "named", "control")}
    assert 30 <= counts["control"] <= 90 and counts["named"] > counts["plain"]  # 20% held out, 3:1 split
    report = (await p.call("GET", "/v1/automations/quiz-reward/report", ADMIN))[1]
    assert {a["arm"]: a["assigned"] for a in report["arms"]} == counts
    assert report["funnel"]["triggered"] == len(users) and report["funnel"]["sent"] == len(users) - counts["control"]
    assert {c["metric"] for c in report["comparisons"]} >= {"ctr", "conversion_itt"}


def test_conditions_compare_numbers_by_value_and_lists_by_membership() -> None:
    rule = parse_rule({"id": "r", "trigger": "quiz_completed", "template": "t", "conditions": [
        {"field": "event.score", "op": ">=", "value": 80}, {"field": "event.quiz", "op": "not_in", "value": ["warmup"]},
        {"field": "learner.skills", "op": "in", "value": ["python"]}, {"field": "learner.vars.level", "op": "==", "value": 3}]})
    event = LearningEvent("e", "quiz_completed", "u", 0.0, {"quiz": "stats-1", "score": 85.0})
    learner = Attributes(skills=("python", "sql"), vars={"level": "3"})
    assert rule.matches(event, learner)
    assert not rule.matches(replace(event, fields={"quiz": "warmup", "score": 85.0}), learner)
    assert not rule.matches(replace(event, fields={"quiz": "stats-1", "score": 79.5}), learner)
    assert not rule.matches(event, replace(learner, skills=("sql",)))
    assert not rule.matches(event, replace(learner, vars={}))
