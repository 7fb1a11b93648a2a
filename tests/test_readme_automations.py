"""The README's automation walk-through, run as written: its TOML loaded with the real CLI, its events posted
to the HTTP API, and what its comments promise checked. Should the README's session times have passed when this
runs, every time in the events is moved by whole weeks (same weekday and hour), so the walk-through stays valid.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from pushgw.automations.engine import Engine
from pushgw.automations.store import RuleStore
from pushgw.core.config import ApiClient, ApiSettings, RedisSettings, Settings
from pushgw.core.schema import loads_message
from pushgw.gateway.api.app import create_app
from pushgw.gateway.cli import main
from pushgw.queue.keys import Keys

README = Path(__file__).resolve().parent.parent / "README.md"
PREFIX = "readmeauto"
K = Keys(PREFIX)
LMS, ADMIN, COURSES = "lms-token-0123456789ab", "admin-token-0123456789a", "courses-token-01234567"
SETTINGS = Settings(redis=RedisSettings(prefix=PREFIX), api=ApiSettings(clients=(
    ApiClient("lms", LMS, ("events", "devices")), ApiClient("ops", ADMIN, ("campaigns",)),
    ApiClient("courses", COURSES, ("enqueue",)))))
TEMPLATES = {
    "quiz-badge": {"default_locale": "en", "variables": {"first_name": "there", "quiz": None, "score": None},
                   "locales": {"en": {"title": "Badge for {quiz}", "body": "{score}%, {first_name}!"}}},
    "session-reminder": {"default_locale": "en", "variables": {"session": None, "starts_at": None},
                         "locales": {"en": {"title": "Live session", "body": "{session} at {starts_at}"}}},
    "we-miss-you": {"default_locale": "en", "variables": {"first_name": "there"},
                    "locales": {"en": {"body": "We miss you, {first_name}"}}},
}


def block(name: str) -> str:
    m = re.search(rf"<!-- readme-example: {re.escape(name)} -->\n```\w*\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no example block {name!r}"
    return m.group(1)


def current(events: dict[str, Any], now: float) -> tuple[dict[str, Any], float]:
    """The README's events, with their times moved by whole weeks if they have passed; (events, shift)."""
    times = [e["starts_at"] for e in events["events"] if "starts_at" in e]
    shift = 0.0
    while min(times) + shift < now + 2 * 86400:
        shift += 7 * 86400
    for e in events["events"]:
        if "starts_at" in e:
            e["starts_at"] += shift
    return events, shift


async def test_the_readme_walkthrough_does_what_it_says(redis: aioredis.Redis, redis_url: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    api = TestClient(TestServer(create_app(SETTINGS, redis)))
    await api.start_server()

    async def call(method: str, path: str, token: str, body: Any = None) -> Any:
        resp = await api.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
        assert resp.status < 300, await resp.text()
        return await resp.json() if resp.status != 204 else None

    try:
        for name, t in TEMPLATES.items():
            await call("PUT", f"/v1/templates/{name}", ADMIN, t)
        for u in ("learner-7", "learner-8", "learner-9"):
            await call("PUT", f"/v1/users/{u}/attributes", LMS, {"cohort": "2026-spring", "first_name": u[-1]})
            await call("PUT", f"/v1/users/{u}/devices", LMS, {"fcm": f"tok-{u}"})
        (tmp_path / "automations.toml").write_text(block("automations.toml"))
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}"\n')
        load = ["--config", str(cfg), "automations", "load", str(tmp_path / "automations.toml")]
        assert await asyncio.to_thread(main, load) == 0  # the CLI runs its own event loop
        assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["quiz-reward", "session-reminders", "come-back"]

        events, _ = current(json.loads(block("events.json")), time.time())
        body = await call("POST", "/v1/events", LMS, events)
        assert body["handled"] == 4
        # learner-7 gets the badge now, learner-8 nothing
        now_msgs = [loads_message(f[b"m"]) for _, f in await redis.xrange(K.stream)]
        assert [(m.user, m.body) for m in now_msgs] == [("learner-7", "85%, 7!")]
        # two reminders for learner-7, 24 h and 15 min before the session
        starts = events["events"][2]["starts_at"]
        waiting = sorted(score for score in (s for _, s in await redis.zrange(K.delayed, 0, -1, withscores=True)))
        assert [round(starts - w) for w in waiting] == [86400, 900]
        # the same file again changes nothing
        again = await call("POST", "/v1/events", LMS, events)
        assert again["handled"] == 0 and again["duplicate"] == 4
        # the reschedule moves both reminders a day later
        moved = events["events"][2] | {"type": "session_rescheduled", "id": "evt-1010", "starts_at": starts + 86400}
        await call("POST", "/v1/events", LMS, {"events": [moved]})
        waiting = sorted(s for _, s in await redis.zrange(K.delayed, 0, -1, withscores=True))
        assert [round(starts + 86400 - w) for w in waiting] == [86400, 900]
        report = await call("GET", "/v1/automations/quiz-reward/report", ADMIN)
        assert report["funnel"]["triggered"] == 1 and report["funnel"]["sent"] == 1
        # the course service's own messages by ref: the automation's reminders are not among them
        assert (await call("DELETE", "/v1/messages?ref=session-812", COURSES))["cancelled"] == 0
        # seven days without a learning event: one nudge per learner (the control group excepted), then no more
        rule = await RuleStore(redis, K).require("come-back")
        held = {u for u in ("learner-7", "learner-8", "learner-9") if rule.campaign().is_control(u)}
        later = Engine(redis, SETTINGS, clock=lambda: time.time() + 7 * 86400 + 60)
        assert await later.sweep() == 3
        assert await later.sweep() == 0
        queued = [loads_message(f[b"m"]) for _, f in await redis.xrange(K.stream)]
        queued += [loads_message(raw) for raw in (await redis.hgetall(K.delayed_data)).values()]
        nudged = [m.user for m in queued if m.campaign == "auto-come-back"]
        assert sorted(nudged) == sorted({"learner-7", "learner-8", "learner-9"} - held)
    finally:
        await api.close()
