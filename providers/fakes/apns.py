"""A local APNs that speaks the real wire protocol: HTTP/2 over TLS with ALPN h2, ES256 JWT or client certificates.

It checks what Apple checks on `POST /3/device/<token>`: the provider JWT (alg ES256, a known
key id, the team as issuer, signature, an iat within the last hour), or a client certificate
whose subject UID is the topic; the topic, push type, priority, expiration, collapse id, payload
size and JSON, each `aps` key's type by Apple's payload key reference (`aps_fault`), and the device
token's form. Like Apple, a new connection allows one stream until
its first authenticated request and then raises MAX_CONCURRENT_STREAMS. Answers are Apple's:
`{"reason": ...}` JSON bodies, apns-id echoed, a timestamp on 410.

Failures are programmed per device token; `goaway_after` sends GOAWAY after that many requests
on a connection, `hang` holds requests unanswered, `delay_s` slows every answer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jh2.settings import SettingCodes

from ..jose import decode_jwt, es256_valid
from .h2server import Answer, H2ServerProtocol
from .tls import LocalCA

PUSH_TYPES = {"alert", "background", "voip", "complication", "fileprovider", "mdm", "liveactivity", "location", "pushtotalk"}
MAX_PAYLOAD = 4096
VOIP_MAX_PAYLOAD = 5120
# apns-topic per push type (Apple's "Sending notification requests to APNs"): the bundle id plus this
# suffix; mdm goes to an MDM certificate's topic (`mdm_topics`), alert and background to the bundle id.
TOPIC_SUFFIXES = {
    "alert": "", "background": "", "voip": ".voip", "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider", "location": ".location-query", "pushtotalk": ".voip-ptt",
    "liveactivity": ".push-type.liveactivity",
}
LIVE_ACTIVITY_EVENTS = {"start", "update", "end"}
Programmed = tuple[int, str, float | None]
"""(HTTP status, APNs reason, Retry-After seconds or None)."""


# The `aps` keys Apple documents ("Generating a remote notification", payload key reference) and
# the type of each; Live Activities add their own. Apple drops what it cannot read, so the device
# shows less than was meant: this fake refuses instead (400 "BadPayload: <key>"), so a test sees it.
_APS_KEYS = {
    "alert", "badge", "sound", "thread-id", "category", "content-available", "mutable-content", "target-content-id",
    "interruption-level", "relevance-score", "filter-criteria", "timestamp", "event", "content-state", "stale-date",
    "dismissal-date", "attributes-type", "attributes",
}
_ALERT_STRINGS = {"title", "subtitle", "body", "launch-image", "title-loc-key", "subtitle-loc-key", "loc-key",
                  "summary-arg"}
_ALERT_LISTS = {"title-loc-args": "title-loc-key", "subtitle-loc-args": "subtitle-loc-key", "loc-args": "loc-key"}
_INTERRUPTION_LEVELS = {"passive", "active", "time-sensitive", "critical"}


def aps_fault(aps: dict[str, Any], push_type: str) -> str | None:
    """What is wrong with an `aps` dictionary by Apple's payload key reference, or None."""
    unknown = set(aps) - _APS_KEYS
    if unknown:
        return f"unknown aps key {sorted(unknown)[0]}"
    alert = aps.get("alert")
    if alert is not None and not isinstance(alert, str):
        if not isinstance(alert, dict) or set(alert) - _ALERT_STRINGS - _ALERT_LISTS.keys():
            return "aps.alert"
        for k, v in alert.items():
            if k in _ALERT_STRINGS and not isinstance(v, str):
                return f"aps.alert.{k}"
            if k in _ALERT_LISTS and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)
                                      or _ALERT_LISTS[k] not in alert):  # arguments fill their key's format
                return f"aps.alert.{k}"
    badge = aps.get("badge")
    if badge is not None and (isinstance(badge, bool) or not isinstance(badge, int) or badge < 0):
        return "aps.badge"
    sound = aps.get("sound")
    if sound is not None and not isinstance(sound, str):
        if not isinstance(sound, dict) or set(sound) - {"critical", "name", "volume"} or sound.get("critical") not in (0, 1) \
                or not isinstance(sound.get("name"), str):
            return "aps.sound"
        volume = sound.get("volume", 1)
        if isinstance(volume, bool) or not isinstance(volume, int | float) or not 0 <= volume <= 1:
            return "aps.sound.volume"
    for key in ("thread-id", "category", "target-content-id"):
        if key in aps and not isinstance(aps[key], str):
            return f"aps.{key}"
    for key in ("content-available", "mutable-content"):
        if key in aps and (aps[key] != 1 or isinstance(aps[key], bool)):  # the number 1 (JSON true is not)
            return f"aps.{key}"
    if "interruption-level" in aps and aps["interruption-level"] not in _INTERRUPTION_LEVELS:
        return "aps.interruption-level"
    if push_type == "liveactivity":  # a Live Activity's relevance-score is any number >= 0, not 0-1
        return live_activity_fault(aps)
    score = aps.get("relevance-score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1):
        return "aps.relevance-score"
    if {"event", "content-state", "attributes-type", "attributes", "stale-date", "dismissal-date", "timestamp"} & set(aps):
        return "Live Activity keys in a push that is not liveactivity"
    if push_type == "background":
        if aps.get("content-available") != 1:
            return "a background push needs aps.content-available = 1"
        shown = sorted({"alert", "sound", "badge"} & set(aps))
        if shown:
            return f"a background push has no aps.{shown[0]}"
    return None


def live_activity_fault(aps: dict[str, Any]) -> str | None:
    """What is wrong with a Live Activity's `aps` by ActivityKit's push notification format, or None."""
    event = aps.get("event")
    if event not in LIVE_ACTIVITY_EVENTS:
        return "aps.event"
    for key in ("timestamp", "stale-date", "dismissal-date"):
        value = aps.get(key)
        if (key == "timestamp" or value is not None) and (isinstance(value, bool) or not isinstance(value, int)):
            return f"aps.{key}"
    if event in ("start", "update") and not isinstance(aps.get("content-state"), dict):
        return "aps.content-state"
    if "content-state" in aps and not isinstance(aps["content-state"], dict):
        return "aps.content-state"
    if event == "start":
        if not isinstance(aps.get("attributes-type"), str) or not isinstance(aps.get("attributes"), dict):
            return "aps.attributes-type and aps.attributes are required to start an activity"
    elif "attributes-type" in aps or "attributes" in aps:
        return "aps.attributes"
    if "dismissal-date" in aps and event != "end":
        return "aps.dismissal-date"
    score = aps.get("relevance-score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float) or score < 0):
        return "aps.relevance-score"
    allowed = {"event", "timestamp", "content-state", "attributes-type", "attributes", "stale-date", "dismissal-date",
               "relevance-score", "alert", "sound"}
    extra = sorted(set(aps) - allowed)
    return f"aps.{extra[0]} in a Live Activity" if extra else None


@dataclass(frozen=True, slots=True)
class ApnsKey:
    """A .p8 signing key as Apple hands it out, with the ids a provider configures."""

    key_file: Path
    key_id: str
    team_id: str


def make_apns_key(directory: str | Path, *, key_id: str = "ABC123DEFG", team_id: str = "TEAM123456") -> ApnsKey:
    """Write a fresh P-256 key as `AuthKey_<key_id>.p8` (mode 0600)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    path = d / f"AuthKey_{key_id}.p8"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return ApnsKey(path, key_id, team_id)


@dataclass(frozen=True, slots=True)
class ApnsReceived:
    """A push the fake accepted (HTTP 200)."""

    token: str
    topic: str
    headers: dict[str, str]
    payload: dict[str, Any]
    apns_id: str
    auth: str  # "jwt" or "certificate"
    jwt: str = field(default="", repr=False)
    received_at: float = field(default_factory=time.time)


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class FakeApns:
    """APNs over HTTP/2 + TLS on 127.0.0.1: `async with FakeApns(ca, keys=[...], topics=[...]) as apns:`."""

    def __init__(self, ca: LocalCA, *, keys: Iterable[ApnsKey] = (), topics: Iterable[str] = (),
                 max_streams: int = 1000, host: str = "127.0.0.1", port: int = 0,
                 mdm_topics: Iterable[str] = ()) -> None:
        self._ca = ca
        self._host = host
        self._port = port
        self._keys: dict[tuple[str, str], ec.EllipticCurvePublicKey] = {}
        for k in keys:
            self.trust(k)
        self.topics = set(topics)  # bundle ids; each push type's topic suffix is added to one of them
        self.mdm_topics = set(mdm_topics)
        self.max_streams = max_streams
        self.goaway_after: int | None = None  # GOAWAY after this many requests on one connection
        self.hang = False
        self.delay_s = 0.0
        self.received: list[ApnsReceived] = []
        self.failed_then_ok: list[ApnsReceived] = []
        self.answers: list[tuple[str, float, int]] = []  # (device token, time.monotonic(), status)
        self.rejections: list[tuple[int, str]] = []  # (status, reason) of every non-200 answer
        self.jwts_seen: set[str] = set()
        self._verified: dict[str, int] = {}  # JWT -> iat, for tokens whose signature checked out
        self.connections = 0
        self.peak_streams = 0  # most pushes in flight at once on one connection
        self.requests = 0
        self.hanging = 0
        self._programmed: dict[str, deque[Programmed]] = {}
        self._failed: set[str] = set()
        self._server: asyncio.Server | None = None
        self._protocols: set[H2ServerProtocol] = set()
        self._release = asyncio.Event()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("FakeApns is not started")
        return self._port

    def trust(self, key: ApnsKey) -> None:
        """Accept provider tokens signed with this key (as if uploaded to the developer account)."""
        private = serialization.load_pem_private_key(key.key_file.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        self._keys[(key.team_id, key.key_id)] = private.public_key()

    def program(self, token: str, responses: Iterable[Programmed]) -> None:
        """Answer the next pushes to `token` with these (status, reason, retry_after), then accept again."""
        self._programmed.setdefault(token.lower(), deque()).extend(responses)

    async def start(self) -> FakeApns:
        ctx = self._ca.server_context(alpn=["h2"])
        ctx.verify_mode = ssl.CERT_OPTIONAL  # certificate auth when the client offers one
        ctx.load_verify_locations(cafile=str(self._ca.ca_file))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ApnsServerProtocol(self), self._host, self._port, ssl=ctx)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._release.set()
        for p in list(self._protocols):
            p.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeApns:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # --- request checks -----------------------------------------------------------------------

    def _verify_jwt(self, jwt: str) -> None:
        iat_seen = self._verified.get(jwt)
        if iat_seen is not None:  # like Apple, verify a provider token once and then only its age
            if iat_seen < time.time() - 3600:
                raise _Refused(403, "ExpiredProviderToken")
            return
        try:
            header, claims, signing_input, sig = decode_jwt(jwt)
        except ValueError:
            raise _Refused(403, "InvalidProviderToken") from None
        key = self._keys.get((str(claims.get("iss")), str(header.get("kid"))))
        if header.get("alg") != "ES256" or key is None or not es256_valid(key, signing_input, sig):
            raise _Refused(403, "InvalidProviderToken")
        iat = claims.get("iat")
        if not isinstance(iat, int) or iat > time.time() + 60:
            raise _Refused(403, "InvalidProviderToken")
        if iat < time.time() - 3600:
            raise _Refused(403, "ExpiredProviderToken")
        self.jwts_seen.add(jwt)
        self._verified[jwt] = iat

    def _check(self, headers: dict[str, str], body: bytes, cert_topic: str | None) -> tuple[str, dict[str, Any], str]:
        if headers.get(":method") != "POST":
            raise _Refused(405, "MethodNotAllowed")
        path = headers.get(":path", "")
        if not path.startswith("/3/device/"):
            raise _Refused(404, "BadPath")
        token = path[len("/3/device/"):]
        auth = headers.get("authorization")
        topic = headers.get("apns-topic")
        if auth is not None:
            if not auth.startswith("bearer "):
                raise _Refused(403, "InvalidProviderToken")
            self._verify_jwt(auth[7:])
            if not topic:
                raise _Refused(400, "MissingTopic")
            kind = "jwt"
        elif cert_topic is not None:
            topic = topic or cert_topic
            if topic != cert_topic:
                raise _Refused(400, "BadTopic")
            kind = "certificate"
        else:
            raise _Refused(403, "MissingProviderToken")
        push_type = headers.get("apns-push-type", "alert")
        if push_type not in PUSH_TYPES:
            raise _Refused(400, "InvalidPushType")
        if push_type == "mdm":
            if topic not in self.mdm_topics:
                raise _Refused(400, "TopicDisallowed")
        else:
            suffix = TOPIC_SUFFIXES[push_type]
            if not topic or not topic.endswith(suffix) or topic[:len(topic) - len(suffix)] not in self.topics \
                    or (not suffix and any(topic.endswith(x) for x in TOPIC_SUFFIXES.values() if x)):
                raise _Refused(400, "TopicDisallowed" if topic not in self.topics else "DeviceTokenNotForTopic")
        if push_type == "liveactivity" and kind != "jwt":
            raise _Refused(403, "InvalidProviderToken")  # Live Activities accept token auth only
        priority = headers.get("apns-priority", "10")
        if priority not in ("1", "5", "10") or (push_type == "background" and priority != "5") \
                or (push_type in ("voip", "pushtotalk") and priority != "10"):
            raise _Refused(400, "BadPriority")
        expiration = headers.get("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            raise _Refused(400, "BadExpirationDate")
        if push_type == "pushtotalk" and expiration != "0":
            raise _Refused(400, "BadExpirationDate")  # push-to-talk: deliver now or never
        collapse = headers.get("apns-collapse-id")
        if collapse is not None and len(collapse.encode()) > 64:
            raise _Refused(400, "BadCollapseId")
        apns_id = headers.get("apns-id")
        if apns_id is not None:
            try:
                uuid.UUID(apns_id)
            except ValueError:
                raise _Refused(400, "BadMessageId") from None
        if not body:
            raise _Refused(400, "PayloadEmpty")
        if len(body) > (VOIP_MAX_PAYLOAD if push_type == "voip" else MAX_PAYLOAD):
            raise _Refused(413, "PayloadTooLarge")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Refused(400, "PayloadEmpty") from None
        if push_type == "mdm":  # Apple's MDM protocol: {"mdm": "<PushMagic>"} and nothing else
            if not isinstance(payload, dict) or set(payload) != {"mdm"} or not isinstance(payload["mdm"], str):
                raise _Refused(400, "BadPayload: mdm")
            return self._token(token), payload, kind
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            raise _Refused(400, "PayloadEmpty")
        fault = aps_fault(payload["aps"], push_type)
        if fault is not None:
            raise _Refused(400, f"BadPayload: {fault}")
        return self._token(token), payload, kind

    @staticmethod
    def _token(token: str) -> str:
        if not token or len(token) < 64 or any(c not in "0123456789abcdefABCDEF" for c in token):
            raise _Refused(400, "BadDeviceToken")
        return token.lower()

    async def handle(self, headers: dict[str, str], body: bytes, cert_topic: str | None) -> tuple[int, dict[str, str], bytes]:
        """One request: (status, response headers, body)."""
        self.requests += 1
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        out_headers = {"apns-id": apns_id}
        try:
            token, payload, kind = self._check(headers, body, cert_topic)
        except _Refused as e:
            self.rejections.append((e.status, e.reason))
            return e.status, out_headers, orjson.dumps({"reason": e.reason})
        if self.hang:
            self.hanging += 1
            try:
                await self._release.wait()
            finally:
                self.hanging -= 1
            return 503, out_headers, orjson.dumps({"reason": "Shutdown"})
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        queue = self._programmed.get(token)
        if queue:
            status, reason, retry_after = queue.popleft()
            self._failed.add(token)
            self.answers.append((token, time.monotonic(), status))
            self.rejections.append((status, reason))
            doc: dict[str, Any] = {"reason": reason}
            if status == 410:
                doc["timestamp"] = int(time.time() * 1000)
            if retry_after is not None:
                out_headers["retry-after"] = str(int(retry_after))
            return status, out_headers, orjson.dumps(doc)
        auth = headers.get("authorization", "")
        received = ApnsReceived(token, headers.get("apns-topic") or cert_topic or "", dict(headers), payload,
                                apns_id, kind, auth[7:])
        self.received.append(received)
        self.answers.append((token, time.monotonic(), 200))
        if token in self._failed:
            self.failed_then_ok.append(received)
        return 200, out_headers, b""


class _ApnsServerProtocol(H2ServerProtocol):
    """One APNs connection: the client certificate's topic, and Apple's stream limit (1 until a push is accepted)."""

    def __init__(self, fake: FakeApns) -> None:
        super().__init__(fake, max_streams=1)
        self.fake = fake
        self.cert_topic: str | None = None
        self.authenticated = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peercert")
        if peer:
            for rdn in peer.get("subject", ()):
                for name, value in rdn:
                    if name == "userId":
                        self.cert_topic = value
        super().connection_made(transport)

    async def respond(self, headers: dict[str, str], body: bytes) -> Answer:
        status, out_headers, out_body = await self.fake.handle(headers, body, self.cert_topic)
        if out_body:
            out_headers["content-type"] = "application/json"
        return status, out_headers, out_body

    def answered(self, status: int) -> None:
        if status == 200 and not self.authenticated:
            self.authenticated = True
            self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.fake.max_streams})
