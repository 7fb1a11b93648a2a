"""APNs push types and Live Activities: the exact headers and payload each type produces, what the
door refuses (a 422 naming the field), and that the local APNs checks each type's rules.

Each send goes through the real provider client to the fake APNs over HTTP/2 + TLS, which checks
Apple's table ("Sending notification requests to APNs"): topic suffix, push type, priority,
expiration, payload size and the Live Activity `aps` keys (ActivityKit push notifications).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pushgw.core.config import ApnsApp, ProviderSettings
from pushgw.core.schema import Device, Message, MessageInvalid, parse_message
from pushgw.providers.apns import ApnsProvider
from pushgw.providers.base import Delivered, Delivery, PayloadTooLarge, Rejected
from pushgw.providers.fakes.apns import ApnsKey, FakeApns, aps_fault, live_activity_fault
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.payloads import check_payload_limits

TOPIC = "org.example.campus"
MDM_TOPIC = "com.apple.mgmt.External.5b0e5c52-0d1c-4f5e-9a2f-7e0c7c4b2d11"
TOKEN = "cd" * 32
T0 = 1_800_000_000

CLASS_START: dict[str, Any] = {
    "id": "class-stat101-start", "devices": [{"apns": TOKEN}], "title": "Live class starting",
    "body": "Statistics 101 starts in 10 minutes", "priority": "high",
    "live_activity": {
        "event": "start", "timestamp": T0, "attributes_type": "LiveClassAttributes",
        "attributes": {"course": "Statistics 101", "room": "B12"},
        "content_state": {"starts_at": T0 + 600, "status": "scheduled"}, "stale_date": T0 + 1200,
        "relevance_score": 75,
    },
}


@pytest.fixture
async def apns(local_ca: LocalCA, apns_key: ApnsKey) -> AsyncIterator[tuple[FakeApns, ApnsProvider]]:
    async with FakeApns(local_ca, keys=[apns_key], topics=[TOPIC], mdm_topics=[MDM_TOPIC]) as fake:
        app = ApnsApp("default", TOPIC, team_id=apns_key.team_id, key_id=apns_key.key_id,
                      key_file=str(apns_key.key_file), host="127.0.0.1", port=fake.port, ca_file=str(local_ca.ca_file),
                      mdm_topic=MDM_TOPIC)
        provider = ApnsProvider([app], ProviderSettings(timeout_s=5.0))
        yield fake, provider
        await provider.close()


async def send(apns: tuple[FakeApns, ApnsProvider], msg: Message) -> tuple[dict[str, str], dict[str, Any]]:
    fake, provider = apns
    out = await provider.send(Delivery(msg, Device("apns", TOKEN), 1, None))
    assert isinstance(out, Delivered), (out, fake.rejections)
    r = fake.received[-1]
    return r.headers, r.payload


def fields_refused(obj: dict[str, Any]) -> set[str]:
    with pytest.raises(MessageInvalid) as e:
        parse_message(obj)
    return {err.field for err in e.value.errors}


# --- golden headers and payloads ----------------------------------------------------------------


async def test_live_activity_start_carries_attributes_content_state_and_alert(
        apns: tuple[FakeApns, ApnsProvider]) -> None:
    headers, payload = await send(apns, parse_message(CLASS_START))
    assert headers["apns-topic"] == TOPIC + ".push-type.liveactivity"
    assert headers["apns-push-type"] == "liveactivity"
    assert headers["apns-priority"] == "10"
    assert payload == {
        "aps": {
            "timestamp": T0, "event": "start", "content-state": {"starts_at": T0 + 600, "status": "scheduled"},
            "attributes-type": "LiveClassAttributes", "attributes": {"course": "Statistics 101", "room": "B12"},
            "stale-date": T0 + 1200, "relevance-score": 75.0,
            "alert": {"title": "Live class starting", "body": "Statistics 101 starts in 10 minutes"},
            "sound": "default",
        },
        "pushgw": {"id": "class-stat101-start", "category": "general"},
    }


async def test_live_activity_quiz_timer_update_and_end(apns: tuple[FakeApns, ApnsProvider]) -> None:
    update = parse_message({"id": "quiz-7-t60", "devices": [{"apns": TOKEN}], "live_activity": {
        "event": "update", "timestamp": T0 + 60, "content_state": {"seconds_left": 240, "answered": 3}}})
    headers, payload = await send(apns, update)
    assert headers["apns-priority"] == "5"
    assert payload["aps"] == {"timestamp": T0 + 60, "event": "update",
                              "content-state": {"seconds_left": 240, "answered": 3}}
    end = parse_message({"id": "quiz-7-end", "devices": [{"apns": TOKEN}], "live_activity": {
        "event": "end", "timestamp": T0 + 300, "content_state": {"seconds_left": 0, "answered": 10},
        "dismissal_date": T0 + 900}})
    _, payload = await send(apns, end)
    assert payload["aps"] == {"timestamp": T0 + 300, "event": "end", "dismissal-date": T0 + 900,
                              "content-state": {"seconds_left": 0, "answered": 10}}


@pytest.mark.parametrize(("push_type", "topic", "priority"), [
    ("voip", TOPIC + ".voip", "10"),
    ("pushtotalk", TOPIC + ".voip-ptt", "10"),
    ("complication", TOPIC + ".complication", "5"),
    ("fileprovider", TOPIC + ".pushkit.fileprovider", "5"),
    ("location", TOPIC + ".location-query", "5"),
])
async def test_each_push_type_goes_to_its_topic_suffix_with_its_priority(
        apns: tuple[FakeApns, ApnsProvider], push_type: str, topic: str, priority: str) -> None:
    msg = parse_message({"id": f"m-{push_type}", "devices": [{"apns": TOKEN}], "apns_push_type": push_type,
                         "title": "Call from tutor", "data": {"room": "r1"}})
    headers, payload = await send(apns, msg)
    assert (headers["apns-topic"], headers["apns-push-type"], headers["apns-priority"]) == (topic, push_type, priority)
    assert payload == {"aps": {}, "room": "r1", "pushgw": {"id": f"m-{push_type}", "category": "general",
                                                           "title": "Call from tutor"}}
    assert ("apns-expiration" in headers) == (push_type == "pushtotalk")
    if push_type == "pushtotalk":
        assert headers["apns-expiration"] == "0"  # delivered now or never


async def test_mdm_push_goes_to_the_configured_mdm_topic_with_push_magic_only(
        apns: tuple[FakeApns, ApnsProvider]) -> None:
    msg = parse_message({"id": "mdm-1", "devices": [{"apns": TOKEN}], "apns_push_type": "mdm",
                         "data": {"mdm": "5A6B-PUSH-MAGIC"}})
    headers, payload = await send(apns, msg)
    assert headers["apns-topic"] == MDM_TOPIC and headers["apns-push-type"] == "mdm"
    assert payload == {"mdm": "5A6B-PUSH-MAGIC"}


async def test_explicit_background_type_is_priority_5_content_available(apns: tuple[FakeApns, ApnsProvider]) -> None:
    msg = parse_message({"id": "bg-1", "user": "u", "apns_push_type": "background", "data": {"sync": "1"},
                         "priority": "high"})
    headers, payload = await send(apns, msg)
    assert (headers["apns-topic"], headers["apns-push-type"], headers["apns-priority"]) == (TOPIC, "background", "5")
    assert payload["aps"] == {"content-available": 1}


async def test_voip_payload_may_reach_5120_bytes_not_more() -> None:
    base = {"id": "v", "devices": [{"apns": TOKEN}], "apns_push_type": "voip"}
    check_payload_limits(parse_message({**base, "data": {"blob": "x" * 4900}}), ("apns",))
    with pytest.raises(PayloadTooLarge) as e:
        check_payload_limits(parse_message({**base, "data": {"blob": "x" * 5200}}), ("apns",))
    assert e.value.limit == 5120


async def test_voip_payload_over_4096_is_delivered(apns: tuple[FakeApns, ApnsProvider]) -> None:
    msg = parse_message({"id": "v-big", "devices": [{"apns": TOKEN}], "apns_push_type": "voip",
                         "data": {"blob": "x" * 4900}})
    _, payload = await send(apns, msg)
    assert len(payload["blob"]) == 4900


async def test_live_activity_over_certificate_auth_is_rejected_before_sending(
        local_ca: LocalCA, apns: tuple[FakeApns, ApnsProvider]) -> None:
    fake, _ = apns
    app = ApnsApp("default", TOPIC, host="127.0.0.1", port=fake.port, ca_file=str(local_ca.ca_file))
    provider = ApnsProvider([app], ProviderSettings(timeout_s=5.0))
    try:
        out = await provider.send(Delivery(parse_message(CLASS_START), Device("apns", TOKEN), 1, None))
    finally:
        await provider.close()
    assert isinstance(out, Rejected) and "token auth" in out.reason


# --- the door -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"devices": [{"fcm": "tok-1"}]}, "live_activity"),
    ({"devices": [{"apns": TOKEN}, {"webpush": {"endpoint": "https://web.push.apple.com/x",
                                                 "keys": {"p256dh": "B" * 87, "auth": "A" * 22}}}]}, "live_activity"),
    ({"user": "learner-1"}, "live_activity"),
    ({"apns_push_type": "voip"}, "apns_push_type"),
    ({"live_activity": {**CLASS_START["live_activity"], "event": "pause"}}, "live_activity.event"),
    ({"live_activity": {**CLASS_START["live_activity"], "timestamp": None}}, "live_activity.timestamp"),
    ({"live_activity": {**CLASS_START["live_activity"], "attributes": None}}, "live_activity.attributes"),
    ({"live_activity": {**CLASS_START["live_activity"], "attributes_type": "no spaces allowed"}},
     "live_activity.attributes_type"),
    ({"live_activity": {**CLASS_START["live_activity"], "dismissal_date": T0}}, "live_activity.dismissal_date"),
    ({"live_activity": {**CLASS_START["live_activity"], "stale_date": "soon"}}, "live_activity.stale_date"),
    ({"live_activity": {**CLASS_START["live_activity"], "content_state": [1]}}, "live_activity.content_state"),
    ({"live_activity": {**CLASS_START["live_activity"], "colour": "red"}}, "live_activity"),
    ({"badge": 1}, "live_activity"),
])
def test_door_refuses_a_bad_live_activity_naming_the_field(change: dict[str, Any], field: str) -> None:
    assert field in fields_refused({**CLASS_START, **change})


@pytest.mark.parametrize(("obj", "field"), [
    ({"id": "b", "user": "u", "apns_push_type": "background", "title": "Hi"}, "apns_push_type"),
    ({"id": "b", "user": "u", "apns_push_type": "background", "badge": 2, "data": {"a": "b"}}, "apns_push_type"),
    ({"id": "a", "user": "u", "apns_push_type": "alert", "data": {"a": "b"}}, "apns_push_type"),
    ({"id": "a", "user": "u", "apns_push_type": "carrier-pigeon", "title": "x"}, "apns_push_type"),
    ({"id": "v", "user": "u", "apns_push_type": "voip", "data": {"a": "b"}}, "apns_push_type"),
    ({"id": "v", "devices": [{"fcm": "t"}], "apns_push_type": "location", "data": {"a": "b"}}, "apns_push_type"),
    ({"id": "m", "devices": [{"apns": TOKEN}], "apns_push_type": "mdm", "data": {"a": "b"}}, "data.mdm"),
    ({"id": "m", "devices": [{"apns": TOKEN}], "apns_push_type": "mdm", "title": "x", "data": {"mdm": "p"}}, "title"),
])
def test_door_refuses_push_type_rule_breaks_naming_the_field(obj: dict[str, Any], field: str) -> None:
    assert field in fields_refused(obj)


def test_a_live_activity_round_trips_through_the_queue_encoding() -> None:
    msg = parse_message(CLASS_START)
    again = parse_message(msg.to_json(), internal=True, now=0.0)
    assert again.apns_push == msg.apns_push


def test_a_message_without_push_type_fields_has_no_apns_push() -> None:
    assert parse_message({"id": "p", "user": "u", "title": "t"}).apns_push is None


# --- the fake -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("aps", "fault"), [
    ({"event": "start", "timestamp": T0, "content-state": {}}, "aps.attributes-type and aps.attributes are required"),
    ({"event": "update", "timestamp": T0}, "aps.content-state"),
    ({"event": "update", "content-state": {}}, "aps.timestamp"),
    ({"event": "update", "timestamp": T0, "content-state": {}, "dismissal-date": T0}, "aps.dismissal-date"),
    ({"event": "update", "timestamp": T0, "content-state": {}, "badge": 1}, "aps.badge in a Live Activity"),
])
def test_fake_apns_checks_live_activity_payloads(aps: dict[str, Any], fault: str) -> None:
    found = live_activity_fault(aps)
    assert found is not None and found.startswith(fault)


def test_fake_apns_refuses_live_activity_keys_in_an_alert() -> None:
    assert aps_fault({"alert": "x", "event": "update"}, "alert") == "Live Activity keys in a push that is not liveactivity"


@pytest.mark.parametrize(("headers", "reason"), [
    ({"apns-push-type": "voip", "apns-topic": TOPIC}, "DeviceTokenNotForTopic"),
    ({"apns-push-type": "alert", "apns-topic": TOPIC + ".voip"}, "TopicDisallowed"),
    ({"apns-push-type": "voip", "apns-topic": TOPIC + ".voip", "apns-priority": "5"}, "BadPriority"),
    ({"apns-push-type": "pushtotalk", "apns-topic": TOPIC + ".voip-ptt", "apns-priority": "10"}, "BadExpirationDate"),
    ({"apns-push-type": "mdm", "apns-topic": TOPIC}, "TopicDisallowed"),
])
async def test_fake_apns_refuses_wrong_topic_priority_or_expiration_per_type(
        apns: tuple[FakeApns, ApnsProvider], headers: dict[str, str], reason: str) -> None:
    fake, provider = apns
    jwt = provider.app("default").jwt
    assert jwt is not None
    request = {":method": "POST", ":path": f"/3/device/{TOKEN}", "authorization": f"bearer {jwt.token()}", **headers}
    status, _, body = await fake.handle(request, b'{"aps": {}}', None)
    assert status == 400 and reason.encode() in body
