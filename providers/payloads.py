"""How a `Message` becomes each provider's payload, and the size limits checked before queueing.

The same builders serve the providers (at send time) and validation (at enqueue time), so a
message that passed validation can never be refused later as too large.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..core.schema import Message
from .base import PayloadTooLarge

APNS_MAX_PAYLOAD = 4096
FCM_MAX_PAYLOAD = 4096
# RFC 8291 with one 4096-byte record: 86-byte header, 16-byte tag, 1 padding delimiter.
WEBPUSH_MAX_PLAINTEXT = 4096 - 86 - 16 - 1


def apns_payload(msg: Message) -> bytes:
    """The JSON body APNs expects: an `aps` dictionary plus the custom data keys."""
    aps: dict[str, Any]
    if msg.is_silent:
        aps = {"content-available": 1}
    else:
        alert: dict[str, str] = {}
        if msg.title is not None:
            alert["title"] = msg.title
        if msg.body is not None:
            alert["body"] = msg.body
        aps = {"alert": alert, "sound": "default", "category": msg.category}
    if msg.collapse_key:
        aps["thread-id"] = msg.collapse_key
    body: dict[str, Any] = {"aps": aps, **msg.data}
    body["pushgw"] = _tracking(msg)
    return orjson.dumps(body)


def fcm_message(msg: Message, token: str) -> dict[str, Any]:
    """The `message` object of an FCM HTTP v1 `messages:send` request."""
    out: dict[str, Any] = {"token": token}
    if not msg.is_silent:
        notification: dict[str, str] = {}
        if msg.title is not None:
            notification["title"] = msg.title
        if msg.body is not None:
            notification["body"] = msg.body
        out["notification"] = notification
    data = dict(msg.data)
    data["pushgw_id"] = msg.id
    data["pushgw_category"] = msg.category
    if msg.campaign:
        data["pushgw_campaign"] = msg.campaign
    if msg.variant:
        data["pushgw_variant"] = msg.variant
    out["data"] = data
    android: dict[str, Any] = {"priority": "high" if msg.priority == "high" else "normal"}
    if msg.ttl is not None:
        android["ttl"] = f"{msg.ttl}s"
    if msg.collapse_key:
        android["collapse_key"] = msg.collapse_key
    out["android"] = android
    return out


def webpush_plaintext(msg: Message) -> bytes:
    """The JSON a service worker receives in its `push` event, before aes128gcm encryption."""
    body: dict[str, Any] = {"id": msg.id, "category": msg.category}
    if msg.title is not None:
        body["title"] = msg.title
    if msg.body is not None:
        body["body"] = msg.body
    if msg.data:
        body["data"] = dict(msg.data)
    if msg.campaign:
        body["campaign"] = msg.campaign
    if msg.variant:
        body["variant"] = msg.variant
    return orjson.dumps(body)


def _tracking(msg: Message) -> dict[str, str]:
    out = {"id": msg.id, "category": msg.category}
    if msg.campaign:
        out["campaign"] = msg.campaign
    if msg.variant:
        out["variant"] = msg.variant
    return out


# Every byte of each payload is either a content string of the message (escaped exactly as orjson
# escapes it, each string at most once, plus the category a second time in APNs) or fixed JSON: keys,
# punctuation, "default", the ttl digits. That fixed part is under 300 bytes for every provider.
_FIXED_OVERHEAD_BOUND = 512
_SMALLEST_LIMIT = min(APNS_MAX_PAYLOAD, FCM_MAX_PAYLOAD, WEBPUSH_MAX_PLAINTEXT)


def _content_bound(msg: Message) -> int:
    """An upper bound on every provider payload's size, from one serialization of the content."""
    content = orjson.dumps([msg.title, msg.body, msg.data, msg.id, msg.category, msg.category, msg.collapse_key,
                            msg.campaign, msg.variant])
    return len(content) + _FIXED_OVERHEAD_BOUND


def check_payload_limits(msg: Message, providers: tuple[str, ...] = ("apns", "fcm", "webpush")) -> None:
    """Raise `PayloadTooLarge` if the message would exceed any of these providers' limits.

    Most messages are far below 4 KB: one serialization of the content proves it for all three
    providers at once, and the payloads are built only for a message near a limit (the API's hot path)."""
    if _content_bound(msg) <= _SMALLEST_LIMIT:
        return
    if "apns" in providers:
        size = len(apns_payload(msg))
        if size > APNS_MAX_PAYLOAD:
            raise PayloadTooLarge("apns", size, APNS_MAX_PAYLOAD)
    if "fcm" in providers:
        m = fcm_message(msg, "")
        size = len(orjson.dumps({"notification": m.get("notification"), "data": m["data"]}))
        if size > FCM_MAX_PAYLOAD:
            raise PayloadTooLarge("fcm", size, FCM_MAX_PAYLOAD)
    if "webpush" in providers:
        size = len(webpush_plaintext(msg))
        if size > WEBPUSH_MAX_PLAINTEXT:
            raise PayloadTooLarge("webpush", size, WEBPUSH_MAX_PLAINTEXT)
