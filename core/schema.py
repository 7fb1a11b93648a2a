"""Message schema v1: what upstream services enqueue, validated once at the door.

A message names its audience (a `user` whose devices come from the registry, and/or explicit
`devices`), its content (`title`, `body`, `data`), and how to deliver it (`category`, `priority`,
`ttl`/`expires_at`, `send_at`, `collapse_key`, `app`). Validation collects every problem with the field at
fault, so a 4xx answer tells the caller exactly what to fix; nothing invalid is ever queued.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import orjson

SCHEMA_VERSION = 1
PROVIDERS = ("apns", "fcm", "webpush")
PRIORITIES = ("normal", "high")
MAX_TTL_S = 28 * 24 * 3600  # APNs and FCM both keep a push at most four weeks
MAX_SCHEDULE_S = 366 * 24 * 3600  # send_at at most a year ahead: a later date is a typo, not a plan
MAX_ID_LEN = 128
MAX_LABEL_LEN = 64
MAX_DEVICES = 100
MAX_LISTED_ERRORS = 100  # field errors listed in one answer; the rest are counted, so a bad batch gets a bounded reply
MAX_PAST_S = MAX_TTL_S  # send_at at most this far in the past (a clock behind, not a date from another era)
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}\Z")
_CATEGORY_RE = re.compile(r"^[a-z0-9_]{1,32}\Z")
_APNS_TOKEN_RE = re.compile(r"^[0-9a-fA-F]{64,200}\Z")
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+={0,2}\Z")
_HEADER_VALUE_RE = re.compile(r"^[^\x00-\x20\x7f](?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?\Z")
_SPACE_RE = re.compile(r"\s")  # the characters for which str.isspace() is true (tests/test_schema.py checks all)

ProviderName = Literal["apns", "fcm", "webpush"]
Priority = Literal["normal", "high"]


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class MessageInvalid(ValueError):
    """A message (or device) failed validation; `errors` names each field at fault."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors

    def as_json(self) -> list[dict[str, str]]:
        """The field errors, at most MAX_LISTED_ERRORS of them; a last entry says how many more were left out."""
        out = [{"field": e.field, "message": e.message} for e in self.errors[:MAX_LISTED_ERRORS]]
        left = len(self.errors) - MAX_LISTED_ERRORS
        if left > 0:
            out.append({"field": "$", "message": f"{left} more errors not listed (fix the ones above and send again)"})
        return out


@dataclass(frozen=True, slots=True)
class Device:
    """One push target. For Web Push `token` is the subscription endpoint URL."""

    provider: ProviderName
    token: str
    app: str | None = None
    p256dh: str | None = None  # Web Push only: the browser's ECDH public key (base64url)
    auth: str | None = None  # Web Push only: the 16-byte auth secret (base64url)

    @property
    def key(self) -> str:
        """Stable id of the device in the registry and in per-delivery bookkeeping."""
        if self.provider == "webpush":
            digest = hashlib.sha256(self.token.encode()).hexdigest()[:32]
            return f"webpush:{digest}"
        return f"{self.provider}:{self.token}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any]
        if self.provider == "webpush":
            out = {"webpush": {"endpoint": self.token, "keys": {"p256dh": self.p256dh, "auth": self.auth}}}
        else:
            out = {self.provider: self.token}
        if self.app:
            out["app"] = self.app
        return out


_T = TypeVar("_T")
EndpointCheck = Callable[[str], str | None]
"""Returns None when a Web Push endpoint is acceptable, else the reason it is refused."""


# Frozen for the type checker (mypy refuses any assignment to a field), a plain slots class at run
# time: a frozen dataclass sets each field through object.__setattr__, a cost the API pays per message
# and every worker decode pays again (docs/decisions.md). Nothing hashes a Message (its data is a dict).
if TYPE_CHECKING:
    from typing import dataclass_transform

    @dataclass_transform(frozen_default=True, field_specifiers=(field,))
    def _message_class(cls: type[_T]) -> type[_T]: ...
else:
    def _message_class(cls):
        return dataclass(slots=True)(cls)


@_message_class
class Message:
    id: str
    user: str | None = None
    devices: tuple[Device, ...] = ()
    app: str = "default"
    title: str | None = None
    body: str | None = None
    data: Mapping[str, str] = field(default_factory=dict)
    category: str = "general"
    priority: Priority = "normal"
    ttl: int | None = None
    expires_at: float | None = None
    send_at: float | None = None  # unix seconds: not before this time (queue/streams.py holds it until then)
    collapse_key: str | None = None
    campaign: str | None = None
    variant: str | None = None
    # Internal: the devices are already resolved from the registry (a retry or a dead letter aims at
    # exactly `devices`; `user` stays only so a token found dead can be removed from the registry).
    resolved: bool = False
    # Internal: written by a stored campaign's fan-out (campaigns/fanout.py); only such messages count in the
    # campaign's report and metric labels, so an upstream message labelled with its id cannot change them.
    fanout: bool = False
    v: int = SCHEMA_VERSION

    @property
    def is_silent(self) -> bool:
        """No visible alert: a background/data-only push."""
        return self.title is None and self.body is None

    def expiry(self, accepted: float) -> float | None:
        """Absolute unix time after which the push is useless, or None if it never expires.

        `ttl` counts from `send_at` when the message is scheduled, else from `accepted` (the enqueue
        time), so "remind me at 9:00, useless after 9:15" is `send_at` plus `ttl: 900`."""
        if self.expires_at is not None:
            return self.expires_at
        if self.ttl is not None:
            return max(accepted, self.send_at or 0.0) + self.ttl
        return None

    def with_devices(self, devices: tuple[Device, ...]) -> Message:
        """The same message aimed at exactly these devices (used for retries and dead letters)."""
        return replace(self, devices=devices, resolved=True)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": self.v, "id": self.id}
        if self.user is not None:
            out["user"] = self.user
        if self.devices:
            out["devices"] = [d.to_json() for d in self.devices]
        if self.app != "default":
            out["app"] = self.app
        for name in ("title", "body", "collapse_key", "campaign", "variant", "ttl", "expires_at", "send_at"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.data:
            out["data"] = dict(self.data)
        out["category"] = self.category
        out["priority"] = self.priority
        if self.resolved:
            out["resolved"] = True
        if self.fanout:
            out["fanout"] = True
        return out

    def dumps(self) -> bytes:
        return orjson.dumps(self.to_json())


def _str(
    obj: Mapping[str, Any], name: str, errors: list[FieldError], *, max_len: int, pattern: re.Pattern[str] | None = None
) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(FieldError(name, "must be a string"))
        return None
    if (len(value) if value.isascii() else len(value.encode())) > max_len:  # ASCII: bytes == characters
        errors.append(FieldError(name, f"must be at most {max_len} bytes"))
        return None
    if pattern is not None and not pattern.match(value):
        errors.append(FieldError(name, f"must match {pattern.pattern}"))
        return None
    return value


def parse_user(value: Any) -> str:
    """A user id by the same rule as a message's `user`; `MessageInvalid` naming the field otherwise."""
    errors: list[FieldError] = []
    user = _str({"user": value}, "user", errors, max_len=MAX_ID_LEN, pattern=_ID_RE)
    if user is None:
        raise MessageInvalid(errors or [FieldError("user", "is required")])
    return user


def parse_device(obj: Any, where: str, errors: list[FieldError], endpoint_check: EndpointCheck | None) -> Device | None:
    """Parse `{"apns": token}`, `{"fcm": token}` or `{"webpush": {"endpoint", "keys"}}` (+ optional app)."""
    if not isinstance(obj, dict):
        errors.append(FieldError(where, "must be an object such as {\"fcm\": \"<token>\"}"))
        return None
    kinds = [p for p in PROVIDERS if p in obj]
    unknown = obj.keys() - _DEVICE_FIELDS
    if unknown:
        errors.append(FieldError(where, f"unknown field(s) {sorted(unknown)}; use one of {list(PROVIDERS)}"))
        return None
    if len(kinds) != 1:
        errors.append(FieldError(where, f"must name exactly one provider of {list(PROVIDERS)}"))
        return None
    app = obj.get("app")
    if app is not None and (not isinstance(app, str) or not _ID_RE.match(app)):
        errors.append(FieldError(f"{where}.app", "must be a short identifier"))
        return None
    kind = kinds[0]
    value = obj[kind]
    if kind == "apns":
        if not isinstance(value, str) or not _APNS_TOKEN_RE.match(value):
            errors.append(FieldError(f"{where}.apns", "must be a hex device token (64+ hex digits)"))
            return None
        return Device("apns", value.lower(), app)
    if kind == "fcm":
        if not isinstance(value, str) or not (1 <= len(value) <= 4096) or _SPACE_RE.search(value):
            errors.append(FieldError(f"{where}.fcm", "must be an FCM registration token"))
            return None
        return Device("fcm", value, app)
    # webpush
    if not isinstance(value, dict):
        errors.append(FieldError(f"{where}.webpush", "must be a subscription {endpoint, keys: {p256dh, auth}}"))
        return None
    endpoint = value.get("endpoint")
    keys = value.get("keys")
    if not isinstance(endpoint, str) or not endpoint.startswith("https://") or len(endpoint) > 2048:
        errors.append(FieldError(f"{where}.webpush.endpoint", "must be an https URL of at most 2048 characters"))
        return None
    if endpoint_check is not None:
        refusal = endpoint_check(endpoint)
        if refusal is not None:
            errors.append(FieldError(f"{where}.webpush.endpoint", refusal))
            return None
    if not isinstance(keys, dict):
        errors.append(FieldError(f"{where}.webpush.keys", "must be an object with p256dh and auth"))
        return None
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    if not isinstance(p256dh, str) or not _B64URL_RE.match(p256dh) or not (86 <= len(p256dh) <= 88):
        errors.append(FieldError(f"{where}.webpush.keys.p256dh", "must be a base64url P-256 public key"))
        return None
    if not isinstance(auth, str) or not _B64URL_RE.match(auth) or not (22 <= len(auth) <= 24):
        errors.append(FieldError(f"{where}.webpush.keys.auth", "must be a base64url 16-byte secret"))
        return None
    return Device("webpush", endpoint, app, p256dh.rstrip("="), auth.rstrip("="))


def reserved_data_key(key: str) -> bool:
    """A data key APNs (`aps`) or FCM (`from`, `notification`, `message_type`, `google*`, `gcm*`) refuses."""
    return key in ("aps", "from", "notification", "message_type") or key.startswith(("google", "gcm"))


_KNOWN = frozenset({
    "v", "id", "user", "devices", "app", "title", "body", "data", "category", "priority",
    "ttl", "expires_at", "send_at", "collapse_key", "campaign", "variant",
})
_KNOWN_INTERNAL = _KNOWN | {"resolved", "fanout"}
_DEVICE_FIELDS = frozenset({*PROVIDERS, "app"})


def parse_message(
    obj: Any,
    *,
    endpoint_check: EndpointCheck | None = None,
    now: float | None = None,
    require_target: bool = True,
    internal: bool = False,
) -> Message:
    """Validate a decoded JSON object and build a `Message`; raise `MessageInvalid` listing every error.

    `internal` admits the fields only the gateway itself writes (`resolved`, `fanout`), for entries read back
    from the queue; upstream input never sets them.
    """
    errors: list[FieldError] = []
    if not isinstance(obj, dict):
        raise MessageInvalid([FieldError("$", "a message must be a JSON object")])
    unknown = obj.keys() - (_KNOWN_INTERNAL if internal else _KNOWN)
    if unknown:
        errors.append(FieldError("$", f"unknown field(s) {sorted(unknown)}"))
    version = obj.get("v", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:  # true and 1.0 equal 1 in Python, not in the schema
        errors.append(FieldError("v", f"unsupported schema version {version!r}; this gateway speaks {SCHEMA_VERSION}"))
    msg_id = _str(obj, "id", errors, max_len=MAX_ID_LEN, pattern=_ID_RE)
    user = _str(obj, "user", errors, max_len=MAX_ID_LEN, pattern=_ID_RE)
    app = _str(obj, "app", errors, max_len=MAX_LABEL_LEN, pattern=_ID_RE) or "default"
    title = _str(obj, "title", errors, max_len=1024)
    body = _str(obj, "body", errors, max_len=4096)
    category = _str(obj, "category", errors, max_len=32, pattern=_CATEGORY_RE) or "general"
    collapse_key = _str(obj, "collapse_key", errors, max_len=64)
    if collapse_key is not None and not _HEADER_VALUE_RE.match(collapse_key):
        # It travels as an HTTP header (apns-collapse-id, Web Push Topic): RFC 9110 section 5.5 field-value,
        # no control characters and no leading or trailing whitespace.
        errors.append(FieldError("collapse_key", "must be a valid header value: no control characters (CR, LF, NUL) "
                                                 "and no leading or trailing whitespace"))
        collapse_key = None
    if title == "":
        errors.append(FieldError("title", "must not be empty; leave it out for a push without a title"))
        title = None
    campaign = _str(obj, "campaign", errors, max_len=MAX_LABEL_LEN, pattern=_ID_RE)
    variant = _str(obj, "variant", errors, max_len=MAX_LABEL_LEN, pattern=_ID_RE)

    priority = obj.get("priority", "normal")
    if priority not in PRIORITIES:
        errors.append(FieldError("priority", f"must be one of {list(PRIORITIES)}"))
        priority = "normal"

    data_in = obj.get("data", {})
    data: dict[str, str] = {}
    if not isinstance(data_in, dict):
        errors.append(FieldError("data", "must be an object of string values"))
    else:
        for k, v in data_in.items():
            if not isinstance(v, str):
                errors.append(FieldError(f"data.{k}", "must be a string (FCM carries data values as strings)"))
            elif reserved_data_key(k):
                errors.append(FieldError(f"data.{k}", "is a key reserved by APNs or FCM"))
            else:
                data[k] = v

    ttl = obj.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL_S):
        errors.append(FieldError("ttl", f"must be whole seconds from 0 to {MAX_TTL_S}"))
        ttl = None
    clock = now if now is not None else time.time()
    expires_at = obj.get("expires_at")
    if expires_at is not None:
        if isinstance(expires_at, bool) or not isinstance(expires_at, int | float) or expires_at != expires_at:
            errors.append(FieldError("expires_at", "must be a unix time in seconds"))
            expires_at = None
        elif ttl is not None:
            errors.append(FieldError("expires_at", "give either ttl or expires_at, not both"))
        elif expires_at <= clock:
            errors.append(FieldError("expires_at", "is already in the past"))
            expires_at = None
        else:
            expires_at = float(expires_at)

    send_at = obj.get("send_at")
    if send_at is not None:
        if isinstance(send_at, bool) or not isinstance(send_at, int | float) or send_at != send_at:
            errors.append(FieldError("send_at", "must be a unix time in seconds"))
            send_at = None
        elif not internal and send_at > clock + MAX_SCHEDULE_S:
            errors.append(FieldError("send_at", f"must be at most {MAX_SCHEDULE_S // 86400} days ahead"))
            send_at = None
        elif not internal and send_at < clock - MAX_PAST_S:
            errors.append(FieldError("send_at", f"must be at most {MAX_PAST_S // 86400} days in the past"))
            send_at = None
        else:
            send_at = float(send_at)  # in the past: due now (the sender's clock may be a little behind)
            if isinstance(expires_at, float) and send_at >= expires_at:
                errors.append(FieldError("send_at", "is at or after expires_at: the message could never be delivered"))
    if not internal and isinstance(expires_at, float) and expires_at > max(clock, send_at or 0.0) + MAX_TTL_S:
        # Bounded like ttl: APNs and FCM keep a push at most four weeks after it is sent.
        errors.append(FieldError("expires_at", f"must be at most {MAX_TTL_S} seconds (like ttl) after send_at or now"))

    devices: list[Device] = []
    devices_in = obj.get("devices", [])
    if not isinstance(devices_in, list):
        errors.append(FieldError("devices", "must be a list"))
    elif len(devices_in) > MAX_DEVICES:
        errors.append(FieldError("devices", f"at most {MAX_DEVICES} devices per message; use a user or a batch"))
    else:
        seen: set[str] = set()
        for i, d in enumerate(devices_in):
            dev = parse_device(d, f"devices[{i}]", errors, endpoint_check)
            if dev is not None and dev.key not in seen:
                seen.add(dev.key)
                devices.append(dev)
    if require_target and user is None and not devices_in:
        errors.append(FieldError("user", "a message needs a user, devices, or both"))
    if title is None and body is None and not data:
        errors.append(FieldError("body", "a message needs a title, a body or data"))

    if errors:
        raise MessageInvalid(errors)
    return Message(
        id=msg_id or uuid.uuid4().hex,
        user=user,
        devices=tuple(devices),
        app=app,
        title=title,
        body=body,
        data=data,
        category=category,
        priority=priority,
        ttl=ttl,
        expires_at=expires_at,
        send_at=send_at,
        collapse_key=collapse_key,
        campaign=campaign,
        variant=variant,
        resolved=internal and obj.get("resolved") is True,
        fanout=internal and obj.get("fanout") is True,
    )


def loads_message(raw: bytes | str) -> Message:
    """Decode a message that is already in the queue (it was validated when it was enqueued)."""
    return parse_message(orjson.loads(raw), now=0.0, internal=True)
