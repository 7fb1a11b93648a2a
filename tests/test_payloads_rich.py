"""Rich fields on the wire: the exact payload and headers each neutral field produces per provider.

Every test sends through the real provider client to the local fake of that provider (HTTP/2 over
TLS), and the fakes check each field where the provider documents it (`aps_fault`, the FCM v1 field
types, `notification_fault` for what a browser's showNotification accepts), so a field put in the
wrong place fails here as it would on the device.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson
import pushgw.providers.apns as apns_module
import pushgw.providers.fcm as fcm_module
import pushgw.providers.webpush as webpush_module
import pytest
from pushgw.core.schema import Device, Message, parse_message
from pushgw.providers.apns import ApnsProvider
from pushgw.providers.base import Delivered, Delivery, Rejected
from pushgw.providers.fakes.apns import FakeApns, aps_fault
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.webpush import FakePushService, notification_fault
from pushgw.providers.fcm import FcmProvider
from pushgw.providers.payloads import apns_collapse_id, fcm_message
from pushgw.providers.webpush import WebPushProvider, topic_for

TOPIC = "org.example.campus"
APNS_TOKEN = "ab" * 32

# One message using every neutral field that shows something (the loc keys have a test of their own).
RICH: dict[str, Any] = {
    "id": "quiz-42", "user": "learner-9", "category": "reward", "data": {"score": "86"},
    "title": "Quiz passed", "subtitle": "Statistics 101", "body": "You scored 86%",
    "image": "https://cdn.campus.example/badges/q42.png", "icon": "/icons/badge.png", "badge": 3,
    "sound": "chime.caf", "interruption_level": "time-sensitive", "relevance_score": 0.8, "thread": "course-stat101",
    "actions": [{"id": "open", "title": "See badge", "foreground": True},
                {"id": "later", "title": "Later", "icon": "/icons/later.png", "destructive": True}],
    "actions_category": "BADGE", "link": "https://campus.example/badges/q42",
    "lang": "en", "dir": "ltr", "require_interaction": True, "renotify": True,
}
ACTIONS_JSON = [{"id": "open", "title": "See badge", "foreground": True},
                {"id": "later", "title": "Later", "icon": "/icons/later.png", "destructive": True}]


def rich(**changes: Any) -> Message:
    obj = {**RICH, **changes}
    return parse_message({k: v for k, v in obj.items() if v is not None})




async def send_apns(apns: tuple[FakeApns, ApnsProvider], msg: Message) -> tuple[dict[str, str], dict[str, Any]]:
    fake, provider = apns
    out = await provider.send(Delivery(msg, Device("apns", APNS_TOKEN), 1, None))
    assert isinstance(out, Delivered), out
    r = fake.received[-1]
    return r.headers, r.payload


async def send_fcm(fcm: tuple[FakeFcm, FcmProvider], msg: Message) -> dict[str, Any]:
    fake, provider = fcm
    out = await provider.send(Delivery(msg, Device("fcm", "tok-1")))
    assert isinstance(out, Delivered), out
    return fake.received[-1].message


async def send_web(web: tuple[FakePushService, WebPushProvider, Device], msg: Message) -> tuple[str | None, dict[str, Any]]:
    svc, provider, device = web
    out = await provider.send(Delivery(msg, device, 1, time.time() + 600))
    assert isinstance(out, Delivered), out
    r = svc.received[-1]
    return r.topic, orjson.loads(r.plaintext)


# --- APNs -------------------------------------------------------------------------------------


async def test_apns_rich_alert_carries_each_field_in_its_aps_key(apns: tuple[FakeApns, ApnsProvider]) -> None:
    headers, payload = await send_apns(apns, rich())
    assert payload == {
        "aps": {
            "alert": {"title": "Quiz passed", "subtitle": "Statistics 101", "body": "You scored 86%"},
            "badge": 3, "sound": "chime.caf", "thread-id": "course-stat101", "category": "BADGE",
            "mutable-content": 1, "interruption-level": "time-sensitive", "relevance-score": 0.8,
        },
        "score": "86",
        "pushgw": {"id": "quiz-42", "category": "reward", "image": "https://cdn.campus.example/badges/q42.png",
                   "link": "https://campus.example/badges/q42", "actions": ACTIONS_JSON},
    }
    assert headers["apns-push-type"] == "alert" and headers["apns-priority"] == "5"
    assert headers["apns-collapse-id"] == "quiz-42"  # no collapse_key: the message id


async def test_apns_localized_alert_uses_loc_keys_and_args(apns: tuple[FakeApns, ApnsProvider]) -> None:
    msg = parse_message({"id": "m-loc", "user": "u", "title_loc_key": "QUIZ_TITLE", "title_loc_args": ["Stats"],
                         "body_loc_key": "QUIZ_BODY", "body_loc_args": ["86", "Stats"]})
    _, payload = await send_apns(apns, msg)
    assert payload["aps"] == {"alert": {"title-loc-key": "QUIZ_TITLE", "title-loc-args": ["Stats"],
                                        "loc-key": "QUIZ_BODY", "loc-args": ["86", "Stats"]}, "sound": "default"}


async def test_apns_critical_sound_is_the_sound_dictionary(apns: tuple[FakeApns, ApnsProvider]) -> None:
    msg = parse_message({"id": "m-crit", "user": "u", "title": "Exam room changed",
                         "sound": {"name": "alarm.caf", "critical": True, "volume": 0.7}, "interruption_level": "critical"})
    _, payload = await send_apns(apns, msg)
    assert payload["aps"] == {"alert": {"title": "Exam room changed"}, "interruption-level": "critical",
                              "sound": {"critical": 1, "name": "alarm.caf", "volume": 0.7}}


async def test_apns_badge_only_update_has_no_alert_and_no_sound(apns: tuple[FakeApns, ApnsProvider]) -> None:
    headers, payload = await send_apns(apns, parse_message({"id": "m-clear", "user": "u", "badge": 0}))
    assert payload["aps"] == {"badge": 0}
    assert headers["apns-push-type"] == "alert"


async def test_apns_sound_none_sends_no_sound(apns: tuple[FakeApns, ApnsProvider]) -> None:
    _, payload = await send_apns(apns, parse_message({"id": "m-quiet", "user": "u", "body": "b", "sound": "none"}))
    assert payload["aps"] == {"alert": {"body": "b"}}


async def test_apns_explicit_silent_is_a_background_push(apns: tuple[FakeApns, ApnsProvider]) -> None:
    msg = parse_message({"id": "m-sync", "user": "u", "silent": True, "link": "campus://sync"})
    headers, payload = await send_apns(apns, msg)
    assert headers["apns-push-type"] == "background" and headers["apns-priority"] == "5"
    assert payload == {"aps": {"content-available": 1},
                       "pushgw": {"id": "m-sync", "category": "general", "link": "campus://sync"}}


async def test_policy_category_and_collapse_key_no_longer_set_aps_category_or_thread(
        apns: tuple[FakeApns, ApnsProvider]) -> None:
    msg = parse_message({"id": "m-1", "user": "u", "title": "t", "category": "reminder", "collapse_key": "session-7"})
    headers, payload = await send_apns(apns, msg)
    assert payload["aps"] == {"alert": {"title": "t"}, "sound": "default"}
    assert payload["pushgw"] == {"id": "m-1", "category": "reminder"}
    assert headers["apns-collapse-id"] == "session-7"


async def test_apns_collapse_id_from_a_long_message_id_is_hashed_to_64_bytes(apns: tuple[FakeApns, ApnsProvider]) -> None:
    long_id = "campaign:spring-2026/learner-123456789/" + "x" * 80
    headers, _ = await send_apns(apns, Message(id=long_id, title="t"))
    expected = "id-" + hashlib.sha256(long_id.encode()).hexdigest()[:40]
    assert headers["apns-collapse-id"] == expected == apns_collapse_id(Message(id=long_id, title="t"))
    assert len(expected) <= 64


async def test_fake_apns_refuses_an_aps_key_of_the_wrong_type(apns: tuple[FakeApns, ApnsProvider],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apns_module, "apns_payload", lambda m: b'{"aps": {"alert": {"title": "t"}, "badge": "3"}}')
    out = await apns[1].send(Delivery(Message(id="m", title="t"), Device("apns", APNS_TOKEN), 1, None))
    assert isinstance(out, Rejected) and "aps.badge" in out.reason


@pytest.mark.parametrize(("aps", "push_type", "fault"), [
    ({"alert": {"title": "t"}, "category": 3}, "alert", "aps.category"),
    ({"alert": {"title": "t"}, "interruption-level": "urgent"}, "alert", "aps.interruption-level"),
    ({"alert": {"title": "t"}, "relevance-score": 2}, "alert", "aps.relevance-score"),
    ({"alert": {"loc-args": ["x"]}}, "alert", "aps.alert.loc-args"),
    ({"alert": {"title": "t"}, "sound": {"critical": 1, "name": "a.caf", "volume": 1.5}}, "alert", "aps.sound.volume"),
    ({"alert": {"title": "t"}, "mutable-content": True}, "alert", "aps.mutable-content"),
    ({"alert": {"title": "t"}, "subtitle": "s"}, "alert", "unknown aps key subtitle"),
    ({"content-available": 1, "badge": 1}, "background", "a background push has no aps.badge"),
])
def test_fake_apns_checks_each_aps_key_by_apples_reference(aps: dict[str, Any], push_type: str, fault: str) -> None:
    assert aps_fault(aps, push_type) == fault


# --- FCM HTTP v1 --------------------------------------------------------------------------------


async def test_fcm_rich_message_maps_to_notification_android_data_and_webpush_link(
        fcm: tuple[FakeFcm, FcmProvider]) -> None:
    message = await send_fcm(fcm, rich(icon="ic_badge"))
    assert message == {
        "token": "tok-1",
        "notification": {"title": "Quiz passed", "body": "You scored 86%",
                         "image": "https://cdn.campus.example/badges/q42.png"},
        "data": {"score": "86", "pushgw_id": "quiz-42", "pushgw_category": "reward",
                 "pushgw_link": "https://campus.example/badges/q42", "pushgw_thread": "course-stat101",
                 "pushgw_actions": orjson.dumps(ACTIONS_JSON).decode(), "pushgw_badge": "3"},
        "android": {"priority": "normal", "notification": {
            "tag": "quiz-42", "icon": "ic_badge", "sound": "chime.caf", "click_action": "BADGE",
            "notification_count": 3}},
        "webpush": {"fcm_options": {"link": "https://campus.example/badges/q42"}},
        "apns": {"payload": {"aps": {
            "alert": {"title": "Quiz passed", "subtitle": "Statistics 101", "body": "You scored 86%"},
            "badge": 3, "sound": "chime.caf", "thread-id": "course-stat101", "category": "BADGE",
            "mutable-content": 1, "interruption-level": "time-sensitive", "relevance-score": 0.8}},
            "fcm_options": {"image": "https://cdn.campus.example/badges/q42.png"}},
    }


async def test_fcm_ios_device_gets_what_apns_shows_in_the_apns_object(fcm: tuple[FakeFcm, FcmProvider]) -> None:
    """An iOS app registered through FCM: FCM builds aps.alert from `notification` only, so badge, sound,
    thread, interruption level and the image's mutable-content travel in apns.payload.aps; without a
    subtitle the alert stays FCM's own."""
    msg = parse_message({"id": "m-ios", "user": "u", "title": "Live class", "body": "Starts in 10 minutes",
                         "badge": 2, "sound": {"name": "bell.caf", "critical": True, "volume": 0.5},
                         "thread": "live", "interruption_level": "time-sensitive",
                         "image": "https://cdn.campus.example/live.png"})
    message = await send_fcm(fcm, msg)
    assert message["apns"] == {
        "payload": {"aps": {"badge": 2, "sound": {"critical": 1, "name": "bell.caf", "volume": 0.5},
                            "thread-id": "live", "mutable-content": 1, "interruption-level": "time-sensitive"}},
        "fcm_options": {"image": "https://cdn.campus.example/live.png"}}
    assert message["notification"]["image"] == "https://cdn.campus.example/live.png"  # Android's


async def test_fcm_apns_block_from_the_sender_wins_over_the_mapped_fields(fcm: tuple[FakeFcm, FcmProvider]) -> None:
    msg = parse_message({"id": "m-ov", "user": "u", "title": "t", "badge": 2, "thread": "a",
                         "fcm": {"apns": {"payload": {"aps": {"thread-id": "b"}}}}})
    message = await send_fcm(fcm, msg)
    assert message["apns"] == {"payload": {"aps": {"badge": 2, "thread-id": "b"}}}


async def test_fake_fcm_checks_the_apns_payload_as_apns_would(fcm: tuple[FakeFcm, FcmProvider],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake refuses an `aps` key APNs does not know and an http image, so the mapping above is checked."""
    fake, provider = fcm

    def wrong(msg: Message, token: str) -> dict[str, Any]:
        out = fcm_message(msg, token)
        out["apns"] = {"payload": {"aps": {"thread_id": "x"}}}
        return out

    monkeypatch.setattr(fcm_module, "fcm_message", wrong)
    out = await provider.send(Delivery(parse_message({"id": "m-w", "user": "u", "title": "t"}), Device("fcm", "tok-1")))
    assert isinstance(out, Rejected) and "aps" in out.reason

    def http_image(msg: Message, token: str) -> dict[str, Any]:
        out = fcm_message(msg, token)
        out["apns"] = {"fcm_options": {"image": "http://cdn.campus.example/x.png"}}
        return out

    monkeypatch.setattr(fcm_module, "fcm_message", http_image)
    out = await provider.send(Delivery(parse_message({"id": "m-h", "user": "u", "title": "t"}), Device("fcm", "tok-1")))
    assert isinstance(out, Rejected) and "fcm_options.image" in out.reason
    assert not fake.received


async def test_android_badge_zero_travels_as_data_since_notification_count_zero_means_unset(
        fcm: tuple[FakeFcm, FcmProvider]) -> None:
    """FCM's AndroidNotification.notification_count 0 is "not set": a shown message with badge 0 sends no
    count, and the app clears its badge from data pushgw_badge; iOS through FCM gets aps.badge 0."""
    message = await send_fcm(fcm, parse_message({"id": "m-0", "user": "u", "title": "All caught up", "badge": 0}))
    assert "notification_count" not in message["android"]["notification"]
    assert message["data"]["pushgw_badge"] == "0"
    assert message["apns"] == {"payload": {"aps": {"badge": 0}}}
    message = await send_fcm(fcm, parse_message({"id": "m-5", "user": "u", "title": "5 new", "badge": 5}))
    assert message["android"]["notification"]["notification_count"] == 5 and message["data"]["pushgw_badge"] == "5"


async def test_fcm_localized_keys_go_to_the_android_notification(fcm: tuple[FakeFcm, FcmProvider]) -> None:
    msg = parse_message({"id": "m-loc", "user": "u", "title_loc_key": "QUIZ_TITLE", "title_loc_args": ["Stats"],
                         "body_loc_key": "QUIZ_BODY", "body_loc_args": ["86"], "collapse_key": "quiz"})
    message = await send_fcm(fcm, msg)
    assert "notification" not in message  # no literal text: the app's strings are shown
    assert message["android"] == {"priority": "normal", "collapse_key": "quiz", "notification": {
        "tag": "quiz", "title_loc_key": "QUIZ_TITLE", "title_loc_args": ["Stats"],
        "body_loc_key": "QUIZ_BODY", "body_loc_args": ["86"]}}


async def test_fcm_app_link_and_badge_only_travel_as_data(fcm: tuple[FakeFcm, FcmProvider]) -> None:
    message = await send_fcm(fcm, parse_message({"id": "m-b", "user": "u", "badge": 0, "link": "campus://badges"}))
    assert message == {"token": "tok-1", "android": {"priority": "normal"},
                       "data": {"pushgw_id": "m-b", "pushgw_category": "general", "pushgw_link": "campus://badges",
                                "pushgw_badge": "0"},
                       "apns": {"payload": {"aps": {"badge": 0}}}}


async def test_fcm_plain_message_gets_a_tag_from_its_id(fcm: tuple[FakeFcm, FcmProvider]) -> None:
    message = await send_fcm(fcm, Message(id="m-7", title="t"))
    assert message["android"] == {"priority": "normal", "notification": {"tag": "m-7"}}
    assert message == fcm_message(Message(id="m-7", title="t"), "tok-1")


async def test_fake_fcm_refuses_an_unknown_android_notification_field(fcm: tuple[FakeFcm, FcmProvider],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def misplaced(msg: Message, token: str) -> dict[str, Any]:
        return {"token": token, "android": {"notification": {"tag": "t", "subtitle": "s"}}}

    monkeypatch.setattr(fcm_module, "fcm_message", misplaced)
    out = await fcm[1].send(Delivery(Message(id="m", title="t"), Device("fcm", "tok-1")))
    assert isinstance(out, Rejected) and "subtitle" in out.reason and out.status == 400


@pytest.mark.parametrize(("message", "where"), [
    ({"android": {"notification": {"notification_count": "3"}}}, "notification_count"),
    ({"android": {"notification": {"title_loc_args": ["x"]}}}, "title_loc_args"),
    ({"android": {"notification": {"sticky": "yes"}}}, "sticky"),
    ({"webpush": {"fcm_options": {"link": "http://campus.example"}}}, "fcm_options.link"),
    ({"notification": {"title": "t", "image": "http://cdn.example/x.png"}}, "notification.image"),
])
async def test_fake_fcm_checks_field_types_and_https_links(fcm: tuple[FakeFcm, FcmProvider],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            message: dict[str, Any], where: str) -> None:
    monkeypatch.setattr(fcm_module, "fcm_message", lambda msg, token: {"token": token, **message})
    out = await fcm[1].send(Delivery(Message(id="m", title="t"), Device("fcm", "tok-1")))
    assert isinstance(out, Rejected) and where in out.reason


# --- Web Push -----------------------------------------------------------------------------------


async def test_webpush_rich_payload_carries_notification_options(
        web: tuple[FakePushService, WebPushProvider, Device]) -> None:
    topic, doc = await send_web(web, rich())
    assert doc == {
        "id": "quiz-42", "category": "reward", "title": "Quiz passed", "body": "You scored 86%",
        "data": {"score": "86"}, "tag": "quiz-42", "image": "https://cdn.campus.example/badges/q42.png",
        "icon": "/icons/badge.png", "app_badge": 3,
        "actions": [{"action": "open", "title": "See badge"},
                    {"action": "later", "title": "Later", "icon": "/icons/later.png"}],
        "navigate": "https://campus.example/badges/q42", "thread": "course-stat101", "lang": "en", "dir": "ltr",
        "requireInteraction": True, "renotify": True,
    }
    assert topic == "quiz-42"


async def test_webpush_collapse_key_sets_topic_and_tag_and_sound_none_is_silent(
        web: tuple[FakePushService, WebPushProvider, Device]) -> None:
    msg = parse_message({"id": "m-1", "user": "u", "body": "b", "collapse_key": "session 7 / week 2", "sound": "none"})
    topic, doc = await send_web(web, msg)
    assert topic == topic_for("session 7 / week 2") and len(topic) == 32
    assert doc == {"id": "m-1", "category": "general", "body": "b", "tag": "session 7 / week 2", "silent": True}


async def test_webpush_topic_from_a_uuid_message_id_is_the_id(web: tuple[FakePushService, WebPushProvider, Device]) -> None:
    msg = parse_message({"user": "u", "body": "b"})  # the gateway's own id: 32 hex characters
    topic, doc = await send_web(web, msg)
    assert topic == msg.id and doc["tag"] == msg.id


async def test_fake_push_service_refuses_what_show_notification_would_throw_on(
        web: tuple[FakePushService, WebPushProvider, Device], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webpush_module, "webpush_plaintext", lambda m: b'{"title": "t", "renotify": true}')
    _, provider, device = web
    out = await provider.send(Delivery(Message(id="m", title="t"), device, 1, None))
    assert isinstance(out, Rejected) and "renotify needs a tag" in out.reason


@pytest.mark.parametrize(("doc", "fault"), [
    ({"title": "t", "actions": [{"id": "a", "title": "A"}]}, "each action is {action, title, icon?}"),
    ({"title": "t", "navigate": "campus://x"}, "navigate must be an https URL"),
    ({"title": "t", "app_badge": -1}, "app_badge must be a whole number >= 0"),
    ({"title": "t", "dir": "up"}, "dir must be auto, ltr or rtl"),
    ({"title": "t", "requireInteraction": "yes"}, "requireInteraction must be a boolean"),
])
def test_fake_push_service_checks_notification_options(doc: dict[str, Any], fault: str) -> None:
    assert notification_fault(orjson.dumps(doc)) == fault
