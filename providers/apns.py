"""APNs provider: HTTP/2 POST /3/device/<token>, token (ES256 JWT) or certificate auth.

Each configured app keeps up to `connections` long-lived HTTP/2 connections (`H2Pool`; see
`providers.h2` for why this is our own HTTP/2 client and not aioapns) and spreads requests
over the one with the fewest streams in flight. Apple asks providers to keep connections open and not to reconnect
rapidly, so a lost connection is reopened on the next send, and after a failed attempt the next
one waits `transport.RECONNECT_GAP_S`. Sending, its time bound and the mapping of network errors to
outcomes are `providers.transport`'s; APNs speaks only HTTP/2, so it has no HTTP/1.1 fallback.

The provider JWT is signed once and shared by every connection of every app that uses the same
key; it is re-signed after `JWT_REFRESH_S` (Apple: not more often than every 20 minutes, at
least every 60) or when APNs answers ExpiredProviderToken.

Outcome mapping (reason first, then status): 410 Unregistered/ExpiredToken, 400 BadDeviceToken
and DeviceTokenNotForTopic -> token gone; 403 ExpiredProviderToken -> re-sign and retry at once;
429 -> retry (after Retry-After when given); 500/503 -> retry; other 4xx -> rejected.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import orjson

from ..core.config import ApnsApp, ConfigError, ProviderSettings
from ..core.schema import Message
from .base import Delivered, Delivery, Outcome, Rejected, Retry, TokenInvalid, retry_after_seconds
from .h2 import H2ClientConnection, H2Response, encode_field, encode_headers, field_name, value_length
from .jose import load_p256_key, sign_es256
from .payloads import apns_collapse_id, apns_payload, apns_priority, apns_topic, check_payload_limits
from .transport import REASON_MAX, Transport, h2_pool

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
JWT_REFRESH_S = 50 * 60
JWT_MIN_AGE_S = 20 * 60  # Apple: at most one new provider token per 20 minutes
CLOCK_SKEW_RETRY_S = 60.0
log = logging.getLogger("pushgw.apns")
_APNS_ID_NS = uuid.UUID("9d3f2a57-8f64-4c1e-9a0e-3f4f1f2b7c11")
_APNS_ID_NS_BYTES = _APNS_ID_NS.bytes
# What an HTTP/2 field value may not hold (RFC 9113 8.2.1): APNs would reset the stream, which reads
# as a provider failure (and counts against the circuit) while no retry can ever succeed.
_BAD_FIELD_VALUE = re.compile(r"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_PRIORITY_10 = encode_field(b"apns-priority", b"10")
_PRIORITY_5 = encode_field(b"apns-priority", b"5")
# The HPACK bytes of the per-delivery fields up to their values (literals without indexing, RFC 7541
# section 6.2.2), so that `_headers` appends a value's length and the value instead of encoding the
# whole field per delivery. An apns-id is always 36 characters (a UUID's text form), so its length too.
_PATH_NAME = field_name(b":path")
_APNS_ID_NAME = field_name(b"apns-id") + value_length(36)
_COLLAPSE_ID_NAME = field_name(b"apns-collapse-id")
_TOKEN_GONE = {"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered", "ExpiredToken"}


def apns_id(message_id: str, token: str) -> str:
    """The apns-id of a push: the same for every attempt of one message to one device (APNs echoes it).

    It is `uuid.uuid5(_APNS_ID_NS, "<message id>/<token>")`, computed without building UUID objects
    because it runs for every delivery (a test checks both agree)."""
    h = bytearray(hashlib.sha1(_APNS_ID_NS_BYTES + f"{message_id}/{token}".encode()).digest()[:16])  # noqa: S324
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


class ProviderJwt:
    """The ES256 provider token for one (team, key): signed once, reused until it is due for refresh."""

    def __init__(self, key_file: str, key_id: str, team_id: str, *, clock: Callable[[], float] = time.time,
                 refresh_s: float = JWT_REFRESH_S) -> None:
        self._key = load_p256_key(key_file, "apns key_file")
        self._key_id = key_id
        self._team_id = team_id
        self._clock = clock
        self._refresh_s = refresh_s
        self._token = ""
        self._issued_at = 0.0
        self.signed = 0  # how many tokens this process signed (tests, metrics)

    def token(self) -> str:
        now = self._clock()
        if not self._token or now - self._issued_at >= self._refresh_s:
            self._sign(now)
        return self._token

    def expired(self, token: str) -> bool:
        """APNs said ExpiredProviderToken for `token`: sign a new one on the next send, if ours is old enough.

        Apple refuses new tokens more often than every 20 minutes (TooManyProviderTokenUpdates), so a
        younger token is kept: APNs calling it expired means this host's clock is off. Returns
        whether a new token will be signed."""
        if token != self._token:
            return True  # another request re-signed already
        if self._clock() - self._issued_at < JWT_MIN_AGE_S:
            return False
        self._token = ""
        return True

    def _sign(self, now: float) -> None:
        self._token = sign_es256(self._key, {"alg": "ES256", "kid": self._key_id}, {"iss": self._team_id, "iat": int(now)})
        self._issued_at = now
        self.signed += 1


class _App:
    """One APNs app (topic + credentials) and its pool of HTTP/2 connections."""

    def __init__(self, app: ApnsApp, settings: ProviderSettings, jwt: ProviderJwt | None) -> None:
        self.name = app.name
        self.topic = app.topic
        self.topic_header = app.topic.encode()  # header values built once, not per request
        self.mdm_topic = app.mdm_topic
        self.push_type_header = app.push_type.encode()
        self.host = app.host or (SANDBOX_HOST if app.sandbox else PRODUCTION_HOST)
        self.port = app.port
        self.jwt = jwt
        try:
            ctx = ssl.create_default_context(cafile=app.ca_file or None)
            if app.cert_file:
                ctx.load_cert_chain(app.cert_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"apns.{app.name}: cannot load ca_file/cert_file ({type(e).__name__})") from None
        ctx.set_alpn_protocols(["h2"])
        self.ssl = ctx
        self.timeout_s = settings.timeout_s
        self.authority = self.host.encode() if self.port == 443 else f"{self.host}:{self.port}".encode()
        self.path_prefix = b"/3/device/"
        # The HPACK bytes of the header fields that never change for this app, and of each variant
        # of those that do per kind of push, encoded once (`_headers` adds the per-device fields).
        # Pseudo-header fields must all come first (RFC 9113 section 8.3), so :path splits the fixed part.
        self.pseudo_block = encode_headers([(b":method", b"POST"), (b":scheme", b"https"), (b":authority", self.authority)])
        self.fixed_block = encode_headers([(b"apns-topic", self.topic_header), (b"content-type", b"application/json")])
        self.push_type_block = {False: encode_field(b"apns-push-type", self.push_type_header),
                                True: encode_field(b"apns-push-type", b"background")}
        self.auth_block: tuple[str | None, bytes] = (None, b"")  # (JWT, its authorization field), per JWT
        self.pool = h2_pool(self.host, self.port, ctx, size=app.connections, max_streams=settings.concurrency,
                            timeout_s=settings.timeout_s)

    @property
    def conns(self) -> list[H2ClientConnection]:
        """The open connections (tests, diagnostics)."""
        return self.pool.conns

    @property
    def connects(self) -> int:
        return self.pool.connects

    def close(self) -> None:
        self.pool.close()


class ApnsProvider:
    """Sends to APNs; never raises for a provider-side failure (see module docstring)."""

    name = "apns"

    def __init__(self, apps: Sequence[ApnsApp], settings: ProviderSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        jwts: dict[tuple[str, str, str], ProviderJwt] = {}
        self._apps: dict[str, _App] = {}
        for a in apps:
            jwt = None
            if a.key_file:
                ident = (a.key_file, a.key_id, a.team_id)
                jwt = jwts.get(ident) or jwts.setdefault(ident, ProviderJwt(a.key_file, a.key_id, a.team_id, clock=clock))
            self._apps[a.name] = _App(a, settings, jwt)
        self._transport: Transport[_App] = Transport("apns", settings.timeout_s)

    def __repr__(self) -> str:
        return f"ApnsProvider(apps=[{', '.join(f'{a.name}:{a.topic}@{a.host}' for a in self._apps.values())}])"

    def check_payload(self, message: Message) -> None:
        check_payload_limits(message, ("apns",))

    def app(self, name: str) -> _App:
        """One app's state (connections, JWT): for tests and diagnostics."""
        return self._apps[name]

    def _headers(self, app: _App, d: Delivery, jwt: str | None) -> bytes:
        """The request's HPACK header block: the app's fixed fields, then this push's."""
        msg = d.message
        if msg.overrides is not None and msg.overrides.apns_headers:
            return self._headers_overridden(app, d, jwt, msg.overrides.apns_headers)
        token = d.device.token
        if msg.apns_push is not None:
            parts = self._typed_headers(app, d)
        else:
            silent = msg.is_silent
            path = app.path_prefix + token.encode()
            parts = [
                app.pseudo_block,
                _PATH_NAME, value_length(len(path)), path,
                app.fixed_block,
                app.push_type_block[silent],
                # Background pushes must be 5; alerts go at once only when the message asks for it.
                _PRIORITY_10 if msg.priority == "high" and not silent else _PRIORITY_5,
                _APNS_ID_NAME, apns_id(msg.id, token).encode(),
            ]
        if jwt is not None:
            if app.auth_block[0] is not jwt:
                app.auth_block = (jwt, encode_field(b"authorization", b"bearer " + jwt.encode()))
            parts.append(app.auth_block[1])
        if d.expires_at is not None and (msg.apns_push is None or msg.apns_push.push_type != "pushtotalk"):
            parts.append(encode_field(b"apns-expiration", str(max(1, int(d.expires_at))).encode()))
        # Always a collapse id (the sender's collapse_key, else from the message id): a delivery
        # repeated after a crash then replaces the notification it duplicates instead of adding one.
        collapse_id = apns_collapse_id(msg).encode()
        parts += (_COLLAPSE_ID_NAME, value_length(len(collapse_id)), collapse_id)
        return b"".join(parts)

    def _headers_overridden(self, app: _App, d: Delivery, jwt: str | None, over: Mapping[str, str]) -> bytes:
        """`_headers` with the message's `apns.headers` block (APNs "Sending notification requests to APNs")
        in place of the fields the gateway derives: apns-push-type, apns-priority, apns-expiration,
        apns-collapse-id."""
        msg = d.message
        token = d.device.token
        push_type = over.get("apns-push-type")
        priority = over.get("apns-priority")
        parts = [
            app.pseudo_block,
            encode_field(b":path", app.path_prefix + token.encode()),
            app.fixed_block,
            encode_field(b"apns-push-type", push_type.encode()) if push_type else app.push_type_block[msg.is_silent],
            encode_field(b"apns-priority", priority.encode()) if priority else (
                _PRIORITY_10 if msg.priority == "high" and not msg.is_silent else _PRIORITY_5),
            encode_field(b"apns-id", apns_id(msg.id, token).encode()),
        ]
        if jwt is not None:
            parts.append(encode_field(b"authorization", b"bearer " + jwt.encode()))
        expiration = over.get("apns-expiration")
        if expiration is None and d.expires_at is not None:
            expiration = str(max(1, int(d.expires_at)))
        if expiration is not None:
            parts.append(encode_field(b"apns-expiration", expiration.encode()))
        parts.append(encode_field(b"apns-collapse-id", over.get("apns-collapse-id", apns_collapse_id(msg)).encode()))
        return b"".join(parts)

    @staticmethod
    def _typed_headers(app: _App, d: Delivery) -> list[bytes]:
        """Fields of a push with an explicit `apns_push_type`: its topic suffix, type and priority
        (APNs "Sending notification requests to APNs"); push-to-talk is delivered now or never (expiration 0)."""
        msg = d.message
        assert msg.apns_push is not None
        push_type = msg.apns_push.push_type
        topic = app.mdm_topic if push_type == "mdm" else apns_topic(app.topic, push_type)
        parts = [
            app.pseudo_block,
            encode_field(b":path", app.path_prefix + d.device.token.encode()),
            encode_headers([(b"apns-topic", topic.encode()), (b"content-type", b"application/json")]),
            encode_field(b"apns-push-type", push_type.encode()),
            encode_field(b"apns-priority", apns_priority(msg, push_type).encode()),
            encode_field(b"apns-id", apns_id(msg.id, d.device.token).encode()),
        ]
        if push_type == "pushtotalk":
            parts.append(encode_field(b"apns-expiration", b"0"))
        return parts

    async def send(self, delivery: Delivery) -> Outcome:
        app_name = delivery.device.app or delivery.message.app
        app = self._apps.get(app_name)
        if app is None:
            return Rejected(f"apns app {app_name!r} is not configured")
        push = delivery.message.apns_push
        if push is not None and push.push_type == "mdm" and not app.mdm_topic:
            return Rejected(f"apns app {app_name!r} has no mdm_topic for mdm pushes")
        if push is not None and push.push_type == "liveactivity" and app.jwt is None:
            return Rejected(f"apns app {app_name!r} uses certificate auth: Live Activities need token auth")
        collapse = delivery.message.collapse_key
        if collapse and _BAD_FIELD_VALUE.search(collapse):
            return Rejected("apns collapse_key is not a valid header value (control characters or edge spaces)")
        jwt = app.jwt.token() if app.jwt is not None else None
        body = apns_payload(delivery.message)
        headers = self._headers(app, delivery, jwt)
        resp = await self._transport.send(app.pool, app, headers, body, delivery, "")
        if not isinstance(resp, H2Response):
            return resp
        if resp.status == 200:
            return Delivered(resp.headers.get(b"apns-id", b"").decode("ascii", "replace"))
        return self._failure(app, jwt, resp.status, resp.body, resp.headers.get(b"retry-after"))

    def _failure(self, app: _App, jwt: str | None, status: int, raw: bytes, retry_after: bytes | None) -> Outcome:
        try:
            doc = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            doc = {}
        reason = doc.get("reason") if isinstance(doc, dict) else None
        reason = reason if isinstance(reason, str) else f"HTTP {status}"
        text = f"apns {reason}"[:REASON_MAX]
        if reason in _TOKEN_GONE or status == 410:
            return TokenInvalid(text, status)
        if reason == "ExpiredProviderToken" and app.jwt is not None and jwt is not None:
            if app.jwt.expired(jwt):
                return Retry(text, after=0.0, status=status)
            log.warning("APNs calls a fresh provider token expired: check this host's clock", extra={"app": app.name})
            return Retry(f"{text} (token younger than 20 min: clock skew?)", after=CLOCK_SKEW_RETRY_S, status=status)
        if status == 429:
            return Retry(text, after=retry_after_seconds(retry_after), status=status)
        if status >= 500:
            return Retry(text, after=retry_after_seconds(retry_after), status=status)
        return Rejected(text, status)

    async def close(self) -> None:
        for a in self._apps.values():
            a.close()
