"""Rich fields at the door: each bad value is a 422 naming its field; good ones round-trip through the queue."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pushgw.core.config import ApiClient, ApiSettings, ApnsApp, RedisSettings, Settings
from pushgw.core.schema import Action, MessageInvalid, Rich, Sound, loads_message, parse_message

TOKEN = "rich-enqueue-token-0123456789"
BASE = {"user": "learner-1", "title": "Quiz passed"}


def fields_of(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(MessageInvalid) as e:
        parse_message({**BASE, **obj})
    return [err.field for err in e.value.errors]


@pytest.mark.parametrize(("obj", "field"), [
    ({"subtitle": 5}, "subtitle"),
    ({"image": "http://cdn.example/q.png"}, "image"),
    ({"image": "https://"}, "image"),
    ({"icon": "ic quiz"}, "icon"),
    ({"badge": -1}, "badge"),
    ({"badge": True}, "badge"),
    ({"badge": 1.5}, "badge"),
    ({"sound": "chime caf"}, "sound"),
    ({"sound": {"name": "a.caf", "loud": True}}, "sound"),
    ({"sound": {"name": "none", "critical": True}}, "sound.name"),
    ({"sound": {"name": "a.caf", "volume": 0.5}}, "sound.volume"),
    ({"sound": {"name": "a.caf", "critical": True, "volume": 1.5}}, "sound.volume"),
    ({"sound": {"name": "a.caf", "critical": "yes"}}, "sound.critical"),
    ({"interruption_level": "urgent"}, "interruption_level"),
    ({"relevance_score": 1.5}, "relevance_score"),
    ({"relevance_score": True}, "relevance_score"),
    ({"thread": "a\nb"}, "thread"),
    ({"thread": "x" * 65}, "thread"),
    ({"actions": [], "actions_category": "Q"}, "actions"),
    ({"actions": [{"id": f"a{i}", "title": "A"} for i in range(5)], "actions_category": "Q"}, "actions"),
    ({"actions": [{"id": "a b", "title": "A"}], "actions_category": "Q"}, "actions[0].id"),
    ({"actions": [{"id": "a", "title": ""}], "actions_category": "Q"}, "actions[0].title"),
    ({"actions": [{"id": "a", "title": "A", "url": "x"}], "actions_category": "Q"}, "actions[0]"),
    ({"actions": [{"id": "a", "title": "A"}, {"id": "a", "title": "B"}], "actions_category": "Q"}, "actions[1].id"),
    ({"actions": [{"id": "a", "title": "A", "icon": "http://x/i.png"}], "actions_category": "Q"}, "actions[0].icon"),
    ({"actions": [{"id": "a", "title": "A", "destructive": 1}], "actions_category": "Q"}, "actions[0].destructive"),
    ({"actions": [{"id": "a", "title": "A"}]}, "actions_category"),
    ({"actions_category": "has space"}, "actions_category"),
    ({"link": "javascript:alert(1)"}, "link"),
    ({"link": "http://campus.example/x"}, "link"),
    ({"link": "/relative"}, "link"),
    ({"title_loc_key": "bad key"}, "title_loc_key"),
    ({"title_loc_args": ["x"]}, "title_loc_args"),
    ({"body_loc_key": "K", "body_loc_args": [1]}, "body_loc_args"),
    ({"lang": "english language"}, "lang"),
    ({"dir": "up"}, "dir"),
    ({"require_interaction": "yes"}, "require_interaction"),
    ({"renotify": 1}, "renotify"),
    ({"silent": "no"}, "silent"),
])
def test_each_bad_rich_field_is_refused_by_name(obj: dict[str, Any], field: str) -> None:
    assert field in fields_of(obj)


def test_a_silent_message_refuses_everything_visible_by_name() -> None:
    with pytest.raises(MessageInvalid) as e:
        parse_message({"user": "u", "silent": True, "title": "t", "badge": 1, "sound": "default", "data": {"k": "v"}})
    assert [err.field for err in e.value.errors] == ["title", "badge", "sound"]


def test_silent_false_needs_something_to_show_and_subtitle_needs_a_title() -> None:
    with pytest.raises(MessageInvalid) as e:
        parse_message({"user": "u", "silent": False, "data": {"k": "v"}})
    assert [err.field for err in e.value.errors] == ["silent"]
    with pytest.raises(MessageInvalid) as e:
        parse_message({"user": "u", "body": "b", "subtitle": "s"})
    assert [err.field for err in e.value.errors] == ["subtitle"]


def test_alert_decorations_need_alert_text() -> None:
    with pytest.raises(MessageInvalid) as e:
        parse_message({"user": "u", "data": {"k": "v"}, "image": "https://cdn.example/q.png", "badge": 1,
                       "interruption_level": "passive", "renotify": True})
    assert [err.field for err in e.value.errors] == ["image", "interruption_level", "renotify"]
    assert parse_message({"user": "u", "body_loc_key": "K", "image": "https://cdn.example/q.png"}).rich is not None


def test_silent_is_explicit_or_inferred() -> None:
    assert parse_message({"user": "u", "silent": True}).is_silent  # a wake-up push with no data is valid
    assert parse_message({"user": "u", "data": {"k": "v"}}).is_silent  # as before: no title or body
    assert not parse_message({"user": "u", "badge": 0}).is_silent  # a badge update is an alert push
    assert not parse_message({"user": "u", "body_loc_key": "K"}).is_silent
    with pytest.raises(MessageInvalid):
        parse_message({"user": "u", "lang": "fr"})  # nothing to show, no data


def test_rich_message_round_trips_through_the_queue_form() -> None:
    m = parse_message({
        **BASE, "subtitle": "Stats", "body": "86%", "image": "https://cdn.example/q.png", "icon": "ic_quiz", "badge": 2,
        "sound": {"name": "alarm.caf", "critical": True, "volume": 1}, "interruption_level": "critical",
        "relevance_score": 1, "thread": "stat101",
        "actions": [{"id": "open", "title": "Open", "foreground": True, "icon": "/i.png"}], "actions_category": "Q",
        "link": "campus://quiz/42", "title_loc_key": "T", "title_loc_args": ["a"], "body_loc_key": "B",
        "body_loc_args": ["b", "c"], "lang": "pt-BR", "dir": "rtl", "require_interaction": True, "renotify": True,
        "silent": False,
    })
    assert m.rich == Rich(
        silent=False, silent_given=True, subtitle="Stats", image="https://cdn.example/q.png", icon="ic_quiz", badge=2,
        sound=Sound("alarm.caf", True, 1.0), interruption_level="critical", relevance_score=1.0, thread="stat101",
        actions=(Action("open", "Open", "/i.png", False, True),), actions_category="Q", link="campus://quiz/42",
        title_loc_key="T", title_loc_args=("a",), body_loc_key="B", body_loc_args=("b", "c"), lang="pt-BR", dir="rtl",
        require_interaction=True, renotify=True)
    assert m.rich.critical
    assert loads_message(m.dumps()) == m


def test_a_message_without_rich_fields_has_none_and_the_same_queue_form() -> None:
    obj = {"v": 1, "id": "m-1", "user": "u", "title": "t", "body": "b", "data": {"k": "v"}, "collapse_key": "c",
           "category": "reminder", "priority": "high"}
    m = parse_message(obj)
    assert m.rich is None
    assert m.to_json() == obj


# --- through the HTTP API (a real loopback server) --------------------------------------------


def api_settings(*apps: ApnsApp) -> Settings:
    return Settings(redis=RedisSettings(prefix="richtest"), apns=apps,
                    api=ApiSettings(clients=(ApiClient("course-service", TOKEN, ("enqueue",)),)))


async def post(client: TestClient[Any, Any], obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/messages", json=obj, headers={"Authorization": f"Bearer {TOKEN}"})
    return resp.status, await resp.json()


async def test_api_refuses_an_http_image_naming_the_field(make_client: Any) -> None:
    status, doc = await post(await make_client(api_settings()), {**BASE, "image": "http://cdn.example/q.png"})
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["image"]


async def test_critical_alerts_need_the_entitlement_flag_of_the_app(make_client: Any) -> None:
    critical = {**BASE, "sound": {"name": "alarm.caf", "critical": True}}
    plain = await make_client(api_settings(ApnsApp("default", "org.example.campus")))
    status, doc = await post(plain, critical)
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["sound.critical"]
    assert "apns.default.critical_alerts" in doc["error"]["fields"][0]["message"]
    status, doc = await post(plain, {**BASE, "interruption_level": "critical"})
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["interruption_level"]
    status, _ = await post(plain, {"devices": [{"fcm": "tok"}], "title": "t", "interruption_level": "critical"})
    assert status == 202  # no APNs device: nothing needs Apple's entitlement

    entitled = await make_client(api_settings(ApnsApp("default", "org.example.campus", critical_alerts=True)))
    status, _ = await post(entitled, {**critical, "id": "crit-1"})
    assert status == 202


async def test_a_critical_alert_to_a_user_needs_the_entitlement_on_every_configured_apns_app(make_client: Any) -> None:
    # A learner's registered devices may be on any configured app: one without the flag refuses the message.
    apps = (ApnsApp("default", "org.example.campus", critical_alerts=True), ApnsApp("kids", "org.example.kids"))
    client = await make_client(api_settings(*apps))
    status, doc = await post(client, {"user": "learner-1", "title": "Exam starts now", "interruption_level": "critical"})
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["interruption_level"]
    assert "apns.kids.critical_alerts" in doc["error"]["fields"][0]["message"]


async def test_size_limit_applies_to_the_final_payload_and_names_provider_and_bytes(make_client: Any) -> None:
    # Each action title is small, but FCM carries the buttons twice escaped in data: the final payload counts.
    actions = [{"id": f"a{i}", "title": '"' * 120} for i in range(4)]
    obj = {"devices": [{"fcm": "tok"}], "title": "t", "body": "x" * 2900, "actions": actions, "actions_category": "Q"}
    status, doc = await post(await make_client(api_settings()), obj)
    assert status == 422
    message = doc["error"]["fields"][0]["message"]
    assert message.startswith("fcm payload is ") and "bytes, limit is 4096" in message


async def test_api_refuses_a_live_activity_without_token_auth_or_to_an_fcm_device(make_client: Any) -> None:
    la = {"devices": [{"apns": "ab" * 32}], "live_activity": {
        "event": "update", "timestamp": 1_800_000_000, "content_state": {"seconds_left": 60}}}
    certificate = await make_client(api_settings(ApnsApp("default", "org.example.campus", cert_file="/x.pem")))
    status, doc = await post(certificate, la)
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["live_activity"]
    assert "token auth" in doc["error"]["fields"][0]["message"]
    status, doc = await post(certificate, {**la, "devices": [{"fcm": "tok"}]})
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["live_activity"]
    token = await make_client(api_settings(ApnsApp("default", "org.example.campus", key_file="/k.p8", key_id="K",
                                                   team_id="T")))
    status, _ = await post(token, {**la, "id": "la-1"})
    assert status == 202


async def test_api_refuses_mdm_without_the_mdm_topic_and_background_with_an_alert(make_client: Any) -> None:
    client = await make_client(api_settings(ApnsApp("default", "org.example.campus")))
    mdm = {"devices": [{"apns": "ab" * 32}], "apns_push_type": "mdm", "data": {"mdm": "magic"}}
    status, doc = await post(client, mdm)
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["apns_push_type"]
    status, doc = await post(client, {**BASE, "apns_push_type": "background"})
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["apns_push_type"]
