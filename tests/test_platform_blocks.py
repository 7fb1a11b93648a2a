"""Per-platform blocks (`apns`, `fcm`, `webpush`): checked against each provider's documented schema at
the door, deep-merged over what the neutral fields produce, and sent where the provider expects them.

The golden tests send through the real provider clients to the local fakes over TLS; the fakes check
each field where the provider documents it (FCM v1 field names and types, `aps` keys, the Notification
API options), so a block that put a field in the wrong place fails here as it would at the provider.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from pushgw.core.config import ApiClient, ApiSettings, ApnsApp, RedisSettings, Settings
from pushgw.core.schema import Device, Message, MessageInvalid, loads_message, parse_message
from pushgw.providers.apns import ApnsProvider
from pushgw.providers.base import Delivered, Delivery, PayloadTooLarge
from pushgw.providers.fakes.apns import FakeApns
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.webpush import FakePushService
from pushgw.providers.fcm import FcmProvider
from pushgw.providers.payloads import check_payload_limits, deep_merge
from pushgw.providers.webpush import WebPushProvider

TOPIC = "org.example.campus"
APNS_TOKEN = "cd" * 32
TOKEN = "t" * 32
BASE: dict[str, Any] = {"id": "live-1", "user": "learner-9", "title": "Live class", "body": "Starts in 10 minutes"}


def with_blocks(**blocks: Any) -> Message:
    return parse_message({**BASE, **blocks})


def refused(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(MessageInvalid) as e:
        parse_message(obj)
    return [err.field for err in e.value.errors]


# --- validation at the door -------------------------------------------------------------------


@pytest.mark.parametrize(("blocks", "field"), [
    ({"fcm": {"android": {"notifcation": {}}}}, "fcm.android.notifcation"),
    ({"fcm": {"android": {"notification": {"chanel_id": "x"}}}}, "fcm.android.notification.chanel_id"),
    ({"fcm": {"android": {"priority": "URGENT"}}}, "fcm.android.priority"),
    ({"fcm": {"android": {"ttl": "3600"}}}, "fcm.android.ttl"),
    ({"fcm": {"webpush": {"fcm_options": {"link": "http://campus.example"}}}}, "fcm.webpush.fcm_options.link"),
    ({"fcm": {"token": "other"}}, "fcm.token"),
    ({"apns": {"payload": {"aps": {"badges": 1}}}}, "apns.payload.aps.badges"),
    ({"apns": {"payload": {"aps": {"alert": {"titel": "x"}}}}}, "apns.payload.aps.alert.titel"),
    ({"apns": {"payload": {"aps": {"content-available": True}}}}, "apns.payload.aps.content-available"),
    ({"apns": {"payload": {"pushgw": {}}}}, "apns.payload.pushgw"),
    ({"apns": {"headers": {"apns-topic": "org.other"}}}, "apns.headers.apns-topic"),
    ({"apns": {"headers": {"apns-push-type": "banner"}}}, "apns.headers.apns-push-type"),
    ({"apns": {"headers": {"apns-priority": 10}}}, "apns.headers.apns-priority"),
    ({"apns": {"aps": {}}}, "apns.aps"),
    ({"webpush": {"notification": {"require_interaction": True}}}, "webpush.notification.require_interaction"),
    ({"webpush": {"notification": {"actions": [{"title": "Open"}]}}}, "webpush.notification.actions[0].action"),
    ({"webpush": {"headers": {"Urgency": "asap"}}}, "webpush.headers.urgency"),
    ({"webpush": {"headers": {"Authorization": "x"}}}, "webpush.headers.authorization"),
    ({"webpush": []}, "webpush"),
])
def test_a_field_the_provider_does_not_document_is_refused_by_its_path(blocks: dict[str, Any], field: str) -> None:
    assert refused({**BASE, **blocks}) == [field]


def test_blocks_round_trip_through_the_queue_form() -> None:
    obj = {**BASE, "fcm": {"android": {"notification": {"channel_id": "live"}}},
           "apns": {"headers": {"apns-priority": "10"}, "payload": {"aps": {"interruption-level": "time-sensitive"},
                                                                   "course": {"id": 7}}},
           "webpush": {"headers": {"urgency": "high"}, "notification": {"vibrate": [100, 50, 100]}}}
    msg = parse_message(obj)
    again = loads_message(msg.dumps())
    assert again.overrides == msg.overrides
    assert again.to_json() == msg.to_json()


def test_a_message_without_blocks_has_no_overrides() -> None:
    assert parse_message(BASE).overrides is None


def test_deep_merge_merges_objects_and_replaces_other_values() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [2], "e": 3}, "d": {"x": 1}}) == {"a": {"b": 1, "c": [2], "e": 3}, "d": {"x": 1}}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}  # the neutral payload is not changed in place


def test_the_final_payload_after_the_merge_is_size_checked() -> None:
    msg = with_blocks(fcm={"android": {"data": {"blob": "x" * 4000}}})
    with pytest.raises(PayloadTooLarge, match="fcm payload is"):
        check_payload_limits(msg, ("fcm",))
    check_payload_limits(msg, ("apns", "webpush"))  # the FCM block does not count against the others


# --- on the wire ------------------------------------------------------------------------------




async def test_apns_block_sets_headers_and_merges_into_aps_and_custom_keys(
        apns: tuple[FakeApns, ApnsProvider]) -> None:
    fake, provider = apns
    msg = with_blocks(apns={"headers": {"apns-priority": "10", "apns-collapse-id": "live-class"},
                            "payload": {"aps": {"interruption-level": "time-sensitive", "sound": "bell.caf",
                                                "alert": {"launch-image": "live.png"}},
                                        "course": {"id": 7}}})
    out = await provider.send(Delivery(msg, Device("apns", APNS_TOKEN), 1, None))
    assert isinstance(out, Delivered), out
    r = fake.received[-1]
    assert r.payload == {
        "aps": {"alert": {"title": "Live class", "body": "Starts in 10 minutes", "launch-image": "live.png"},
                "sound": "bell.caf", "interruption-level": "time-sensitive"},
        "course": {"id": 7},
        "pushgw": {"id": "live-1", "category": "general"},
    }
    assert r.headers["apns-priority"] == "10" and r.headers["apns-collapse-id"] == "live-class"
    assert r.headers["apns-push-type"] == "alert" and r.headers["apns-topic"] == TOPIC


async def test_fcm_block_merges_android_apns_webpush_and_fcm_options(fcm: tuple[FakeFcm, FcmProvider]) -> None:
    fake, provider = fcm
    msg = with_blocks(fcm={
        "android": {"priority": "HIGH", "notification": {"channel_id": "live", "visibility": "PUBLIC"}},
        "apns": {"headers": {"apns-priority": "10"}, "payload": {"aps": {"interruption-level": "time-sensitive"}}},
        "webpush": {"fcm_options": {"link": "https://campus.example/live/1"}},
        "fcm_options": {"analytics_label": "live-reminder"},
    })
    out = await provider.send(Delivery(msg, Device("fcm", "tok-1")))
    assert isinstance(out, Delivered), out
    assert fake.received[-1].message == {
        "token": "tok-1",
        "notification": {"title": "Live class", "body": "Starts in 10 minutes"},
        "data": {"pushgw_id": "live-1", "pushgw_category": "general"},
        "android": {"priority": "HIGH", "notification": {"tag": "live-1", "channel_id": "live", "visibility": "PUBLIC"}},
        "apns": {"headers": {"apns-priority": "10"}, "payload": {"aps": {"interruption-level": "time-sensitive"}}},
        "webpush": {"fcm_options": {"link": "https://campus.example/live/1"}},
        "fcm_options": {"analytics_label": "live-reminder"},
    }


async def test_webpush_block_sets_headers_and_notification_options(
        web: tuple[FakePushService, WebPushProvider, Device]) -> None:
    svc, provider, device = web
    msg = with_blocks(webpush={"headers": {"Urgency": "high", "Topic": "live1"},
                               "notification": {"vibrate": [200, 100, 200], "tag": "live", "timestamp": 1764835200000,
                                                "actions": [{"action": "join", "title": "Join"}]}})
    out = await provider.send(Delivery(msg, device, 1, time.time() + 600))
    assert isinstance(out, Delivered), out
    r = svc.received[-1]
    assert r.topic == "live1"
    assert orjson.loads(r.plaintext) == {
        "id": "live-1", "category": "general", "title": "Live class", "body": "Starts in 10 minutes", "tag": "live",
        "vibrate": [200, 100, 200], "timestamp": 1764835200000, "actions": [{"action": "join", "title": "Join"}],
    }


# --- through the HTTP API ---------------------------------------------------------------------


def api_settings(*apps: ApnsApp) -> Settings:
    return Settings(redis=RedisSettings(prefix="blocktest"), apns=apps,
                    api=ApiSettings(clients=(ApiClient("course-service", TOKEN, ("enqueue",)),)))


async def post(client: TestClient[Any, Any], obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/messages", json=obj, headers={"Authorization": f"Bearer {TOKEN}"})
    return resp.status, await resp.json()


async def test_api_refuses_a_misspelt_block_field_with_422_naming_it(make_client: Any) -> None:
    status, doc = await post(await make_client(api_settings()), {**BASE, "fcm": {"android": {"notifcation": {}}}})
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["fcm.android.notifcation"]


async def test_api_refuses_a_block_that_makes_the_payload_too_large(make_client: Any) -> None:
    obj = {**BASE, "devices": [{"fcm": "tok"}], "fcm": {"android": {"data": {"blob": "x" * 4000}}}}
    del obj["user"]
    status, doc = await post(await make_client(api_settings()), obj)
    assert status == 422 and doc["error"]["fields"][0]["message"].startswith("fcm payload is ")


async def test_api_critical_sound_in_the_apns_block_needs_the_entitlement(make_client: Any) -> None:
    obj = {**BASE, "apns": {"payload": {"aps": {"sound": {"critical": 1, "name": "alarm.caf"}}}}}
    status, doc = await post(await make_client(api_settings(ApnsApp("default", TOPIC))), obj)
    assert status == 422 and [f["field"] for f in doc["error"]["fields"]] == ["apns.payload.aps.sound.critical"]
    entitled = await make_client(api_settings(ApnsApp("default", TOPIC, critical_alerts=True)))
    status, _ = await post(entitled, {**obj, "id": "crit-2"})
    assert status == 202
