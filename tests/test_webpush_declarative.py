"""Declarative Web Push (W3C Push API "declarative push message"): which subscriptions get it, the exact
JSON after decryption, and that the local push service refuses a malformed one as a browser would."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from pushgw.core.config import ProviderSettings, WebPushSettings
from pushgw.core.schema import Device, MessageInvalid, parse_device, parse_message
from pushgw.providers.base import Delivered, Delivery
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.fakes.webpush import FakePushService, declarative_fault
from pushgw.providers.vapid import make_vapid_key
from pushgw.providers.webpush import WebPushProvider, uses_declarative

KEYS = {"p256dh": "B" * 87, "auth": "A" * 22}
CLASS_REMINDER: dict[str, Any] = {
    "id": "rem-1", "user": "learner-1", "title": "Live class in 10 minutes", "body": "Statistics 101",
    "link": "https://campus.example/live/stat101", "badge": 2, "lang": "en", "dir": "ltr",
    "actions": [{"id": "join", "title": "Join"}], "actions_category": "CLASS", "data": {"room": "b12"},
}


async def send(local_ca: LocalCA, tmp_path: Path, msg_obj: dict[str, Any], *, flag: bool,
               **settings: Any) -> dict[str, Any]:
    async with FakePushService(local_ca) as svc:
        ws = WebPushSettings(vapid_private_key_file=str(make_vapid_key(tmp_path / "vapid")), allowed_hosts=("127.0.0.1",),
                             allow_private=True, ca_file=str(local_ca.ca_file), **settings)
        provider = WebPushProvider(ws, ProviderSettings(timeout_s=5.0))
        try:
            sub = svc.new_subscription()
            device = Device("webpush", sub["endpoint"], None, sub["keys"]["p256dh"], sub["keys"]["auth"], flag)
            out = await provider.send(Delivery(parse_message(msg_obj), device, 1, time.time() + 600))
            assert isinstance(out, Delivered), (out, svc.rejections)
            doc: dict[str, Any] = orjson.loads(svc.received[-1].plaintext)
            return doc
        finally:
            await provider.close()


async def test_a_flagged_subscription_gets_the_declarative_push_message(local_ca: LocalCA, tmp_path: Path) -> None:
    doc = await send(local_ca, tmp_path, CLASS_REMINDER, flag=True)
    assert doc == {
        "web_push": 8030,
        "notification": {
            "title": "Live class in 10 minutes", "navigate": "https://campus.example/live/stat101", "tag": "rem-1",
            "body": "Statistics 101", "data": {"id": "rem-1", "category": "general", "data": {"room": "b12"}},
            "lang": "en", "dir": "ltr",
            "actions": [{"action": "join", "title": "Join", "navigate": "https://campus.example/live/stat101"}],
        },
        "app_badge": 2,
    }


async def test_the_webpush_setting_sends_declarative_with_the_configured_navigate(
        local_ca: LocalCA, tmp_path: Path) -> None:
    doc = await send(local_ca, tmp_path, {"id": "m2", "user": "u", "title": "Quiz graded"}, flag=False,
                     declarative=True, declarative_navigate="https://campus.example/")
    assert doc == {"web_push": 8030, "notification": {"title": "Quiz graded", "navigate": "https://campus.example/",
                                                      "tag": "m2", "data": {"id": "m2", "category": "general"}}}


async def test_an_unflagged_subscription_keeps_the_service_worker_payload(local_ca: LocalCA, tmp_path: Path) -> None:
    doc = await send(local_ca, tmp_path, CLASS_REMINDER, flag=False)
    assert "web_push" not in doc and doc["title"] == "Live class in 10 minutes"


async def test_a_message_without_title_or_navigate_falls_back_to_the_service_worker_payload(
        local_ca: LocalCA, tmp_path: Path) -> None:
    doc = await send(local_ca, tmp_path, {"id": "m3", "user": "u", "title": "No link"}, flag=True)
    assert "web_push" not in doc and doc["title"] == "No link"
    doc = await send(local_ca, tmp_path / "silent", {"id": "m4", "user": "u", "data": {"sync": "1"}}, flag=True)
    assert "web_push" not in doc


def test_apples_push_service_always_gets_declarative_and_others_only_when_flagged() -> None:
    apple = Device("webpush", "https://web.push.apple.com/QGz1", None, "B" * 87, "A" * 22)
    mozilla = Device("webpush", "https://updates.push.services.mozilla.com/wpush/v2/x", None, "B" * 87, "A" * 22)
    assert uses_declarative(apple, urlsplit(apple.token))
    assert not uses_declarative(mozilla, urlsplit(mozilla.token))
    assert uses_declarative(mozilla, urlsplit(mozilla.token), always=True)


def test_the_declarative_flag_round_trips_and_is_checked_at_the_door() -> None:
    errors: list[Any] = []
    device = parse_device({"webpush": {"endpoint": "https://web.push.apple.com/x", "keys": KEYS, "declarative": True}},
                          "device", errors, None)
    assert device is not None and device.declarative and device.to_json()["webpush"]["declarative"] is True
    with pytest.raises(MessageInvalid) as e:
        parse_message({"id": "x", "title": "t", "devices": [
            {"webpush": {"endpoint": "https://web.push.apple.com/x", "keys": KEYS, "declarative": "yes"}}]})
    assert [err.field for err in e.value.errors] == ["devices[0].webpush.declarative"]


@pytest.mark.parametrize(("doc", "fault"), [
    ({"web_push": 8031, "notification": {"title": "t", "navigate": "https://a.example/"}}, "web_push must be 8030"),
    ({"web_push": 8030, "notification": {"title": "t"}}, "notification.navigate is required"),
    ({"web_push": 8030, "notification": {"navigate": "https://a.example/"}}, "notification.title is required"),
    ({"web_push": 8030, "notification": {"title": "t", "navigate": "http://a.example/"}}, "notification.navigate must"),
    ({"web_push": 8030, "notification": {"title": "t", "navigate": "https://a.example/", "requireInteraction": True}},
     "unknown notification member requireInteraction"),
    ({"web_push": 8030, "notification": {"title": "t", "navigate": "https://a.example/"}, "app_badge": -1},
     "app_badge must"),
    ({"web_push": 8030, "notification": {"title": "t", "navigate": "https://a.example/",
                                         "actions": [{"action": "a", "title": "A"}]}}, "each notification action"),
])
def test_fake_push_service_checks_the_declarative_shape(doc: dict[str, Any], fault: str) -> None:
    found = declarative_fault(doc)
    assert found is not None and found.startswith(fault)
