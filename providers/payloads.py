"""How a `Message` becomes each provider's payload, and the size limits checked before queueing.

The same builders serve the providers (at send time) and validation (at enqueue time), so a
message that passed validation can never be refused later as too large.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from ..core.schema import (
    APNS_SHARED_TOKEN_TYPES,
    SOUND_DEFAULT,
    SOUND_NONE,
    Action,
    FcmTarget,
    Message,
    Overrides,
    Rich,
    Sound,
)
from .base import PayloadTooLarge

APNS_MAX_PAYLOAD = 4096
APNS_VOIP_MAX_PAYLOAD = 5120  # APNs "Sending notification requests to APNs": VoIP payloads up to 5120 bytes
FCM_MAX_PAYLOAD = 4096
APNS_MAX_COLLAPSE_ID = 64
_ICON_URL_PREFIXES = ("https://", "/")
# RFC 8291 with one 4096-byte record: 86-byte header, 16-byte tag, 1 padding delimiter.
WEBPUSH_MAX_PLAINTEXT = 4096 - 86 - 16 - 1


def replacement_key(msg: Message) -> str:
    """What makes a newer notification replace an older one on the device: the sender's `collapse_key`,
    else the message id, so a delivery repeated after a crash replaces its first copy instead of adding one."""
    return msg.collapse_key or msg.id


def apns_collapse_id(msg: Message) -> str:
    """The apns-collapse-id header (APNs "Sending notification requests to APNs": at most 64 bytes).

    A collapse_key is at most 64 bytes (core/schema.py); a message id longer than that is hashed."""
    if msg.collapse_key:
        return msg.collapse_key
    if len(msg.id) <= APNS_MAX_COLLAPSE_ID:  # ids are ASCII (core/schema.py): characters == bytes
        return msg.id
    return "id-" + hashlib.sha256(msg.id.encode()).hexdigest()[:40]


def apns_payload(msg: Message) -> bytes:
    """The JSON body APNs expects: an `aps` dictionary plus the custom data keys."""
    if msg.apns_push is not None and msg.apns_push.push_type not in APNS_SHARED_TOKEN_TYPES:
        return apns_typed_payload(msg)
    rich = msg.rich
    aps: dict[str, Any]
    if msg.is_silent:
        aps = {"content-available": 1}
    elif rich is None:
        alert: dict[str, str] = {}
        if msg.title is not None:
            alert["title"] = msg.title
        if msg.body is not None:
            alert["body"] = msg.body
        aps = {"alert": alert, "sound": "default"}
    else:
        aps = _rich_aps(msg, rich)
    body: dict[str, Any] = {"aps": aps, **msg.data}
    body["pushgw"] = _tracking(msg) if rich is None else _rich_tracking(msg, rich)
    if msg.overrides is not None and msg.overrides.apns_payload:
        body = deep_merge(body, msg.overrides.apns_payload)
    return orjson.dumps(body)


# Each push type's topic suffix (APNs "Sending notification requests to APNs", apns-topic); mdm uses
# the MDM topic from the app's configuration, alert and background the bundle id itself.
APNS_TOPIC_SUFFIXES = {
    "voip": ".voip", "complication": ".complication", "fileprovider": ".pushkit.fileprovider",
    "location": ".location-query", "pushtotalk": ".voip-ptt", "liveactivity": ".push-type.liveactivity",
}


def apns_topic(bundle_id: str, push_type: str) -> str:
    """The apns-topic of a push type (not mdm, whose topic is configured)."""
    return bundle_id + APNS_TOPIC_SUFFIXES.get(push_type, "")


def apns_priority(msg: Message, push_type: str) -> str:
    """apns-priority by Apple's table: background 5, voip and pushtotalk 10, else 10 for a high message, 5 otherwise."""
    if push_type == "background":
        return "5"
    if push_type in ("voip", "pushtotalk"):
        return "10"
    return "10" if msg.priority == "high" else "5"


def apns_max_payload(msg: Message) -> int:
    if msg.apns_push is not None and msg.apns_push.push_type == "voip":
        return APNS_VOIP_MAX_PAYLOAD
    return APNS_MAX_PAYLOAD


def apns_typed_payload(msg: Message) -> bytes:
    """The body of a voip, location, complication, fileprovider, mdm, pushtotalk or liveactivity push.

    mdm is `{"mdm": <PushMagic>}` (Apple's MDM protocol); a Live Activity's `aps` carries event,
    timestamp, content-state and its dates (ActivityKit push notifications), with the message's title
    and body as its alert; the other types are read by the app (PushKit, location push service
    extension): an empty `aps` beside the data and `pushgw` with the title and body."""
    push = msg.apns_push
    assert push is not None
    if push.push_type == "mdm":
        return orjson.dumps({"mdm": msg.data["mdm"]})
    tracking: dict[str, Any] = _tracking(msg)
    la = push.live_activity
    aps: dict[str, Any] = {}
    if la is not None:
        aps = {"timestamp": la.timestamp, "event": la.event}
        if la.content_state is not None:
            aps["content-state"] = la.content_state
        if la.attributes_type is not None:
            aps["attributes-type"] = la.attributes_type
            aps["attributes"] = la.attributes
        if la.stale_date is not None:
            aps["stale-date"] = la.stale_date
        if la.dismissal_date is not None:
            aps["dismissal-date"] = la.dismissal_date
        if la.relevance_score is not None:
            aps["relevance-score"] = la.relevance_score
        if msg.title is not None or msg.body is not None:
            alert: dict[str, str] = {}
            if msg.title is not None:
                alert["title"] = msg.title
            if msg.body is not None:
                alert["body"] = msg.body
            aps["alert"] = alert
            aps["sound"] = SOUND_DEFAULT
    else:
        if msg.title is not None:
            tracking["title"] = msg.title
        if msg.body is not None:
            tracking["body"] = msg.body
    body: dict[str, Any] = {"aps": aps, **msg.data, "pushgw": tracking}
    if msg.overrides is not None and msg.overrides.apns_payload:
        body = deep_merge(body, msg.overrides.apns_payload)  # core/schema.py check_typed_push_blocks limits it
    return orjson.dumps(body)


def _rich_aps(msg: Message, rich: Rich) -> dict[str, Any]:
    """`aps` of a visible push with rich fields (APNs "Generating a remote notification", payload key reference)."""
    alert: dict[str, Any] = {}
    if msg.title is not None:
        alert["title"] = msg.title
    if rich.subtitle is not None:
        alert["subtitle"] = rich.subtitle
    if msg.body is not None:
        alert["body"] = msg.body
    if rich.title_loc_key is not None:
        alert["title-loc-key"] = rich.title_loc_key
        if rich.title_loc_args:
            alert["title-loc-args"] = list(rich.title_loc_args)
    if rich.body_loc_key is not None:
        alert["loc-key"] = rich.body_loc_key
        if rich.body_loc_args:
            alert["loc-args"] = list(rich.body_loc_args)
    aps: dict[str, Any] = {}
    if alert:
        aps["alert"] = alert
    if rich.badge is not None:
        aps["badge"] = rich.badge
    if rich.sound is None:
        if alert:
            aps["sound"] = SOUND_DEFAULT
    else:
        _aps_presentation_sound(rich.sound, aps)
    _aps_presentation(rich, aps)
    return aps


def _aps_presentation_sound(sound: Sound, aps: dict[str, Any]) -> None:
    """aps.sound of a given sound: its name, the critical-alert dictionary, or nothing for "none"."""
    if sound.critical:
        critical: dict[str, Any] = {"critical": 1, "name": sound.name}
        if sound.volume is not None:
            critical["volume"] = sound.volume
        aps["sound"] = critical
    elif sound.name != SOUND_NONE:
        aps["sound"] = sound.name


def _aps_presentation(rich: Rich, aps: dict[str, Any]) -> None:
    """The `aps` keys that group, select buttons, mark an image and rank an alert (APNs payload key reference)."""
    if rich.thread is not None:
        aps["thread-id"] = rich.thread
    if rich.actions_category is not None:
        aps["category"] = rich.actions_category
    if rich.image is not None:
        aps["mutable-content"] = 1  # the app's notification service extension downloads the image
    if rich.interruption_level is not None:
        aps["interruption-level"] = rich.interruption_level
    if rich.relevance_score is not None:
        aps["relevance-score"] = rich.relevance_score


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, as a new dict: objects merge key by key, any other value replaces.

    How a per-platform block (core/schema.py `Overrides`) applies over what the neutral fields produce."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        out[key] = deep_merge(below, value) if isinstance(below, dict) and isinstance(value, Mapping) else value
    return out


def fcm_target(target: FcmTarget) -> dict[str, Any]:
    """`message.topic` or `message.condition` of a topic send (FCM "Send messages to topics"): the topic
    name without the /topics/ prefix, or the condition expression as given."""
    return {target.kind: target.value}


def apns_header_overrides(msg: Message) -> Mapping[str, str]:
    """The APNs request headers the message's `apns.headers` block sets (none when it has no block)."""
    overrides: Overrides | None = msg.overrides
    return overrides.apns_headers if overrides is not None else {}


def _shows_alert(msg: Message, rich: Rich) -> bool:
    """The push has text to show (a badge- or sound-only push has none)."""
    if msg.title is not None or msg.body is not None:
        return True
    return rich.title_loc_key is not None or rich.body_loc_key is not None


def fcm_message(msg: Message, token: str) -> dict[str, Any]:
    """The `message` object of an FCM HTTP v1 `messages:send` request."""
    rich = msg.rich
    out: dict[str, Any] = {"token": token} if msg.fcm_target is None else fcm_target(msg.fcm_target)
    shown = (msg.title is not None or msg.body is not None) if rich is None else (
        not rich.silent and _shows_alert(msg, rich))
    if shown:
        notification: dict[str, str] = {}
        if msg.title is not None:
            notification["title"] = msg.title
        if msg.body is not None:
            notification["body"] = msg.body
        if rich is not None and rich.image is not None:
            notification["image"] = rich.image
        if notification:
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
    if shown:
        # AndroidNotification.tag: a notification with the same tag replaces the one shown.
        android_notification: dict[str, Any] = {"tag": msg.collapse_key or msg.id}
        if rich is not None:
            _rich_android(rich, android_notification)
        android["notification"] = android_notification
    out["android"] = android
    if rich is not None:
        _rich_fcm(msg, rich, out, data, shown)
    if msg.overrides is not None and msg.overrides.fcm:
        return deep_merge(out, msg.overrides.fcm)
    return out


def _rich_android(rich: Rich, notification: dict[str, Any]) -> None:
    """AndroidNotification fields (FCM v1 reference, projects.messages#AndroidNotification)."""
    if rich.icon is not None and not rich.icon.startswith(_ICON_URL_PREFIXES):
        notification["icon"] = rich.icon  # a drawable resource name; a URL is the web's form
    if rich.sound is not None and rich.sound.name != SOUND_NONE:
        notification["sound"] = rich.sound.name
    if rich.actions_category is not None:
        notification["click_action"] = rich.actions_category
    if rich.title_loc_key is not None:
        notification["title_loc_key"] = rich.title_loc_key
        if rich.title_loc_args:
            notification["title_loc_args"] = list(rich.title_loc_args)
    if rich.body_loc_key is not None:
        notification["body_loc_key"] = rich.body_loc_key
        if rich.body_loc_args:
            notification["body_loc_args"] = list(rich.body_loc_args)
    if rich.badge:
        # AndroidNotification.notification_count: 0 means "not set", so FCM cannot clear a count on
        # Android; the app reads data pushgw_badge (always sent, 0 included) to clear it.
        notification["notification_count"] = rich.badge


def _rich_fcm(msg: Message, rich: Rich, out: dict[str, Any], data: dict[str, str], shown: bool) -> None:
    """What the app reads from `data` (FCM data values are strings), the web client's click link, and the
    `apns` object for an iOS device registered through FCM."""
    if rich.link is not None:
        data["pushgw_link"] = rich.link
        if rich.link.startswith("https://"):
            out["webpush"] = {"fcm_options": {"link": rich.link}}  # WebpushFcmOptions.link: https only
    if rich.thread is not None:
        data["pushgw_thread"] = rich.thread  # Android groups in the app (v1 has no group field)
    if rich.actions:
        data["pushgw_actions"] = orjson.dumps([a.to_json() for a in rich.actions]).decode()
    if rich.badge is not None:
        data["pushgw_badge"] = str(rich.badge)
    apns = _fcm_apns(msg, rich, shown)
    if apns:
        out["apns"] = apns


def _fcm_apns(msg: Message, rich: Rich, shown: bool) -> dict[str, Any]:
    """ApnsConfig of an FCM message (FCM v1 reference, projects.messages#ApnsConfig): FCM builds `aps.alert`
    from `notification` alone, so the rest of what APNs shows goes in `payload.aps` (APNs payload key
    reference) and the image in `fcm_options.image`, as for a device registered with APNs directly."""
    aps: dict[str, Any] = {}
    if rich.badge is not None:
        aps["badge"] = rich.badge  # 0 clears the count on iOS
    if shown:
        if rich.subtitle is not None:
            # The alert dictionary replaces the one FCM derives from `notification`: title and body again.
            alert: dict[str, str] = {}
            if msg.title is not None:
                alert["title"] = msg.title
            alert["subtitle"] = rich.subtitle
            if msg.body is not None:
                alert["body"] = msg.body
            aps["alert"] = alert
        if rich.sound is not None:
            _aps_presentation_sound(rich.sound, aps)
        _aps_presentation(rich, aps)
    out: dict[str, Any] = {}
    if aps:
        out["payload"] = {"aps": aps}
    if shown and rich.image is not None:
        out["fcm_options"] = {"image": rich.image}  # ApnsFcmOptions.image, shown by FCM's iOS service extension
    return out


def webpush_plaintext(msg: Message) -> bytes:
    """The JSON a service worker receives in its `push` event, before aes128gcm encryption.

    Its keys beside id, category, campaign and variant are the Notification API's
    (`showNotification(title, options)`); `tag` replaces a shown notification with the same tag."""
    rich = msg.rich
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
    if not msg.is_silent:
        body["tag"] = msg.collapse_key or msg.id
    if rich is not None:
        _rich_web(rich, body)
    if msg.overrides is not None and msg.overrides.webpush_notification:
        body = deep_merge(body, msg.overrides.webpush_notification)
    return orjson.dumps(body)


def _rich_web(rich: Rich, body: dict[str, Any]) -> None:
    """Notification API options (WHATWG Notifications, NotificationOptions) and the declarative names."""
    if rich.image is not None:
        body["image"] = rich.image
    if rich.icon is not None and rich.icon.startswith(_ICON_URL_PREFIXES):
        body["icon"] = rich.icon  # a URL or a path on the site; a resource name is Android's form
    if rich.badge is not None:
        body["app_badge"] = rich.badge  # the Badging API count (declarative push message "app_badge")
    if rich.actions:
        body["actions"] = [_web_action(a) for a in rich.actions]
    if rich.link is not None and rich.link.startswith("https://"):
        body["navigate"] = rich.link
    if rich.thread is not None:
        body["thread"] = rich.thread
    if rich.lang is not None:
        body["lang"] = rich.lang
    if rich.dir is not None:
        body["dir"] = rich.dir
    if rich.require_interaction:
        body["requireInteraction"] = True
    if rich.renotify:
        body["renotify"] = True
    if rich.sound is not None and rich.sound.name == SOUND_NONE:
        body["silent"] = True  # NotificationOptions.silent: no sound or vibration


DECLARATIVE_PUSH_SERVICE_SUFFIX = ".push.apple.com"  # Apple's push service shows declarative messages itself


def webpush_declarative(msg: Message, default_navigate: str) -> bytes | None:
    """The declarative push message of a visible message (W3C Push API, "declarative push message"):
    `{"web_push": 8030, "notification": {title, navigate, ...}, "app_badge"?}`, shown by the browser
    without a service worker. None for a message it cannot express: silent, without a title, or
    without an https `navigate` (the message's https link, else `default_navigate`)."""
    rich = msg.rich
    link = rich.link if rich is not None and rich.link is not None and rich.link.startswith("https://") else None
    navigate = link or default_navigate
    if msg.is_silent or msg.title is None or not navigate:
        return None
    notification: dict[str, Any] = {"title": msg.title, "navigate": navigate, "tag": replacement_key(msg)}
    if msg.body is not None:
        notification["body"] = msg.body
    data: dict[str, Any] = {"id": msg.id, "category": msg.category}
    if msg.data:
        data["data"] = dict(msg.data)
    if msg.campaign:
        data["campaign"] = msg.campaign
    if msg.variant:
        data["variant"] = msg.variant
    notification["data"] = data
    out: dict[str, Any] = {"web_push": 8030, "notification": notification}
    if rich is not None:
        _declarative_rich(rich, notification, out)
    return orjson.dumps(out)


def _declarative_rich(rich: Rich, notification: dict[str, Any], out: dict[str, Any]) -> None:
    """The rich fields in a declarative push message (its `notification` members, and `app_badge`)."""
    if rich.image is not None:
        notification["image"] = rich.image
    if rich.icon is not None and rich.icon.startswith(_ICON_URL_PREFIXES):
        notification["icon"] = rich.icon
    if rich.lang is not None:
        notification["lang"] = rich.lang
    if rich.dir is not None:
        notification["dir"] = rich.dir
    if rich.require_interaction:
        notification["require_interaction"] = True
    if rich.renotify:
        notification["renotify"] = True
    if rich.sound is not None and rich.sound.name == SOUND_NONE:
        notification["silent"] = True
    if rich.actions:
        actions = []
        for a in rich.actions:
            action = _web_action(a)
            action["navigate"] = notification["navigate"]  # each action opens a URL; the app reads action ids
            actions.append(action)
        notification["actions"] = actions
    if rich.badge is not None:
        out["app_badge"] = rich.badge


def _web_action(action: Action) -> dict[str, str]:
    out = {"action": action.id, "title": action.title}
    if action.icon is not None:
        out["icon"] = action.icon
    return out


def _tracking(msg: Message) -> dict[str, str]:
    out = {"id": msg.id, "category": msg.category}
    if msg.campaign:
        out["campaign"] = msg.campaign
    if msg.variant:
        out["variant"] = msg.variant
    return out


def _rich_tracking(msg: Message, rich: Rich) -> dict[str, Any]:
    """APNs custom key `pushgw`: what the app (or its notification service extension) reads beside `aps`."""
    out: dict[str, Any] = _tracking(msg)
    if rich.image is not None:
        out["image"] = rich.image
    if rich.link is not None:
        out["link"] = rich.link
    if rich.actions:
        out["actions"] = [a.to_json() for a in rich.actions]
    return out


# Every byte of a payload without rich fields is either a content string of the message (escaped
# exactly as orjson escapes it, each string at most as often as it is listed here: the id and the
# collapse key twice, as FCM's tag repeats one of them; the declarative push message adds the configured
# navigate, counted apart) or fixed JSON: keys, punctuation, "default",
# the ttl digits. That fixed part is under 300 bytes for every provider. A message with rich fields
# is measured by building its payloads.
_FIXED_OVERHEAD_BOUND = 512
_SMALLEST_LIMIT = min(APNS_MAX_PAYLOAD, FCM_MAX_PAYLOAD, WEBPUSH_MAX_PLAINTEXT)


def _content_bound(msg: Message) -> int:
    """An upper bound on every provider payload's size, from one serialization of the content."""
    content = orjson.dumps([msg.title, msg.body, msg.data, msg.id, msg.id, msg.category, msg.collapse_key,
                            msg.collapse_key, msg.campaign, msg.variant])
    return len(content) + _FIXED_OVERHEAD_BOUND


def fcm_payload_size(msg: Message) -> int:
    """Bytes of the FCM message as sent, without the registration token (the target, not payload)."""
    m = fcm_message(msg, "")
    m.pop("token", None)
    return len(orjson.dumps(m))


DECLARATIVE = "webpush declarative"  # the provider named by PayloadTooLarge for a declarative push message


def check_payload_limits(msg: Message, providers: tuple[str, ...] = ("apns", "fcm", "webpush"), *,
                         declarative_navigate: str | None = None) -> None:
    """Raise `PayloadTooLarge` (provider, bytes, limit) if a final payload would exceed that provider's limit.

    With `declarative_navigate` (the `[webpush] declarative_navigate` setting, "" when unset) a message that
    may reach Web Push is also measured in its declarative form (W3C Push API), which a subscription on
    Apple's push service or flagged `declarative` gets: it must fit the same 4096-byte record.

    Most messages are far below 4 KB: one serialization of the content proves it for all three
    providers at once, and the payloads are built only for a message near a limit or with rich
    fields (the API's hot path)."""
    if msg.rich is None and msg.overrides is None and msg.apns_push is None:
        bound = _content_bound(msg)
        if declarative_navigate:
            bound += len(orjson.dumps(declarative_navigate))  # the declarative form's one string from elsewhere
        if bound <= _SMALLEST_LIMIT:
            return
    if "apns" in providers:
        size, limit = len(apns_payload(msg)), apns_max_payload(msg)
        if size > limit:
            raise PayloadTooLarge("apns", size, limit)
    if "fcm" in providers:
        size = fcm_payload_size(msg)
        if size > FCM_MAX_PAYLOAD:
            raise PayloadTooLarge("fcm", size, FCM_MAX_PAYLOAD)
    if "webpush" in providers:
        size = len(webpush_plaintext(msg))
        if size > WEBPUSH_MAX_PLAINTEXT:
            raise PayloadTooLarge("webpush", size, WEBPUSH_MAX_PLAINTEXT)
        if declarative_navigate is not None:
            declarative = webpush_declarative(msg, declarative_navigate)
            if declarative is not None and len(declarative) > WEBPUSH_MAX_PLAINTEXT:
                raise PayloadTooLarge(DECLARATIVE, len(declarative), WEBPUSH_MAX_PLAINTEXT)
