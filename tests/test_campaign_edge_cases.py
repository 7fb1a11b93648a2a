"""Campaign edge cases on a real Redis: reports within bounds, unknown and hostile ids,
attribute imports, atomic launches, strict validation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from pushgw.campaigns.audiences import UserAttributes, parse_attributes, parse_audience
from pushgw.campaigns.events import parse_events
from pushgw.campaigns.experiments import message_id, parse_campaign, parse_message_id
from pushgw.campaigns.fanout import CampaignStore, FanoutRunner
from pushgw.campaigns.report import format_report, two_proportion, wilson
from pushgw.core.config import ApiClient, ApiSettings, RedisSettings, Settings, WorkerSettings
from pushgw.core.schema import Device, MessageInvalid, parse_message
from pushgw.gateway.api.app import create_app
from pushgw.gateway.cli import main
from pushgw.gateway.client import PushClient
from pushgw.gateway.worker import Worker
from pushgw.providers.fakes.accept import AcceptAll
from pushgw.queue.keys import Keys
from pushgw.users.profiles import parse_preferences
from pushgw.users.registry import DeviceRegistry

PREFIX = "cmpfix"
TOKEN = "campaign-fix-token-0123456789"
SETTINGS = Settings(
    redis=RedisSettings(prefix=PREFIX),
    worker=WorkerSettings(block_ms=20, janitor_interval_s=0.05, backoff_base_s=0.01, backoff_cap_s=0.05),
    api=ApiSettings(clients=(ApiClient("marketing", TOKEN, ("enqueue", "devices", "campaigns", "events")),)),
)
KEYS = Keys(PREFIX)
TEMPLATE = {"default_locale": "en", "locales": {"en": {"title": "New module", "body": "Statistics 2 is open"}}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _campaign(client: PushClient, cid: str, *, control: float = 0, variants: int = 1) -> None:
    await client.save_template("fix-module", TEMPLATE)
    await client.create_campaign({
        "id": cid, "template": "fix-module", "audience": {"filter": {"cohort": "intermediate"}}, "control_percent": control,
        "variants": [{"name": f"v{i}", "weight": 1} for i in range(variants)]})


async def _deliver(redis: aioredis.Redis, client: PushClient, cid: str) -> dict[str, Any]:
    assert await FanoutRunner(redis, SETTINGS).run_pending() == 1
    worker = Worker(SETTINGS, redis, {"fcm": AcceptAll()}, consumer="fix-w1")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        return await client.wait_for_delivery(cid, timeout_s=60, poll_s=0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


# ---------------------------------------------------------------------------- 1: rates over delivered learners


async def test_events_of_undelivered_learners_keep_the_report_within_bounds(redis: aioredis.Redis) -> None:
    client = PushClient(redis, SETTINGS)
    users = [f"learner-{i}" for i in range(20)]
    await client.import_attributes((u, {"cohort": "intermediate"}) for u in users)
    await DeviceRegistry(redis, KEYS).register(users[0], Device("fcm", "tok-0"))  # only one learner has a device
    await _campaign(client, "undelivered")
    await client.launch_campaign("undelivered", 100)
    before = await _deliver(redis, client, "undelivered")
    assert before["arms"][0]["delivered"] == 1
    # Five conversions and three opens, from learners the push never reached, and one open of the delivered learner.
    events = [{"type": "converted", "campaign": "undelivered", "user": u} for u in users[1:6]]
    events += [{"type": "opened", "campaign": "undelivered", "user": u} for u in users[:4]]
    results = await client.report_events(events + events)  # the retries are duplicates
    assert [r["status"] for r in results] == ["counted"] * len(events) + ["duplicate"] * len(events)
    app = TestClient(TestServer(create_app(SETTINGS, redis)))
    await app.start_server()
    try:
        resp = await app.get("/v1/campaigns/undelivered/report", headers=AUTH)
        assert resp.status == 200, await resp.text()
        report = await resp.json()
        resp = await app.get("/v1/campaigns/undelivered/report.png", headers=AUTH)
        assert resp.status == 200
    finally:
        await app.close()
    (a,) = report["arms"]
    assert (a["assigned"], a["delivered"], a["converted"], a["opened"]) == (20, 1, 5, 4)
    assert (a["converted_delivered"], a["opened_delivered"]) == (0, 1)
    assert a["cr"] == {"value": 0.0, "ci95": pytest.approx(list(wilson(0, 1))), "count": 0, "of": 1}
    assert a["ctr"]["value"] == 1.0 and a["ctr"]["ci95"][1] == 1.0
    assert a["conversion_itt"]["value"] == pytest.approx(5 / 20)
    assert "undelivered" in format_report(report)
    # One set per (campaign, arm, type) instead of one marker key per learner.
    assert await redis.smembers(KEYS.event_users("undelivered", "v0", "converted")) == {u.encode() for u in users[1:6]}
    assert not [k async for k in redis.scan_iter(f"{PREFIX}:evt:*")]


def test_wilson_and_the_z_test_refuse_more_successes_than_trials() -> None:
    with pytest.raises(ValueError, match="successes"):
        wilson(5, 1)
    with pytest.raises(ValueError, match="successes"):
        two_proportion(3, 2, 1, 2)
    assert wilson(0, 0) is None and two_proportion(1, 0, 1, 2) is None


async def test_events_for_campaigns_that_are_not_stored_are_ignored_and_store_nothing(redis: aioredis.Redis) -> None:
    client = PushClient(redis, SETTINGS)
    events = [{"type": "opened", "campaign": "made-up", "user": f"u{i}", "variant": f"var{i}"} for i in range(50)]
    results = await client.report_events(events)
    assert {r["status"] for r in results} == {"ignored"} and {r["reason"] for r in results} == {"unknown_campaign"}
    assert await redis.dbsize() == 0


# ---------------------------------------------------------------------------- 2: campaign ids from URLs


async def test_a_campaign_id_naming_another_key_is_not_found(redis: aioredis.Redis) -> None:
    client = PushClient(redis, SETTINGS)
    await client.import_attributes([("learner-1", {"cohort": "intermediate"})])
    await _campaign(client, "foo")
    await client.launch_campaign("foo", 10)  # foo:members (a set) and foo:fanout (a hash) now exist
    assert await CampaignStore(redis, KEYS).get("foo:members") is None
    app = TestClient(TestServer(create_app(SETTINGS, redis)))
    await app.start_server()
    try:
        for path in ("/v1/campaigns/foo:members", "/v1/campaigns/foo:members/status", "/v1/campaigns/foo:fanout",
                     "/v1/campaigns/foo:members/report"):
            resp = await app.get(path, headers=AUTH)
            assert resp.status == 404, (path, resp.status, await resp.text())
    finally:
        await app.close()


# ---------------------------------------------------------------------------- 3, 4: attributes and the shared tz field


async def test_replacing_or_importing_attributes_keeps_the_time_zone_set_in_preferences(redis: aioredis.Redis) -> None:
    client = PushClient(redis, SETTINGS)
    await client.set_preferences("learner-1", timezone="Asia/Tokyo")
    await client.set_preferences("learner-2", timezone="Asia/Tokyo")
    await client.set_attributes("learner-1", {"cohort": "intermediate"}, replace=True)
    assert (await client.preferences("learner-1")).timezone == "Asia/Tokyo"
    assert (await client.attributes("learner-1")).timezone == "Asia/Tokyo"
    await client.import_attributes([("learner-2", {"cohort": "advanced"})])
    assert (await client.preferences("learner-2")).timezone == "Asia/Tokyo"
    # Named explicitly, it is still set or cleared.
    await client.import_attributes([("learner-2", {"cohort": "advanced", "timezone": "Europe/Paris"})])
    assert (await client.preferences("learner-2")).timezone == "Europe/Paris"
    await client.set_attributes("learner-1", {"timezone": None}, replace=True)
    assert (await client.preferences("learner-1")).timezone is None


async def test_an_import_naming_a_learner_twice_leaves_no_stale_index_entry(redis: aioredis.Redis) -> None:
    attrs = UserAttributes(redis, KEYS)
    assert await attrs.import_many([("learner-1", {"cohort": "beginner", "skills": ["sql"]}),
                                    ("learner-2", {"cohort": "beginner"}),
                                    ("learner-1", {"cohort": "advanced", "skills": ["python"]})]) == 3
    assert await redis.smembers(KEYS.audience_index("cohort", "beginner")) == {b"learner-2"}
    assert await redis.smembers(KEYS.audience_index("cohort", "advanced")) == {b"learner-1"}
    assert not await redis.exists(KEYS.audience_index("skill", "sql"))
    assert (await attrs.get("learner-1")).skills == ("python",)


# ---------------------------------------------------------------------------- 5: a launch that fails half-way


async def test_a_launch_that_fails_while_materializing_commits_nothing(redis: aioredis.Redis) -> None:
    client = PushClient(redis, SETTINGS)
    await _campaign(client, "half-way")
    index = KEYS.audience_index("cohort", "intermediate")
    await redis.set(index, "not a set")  # the audience cannot be computed: the launch fails after its checks
    with pytest.raises(aioredis.ResponseError):
        await client.launch_campaign("half-way", 100)
    status = await client.campaign_status("half-way")
    assert status["fanout"]["state"] == "none" and status["stage_percent"] == 0
    assert not await redis.smembers(KEYS.fanout_jobs)
    assert [k async for k in redis.scan_iter(f"{PREFIX}:cmp:half-way:members*")] == []
    await redis.delete(index)
    await client.import_attributes((f"learner-{i}", {"cohort": "intermediate"}) for i in range(30))
    launched = await client.launch_campaign("half-way", 100)  # not stuck: no 409
    assert launched["fanout"]["members"] == 30
    assert await FanoutRunner(redis, SETTINGS).run_pending() == 1
    assert (await client.campaign_status("half-way"))["fanout"]["sent"] == 30


# ---------------------------------------------------------------------------- 6: a trailing newline is not valid


def test_validation_refuses_a_trailing_newline() -> None:
    with pytest.raises(MessageInvalid):
        parse_attributes({"cohort": "spring\n"})
    with pytest.raises(MessageInvalid):
        parse_attributes({"topics": ["spring\n"]})
    with pytest.raises(MessageInvalid):
        parse_audience({"topic": "spring\n"})
    with pytest.raises(MessageInvalid):
        parse_campaign({"id": "spring\n", "template": "t", "audience": {"topic": "spring"}, "category": "general"}, 0.0)
    with pytest.raises(MessageInvalid):
        parse_events([{"type": "opened", "campaign": "spring\n", "user": "u1"}])
    with pytest.raises(MessageInvalid):
        parse_preferences({"opt_out": {"categories": ["spring\n"]}})
    for field, value in (("id", "spring\n"), ("user", "spring\n"), ("category", "spring\n"), ("campaign", "spring\n")):
        with pytest.raises(MessageInvalid):
            parse_message({"id": "m1", "user": "u1", "title": "t", field: value})
    for device in ({"apns": "a" * 64 + "\n"},
                   {"webpush": {"endpoint": "https://push.example/s1", "keys": {"p256dh": "B" * 87, "auth": "A" * 22 + "\n"}}}):
        with pytest.raises(MessageInvalid):
            parse_message({"id": "m1", "devices": [device], "title": "t"})
    assert parse_message_id("cmp:spring\n:u1") is None


# ---------------------------------------------------------------------------- 9: long user ids


async def test_a_learner_with_a_120_character_id_gets_the_campaign_message(redis: aioredis.Redis) -> None:
    client = PushClient(redis, SETTINGS)
    long_user = "u" * 119 + "x"
    other = "u" * 119 + "y"
    mid0 = message_id("long-ids", long_user)
    assert len(mid0) <= 128 and mid0 == message_id("long-ids", long_user)  # deterministic
    assert message_id("long-ids", long_user) != message_id("long-ids", other)
    assert len(message_id("long-ids", long_user, 3)) <= 128 and message_id("long-ids", long_user, 3) != message_id(
        "long-ids", long_user)
    assert message_id("long-ids", "short") == "cmp:long-ids:short"
    await client.import_attributes([(long_user, {"cohort": "intermediate"}), (other, {"cohort": "intermediate"})])
    await _campaign(client, "long-ids")
    await client.launch_campaign("long-ids", 100)
    assert await FanoutRunner(redis, SETTINGS).run_pending() == 1
    job = (await client.campaign_status("long-ids"))["fanout"]
    assert (job["sent"], job["failed"], job["errors"]) == (2, 0, [])
    queued = [json.loads(f[b"m"]) for stream in (KEYS.stream, KEYS.stream_high) for _, f in await redis.xrange(stream)]
    assert sorted(m["user"] for m in queued) == [long_user, other]
    mid = next(m["id"] for m in queued if m["user"] == long_user)
    assert mid == message_id("long-ids", long_user)
    # The app reports with the message id and the user: counted for that learner; a user it does not name: refused.
    r = await client.report_events([{"type": "opened", "message_id": mid, "user": long_user},
                                    {"type": "converted", "message_id": mid}])
    assert [x["status"] for x in r] == ["counted", "ignored"] and r[1]["reason"] == "user_unknown"
    with pytest.raises(MessageInvalid):
        await client.report_events([{"type": "opened", "message_id": mid, "user": other}])


# ---------------------------------------------------------------------------- 14: the CLI's errors


def test_cli_errors_for_a_non_list_event_file_and_an_unknown_campaign(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}cli"\n')
    events = tmp_path / "events.json"
    events.write_text(json.dumps({"type": "opened", "campaign": "c", "user": "u"}))
    assert main(["--config", str(cfg), "events", "import", str(events)]) == 2
    err = capsys.readouterr().err
    assert "JSON list of events" in err and "Traceback" not in err
    assert main(["--config", str(cfg), "campaigns", "report", "nope"]) != 0
    assert "no such campaign" in capsys.readouterr().err

