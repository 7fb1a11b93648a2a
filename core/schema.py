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
from typing import Any, Literal

import orjson

from .records import record

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
_ID_RE = ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}\Z")  # message ids, users, refs
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
    # Web Push only: the site shows declarative push messages (W3C Push API; no service worker needed)
    declarative: bool = False

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
            sub: dict[str, Any] = {"endpoint": self.token, "keys": {"p256dh": self.p256dh, "auth": self.auth}}
            if self.declarative:
                sub["declarative"] = True
            out = {"webpush": sub}
        else:
            out = {self.provider: self.token}
        if self.app:
            out["app"] = self.app
        return out


EndpointCheck = Callable[[str], str | None]
"""Returns None when a Web Push endpoint is acceptable, else the reason it is refused."""


# Frozen for the type checker, a plain slots class at run time (core/records.py): the API builds one per
# message and every worker decode again. Nothing hashes a Message (its data is a dict).
@record
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
    rich: Rich | None = None  # the rich presentation fields (subtitle, image, badge, ...); None: none given
    overrides: Overrides | None = None  # the per-platform blocks (apns, fcm, webpush); None: none given
    fcm_target: FcmTarget | None = None  # an FCM topic or condition instead of user and devices
    apns_push: ApnsPush | None = None  # an APNs push type other than the inferred one, or a Live Activity
    # Internal: the devices are already resolved from the registry (a retry or a dead letter aims at
    # exactly `devices`; `user` stays only so a token found dead can be removed from the registry).
    resolved: bool = False
    # Internal: written by a stored campaign's fan-out (campaigns/fanout.py); only such messages count in the
    # campaign's report and metric labels, so an upstream message labelled with its id cannot change them.
    fanout: bool = False
    # The upstream entity the message is about (e.g. session-812): `DELETE /v1/messages?ref=` withdraws every
    # message of one API client with this ref that is still waiting (scheduled or held by the policy).
    ref: str | None = None
    # Internal: the API client that enqueued it (gateway/intake.py): who may read its status, whose webhooks
    # get its outcome events. None: enqueued by the CLI, the Python client or a campaign fan-out.
    client: str | None = None
    v: int = SCHEMA_VERSION

    @property
    def is_silent(self) -> bool:
        """No visible alert: a background/data-only push (`silent`, given or inferred; see `Rich.silent`)."""
        if self.rich is not None:
            return self.rich.silent
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
        if self.fcm_target is not None:
            out.update(self.fcm_target.to_json())  # its pseudo-device is planned again from it
        elif self.devices:
            out["devices"] = [d.to_json() for d in self.devices]
        if self.app != "default":
            out["app"] = self.app
        for name in ("title", "body", "collapse_key", "campaign", "variant", "ttl", "expires_at", "send_at", "ref"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.data:
            out["data"] = dict(self.data)
        if self.rich is not None:
            out.update(self.rich.to_json())
        if self.overrides is not None:
            out.update(self.overrides.to_json())
        if self.apns_push is not None:
            out.update(self.apns_push.to_json())
        out["category"] = self.category
        out["priority"] = self.priority
        if self.resolved:
            out["resolved"] = True
        if self.fanout:
            out["fanout"] = True
        if self.client is not None:
            out["client"] = self.client
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
    declarative = value.get("declarative", False)
    if not isinstance(declarative, bool):
        errors.append(FieldError(f"{where}.webpush.declarative", "must be true or false"))
        return None
    return Device("webpush", endpoint, app, p256dh.rstrip("="), auth.rstrip("="), declarative)


def reserved_data_key(key: str) -> bool:
    """A data key APNs (`aps`) or FCM (`from`, `notification`, `message_type`, `google*`, `gcm*`) refuses."""
    return key in ("aps", "from", "notification", "message_type") or key.startswith(("google", "gcm"))


# --- Rich presentation fields ------------------------------------------------------------------
# Neutral fields that each provider module maps to its own keys (providers/payloads.py; the mapping
# table is in the README). They sit at the top level of a message; the parsed values live in one
# `Rich` object, so a message that uses none of them costs one test on the delivery path.

INTERRUPTION_LEVELS = ("passive", "active", "time-sensitive", "critical")
TEXT_DIRECTIONS = ("auto", "ltr", "rtl")
SOUND_DEFAULT = "default"
SOUND_NONE = "none"
MAX_ACTIONS = 4  # Apple: up to four actions in a notification's default context; browsers show fewer
MAX_LOC_ARGS = 10
MAX_BADGE = 2**31 - 1  # FCM's notification_count is an int32
MAX_URL_LEN = 2048
RICH_FIELDS = (
    "subtitle", "image", "icon", "badge", "sound", "interruption_level", "relevance_score", "thread",
    "actions", "actions_category", "link", "title_loc_key", "title_loc_args", "body_loc_key", "body_loc_args",
    "silent", "lang", "dir", "require_interaction", "renotify",
)
_RICH_KEYS = frozenset(RICH_FIELDS)
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")  # sound files, action ids, category identifiers
_LOC_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
_ICON_NAME_RE = re.compile(r"^[A-Za-z0-9_.]{1,128}\Z")  # an Android drawable resource name
_HTTPS_URL_RE = re.compile(r"^https://[^/?#\s@]+[^\s\x00-\x1f\x7f]*\Z")
_PATH_URL_RE = re.compile(r"^/[^\s\x00-\x1f\x7f]*\Z")
_LINK_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}:[^\s\x00-\x1f\x7f]+\Z")
_LINK_REFUSED_SCHEMES = ("http", "javascript", "data", "file", "vbscript", "blob")
_LANG_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,4}\Z")
_NO_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_ACTION_FIELDS = frozenset({"id", "title", "icon", "destructive", "foreground"})
_SOUND_FIELDS = frozenset({"name", "critical", "volume"})
# What a silent (data-only, background) push may not carry: APNs refuses a background push with an
# alert, sound or badge ("Pushing background updates to your App"), and nothing is shown to act on.
_VISIBLE_FIELDS = (
    "title", "body", "subtitle", "image", "badge", "sound", "interruption_level", "relevance_score", "actions",
    "actions_category", "title_loc_key", "title_loc_args", "body_loc_key", "body_loc_args", "require_interaction",
    "renotify",
)


# What only makes sense on a notification with text: without one it would be sent nowhere (a silent
# push) or shown as an empty banner.
_ALERT_DECORATIONS = (
    "image", "actions", "actions_category", "interruption_level", "relevance_score", "require_interaction", "renotify",
)


@dataclass(frozen=True, slots=True)
class Sound:
    """A notification sound: a file name in the app, "default", or "none"; `critical` plays through
    the mute switch and Focus (APNs critical alerts, which need Apple's entitlement)."""

    name: str
    critical: bool = False
    volume: float | None = None  # 0..1, critical sounds only

    def to_json(self) -> str | dict[str, Any]:
        if not self.critical:
            return self.name
        out: dict[str, Any] = {"name": self.name, "critical": True}
        if self.volume is not None:
            out["volume"] = self.volume
        return out


@dataclass(frozen=True, slots=True)
class Action:
    """A notification button: `id` comes back to the app (or service worker) when it is tapped."""

    id: str
    title: str
    icon: str | None = None
    destructive: bool = False
    foreground: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "title": self.title}
        if self.icon is not None:
            out["icon"] = self.icon
        if self.destructive:
            out["destructive"] = True
        if self.foreground:
            out["foreground"] = True
        return out


@dataclass(frozen=True, slots=True)
class Rich:
    """The rich presentation fields of a message; only the ones given are set."""

    silent: bool  # a background/data-only push: `silent` as given, else no alert text, badge or sound
    silent_given: bool = False
    subtitle: str | None = None
    image: str | None = None
    icon: str | None = None
    badge: int | None = None
    sound: Sound | None = None
    interruption_level: str | None = None
    relevance_score: float | None = None
    thread: str | None = None
    actions: tuple[Action, ...] = ()
    actions_category: str | None = None
    link: str | None = None
    title_loc_key: str | None = None
    title_loc_args: tuple[str, ...] = ()
    body_loc_key: str | None = None
    body_loc_args: tuple[str, ...] = ()
    lang: str | None = None
    dir: str | None = None
    require_interaction: bool = False
    renotify: bool = False

    @property
    def critical(self) -> bool:
        """Uses Apple's critical-alert entitlement (a critical sound or interruption level)."""
        return (self.sound is not None and self.sound.critical) or self.interruption_level == "critical"

    @property
    def has_content(self) -> bool:
        """Something a device can show or do without a title, body or data."""
        return self.silent_given or not self.silent

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("subtitle", "image", "icon", "badge", "interruption_level", "relevance_score", "thread",
                     "actions_category", "link", "title_loc_key", "body_loc_key", "lang", "dir"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.sound is not None:
            out["sound"] = self.sound.to_json()
        if self.actions:
            out["actions"] = [a.to_json() for a in self.actions]
        if self.title_loc_args:
            out["title_loc_args"] = list(self.title_loc_args)
        if self.body_loc_args:
            out["body_loc_args"] = list(self.body_loc_args)
        if self.silent_given:
            out["silent"] = self.silent
        if self.require_interaction:
            out["require_interaction"] = True
        if self.renotify:
            out["renotify"] = True
        return out


def _bool(obj: Mapping[str, Any], name: str, errors: list[FieldError], where: str = "") -> bool | None:
    value = obj.get(name)
    if value is None or isinstance(value, bool):
        return value
    errors.append(FieldError(where + name, "must be true or false"))
    return None


def _url(value: Any, name: str, errors: list[FieldError], *, paths: bool = False, names: bool = False) -> str | None:
    """An https URL (or, where allowed, a path on the site, or an Android resource name)."""
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_URL_LEN and (
            _HTTPS_URL_RE.match(value) or (paths and _PATH_URL_RE.match(value))
            or (names and _ICON_NAME_RE.match(value))):
        return value
    allowed = "an https URL" + (", a path such as /icons/quiz.png" if paths else "") + (
        " or a resource name such as ic_quiz" if names else "")
    errors.append(FieldError(name, f"must be {allowed} of at most {MAX_URL_LEN} characters (http is refused: "
                                   "devices and browsers fetch it)"))
    return None


def _loc_args(obj: Mapping[str, Any], name: str, key: str | None, errors: list[FieldError]) -> tuple[str, ...]:
    value = obj.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_LOC_ARGS or not all(
            isinstance(v, str) and len(v.encode()) <= 256 for v in value):
        errors.append(FieldError(name, f"must be a list of at most {MAX_LOC_ARGS} strings of at most 256 bytes"))
        return ()
    if key is None:
        errors.append(FieldError(name, f"needs {name.removesuffix('_args')}_key (the arguments fill its format)"))
        return ()
    return tuple(value)


def _sound(value: Any, errors: list[FieldError]) -> Sound | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not _NAME_RE.match(value):
            errors.append(FieldError("sound", 'must be "default", "none", a sound file name such as chime.caf, '
                                              "or {name, critical, volume}"))
            return None
        return Sound(value)
    if not isinstance(value, dict):
        errors.append(FieldError("sound", 'must be a name, "default", "none" or {name, critical, volume}'))
        return None
    unknown = value.keys() - _SOUND_FIELDS
    if unknown:
        errors.append(FieldError("sound", f"unknown field(s) {sorted(unknown)}; use name, critical, volume"))
        return None
    name = value.get("name", SOUND_DEFAULT)
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == SOUND_NONE:
        errors.append(FieldError("sound.name", 'must be "default" or a sound file name such as alarm.caf'))
        return None
    critical = _bool(value, "critical", errors, "sound.")
    volume = value.get("volume")
    if volume is not None:
        if isinstance(volume, bool) or not isinstance(volume, int | float) or not 0 <= volume <= 1:
            errors.append(FieldError("sound.volume", "must be a number from 0 to 1"))
            return None
        if not critical:
            errors.append(FieldError("sound.volume", "applies to critical sounds only (APNs sound.volume)"))
            return None
    return Sound(name, bool(critical), None if volume is None else float(volume))


def _actions(value: Any, errors: list[FieldError]) -> tuple[Action, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_ACTIONS:
        errors.append(FieldError("actions", f"must be a list of 1 to {MAX_ACTIONS} buttons {{id, title}}"))
        return ()
    out: list[Action] = []
    for i, a in enumerate(value):
        where = f"actions[{i}]"
        if not isinstance(a, dict):
            errors.append(FieldError(where, "must be an object {id, title, icon?, destructive?, foreground?}"))
            continue
        unknown = a.keys() - _ACTION_FIELDS
        if unknown:
            errors.append(FieldError(where, f"unknown field(s) {sorted(unknown)}"))
            continue
        action_id, title = a.get("id"), a.get("title")
        if not isinstance(action_id, str) or not _NAME_RE.match(action_id):
            errors.append(FieldError(f"{where}.id", "must be 1-64 letters, digits, '.', '_' or '-'"))
            continue
        if any(x.id == action_id for x in out):
            errors.append(FieldError(f"{where}.id", "is used by another button of this message"))
            continue
        if not isinstance(title, str) or not title.strip() or len(title.encode()) > 128 or _NO_CONTROL_RE.search(title):
            errors.append(FieldError(f"{where}.title", "must be a non-empty string of at most 128 bytes"))
            continue
        icon = _url(a.get("icon"), f"{where}.icon", errors, paths=True)
        destructive = _bool(a, "destructive", errors, f"{where}.")
        foreground = _bool(a, "foreground", errors, f"{where}.")
        out.append(Action(action_id, title, icon, bool(destructive), bool(foreground)))
    return tuple(out)


def parse_rich(obj: Mapping[str, Any], errors: list[FieldError], *, title: str | None, body: str | None) -> Rich | None:
    """The rich fields of a message (at least one is present in `obj`); appends an error per field at fault."""
    before = len(errors)
    subtitle = _str(obj, "subtitle", errors, max_len=1024)
    image = _url(obj.get("image"), "image", errors)
    icon = _url(obj.get("icon"), "icon", errors, paths=True, names=True)
    badge = obj.get("badge")
    if badge is not None and (isinstance(badge, bool) or not isinstance(badge, int) or not 0 <= badge <= MAX_BADGE):
        errors.append(FieldError("badge", f"must be a whole number from 0 (clears the badge) to {MAX_BADGE}"))
        badge = None
    sound = _sound(obj.get("sound"), errors)
    level = obj.get("interruption_level")
    if level is not None and level not in INTERRUPTION_LEVELS:
        errors.append(FieldError("interruption_level", f"must be one of {list(INTERRUPTION_LEVELS)}"))
        level = None
    score = obj.get("relevance_score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            errors.append(FieldError("relevance_score", "must be a number from 0 to 1"))
            score = None
        else:
            score = float(score)
    thread = _str(obj, "thread", errors, max_len=64)
    if thread is not None and (not thread.strip() or _NO_CONTROL_RE.search(thread)):
        errors.append(FieldError("thread", "must be a non-empty string without control characters"))
    actions = _actions(obj.get("actions"), errors)
    actions_category = _str(obj, "actions_category", errors, max_len=64, pattern=_NAME_RE)
    if obj.get("actions") is not None and actions_category is None and "actions_category" not in obj:
        errors.append(FieldError("actions_category", "is required with actions: iOS and Android show the buttons "
                                                     "the app registered under this category identifier"))
    link = obj.get("link")
    if link is not None and (not isinstance(link, str) or len(link) > MAX_URL_LEN or not _LINK_RE.match(link)
                             or link.partition(":")[0].lower() in _LINK_REFUSED_SCHEMES):
        errors.append(FieldError("link", f"must be an https URL or an app link such as campus://quiz/42, at most "
                                         f"{MAX_URL_LEN} characters (http, javascript: and data: are refused)"))
        link = None
    title_loc_key = _str(obj, "title_loc_key", errors, max_len=128, pattern=_LOC_KEY_RE)
    body_loc_key = _str(obj, "body_loc_key", errors, max_len=128, pattern=_LOC_KEY_RE)
    title_loc_args = _loc_args(obj, "title_loc_args", title_loc_key, errors)
    body_loc_args = _loc_args(obj, "body_loc_args", body_loc_key, errors)
    lang = obj.get("lang")
    if lang is not None and (not isinstance(lang, str) or not _LANG_RE.match(lang)):
        errors.append(FieldError("lang", "must be a language tag such as fr or pt-BR"))
        lang = None
    direction = obj.get("dir")
    if direction is not None and direction not in TEXT_DIRECTIONS:
        errors.append(FieldError("dir", f"must be one of {list(TEXT_DIRECTIONS)}"))
        direction = None
    require_interaction = _bool(obj, "require_interaction", errors)
    renotify = _bool(obj, "renotify", errors)
    silent_in = _bool(obj, "silent", errors)

    alert_text = title is not None or body is not None or subtitle is not None or title_loc_key is not None \
        or body_loc_key is not None
    shows = alert_text or badge is not None or (sound is not None and sound.name != SOUND_NONE)
    if silent_in:
        for name in _VISIBLE_FIELDS:
            if obj.get(name) is not None:
                errors.append(FieldError(name, "a silent (data-only) message shows nothing: remove it or silent"))
    elif silent_in is False and not shows:
        errors.append(FieldError("silent", "is false but the message shows nothing: give a title, body, "
                                           "loc key, badge or sound"))
    elif not alert_text:
        for name in _ALERT_DECORATIONS:
            if obj.get(name) is not None:
                errors.append(FieldError(name, "decorates an alert: give a title, body or loc key too"))
    if subtitle is not None and title is None and title_loc_key is None:
        errors.append(FieldError("subtitle", "needs a title or title_loc_key (APNs shows it under the title)"))
    if len(errors) > before:
        return None
    return Rich(
        silent=silent_in if silent_in is not None else not shows,
        silent_given=silent_in is not None,
        subtitle=subtitle, image=image, icon=icon, badge=badge, sound=sound, interruption_level=level,
        relevance_score=score, thread=thread, actions=actions, actions_category=actions_category, link=link,
        title_loc_key=title_loc_key, title_loc_args=title_loc_args, body_loc_key=body_loc_key,
        body_loc_args=body_loc_args, lang=lang, dir=direction, require_interaction=bool(require_interaction),
        renotify=bool(renotify),
    )


# --- Per-platform blocks -----------------------------------------------------------------------
# `apns`, `fcm` and `webpush` objects of a message carry what the neutral fields do not say, in each
# provider's own names. providers/payloads.py deep-merges them over the payload the neutral fields
# produce. Each block is checked against the provider's documented schema: a field it does not know is
# refused with its path (e.g. `fcm.android.notifcation`), never dropped.

BLOCK_FIELDS = ("apns", "fcm", "webpush")
_BLOCK_KEYS = frozenset(BLOCK_FIELDS)
MAX_BLOCK_DEPTH = 8
APNS_HEADER_PUSH_TYPES = ("alert", "background", "voip", "location", "complication", "fileprovider", "mdm",
                   "pushtotalk", "liveactivity", "widgets", "controls")
WEBPUSH_URGENCIES = ("very-low", "low", "normal", "high")
_DIGITS_RE = re.compile(r"^[0-9]{1,12}\Z")
_WEBPUSH_TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")  # RFC 8030 section 5.4: at most 32 base64url characters
_FCM_TTL_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9})?s\Z")  # a google.protobuf.Duration in JSON


@dataclass(frozen=True, slots=True)
class Overrides:
    """The validated per-platform blocks of a message, as given (header names in lower case)."""

    apns_headers: Mapping[str, str] = field(default_factory=dict)
    apns_payload: Mapping[str, Any] = field(default_factory=dict)
    fcm: Mapping[str, Any] = field(default_factory=dict)
    webpush_headers: Mapping[str, str] = field(default_factory=dict)
    webpush_notification: Mapping[str, Any] = field(default_factory=dict)
    given: frozenset[str] = frozenset()

    @property
    def critical_field(self) -> str | None:
        """The `apns` block field that asks for a critical alert (Apple's entitlement), or None."""
        aps = self.apns_payload.get("aps")
        if not isinstance(aps, Mapping):
            return None
        sound = aps.get("sound")
        if isinstance(sound, Mapping) and sound.get("critical") == 1:
            return "apns.payload.aps.sound.critical"
        if aps.get("interruption-level") == "critical":
            return "apns.payload.aps.interruption-level"
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "apns" in self.given:
            apns: dict[str, Any] = {}
            if self.apns_headers:
                apns["headers"] = dict(self.apns_headers)
            if self.apns_payload:
                apns["payload"] = dict(self.apns_payload)
            out["apns"] = apns
        if "fcm" in self.given:
            out["fcm"] = dict(self.fcm)
        if "webpush" in self.given:
            webpush: dict[str, Any] = {}
            if self.webpush_headers:
                webpush["headers"] = dict(self.webpush_headers)
            if self.webpush_notification:
                webpush["notification"] = dict(self.webpush_notification)
            out["webpush"] = webpush
        return out


_Check = Callable[[Any, str, list[FieldError]], bool]
_SchemaSpec = Mapping[str, "_Check | Mapping[str, Any]"]


def _is_str(value: Any, where: str, errors: list[FieldError]) -> bool:
    if isinstance(value, str):
        return True
    errors.append(FieldError(where, "must be a string"))
    return False


def _is_bool(value: Any, where: str, errors: list[FieldError]) -> bool:
    if isinstance(value, bool):
        return True
    errors.append(FieldError(where, "must be true or false"))
    return False


def _is_int(value: Any, where: str, errors: list[FieldError]) -> bool:
    if not isinstance(value, bool) and isinstance(value, int) and 0 <= value < 2**31:
        return True
    errors.append(FieldError(where, "must be a whole number from 0 to 2147483647"))
    return False


def _is_flag(value: Any, where: str, errors: list[FieldError]) -> bool:
    if value in (0, 1) and not isinstance(value, bool):
        return True
    errors.append(FieldError(where, "must be 0 or 1"))
    return False


def _is_unit(value: Any, where: str, errors: list[FieldError]) -> bool:
    if not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value <= 1:
        return True
    errors.append(FieldError(where, "must be a number from 0 to 1"))
    return False


def _is_strings(value: Any, where: str, errors: list[FieldError]) -> bool:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return True
    errors.append(FieldError(where, "must be a list of strings"))
    return False


def _is_string_map(value: Any, where: str, errors: list[FieldError]) -> bool:
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return True
    errors.append(FieldError(where, "must be an object of string values"))
    return False


def _is_json(value: Any, where: str, errors: list[FieldError], depth: int = 0) -> bool:
    """Any JSON value nested at most MAX_BLOCK_DEPTH deep (custom payload keys, content-state, data)."""
    if depth > MAX_BLOCK_DEPTH:
        errors.append(FieldError(where, f"nests deeper than {MAX_BLOCK_DEPTH} levels"))
        return False
    if isinstance(value, dict):
        return all(_is_json(v, f"{where}.{k}", errors, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_json(v, f"{where}[{i}]", errors, depth + 1) for i, v in enumerate(value))
    return value is None or isinstance(value, str | int | float | bool)


def _is_any_json(value: Any, where: str, errors: list[FieldError]) -> bool:
    return _is_json(value, where, errors)


def _is_timestamp(value: Any, where: str, errors: list[FieldError]) -> bool:
    if not isinstance(value, bool) and isinstance(value, int) and value >= 0:
        return True
    errors.append(FieldError(where, "must be a time in milliseconds since the epoch"))
    return False


def _is_vibrate(value: Any, where: str, errors: list[FieldError]) -> bool:
    """NotificationOptions.vibrate: a duration or a list of durations in milliseconds."""
    items = value if isinstance(value, list) else [value]
    if all(not isinstance(v, bool) and isinstance(v, int) and 0 <= v <= 10_000 for v in items):
        return True
    errors.append(FieldError(where, "must be milliseconds or a list of them (0 to 10000)"))
    return False


def _web_actions(value: Any, where: str, errors: list[FieldError]) -> bool:
    """NotificationOptions.actions: a list of {action, title, icon?} (navigate for declarative push)."""
    if not isinstance(value, list):
        errors.append(FieldError(where, "must be a list of {action, title, icon?}"))
        return False
    ok = True
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if _check_spec(item, _WEB_ACTION, here, errors):
            for required in ("action", "title"):
                if required not in item:
                    errors.append(FieldError(f"{here}.{required}", "is required"))
                    ok = False
        else:
            ok = False
    return ok


def _is_object(value: Any, where: str, errors: list[FieldError]) -> bool:
    if isinstance(value, dict):
        return _is_json(value, where, errors)
    errors.append(FieldError(where, "must be an object"))
    return False


def _one_of(*choices: str) -> _Check:
    def check(value: Any, where: str, errors: list[FieldError]) -> bool:
        if value in choices:
            return True
        errors.append(FieldError(where, f"must be one of {list(choices)}"))
        return False
    return check


def _matching(pattern: re.Pattern[str], text: str) -> _Check:
    def check(value: Any, where: str, errors: list[FieldError]) -> bool:
        if isinstance(value, str) and pattern.match(value):
            return True
        errors.append(FieldError(where, f"must be {text}"))
        return False
    return check


def _is_https(value: Any, where: str, errors: list[FieldError]) -> bool:
    return _url(value, where, errors) is not None


def _check_spec(value: Any, spec: _SchemaSpec, where: str, errors: list[FieldError]) -> bool:
    """`value` is an object whose keys are all in `spec`, each value passing its check or sub-spec."""
    if not isinstance(value, dict):
        errors.append(FieldError(where, "must be an object"))
        return False
    ok = True
    for key, item in value.items():
        path = f"{where}.{key}"
        rule = spec.get(key)
        if rule is None:
            errors.append(FieldError(path, f"is not a field of {where} in the provider's documented schema; "
                                           f"known: {sorted(spec)}"))
            ok = False
        elif isinstance(rule, Mapping):
            ok = _check_spec(item, rule, path, errors) and ok
        else:
            ok = rule(item, path, errors) and ok
    return ok


def _apns_alert(value: Any, where: str, errors: list[FieldError]) -> bool:
    """aps.alert: a string, or the alert dictionary (APNs payload key reference)."""
    if isinstance(value, str):
        return True
    return _check_spec(value, _APNS_ALERT, where, errors)


def _apns_sound(value: Any, where: str, errors: list[FieldError]) -> bool:
    """aps.sound: a file name, or {critical, name, volume} for a critical alert."""
    if isinstance(value, str):
        return True
    return _check_spec(value, {"critical": _is_flag, "name": _is_str, "volume": _is_unit}, where, errors)


def _apns_payload(value: Any, where: str, errors: list[FieldError]) -> bool:
    """An APNs payload: `aps` by its documented keys; other top-level keys are the app's custom data."""
    if not isinstance(value, dict):
        errors.append(FieldError(where, "must be an object such as {\"aps\": {...}}"))
        return False
    ok = True
    for key, item in value.items():
        if key == "aps":
            ok = _check_spec(item, _APS, f"{where}.aps", errors) and ok
        elif key == "pushgw":
            errors.append(FieldError(f"{where}.pushgw", "is the gateway's own key (message id and tracking)"))
            ok = False
        else:
            ok = _is_json(item, f"{where}.{key}", errors) and ok
    return ok


_APNS_ALERT: _SchemaSpec = {
    "title": _is_str, "subtitle": _is_str, "body": _is_str, "launch-image": _is_str,
    "title-loc-key": _is_str, "title-loc-args": _is_strings, "subtitle-loc-key": _is_str,
    "subtitle-loc-args": _is_strings, "loc-key": _is_str, "loc-args": _is_strings,
}
# APNs "Generating a remote notification", payload key reference; Live Activity keys from
# "Starting and updating Live Activities with ActivityKit push notifications".
_APS: _SchemaSpec = {
    "alert": _apns_alert, "badge": _is_int, "sound": _apns_sound, "thread-id": _is_str, "category": _is_str,
    "content-available": _is_flag, "mutable-content": _is_flag, "target-content-id": _is_str,
    "interruption-level": _one_of(*INTERRUPTION_LEVELS), "relevance-score": _is_unit, "filter-criteria": _is_str,
    "timestamp": _is_int, "event": _one_of("start", "update", "end"), "content-state": _is_object,
    "stale-date": _is_int, "dismissal-date": _is_int, "attributes-type": _is_str, "attributes": _is_object,
}
# APNs "Sending notification requests to APNs", request headers a message may set (apns-topic and
# authorization come from the app's configuration, apns-id from the delivery).
_APNS_HEADERS: _SchemaSpec = {
    "apns-push-type": _one_of(*APNS_HEADER_PUSH_TYPES),
    "apns-priority": _one_of("1", "5", "10"),
    "apns-expiration": _matching(_DIGITS_RE, "unix seconds as a string of digits (0: deliver once or drop)"),
    "apns-collapse-id": _matching(re.compile(r"^[^\x00-\x1f\x7f]{1,64}\Z"), "1 to 64 characters"),
}
# FCM HTTP v1 reference, projects.messages (AndroidConfig, AndroidNotification, ApnsConfig, WebpushConfig).
_FCM_ANDROID_NOTIFICATION: _SchemaSpec = {
    **{k: _is_str for k in ("title", "body", "icon", "color", "sound", "tag", "click_action", "title_loc_key",
                            "body_loc_key", "channel_id", "ticker", "event_time", "image")},
    "title_loc_args": _is_strings, "body_loc_args": _is_strings, "vibrate_timings": _is_strings,
    **{k: _is_bool for k in ("sticky", "local_only", "default_sound", "default_vibrate_timings",
                             "default_light_settings", "bypass_proxy_notification")},
    "notification_priority": _one_of("PRIORITY_UNSPECIFIED", "PRIORITY_MIN", "PRIORITY_LOW", "PRIORITY_DEFAULT",
                                     "PRIORITY_HIGH", "PRIORITY_MAX"),
    "visibility": _one_of("VISIBILITY_UNSPECIFIED", "PRIVATE", "PUBLIC", "SECRET"),
    "proxy": _one_of("PROXY_UNSPECIFIED", "ALLOW", "DENY", "IF_PRIORITY_LOWERED"),
    "notification_count": _is_int, "light_settings": _is_object,
}
_FCM_ANDROID: _SchemaSpec = {
    "collapse_key": _is_str, "priority": _one_of("NORMAL", "HIGH"),
    "ttl": _matching(_FCM_TTL_RE, 'a duration in seconds such as "3600s"'),
    "restricted_package_name": _is_str, "data": _is_string_map, "notification": _FCM_ANDROID_NOTIFICATION,
    "fcm_options": {"analytics_label": _is_str}, "direct_boot_ok": _is_bool,
}
_FCM_BLOCK: _SchemaSpec = {
    "android": _FCM_ANDROID,
    "apns": {"headers": _is_string_map, "payload": _apns_payload,
             "fcm_options": {"analytics_label": _is_str, "image": _is_https}},
    "webpush": {"headers": _is_string_map, "data": _is_string_map, "notification": _is_object,
                "fcm_options": {"link": _is_https, "analytics_label": _is_str}},
    "fcm_options": {"analytics_label": _is_str},
}
# WHATWG Notifications, NotificationOptions (what the service worker passes to showNotification).
_WEB_NOTIFICATION: _SchemaSpec = {
    "title": _is_str, "body": _is_str, "icon": _is_str, "image": _is_str, "badge": _is_str, "tag": _is_str,
    "renotify": _is_bool, "requireInteraction": _is_bool, "silent": _is_bool, "data": _is_any_json,
    "dir": _one_of(*TEXT_DIRECTIONS), "lang": _is_str, "timestamp": _is_timestamp, "vibrate": _is_vibrate,
    "actions": _web_actions,
}
_WEB_ACTION: _SchemaSpec = {"action": _is_str, "title": _is_str, "icon": _is_str, "navigate": _is_https}
# RFC 8030 section 5 request headers a message may set (the gateway sets Authorization, Content-*).
_WEB_HEADERS: _SchemaSpec = {
    "ttl": _matching(_DIGITS_RE, "whole seconds as a string of digits"),
    "urgency": _one_of(*WEBPUSH_URGENCIES),
    "topic": _matching(_WEBPUSH_TOPIC_RE, "1 to 32 base64url characters (RFC 8030 section 5.4)"),
}
_APNS_BLOCK: _SchemaSpec = {"headers": _APNS_HEADERS, "payload": _apns_payload}
_WEBPUSH_BLOCK: _SchemaSpec = {"headers": _WEB_HEADERS, "notification": _WEB_NOTIFICATION}


def parse_overrides(obj: Mapping[str, Any], errors: list[FieldError]) -> Overrides | None:
    """The `apns`, `fcm` and `webpush` blocks of a message (at least one is present in `obj`)."""
    before = len(errors)
    given = frozenset(k for k in BLOCK_FIELDS if obj.get(k) is not None)
    apns, fcm, webpush = ({} if obj.get(k) is None else obj[k] for k in BLOCK_FIELDS)
    if isinstance(webpush, dict) and isinstance(webpush.get("headers"), dict):
        webpush = {**webpush, "headers": {str(k).lower(): v for k, v in webpush["headers"].items()}}
    if isinstance(apns, dict) and isinstance(apns.get("headers"), dict):
        apns = {**apns, "headers": {str(k).lower(): v for k, v in apns["headers"].items()}}
    _check_spec(apns, _APNS_BLOCK, "apns", errors)
    _check_spec(fcm, _FCM_BLOCK, "fcm", errors)
    _check_spec(webpush, _WEBPUSH_BLOCK, "webpush", errors)
    if len(errors) > before:
        return None
    return Overrides(
        apns_headers=apns.get("headers", {}), apns_payload=apns.get("payload", {}), fcm=fcm,
        webpush_headers=webpush.get("headers", {}), webpush_notification=webpush.get("notification", {}),
        given=given,
    )


# --- FCM topic and condition targets -----------------------------------------------------------
# `fcm_topic` or `fcm_condition` sends one FCM v1 request with `message.topic` / `message.condition`
# (FCM "Send messages to topics"): FCM fans it out to the subscribed devices, so the gateway plans it
# as one delivery to a pseudo-device, once per message.

TARGET_FIELDS = ("fcm_topic", "fcm_condition")
_TARGET_KEYS = frozenset(TARGET_FIELDS)
MAX_CONDITION_TOPICS = 5  # FCM: "You can include up to five topics in your conditional expression"
MAX_CONDITION_LEN = 2048
_FCM_TOPIC_RE = re.compile(r"^[a-zA-Z0-9_.~%-]{1,900}\Z")  # FCM's topic name rule
_CONDITION_TOKEN_RE = re.compile(
    r"\s*(?:(?P<topic>'(?P<name>[^']*)'\s+in\s+topics)|(?P<op>&&|\|\|)|(?P<not>!)|(?P<open>\()|(?P<close>\)))"
)
FcmTargetKind = Literal["topic", "condition"]


@dataclass(frozen=True, slots=True)
class FcmTarget:
    """An FCM topic or condition a message is sent to instead of device tokens."""

    kind: FcmTargetKind
    value: str

    @property
    def device(self) -> Device:
        """The pseudo-device the worker plans the one delivery for (its key cannot be a token's:
        FCM tokens have no space and `fcm_topic`/`fcm_condition` deliveries have no user)."""
        return Device("fcm", f"{self.kind} {self.value}")

    def to_json(self) -> dict[str, str]:
        return {f"fcm_{self.kind}": self.value}


def condition_topics(condition: str) -> list[str] | None:
    """The topic names of an FCM condition, or None if it is not one: `'name' in topics` terms joined by
    `&&` and `||`, negated by `!`, grouped by parentheses (FCM "Send messages to topics", `message.condition`)."""
    pos, depth, names, expect_term = 0, 0, [], True
    end = len(condition.rstrip())
    while pos < end:
        m = _CONDITION_TOKEN_RE.match(condition, pos)
        if m is None:
            return None
        pos = m.end()
        if m.group("topic") is not None:
            if not expect_term or not _FCM_TOPIC_RE.match(m.group("name")):
                return None
            names.append(m.group("name"))
            expect_term = False
        elif m.group("op") is not None:
            if expect_term:
                return None
            expect_term = True
        elif m.group("not") is not None or m.group("open") is not None:
            if not expect_term:
                return None
            depth += m.group("open") is not None
        else:
            if expect_term or depth == 0:
                return None
            depth -= 1
    return names if names and depth == 0 and not expect_term else None


def parse_fcm_target(obj: Mapping[str, Any], errors: list[FieldError]) -> FcmTarget | None:
    """`fcm_topic` or `fcm_condition` (at least one is present in `obj`)."""
    topic, condition = obj.get("fcm_topic"), obj.get("fcm_condition")
    if topic is not None and condition is not None:
        errors.append(FieldError("fcm_condition", "give either fcm_topic or fcm_condition, not both"))
        return None
    for name in ("user", "devices"):
        if obj.get(name) is not None:
            errors.append(FieldError(name, "a message to an FCM topic or condition has no other target "
                                           "(send a second message to the user or devices)"))
            return None
    if topic is not None:
        if not isinstance(topic, str) or not _FCM_TOPIC_RE.match(topic):
            errors.append(FieldError("fcm_topic", f"must match {_FCM_TOPIC_RE.pattern} (FCM's topic name rule; "
                                                  "without the /topics/ prefix)"))
            return None
        return FcmTarget("topic", topic)
    if not isinstance(condition, str) or len(condition) > MAX_CONDITION_LEN:
        errors.append(FieldError("fcm_condition", f"must be a string of at most {MAX_CONDITION_LEN} characters"))
        return None
    names = condition_topics(condition)
    if names is None:
        errors.append(FieldError("fcm_condition", "must be terms 'topic' in topics joined by && and ||, with ! "
                                                  "and parentheses, e.g. 'a' in topics && ('b' in topics || 'c' in topics)"))
        return None
    if len(names) > MAX_CONDITION_TOPICS:
        errors.append(FieldError("fcm_condition", f"names {len(names)} topics; FCM allows at most "
                                                  f"{MAX_CONDITION_TOPICS}"))
        return None
    return FcmTarget("condition", condition.strip())
# --- APNs push types and Live Activities ----------------------------------------------------------
# Apple's "Sending notification requests to APNs": each apns-push-type has its topic suffix and its
# priority rules; every type but alert and background uses a token of its own (a PushKit, location,
# push-to-talk, MDM or Live Activity push token), so such a message names its APNs devices explicitly.

APNS_PUSH_TYPES = ("alert", "background", "voip", "location", "complication", "fileprovider", "mdm", "pushtotalk",
                   "liveactivity")
APNS_SHARED_TOKEN_TYPES = ("alert", "background")  # the app's device token; any other type has a token of its own
LIVE_ACTIVITY_EVENTS = ("start", "update", "end")
_APNS_PUSH_KEYS = frozenset({"apns_push_type", "live_activity"})
_LIVE_ACTIVITY_FIELDS = frozenset({"event", "content_state", "timestamp", "attributes_type", "attributes",
                                   "stale_date", "dismissal_date", "relevance_score"})
_ATTRIBUTES_TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}\Z")  # a Swift ActivityAttributes type name


@dataclass(frozen=True, slots=True)
class LiveActivity:
    """One Live Activity push (ActivityKit "Starting and updating Live Activities with ActivityKit push
    notifications"): `aps.event`, `aps.content-state`, `aps.timestamp`, and for `start` the attributes."""

    event: str
    timestamp: int
    content_state: Mapping[str, Any] | None = None
    attributes_type: str | None = None
    attributes: Mapping[str, Any] | None = None
    stale_date: int | None = None
    dismissal_date: int | None = None
    relevance_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event, "timestamp": self.timestamp}
        for name in ("content_state", "attributes_type", "attributes", "stale_date", "dismissal_date",
                     "relevance_score"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class ApnsPush:
    """The APNs push type of a message (`apns_push_type`) and its Live Activity, if any."""

    push_type: str
    live_activity: LiveActivity | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"apns_push_type": self.push_type}
        if self.live_activity is not None:
            out["live_activity"] = self.live_activity.to_json()
        return out


def _unix_seconds(obj: Mapping[str, Any], name: str, errors: list[FieldError]) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
        errors.append(FieldError(f"live_activity.{name}", "must be a unix time in whole seconds"))
        return None
    return value


def _live_activity(value: Any, errors: list[FieldError]) -> LiveActivity | None:
    if not isinstance(value, dict):
        errors.append(FieldError("live_activity", "must be an object {event, content_state, timestamp, ...}"))
        return None
    unknown = value.keys() - _LIVE_ACTIVITY_FIELDS
    if unknown:
        errors.append(FieldError("live_activity", f"unknown field(s) {sorted(unknown)}"))
        return None
    before = len(errors)
    event = value.get("event")
    if event not in LIVE_ACTIVITY_EVENTS:
        errors.append(FieldError("live_activity.event", f"must be one of {list(LIVE_ACTIVITY_EVENTS)}"))
    timestamp = _unix_seconds(value, "timestamp", errors)
    if value.get("timestamp") is None:
        errors.append(FieldError("live_activity.timestamp", "is required: the device drops an update older than "
                                                            "the one it shows (aps.timestamp)"))
    state = value.get("content_state")
    if state is not None and not isinstance(state, dict):
        errors.append(FieldError("live_activity.content_state", "must be an object (the activity's ContentState)"))
    elif state is None and event in ("start", "update"):
        errors.append(FieldError("live_activity.content_state", f"is required for {event}"))
    attributes_type, attributes = value.get("attributes_type"), value.get("attributes")
    if event == "start":
        if not isinstance(attributes_type, str) or not _ATTRIBUTES_TYPE_RE.match(attributes_type):
            errors.append(FieldError("live_activity.attributes_type", "is required for start: the app's "
                                                                      "ActivityAttributes type name"))
        if not isinstance(attributes, dict):
            errors.append(FieldError("live_activity.attributes", "is required for start: an object"))
    else:
        for name in ("attributes_type", "attributes"):
            if value.get(name) is not None:
                errors.append(FieldError(f"live_activity.{name}", "applies to start only"))
    stale_date = _unix_seconds(value, "stale_date", errors)
    dismissal_date = _unix_seconds(value, "dismissal_date", errors)
    if dismissal_date is not None and event != "end":
        errors.append(FieldError("live_activity.dismissal_date", "applies to end only"))
    score = value.get("relevance_score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float) or score < 0):
        errors.append(FieldError("live_activity.relevance_score", "must be a number >= 0"))
    if len(errors) > before:
        return None
    assert isinstance(event, str) and timestamp is not None
    return LiveActivity(event, timestamp, state, attributes_type if event == "start" else None,
                        attributes if event == "start" else None, stale_date, dismissal_date,
                        None if score is None else float(score))


def parse_apns_push(obj: Mapping[str, Any], errors: list[FieldError], *, user: str | None, devices_in: Any,
                    rich: Rich | None, title: str | None, body: str | None, data: Mapping[str, str]) -> ApnsPush | None:
    """`apns_push_type` and `live_activity` of a message (one of them is in `obj`); an error per field at fault."""
    before = len(errors)
    push_type = obj.get("apns_push_type")
    la_in = obj.get("live_activity")
    live = _live_activity(la_in, errors) if la_in is not None else None
    if push_type is None:
        push_type = "liveactivity" if la_in is not None else None
    if push_type not in APNS_PUSH_TYPES:
        errors.append(FieldError("apns_push_type", f"must be one of {list(APNS_PUSH_TYPES)}"))
        return None
    field_name = "live_activity" if la_in is not None else "apns_push_type"
    if la_in is not None and push_type != "liveactivity":
        errors.append(FieldError("apns_push_type", "is liveactivity for a message with live_activity"))
    if push_type == "liveactivity" and la_in is None:
        errors.append(FieldError("live_activity", "is required for apns_push_type liveactivity"))
    _push_type_rules(push_type, field_name, errors, user=user, devices_in=devices_in, rich=rich, title=title,
                     body=body, data=data)
    if len(errors) > before:
        return None
    return ApnsPush(push_type, live)


def _push_type_rules(push_type: str, field_name: str, errors: list[FieldError], *, user: str | None, devices_in: Any,
                     rich: Rich | None, title: str | None, body: str | None, data: Mapping[str, str]) -> None:
    """Apple's rules for one apns-push-type (background: nothing shown; alert: something shown; any other
    type: its own push tokens, so explicit APNs devices and no rich fields); errors name `field_name`."""
    silent = rich.silent if rich is not None else (title is None and body is None)
    if push_type == "background" and not silent:
        errors.append(FieldError(field_name, "background pushes carry no alert, sound or badge (APNs: priority "
                                                   "5, content-available): remove title, body, badge and sound"))
    if push_type == "alert" and silent:
        errors.append(FieldError(field_name, "alert needs a title, body, loc key, badge or sound"))
    if push_type not in APNS_SHARED_TOKEN_TYPES:
        if rich is not None:
            errors.append(FieldError(field_name, f"{push_type} pushes carry no rich presentation fields "
                                                 f"({sorted(rich.to_json())[0]} is one)"))
        if push_type == "mdm" and (title is not None or body is not None):
            errors.append(FieldError("title" if title is not None else "body", "an mdm push carries only data.mdm"))
        if push_type == "mdm" and not data.get("mdm"):
            errors.append(FieldError("data.mdm", "is required for mdm: the device's PushMagic string"))
        if user is not None:
            errors.append(FieldError(field_name, f"{push_type} pushes go to their own APNs push tokens: name them "
                                                 "in devices instead of a user"))
        if isinstance(devices_in, list):
            for i, d in enumerate(devices_in):
                if isinstance(d, dict) and "apns" not in d:
                    errors.append(FieldError(field_name, f"{push_type} pushes go to APNs devices only: "
                                                         f"devices[{i}] is not an APNs device"))
                    break


def check_header_push_type(obj: Mapping[str, Any], overrides: Overrides, errors: list[FieldError], *, user: str | None,
                           devices_in: Any, rich: Rich | None, title: str | None, body: str | None,
                           data: Mapping[str, str]) -> None:
    """An `apns.headers.apns-push-type` by the rules of the neutral push type. It may repeat `apns_push_type`
    (or `liveactivity` of a `live_activity`), not contradict it; without one, alert and background are checked
    as the neutral field would be, and a type with a topic and payload of its own (voip, liveactivity, ...)
    needs the neutral field, which sets them (the header alone would go to the app's bundle topic)."""
    where = "apns.headers.apns-push-type"
    header = overrides.apns_headers["apns-push-type"]
    neutral = obj.get("apns_push_type") or ("liveactivity" if obj.get("live_activity") is not None else None)
    if neutral is not None:
        if neutral not in APNS_SHARED_TOKEN_TYPES:
            return  # no apns.headers at all on such a push (check_typed_push_blocks)
        if header != neutral:
            errors.append(FieldError(where, f"is {header!r} but the message's push type is {neutral!r}: "
                                            "give it once, in apns_push_type"))
        return
    if header in APNS_PUSH_TYPES and header not in APNS_SHARED_TOKEN_TYPES:
        errors.append(FieldError(where, f"{header} pushes need apns_push_type: {header!r} (or live_activity), which "
                                        "also sets the topic suffix, priority and payload"))
        return
    _push_type_rules(header, where, errors, user=user, devices_in=devices_in, rich=rich, title=title, body=body,
                     data=data)


# What an `apns.payload.aps` block may add to a Live Activity push: the activity's own keys come from
# `live_activity` (one source for event, timestamp, state and dates).
_LIVE_ACTIVITY_BLOCK_APS = frozenset({"alert", "sound"})


def check_typed_push_blocks(push: ApnsPush, overrides: Overrides, errors: list[FieldError]) -> None:
    """Per-platform blocks on a push type with a token of its own (voip, liveactivity, mdm, ...): its headers
    (topic suffix, priority, push type) come from the neutral fields, so `apns.headers` is refused; an mdm
    body is the PushMagic alone; a Live Activity's `aps` takes only alert and sound from the block. The rest
    of `apns.payload` is merged over the payload as for any message (the block wins)."""
    if overrides.apns_headers:
        name = sorted(overrides.apns_headers)[0]
        errors.append(FieldError(f"apns.headers.{name}", f"a {push.push_type} push's headers come from apns_push_type, "
                                                         "priority, ttl and collapse_key"))
    if not overrides.apns_payload:
        return
    if push.push_type == "mdm":
        errors.append(FieldError("apns.payload", "an mdm push's body is {\"mdm\": <PushMagic>} alone"))
        return
    aps = overrides.apns_payload.get("aps")
    if isinstance(aps, Mapping):
        allowed = _LIVE_ACTIVITY_BLOCK_APS if push.push_type == "liveactivity" else frozenset()
        for key in sorted(set(aps) - allowed):
            errors.append(FieldError(f"apns.payload.aps.{key}", f"is not set by a block on a {push.push_type} push"
                                     + (": give it in live_activity" if push.push_type == "liveactivity" else "")))


_KNOWN = frozenset({
    "v", "id", "user", "devices", "app", "title", "body", "data", "category", "priority",
    "ttl", "expires_at", "send_at", "collapse_key", "campaign", "variant", "ref",
})
_KNOWN_INTERNAL = _KNOWN | {"resolved", "fanout", "client"}
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
    rich_given = blocks_given = target_given = apns_given = False
    if unknown:  # rich fields, blocks, targets, APNs push types, or fields nobody knows (a plain message skips this)
        rich_given = not unknown.isdisjoint(_RICH_KEYS)
        blocks_given = not unknown.isdisjoint(_BLOCK_KEYS)
        target_given = not unknown.isdisjoint(_TARGET_KEYS)
        apns_given = not unknown.isdisjoint(_APNS_PUSH_KEYS)
        unknown -= _RICH_KEYS | _BLOCK_KEYS | _TARGET_KEYS | _APNS_PUSH_KEYS
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
    ref = _str(obj, "ref", errors, max_len=MAX_ID_LEN, pattern=_ID_RE)

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
    fcm_target = parse_fcm_target(obj, errors) if target_given else None
    if require_target and user is None and not devices_in and not target_given:
        errors.append(FieldError("user", "a message needs a user, devices (or both), or an fcm_topic or fcm_condition"))
    rich = parse_rich(obj, errors, title=title, body=body) if rich_given else None
    overrides = parse_overrides(obj, errors) if blocks_given else None
    apns_push = parse_apns_push(obj, errors, user=user, devices_in=devices_in, rich=rich, title=title, body=body,
                                data=data) if apns_given else None
    # Door checks only: an entry already queued was accepted by the rules of its day (as send_at's bounds).
    if not internal and overrides is not None and "apns-push-type" in overrides.apns_headers:
        check_header_push_type(obj, overrides, errors, user=user, devices_in=devices_in, rich=rich, title=title,
                               body=body, data=data)
    if not internal and overrides is not None and apns_push is not None \
            and apns_push.push_type not in APNS_SHARED_TOKEN_TYPES:
        check_typed_push_blocks(apns_push, overrides, errors)
    if title is None and body is None and not data and (rich is None or not rich.has_content) and not (
            apns_given and obj.get("live_activity") is not None):  # a Live Activity's content is its state
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
        rich=rich,
        overrides=overrides,
        fcm_target=fcm_target,
        apns_push=apns_push,
        resolved=internal and obj.get("resolved") is True,
        fanout=internal and obj.get("fanout") is True,
        ref=ref,
        client=obj.get("client") if internal and isinstance(obj.get("client"), str) else None,
    )


def loads_message(raw: bytes | str) -> Message:
    """Decode a message that is already in the queue (it was validated when it was enqueued)."""
    return parse_message(orjson.loads(raw), now=0.0, internal=True)
