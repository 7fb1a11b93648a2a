"""A local Web Push service (RFC 8030) that checks VAPID (RFC 8292) and decrypts aes128gcm (RFC 8291).

It plays both sides a real deployment has: the browser, which creates subscriptions (a P-256
key pair and an auth secret per subscription, `new_subscription()`), and the push service, which
accepts `POST /push/<id>` only with a valid `vapid t=..., k=...` header (ES256 signature by k,
aud = this origin, exp in the future and at most 24 h away, sub mailto:/https:), the
`Content-Encoding: aes128gcm`, a TTL, a valid Urgency and Topic. The body is decrypted with
`http_ece`, an implementation independent of the gateway's, so a received message proves that
the browser could read it. Failures are programmed per subscription id.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import http_ece
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.jose import b64url, b64url_decode, decode_jwt, es256_valid

MAX_BODY = 4096
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
Programmed = tuple[int, float | None]
"""(HTTP status, Retry-After seconds or None)."""


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
    headers: dict[str, str]
    received_at: float = field(default_factory=time.time)


class _Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class FakePushService:
    """`async with FakePushService(ca) as svc: sub = svc.new_subscription()` (a browser subscription dict)."""

    def __init__(self, ca: LocalCA, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._ca = ca
        self._host = host
        self._port = port
        self.received: list[WebPushReceived] = []
        self.failed_then_ok: list[WebPushReceived] = []
        self.answers: list[tuple[str, float, int]] = []
        self.rejections: list[tuple[int, str]] = []
        self.requests = 0
        self.hang = False
        self.delay_s = 0.0
        self.vapid_tokens: set[str] = set()
        self._subs: dict[str, _Subscription] = {}
        self._programmed: dict[str, deque[Programmed]] = {}
        self._failed: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

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

    async def start(self) -> FakePushService:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/push/{id}", self._push)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ca.server_context())
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakePushService:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

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

    async def _push(self, request: web.Request) -> web.Response:
        self.requests += 1
        sub_id = request.match_info["id"]
        try:
            status, headers, text = await self._handle(request, sub_id)
        except _Refused as e:
            self.rejections.append((e.status, e.text))
            return web.Response(status=e.status, text=e.text)
        return web.Response(status=status, text=text, headers=headers)

    async def _handle(self, request: web.Request, sub_id: str) -> tuple[int, dict[str, str], str]:
        sub = self._subs.get(sub_id)
        if sub is None:
            raise _Refused(404, "no such subscription")
        if sub.gone:
            raise _Refused(410, "subscription expired or unsubscribed")
        vapid_key = self._verify_vapid(request.headers.get("Authorization", ""))
        if request.headers.get("Content-Encoding") != "aes128gcm":
            raise _Refused(415, "Content-Encoding must be aes128gcm")
        ttl_text = request.headers.get("TTL")
        if ttl_text is None or not ttl_text.isdigit():
            raise _Refused(400, "TTL header is required")
        urgency = request.headers.get("Urgency", "normal")
        if urgency not in ("very-low", "low", "normal", "high"):
            raise _Refused(400, "Urgency must be very-low, low, normal or high")
        topic = request.headers.get("Topic")
        if topic is not None and not _TOPIC_RE.match(topic):
            raise _Refused(400, "Topic must be at most 32 base64url characters")
        body = await request.read()
        if len(body) > MAX_BODY:
            raise _Refused(413, "payload too large")
        try:
            plaintext = http_ece.decrypt(body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm")
        except Exception as e:  # http_ece raises its own ECEException and cryptography errors
            raise _Refused(400, f"cannot decrypt: {type(e).__name__}") from None
        if self.hang:
            await self._release.wait()
            raise _Refused(503, "shutting down")
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        queue = self._programmed.get(sub_id)
        if queue:
            status, retry_after = queue.popleft()
            self._failed.add(sub_id)
            self.answers.append((sub_id, time.monotonic(), status))
            self.rejections.append((status, "programmed"))
            return status, ({"Retry-After": str(int(retry_after))} if retry_after is not None else {}), "programmed failure"
        received = WebPushReceived(sub_id, plaintext, int(ttl_text), urgency, topic, vapid_key, dict(request.headers))
        self.received.append(received)
        self.answers.append((sub_id, time.monotonic(), 201))
        if sub_id in self._failed:
            self.failed_then_ok.append(received)
        return 201, {"Location": f"{self.origin}/message/{secrets.token_urlsafe(8)}"}, ""
