"""Decoding the stream entries the gateway wrote itself, without validating their content again.

Every message in the work streams was written by the gateway: the API's intake, a campaign fan-out, a
retry or a deferral, each from a `Message` that `parse_message` accepted at the door (core/schema.py).
Decoding one for delivery therefore needs the types the worker relies on, not the content rules again
(lengths, id patterns, reserved data keys, header-safe collapse keys). `loads_queued` builds a plain
message (a user, text, data and scalar options, as most are) straight from its JSON after checking each
field's type; anything else (explicit devices, rich fields, platform blocks, targets, push types, a
field of the wrong type) goes through `parse_message`, which builds it or raises `MessageInvalid`, so a
poison entry is still dead-lettered.
"""

from __future__ import annotations

from typing import Any

import orjson

from .schema import MAX_TTL_S, PRIORITIES, SCHEMA_VERSION, Message, parse_message

# The fields of a plain message as `Message.to_json` writes them.
_PLAIN = frozenset({"v", "id", "user", "app", "title", "body", "collapse_key", "campaign", "variant", "ttl",
                    "expires_at", "send_at", "data", "category", "priority", "resolved", "fanout"})


def loads_queued(raw: bytes | str) -> Message:
    """The message of a stream entry; `MessageInvalid` (or `ValueError` for bad JSON) when it is not one."""
    obj = orjson.loads(raw)
    msg = _plain(obj) if type(obj) is dict and obj.keys() <= _PLAIN else None
    return msg if msg is not None else parse_message(obj, now=0.0, internal=True)


def _plain(obj: dict[str, Any]) -> Message | None:
    """The message, or None when a field is not of the type `parse_message` would accept as it is."""
    get = obj.get
    msg_id, user, v = get("id"), get("user"), get("v", SCHEMA_VERSION)
    if type(msg_id) is not str or not msg_id or type(user) is not str or type(v) is not int or v != SCHEMA_VERSION:
        return None
    title, body, collapse_key, campaign, variant = get("title"), get("body"), get("collapse_key"), get("campaign"), get("variant")
    for value in (title, body, collapse_key, campaign, variant):  # each field read once
        if value is not None and type(value) is not str:
            return None
    app, category, priority = get("app", "default"), get("category", "general"), get("priority", "normal")
    if (title == "" or type(app) is not str or not app or type(category) is not str or not category
            or priority not in PRIORITIES):
        return None
    data = get("data")
    if data is None:
        if title is None and body is None:
            return None
        data = {}
    elif type(data) is not dict:
        return None
    else:
        for value in data.values():
            if type(value) is not str:
                return None
        if title is None and body is None and not data:
            return None
    ttl, expires_at, send_at = get("ttl"), get("expires_at"), get("send_at")
    if ttl is not None and (type(ttl) is not int or not 0 <= ttl <= MAX_TTL_S or expires_at is not None):
        return None
    if expires_at is not None:
        if type(expires_at) not in (int, float) or expires_at != expires_at or expires_at <= 0:
            return None
        expires_at = float(expires_at)
    if send_at is not None:
        if type(send_at) not in (int, float) or send_at != send_at:
            return None
        send_at = float(send_at)
        if expires_at is not None and send_at >= expires_at:
            return None
    return Message(
        id=msg_id, user=user, app=app, title=title, body=body, data=data, category=category, priority=priority,
        ttl=ttl, expires_at=expires_at, send_at=send_at, collapse_key=collapse_key, campaign=campaign,
        variant=variant, resolved=get("resolved") is True, fanout=get("fanout") is True,
    )
