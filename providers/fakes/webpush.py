"""A local Web Push service (RFC 8030) that checks VAPID (RFC 8292) and decrypts aes128gcm (RFC 8291).

It plays both sides a real deployment has: the browser, which creates subscriptions (a P-256
key pair and an auth secret per subscription, `new_subscription()`), and the push service, which
accepts `POST /push/<id>` only with a valid `vapid t=..., k=...` header (ES256 signature by k,
aud = this origin, exp in the future and at most 24 h away, sub mailto:/https:), the
`Content-Encoding: aes128gcm`, a TTL, a valid Urgency and Topic. The body is decrypted with
`http_ece`, an implementation independent of the gateway's, so a received message proves that
the browser could read it; its JSON is then checked as the browser's `showNotification` would use it
(`notification_fault`). Failures are programmed per subscription id.

Like the real services (FCM's web push endpoint, Mozilla autopush, Apple) it serves HTTP/2 and
HTTP/1.1 on one TLS port, chosen by ALPN (`providers.fakes.h2server`); every check above applies to
both, from one handler. `FakePushService(ca, http2=False)` serves HTTP/1.1 only, so tests cover the
provider's fallback.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import http_ece
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict

from ..jose import b64url, b64url_decode, decode_jwt, es256_valid
from .h2server import Answer, H2ServerProtocol, HandlerH2Protocol, Negotiated, aiohttp_protocol, hold
from .tls import LocalCA

MAX_BODY = 4096
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_PUSH_PATH = re.compile(r"^/push/([^/?]+)$")
DEFAULT_MAX_STREAMS = 100  # MAX_CONCURRENT_STREAMS of its HTTP/2 connections (a common server default)
Programmed = tuple[int, float | None]
"""(HTTP status, Retry-After seconds or None)."""


# The options of `showNotification(title, options)` (WHATWG Notifications API, NotificationOptions)
# that the gateway's payload carries, and the declarative push message's names (W3C Push API):
# `navigate` (a URL) and `app_badge` (a count).
_WEB_STRINGS = ("title", "body", "tag", "icon", "image", "badge", "lang", "id", "category", "campaign", "variant",
                "thread")
_WEB_BOOLS = ("renotify", "requireInteraction", "silent")


# A declarative push message's `notification` members (W3C Push API, "declarative push message") and
# their types; `title` and `navigate` are required, and `navigate` URLs are absolute.
_DECLARATIVE_STRINGS = ("title", "navigate", "body", "lang", "dir", "tag", "image", "icon", "badge")
_DECLARATIVE_BOOLS = ("renotify", "silent", "require_interaction")
_DECLARATIVE_MEMBERS = {*_DECLARATIVE_STRINGS, *_DECLARATIVE_BOOLS, "vibrate", "timestamp", "data", "actions"}


def declarative_fault(doc: dict[str, Any]) -> str | None:
    """What is wrong with a declarative push message (`"web_push": 8030`) for the browser, or None."""
    if doc.get("web_push") != 8030 or isinstance(doc.get("web_push"), bool):
        return "web_push must be 8030"
    extra = sorted(set(doc) - {"web_push", "notification", "app_badge", "mutable"})
    if extra:
        return f"unknown member {extra[0]}"
    n = doc.get("notification")
    if not isinstance(n, dict):
        return "notification must be an object"
    extra = sorted(set(n) - _DECLARATIVE_MEMBERS)
    if extra:
        return f"unknown notification member {extra[0]}"
    for key in _DECLARATIVE_STRINGS:
        if key in n and not isinstance(n[key], str):
            return f"notification.{key} must be a string"
    for key in _DECLARATIVE_BOOLS:
        if key in n and not isinstance(n[key], bool):
            return f"notification.{key} must be a boolean"
    for key in ("title", "navigate"):
        if not n.get(key):
            return f"notification.{key} is required"
    if not n["navigate"].startswith("https://"):
        return "notification.navigate must be an https URL"
    if n.get("dir", "auto") not in ("auto", "ltr", "rtl"):
        return "notification.dir must be auto, ltr or rtl"
    if n.get("renotify") and not n.get("tag"):
        return "notification.renotify needs a tag"
    for a in n.get("actions", []):
        if not isinstance(a, dict) or not isinstance(a.get("action"), str) or not isinstance(a.get("title"), str) \
                or not str(a.get("navigate", "")).startswith("https://") or set(a) - {"action", "title", "navigate", "icon"}:
            return "each notification action is {action, title, navigate, icon?}"
    badge = doc.get("app_badge")
    if badge is not None and (isinstance(badge, bool) or not isinstance(badge, int) or badge < 0):
        return "app_badge must be a whole number >= 0"
    if "mutable" in doc and not isinstance(doc["mutable"], bool):
        return "mutable must be a boolean"
    return None


def notification_fault(plaintext: bytes) -> str | None:
    """Why a service worker passing this payload to `showNotification` would fail, or None.

    The browser's side of the fake: a push service never reads the encrypted body, but a browser
    throws a TypeError for options it cannot use (renotify without a tag, silent with vibrate)."""
    try:
        doc = orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        return None  # not the gateway's JSON: the service worker reads it its own way
    if not isinstance(doc, dict):
        return None
    if "web_push" in doc:
        return declarative_fault(doc)
    for key in _WEB_STRINGS:
        if key in doc and not isinstance(doc[key], str):
            return f"{key} must be a string"
    for key in _WEB_BOOLS:
        if key in doc and not isinstance(doc[key], bool):
            return f"{key} must be a boolean"
    if doc.get("renotify") and not doc.get("tag"):
        return "renotify needs a tag"
    if doc.get("silent") and doc.get("vibrate"):
        return "silent with vibrate"
    if doc.get("dir", "auto") not in ("auto", "ltr", "rtl"):
        return "dir must be auto, ltr or rtl"
    actions = doc.get("actions")
    if actions is not None:
        if not isinstance(actions, list):
            return "actions must be a list"
        for a in actions:
            if not isinstance(a, dict) or not isinstance(a.get("action"), str) or not isinstance(a.get("title"), str) \
                    or set(a) - {"action", "title", "icon", "navigate"}:
                return "each action is {action, title, icon?}"
    navigate = doc.get("navigate")
    if navigate is not None and (not isinstance(navigate, str) or not navigate.startswith("https://")):
        return "navigate must be an https URL"
    badge = doc.get("app_badge")
    if badge is not None and (isinstance(badge, bool) or not isinstance(badge, int) or badge < 0):
        return "app_badge must be a whole number >= 0"
    if "data" in doc and not isinstance(doc["data"], dict):
        return "data must be an object"
    return None


@dataclass(slots=True)
class _Subscription:
    id: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    auth: bytes = field(repr=False)
    gone: bool = False


@dataclass(frozen=True, slots=True)
class WebPushReceived:
    """A push the service accepted (201), decrypted as the browser would see it."""

    subscription_id: str
    plaintext: bytes
    ttl: int
    urgency: str
    topic: str | None
    vapid_key: str
    headers: Mapping[str, str]  # case-insensitive: HTTP/2 names are lower case, HTTP/1.1 ones as sent
    received_at: float = field(default_factory=time.time)
    protocol: str = "h2"  # "h2" or "http/1.1": how the request came


class _Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class FakePushService:
    """`async with FakePushService(ca) as svc: sub = svc.new_subscription()` (a browser subscription dict)."""

    def __init__(self, ca: LocalCA, *, host: str = "127.0.0.1", port: int = 0, http2: bool = True,
                 max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self._ca = ca
        self._host = host
        self._port = port
        self.http2 = http2  # offer HTTP/2 by ALPN (else HTTP/1.1 only)
        self.max_streams = max_streams  # MAX_CONCURRENT_STREAMS of each new HTTP/2 connection
        self.goaway_after: int | None = None  # HTTP/2: GOAWAY after this many requests on one connection
        self.received: list[WebPushReceived] = []
        self.failed_then_ok: list[WebPushReceived] = []
        self.answers: list[tuple[str, float, int]] = []
        self.rejections: list[tuple[int, str]] = []
        self.requests = 0
        self.requests_by_protocol: dict[str, int] = {"h2": 0, "http/1.1": 0}
        self.connections = 0  # HTTP/2 connections accepted
        self.http1_connections = 0
        self.peak_streams = 0  # most requests in flight at once on one HTTP/2 connection
        self.hang = False  # when set, accepted pushes are held until `resume()` (or 503 when the fake stops)
        self.hanging = 0  # requests held by hang mode right now
        self.delay_s = 0.0
        self.vapid_tokens: set[str] = set()
        self._subs: dict[str, _Subscription] = {}
        self._programmed: dict[str, deque[Programmed]] = {}
        self._failed: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._protocols: set[H2ServerProtocol] = set()
        self._release = asyncio.Event()
        self._stopping = False

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("FakePushService is not started")
        return self._port

    @property
    def origin(self) -> str:
        return f"https://{self._host}:{self.port}"

    def new_subscription(self) -> dict[str, Any]:
        """What `PushSubscription.toJSON()` gives a web page: endpoint and keys (p256dh, auth)."""
        sub_id = secrets.token_urlsafe(12)
        key = ec.generate_private_key(ec.SECP256R1())
        auth = secrets.token_bytes(16)
        self._subs[sub_id] = _Subscription(sub_id, key, auth)
        public = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return {"endpoint": f"{self.origin}/push/{sub_id}", "keys": {"p256dh": b64url(public), "auth": b64url(auth)}}

    def unsubscribe(self, sub_id: str) -> None:
        """The user revoked permission: the service answers 410 Gone from now on."""
        self._subs[sub_id].gone = True

    def program(self, sub_id: str, responses: Iterable[Programmed]) -> None:
        self._programmed.setdefault(sub_id, deque()).extend(responses)

    def resume(self) -> None:
        """End hang mode: the requests held so far are answered as usual."""
        self.hang = False
        self._release.set()
        self._release = asyncio.Event()

    async def start(self) -> FakePushService:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/push/{id}", self._push_http1)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        ctx = self._ca.server_context(alpn=["h2", "http/1.1"] if self.http2 else ["http/1.1"])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Negotiated(lambda: HandlerH2Protocol(self), self._http1_handler),
                                                self._host, self._port, ssl=ctx)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._stopping = True
        self._release.set()
        for p in list(self._protocols):
            p.abort()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()  # closes the HTTP/1.1 connections
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakePushService:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _http1_handler(self) -> asyncio.Protocol:
        assert self._runner is not None
        self.http1_connections += 1
        return aiohttp_protocol(self._runner)

    # --- checks -------------------------------------------------------------------------------

    def _verify_vapid(self, header: str) -> str:
        if not header.lower().startswith("vapid "):
            raise _Refused(401, "Authorization must use the vapid scheme")
        params = {}
        for part in header[6:].split(","):
            name, _, value = part.strip().partition("=")
            params[name.strip()] = value.strip()
        token, k = params.get("t"), params.get("k")
        if not token or not k:
            raise _Refused(401, "vapid needs t and k")
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(k))
            header_doc, claims, signing_input, sig = decode_jwt(token)
        except ValueError:
            raise _Refused(401, "malformed vapid token or key") from None
        if header_doc.get("alg") != "ES256" or len(sig) != 64:
            raise _Refused(401, "vapid token must be ES256")
        if not es256_valid(public, signing_input, sig):
            raise _Refused(403, "vapid signature does not match k")
        if claims.get("aud") != self.origin:
            raise _Refused(403, "vapid aud must be the push service origin")
        exp = claims.get("exp")
        now = time.time()
        if not isinstance(exp, int) or exp <= now or exp > now + 24 * 3600:
            raise _Refused(403, "vapid exp must be in the future and within 24 hours")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.startswith(("mailto:", "https:")):
            raise _Refused(403, "vapid sub must be a mailto: or https: URL")
        self.vapid_tokens.add(token)
        return k

    async def _push_http1(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.requests_by_protocol["http/1.1"] += 1
        status, headers, body = await self.handle(request.match_info["id"], CIMultiDict(request.headers),
                                                  await request.read(), "http/1.1")
        return web.Response(status=status, body=body, headers=headers)

    async def handle_h2(self, headers: Mapping[str, str], body: bytes) -> Answer:
        """One HTTP/2 request: the route of the HTTP/1.1 server, from the pseudo-headers, plus the
        checks HTTP/2 adds (scheme, authority of this service; jh2 already refuses a content-length
        that does not match the body, as a protocol error)."""
        self.requests_by_protocol["h2"] += 1  # every request, any path
        m = _PUSH_PATH.match(headers.get(":path", "").partition("?")[0])
        if m is None:
            return 404, {}, b"Not Found"
        if headers.get(":method") != "POST":
            return 405, {"allow": "POST"}, b"Method Not Allowed"
        self.requests += 1
        authority = headers.get(":authority", "")
        if headers.get(":scheme") != "https" or not authority.endswith(f":{self.port}"):
            return self._refuse(_Refused(400, ":scheme must be https and :authority this service"))
        return await self.handle(m.group(1), CIMultiDict(headers), body, "h2")

    def _refuse(self, e: _Refused) -> Answer:
        self.rejections.append((e.status, e.text))
        return e.status, {"content-type": "text/plain; charset=utf-8"}, e.text.encode()

    async def handle(self, sub_id: str, headers: CIMultiDict[str], body: bytes, protocol: str) -> Answer:
        """`POST /push/<sub_id>` over either protocol: every check, then the programmed or the normal answer."""
        try:
            status, out, text = await self._handle(sub_id, headers, body, protocol)
        except _Refused as e:
            return self._refuse(e)
        return status, out, text.encode()

    async def _handle(self, sub_id: str, headers: CIMultiDict[str], body: bytes,
                      protocol: str) -> tuple[int, dict[str, str], str]:
        sub = self._subs.get(sub_id)
        if sub is None:
            raise _Refused(404, "no such subscription")
        if sub.gone:
            raise _Refused(410, "subscription expired or unsubscribed")
        vapid_key = self._verify_vapid(headers.get("Authorization", ""))
        if headers.get("Content-Encoding") != "aes128gcm":
            raise _Refused(415, "Content-Encoding must be aes128gcm")
        ttl_text = headers.get("TTL")
        if ttl_text is None or not ttl_text.isdigit():
            raise _Refused(400, "TTL header is required")
        urgency = headers.get("Urgency", "normal")
        if urgency not in ("very-low", "low", "normal", "high"):
            raise _Refused(400, "Urgency must be very-low, low, normal or high")
        topic = headers.get("Topic")
        if topic is not None and not _TOPIC_RE.match(topic):
            raise _Refused(400, "Topic must be at most 32 base64url characters")
        if len(body) > MAX_BODY:
            raise _Refused(413, "payload too large")
        try:
            plaintext = http_ece.decrypt(body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm")
        except Exception as e:  # http_ece raises its own ECEException and cryptography errors
            raise _Refused(400, f"cannot decrypt: {type(e).__name__}") from None
        fault = notification_fault(plaintext)
        if fault is not None:
            raise _Refused(400, f"the browser cannot show this notification: {fault}")
        if not await hold(self):
            raise _Refused(503, "shutting down")
        queue = self._programmed.get(sub_id)
        if queue:
            status, retry_after = queue.popleft()
            self._failed.add(sub_id)
            self.answers.append((sub_id, time.monotonic(), status))
            self.rejections.append((status, "programmed"))
            return status, ({"retry-after": str(int(retry_after))} if retry_after is not None else {}), "programmed failure"
        received = WebPushReceived(sub_id, plaintext, int(ttl_text), urgency, topic, vapid_key, headers,
                                   protocol=protocol)
        self.received.append(received)
        self.answers.append((sub_id, time.monotonic(), 201))
        if sub_id in self._failed:
            self.failed_then_ok.append(received)
        return 201, {"location": f"{self.origin}/message/{secrets.token_urlsafe(8)}"}, ""
