"""Rich fields in combination: a raw apns-push-type header, per-platform blocks on a Live Activity, and the
declarative Web Push form's size, each refused at the door with the field at fault or merged as documented."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from pushgw.core.config import ApiClient, ApiSettings, RedisSettings, Settings, WebPushSettings
from pushgw.core.schema import MessageInvalid, loads_message, parse_message
from pushgw.providers.apns import ApnsProvider
from pushgw.providers.base import PayloadTooLarge
from pushgw.providers.fakes.apns import FakeApns
from pushgw.providers.payloads import (
    DECLARATIVE,
    WEBPUSH_MAX_PLAINTEXT,
    check_payload_limits,
    webpush_declarative,
    webpush_plaintext,
)

TOKEN = "combination-test-token-0123456789"
APNS_TOKEN = "ef" * 32
NAVIGATE = "https://campus.example/"
LIVE_UPDATE: dict[str, Any] = {
    "id": "live-7-update", "devices": [{"apns": APNS_TOKEN}], "title": "Live class in 10 minutes",
    "live_activity": {"event": "update", "timestamp": 1_800_000_000, "content_state": {"minutes_left": 10}},
}


def refused(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(MessageInvalid) as e:
        parse_message(obj)
    return [err.field for err in e.value.errors]


# --- (b) apns-push-type in a raw apns.headers block ------------------------------------------------


@pytest.mark.parametrize("obj", [
    {"user": "u", "title": "Quiz", "apns": {"headers": {"apns-push-type": "background"}}},  # an alert sent as background
    {"user": "u", "data": {"sync": "1"}, "apns": {"headers": {"apns-push-type": "alert"}}},  # alert with nothing shown
    {"devices": [{"apns": APNS_TOKEN}], "data": {"k": "v"}, "apns": {"headers": {"apns-push-type": "voip"}}},
    {"devices": [{"apns": APNS_TOKEN}], "title": "t", "apns": {"headers": {"apns-push-type": "liveactivity"}}},
    {"user": "u", "title": "t", "apns": {"headers": {"apns-push-type": "widgets"}}},  # a token of its own: no user
    {**LIVE_UPDATE, "apns": {"headers": {"apns-push-type": "alert"}}},  # a Live Activity's headers are its own
    {**LIVE_UPDATE, "apns": {"headers": {"apns-push-type": "liveactivity"}}},  # even repeated: no bundle topic
    {"devices": [{"apns": APNS_TOKEN}], "data": {"k": "v"}, "apns_push_type": "background",
     "apns": {"headers": {"apns-push-type": "alert"}}},  # contradicts apns_push_type
])
def test_a_push_type_header_breaking_its_types_rules_is_refused_naming_the_header(obj: dict[str, Any]) -> None:
    assert refused(obj) == ["apns.headers.apns-push-type"]


def test_a_push_type_header_that_keeps_its_types_rules_is_accepted() -> None:
    parse_message({"user": "u", "data": {"sync": "1"}, "apns": {"headers": {"apns-push-type": "background"}}})
    parse_message({"user": "u", "title": "t", "apns": {"headers": {"apns-push-type": "alert"}}})
    parse_message({"devices": [{"apns": APNS_TOKEN}], "data": {"k": "v"}, "apns_push_type": "background",
                   "apns": {"headers": {"apns-push-type": "background"}}})


# --- (d) per-platform blocks on a Live Activity and other typed pushes --------------------------------


@pytest.mark.parametrize(("block", "field"), [
    ({"apns": {"headers": {"apns-priority": "5"}}}, "apns.headers.apns-priority"),
    ({"apns": {"payload": {"aps": {"event": "end"}}}}, "apns.payload.aps.event"),
    ({"apns": {"payload": {"aps": {"content-state": {"minutes_left": 1}}}}}, "apns.payload.aps.content-state"),
    ({"apns": {"payload": {"aps": {"badge": 1}}}}, "apns.payload.aps.badge"),
])
def test_a_live_activity_refuses_a_block_that_conflicts_with_its_own_fields(block: dict[str, Any], field: str) -> None:
    assert refused({**LIVE_UPDATE, **block}) == [field]


def test_an_mdm_push_refuses_any_apns_block() -> None:
    mdm = {"devices": [{"apns": APNS_TOKEN}], "apns_push_type": "mdm", "data": {"mdm": "magic"}}
    assert refused({**mdm, "apns": {"payload": {"extra": 1}}}) == ["apns.payload"]


async def test_a_live_activity_block_merges_its_alert_and_custom_keys_over_the_payload(
        apns: tuple[FakeApns, ApnsProvider]) -> None:
    """Documented precedence: the block is deep-merged over the Live Activity payload and wins; it may set
    the alert (e.g. localized keys) and custom keys, never the activity's own keys."""
    from pushgw.core.schema import Device
    from pushgw.providers.base import Delivered, Delivery

    fake, provider = apns
    msg = parse_message({**LIVE_UPDATE, "apns": {"payload": {
        "aps": {"alert": {"title-loc-key": "LIVE_SOON", "title-loc-args": ["10"]}, "sound": "bell.caf"},
        "course": {"id": 7}}}})
    out = await provider.send(Delivery(msg, Device("apns", APNS_TOKEN), 1, None))
    assert isinstance(out, Delivered), (out, fake.rejections)
    r = fake.received[-1]
    assert r.headers["apns-push-type"] == "liveactivity" and r.topic.endswith(".push-type.liveactivity")
    assert r.payload["aps"] == {
        "timestamp": 1_800_000_000, "event": "update", "content-state": {"minutes_left": 10},
        "alert": {"title": "Live class in 10 minutes", "title-loc-key": "LIVE_SOON", "title-loc-args": ["10"]},
        "sound": "bell.caf"}
    assert r.payload["course"] == {"id": 7}


# --- (c) the declarative Web Push form's size at enqueue ------------------------------------------

# A link repeated by the declarative form (notification.navigate and each action's navigate): the
# service-worker JSON, APNs and FCM payloads fit, the declarative push message does not.
LONG_LINK = NAVIGATE + "live/" + "a" * 900
BIG_DECLARATIVE: dict[str, Any] = {
    "id": "decl-big", "user": "learner-1", "title": "Live class", "body": "Starts in 10 minutes", "link": LONG_LINK,
    "actions": [{"id": f"a{i}", "title": f"Action {i}"} for i in range(4)], "actions_category": "LIVE",
}


def test_the_declarative_form_over_one_record_is_refused_with_its_byte_count() -> None:
    msg = parse_message(BIG_DECLARATIVE)
    declarative = webpush_declarative(msg, NAVIGATE)
    assert declarative is not None and len(declarative) > WEBPUSH_MAX_PLAINTEXT >= len(webpush_plaintext(msg))
    check_payload_limits(msg)  # without the declarative setting passed in: the three plain forms fit
    with pytest.raises(PayloadTooLarge) as e:
        check_payload_limits(msg, declarative_navigate=NAVIGATE)
    assert (e.value.provider, e.value.size, e.value.limit) == (DECLARATIVE, len(declarative), WEBPUSH_MAX_PLAINTEXT)
    check_payload_limits(msg, ("apns", "fcm"), declarative_navigate=NAVIGATE)  # a message that reaches no browser


async def test_api_refuses_a_message_whose_declarative_form_exceeds_one_record(make_client: Any) -> None:
    settings = Settings(redis=RedisSettings(prefix="combotest"), webpush=WebPushSettings(declarative_navigate=NAVIGATE),
                        api=ApiSettings(clients=(ApiClient("course-service", TOKEN, ("enqueue",)),)))
    client: TestClient[Any, Any] = await make_client(settings)
    resp = await client.post("/v1/messages", json=BIG_DECLARATIVE, headers={"Authorization": f"Bearer {TOKEN}"})
    doc = await resp.json()
    size = len(webpush_declarative(parse_message(BIG_DECLARATIVE), NAVIGATE) or b"")
    assert resp.status == 422, doc
    [err] = doc["error"]["fields"]
    assert err["message"].startswith(f"webpush declarative payload is {size} bytes, limit is {WEBPUSH_MAX_PLAINTEXT}")
    fcm_only = {**BIG_DECLARATIVE, "id": "decl-fcm", "devices": [{"fcm": "tok-1"}]}
    del fcm_only["user"]
    resp = await client.post("/v1/messages", json=fcm_only, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 202, await resp.text()


def test_an_entry_queued_before_these_door_checks_still_decodes() -> None:
    """The worker reads queued entries with `loads_message`: a Live Activity with a header block, accepted
    before the rule existed, is still delivered rather than refused at decode."""
    queued = orjson.dumps({**LIVE_UPDATE, "apns": {"headers": {"apns-priority": "5"}}})
    assert refused({**LIVE_UPDATE, "apns": {"headers": {"apns-priority": "5"}}}) == ["apns.headers.apns-priority"]
    assert loads_message(queued).overrides is not None
