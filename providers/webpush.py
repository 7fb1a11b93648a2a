"""Web Push provider: RFC 8030 delivery, RFC 8291 (aes128gcm) encryption, RFC 8292 (VAPID) auth.

Encryption and the VAPID header are implemented here on `cryptography` rather than sent through
pywebpush, which builds a new `py_vapid` token and goes through `http_ece` for every message; the
format is small and fixed (one record, one key derivation), the VAPID header is cached per origin
(`providers.vapid`) and each subscription's parsed public key too (`subscription_key`). Most of what
is left per message is the ephemeral ECDH key RFC 8291 section 3.1 requires. The fake push service
decrypts with `http_ece`, an independent implementation, so the two are checked against each other
on every test (`python -m pushgw.bench.webpush_encode` compares the costs; docs/benchmarks.md).

The push services (FCM's web push endpoint, Mozilla autopush, Apple) accept HTTP/2, so each
push-service origin (scheme://host:port) gets a small HTTP/2 pool (`providers.transport.h2_pool`),
created on its first push. Origins come from browsers, so the pools are bounded (`MAX_ORIGINS`): a
new origin closes the least recently used pool with nothing in flight (when every pool is busy the
map grows past the bound until one is idle). An origin whose TLS handshake does not choose ALPN "h2"
is remembered and served over HTTP/1.1 from then on (`providers.transport`), with one warning per
origin, as FCM does: a push service behind an HTTP/1.1-only proxy keeps working. Outcomes are the
same on both paths.

The endpoint URL comes from a browser, so it is untrusted: `EndpointPolicy` checks the URL before
each send (https, allowed host, no private literal address), and a resolver checks every address
a host name resolves to at connect time, so DNS rebinding to 127.0.0.1 is refused too: aiohttp
calls it, and on the HTTP/2 path the pool connects only to the addresses it returns (SNI and the
certificate check still use the host name). Redirects are never followed (RFC 8030 section 5: a
push service answers 201 Created). A refused endpoint is `Rejected`: retrying cannot make it
acceptable. A connection error's reason names its type only, not its text.

Outcomes (RFC 8030 section 5, RFC 8292 section 4): 2xx -> delivered; 404/410 -> subscription gone;
429 -> retry after Retry-After; 5xx -> retry; 413 and other 4xx (bad VAPID, bad request) -> rejected;
timeouts and connection errors -> retry (`providers.transport`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import re
import struct
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import SplitResult, quote, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from multidict import CIMultiDict

from ..core.config import ConfigError, ProviderSettings, WebPushSettings
from ..core.schema import Device, Message
from .base import Delivered, Delivery, Outcome, Rejected, Retry, TokenInvalid, retry_after_seconds
from .endpoints import CheckedResolver, EndpointPolicy, malformed
from .h2 import H2Pool, H2Response
from .jose import b64url, b64url_decode
from .payloads import (
    DECLARATIVE_PUSH_SERVICE_SUFFIX,
    WEBPUSH_MAX_PLAINTEXT,
    check_payload_limits,
    replacement_key,
    webpush_declarative,
    webpush_plaintext,
)
from .transport import (
    CONNECTIONS,
    REASON_MAX,
    AddressRefused,
    Http1Client,
    Http1Request,
    Transport,
    h2_pool,
    tls_contexts,
)
from .vapid import VapidSigner, load_vapid_key

RECORD_SIZE = 4096
DEFAULT_TTL_S = 28 * 24 * 3600  # no expiry given: keep it as long as the services allow
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_KEY_INFO = b"WebPush: info\x00"
_CEK_INFO = b"Content-Encoding: aes128gcm\x00\x01"
_NONCE_INFO = b"Content-Encoding: nonce\x00\x01"
MAX_ORIGINS = 256  # HTTP/2 pools per process; the push services in use are a handful
HTTP1_ORIGINS_MAX = 4096  # origins remembered as HTTP/1.1-only; a forgotten one is probed again
ENDPOINTS_MAX = 16384  # endpoints whose checks and request parts are kept per process (about 1 KB each)
_CONTENT_ENCODING = (b"content-encoding", b"aes128gcm")
_CONTENT_TYPE = (b"content-type", b"application/octet-stream")
_URGENCY = {"high": (b"urgency", b"high"), "normal": (b"urgency", b"normal")}
_BODY_READ = 512  # bytes of an error answer read for the reason (and logs)
_PATH_SAFE = "/?=&%:@!$'()*+,;~-._"  # left as they are in a request target (RFC 3986 pchar, query)
log = logging.getLogger("pushgw.webpush")


class EncryptionError(ValueError):
    """The subscription's keys are unusable (not a P-256 point, wrong auth length)."""


SUBSCRIPTION_KEY_CACHE = 4096  # parsed p256dh keys kept per process (about 1 KB each)


@functools.lru_cache(maxsize=SUBSCRIPTION_KEY_CACHE)
def subscription_key(p256dh: str) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """A subscription's p256dh as (65 raw bytes, parsed P-256 point), parsed once per subscription.

    Parsing checks the point is on the curve, a fixed cost per parse; a
    subscription usually gets many messages, so the latest `SUBSCRIPTION_KEY_CACHE` are kept (LRU,
    bounded). A key that fails to parse raises `EncryptionError` and is not cached."""
    try:
        ua_public = b64url_decode(p256dh)
        ua_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public)
    except (ValueError, TypeError):
        raise EncryptionError("subscription p256dh is not a P-256 public key") from None
    if len(ua_public) != 65:
        raise EncryptionError("subscription keys have the wrong length (p256dh 65 bytes, auth 16)")
    return ua_public, ua_key


def encrypt(plaintext: bytes, p256dh: str, auth: str, *, salt: bytes | None = None,
            server_key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """One aes128gcm record (RFC 8291 §3-4): header (salt, rs, keyid = our ephemeral key) + ciphertext."""
    ua_public, ua_key = subscription_key(p256dh)
    try:
        auth_secret = b64url_decode(auth)
    except (ValueError, TypeError):
        raise EncryptionError("subscription auth is not base64url") from None
    if len(auth_secret) != 16:
        raise EncryptionError("subscription keys have the wrong length (p256dh 65 bytes, auth 16)")
    as_key = server_key or ec.generate_private_key(ec.SECP256R1())
    as_public = as_key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    ecdh_secret = as_key.exchange(ec.ECDH(), ua_key)
    # HKDF with one output block each is HMAC twice: extract, then expand with counter 0x01.
    prk_key = hmac.digest(auth_secret, ecdh_secret, "sha256")
    ikm = hmac.digest(prk_key, _KEY_INFO + ua_public + as_public + b"\x01", "sha256")
    salt = salt or os.urandom(16)
    prk = hmac.digest(salt, ikm, "sha256")
    cek = hmac.digest(prk, _CEK_INFO, "sha256")[:16]
    nonce = hmac.digest(prk, _NONCE_INFO, "sha256")[:12]
    ciphertext = AESGCM(cek).encrypt(nonce, plaintext + b"\x02", None)  # 0x02: last record, no padding
    return salt + struct.pack("!IB", RECORD_SIZE, len(as_public)) + as_public + ciphertext


def topic_for(collapse_key: str) -> str:
    """The Topic header (<= 32 base64url characters) for a collapse key; long or odd keys are hashed."""
    if _TOPIC_RE.match(collapse_key):
        return collapse_key
    return b64url(hashlib.sha256(collapse_key.encode()).digest())[:32]


class EndpointRefused(AddressRefused):
    """Every address of an endpoint's host is private/loopback while that is not allowed."""


class _Origin:
    """One push-service origin on HTTP/2: its pool, `:authority`, VAPID header bytes and requests in flight."""

    __slots__ = ("auth_bytes", "auth_text", "authority", "inflight", "pool")

    def __init__(self, pool: H2Pool, authority: bytes) -> None:
        self.pool = pool
        self.authority = authority
        self.inflight = 0  # a pool is closed only when this is 0
        self.auth_text = ""
        self.auth_bytes = b""

    def authorization(self, value: str) -> bytes:
        """The VAPID header as bytes, encoded again only when the signer renews the token."""
        if value is not self.auth_text:
            self.auth_text = value
            self.auth_bytes = value.encode()
        return self.auth_bytes


def _origin_key(parts: SplitResult) -> str:
    """scheme://host:port of an endpoint that passed `EndpointPolicy.check` (https, a host)."""
    host = parts.hostname or ""
    return f"https://{f'[{host}]' if ':' in host else host}:{parts.port or 443}"


def _request_target(parts: SplitResult) -> bytes:
    """`:path` of an endpoint: its path and query, percent-encoded where a URL from a browser is not ASCII."""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not (target.isascii() and target.isprintable() and " " not in target):
        target = quote(target, safe=_PATH_SAFE)
    return target.encode("ascii")


def _authority(parts: SplitResult) -> bytes:
    if parts.netloc.isascii():
        return parts.netloc.encode("ascii")
    host = (parts.hostname or "").encode("idna")  # an internationalised push-service name
    return host + (f":{parts.port}".encode() if parts.port else b"")


class Endpoint:
    """What a subscription's endpoint URL settles once: why it can never be sent to (`refusal`), or its
    parts, origin key, VAPID audience (RFC 8292 section 2) and `:path`. The checks depend only on the
    URL and the configured policy, so a provider keeps one per endpoint (`WebPushProvider.endpoint`);
    the addresses a name resolves to are still checked at every connect (`_CheckedResolver`)."""

    __slots__ = ("audience", "key", "parts", "refusal", "target")

    def __init__(self, url: str, policy: EndpointPolicy) -> None:
        self.refusal: Outcome | None = None
        problem = malformed(url)
        if problem is not None:  # a stored subscription no request can ever reach: remove it
            self.refusal = TokenInvalid(f"webpush {problem}")
        else:
            refusal = policy.check(url)
            if refusal is not None:
                self.refusal = Rejected(f"webpush endpoint refused: {refusal}")
        if self.refusal is None:
            self.parts = parts = urlsplit(url)  # it parsed in the checks
            self.key = _origin_key(parts)
            self.audience = f"{parts.scheme}://{parts.netloc}"
            self.target = _request_target(parts)
        else:
            self.parts = _NO_PARTS
            self.key = self.audience = ""
            self.target = b""


_NO_PARTS = SplitResult("", "", "", "", "")


def uses_declarative(device: Device, parts: SplitResult, *, always: bool = False) -> bool:
    """Whether a push to this subscription is a declarative push message: flagged on the subscription, set for
    all (`webpush.declarative`), or Apple's push service (Safari 18.4+ shows it without a service worker)."""
    return always or device.declarative or (parts.hostname or "").endswith(DECLARATIVE_PUSH_SERVICE_SUFFIX)


class WebPushProvider:
    """Sends Web Push messages; never raises for a provider-side failure (see module docstring)."""

    name = "webpush"

    def __init__(self, settings: WebPushSettings, provider_settings: ProviderSettings, *,
                 clock: Any = time.time, max_origins: int = MAX_ORIGINS) -> None:
        """`max_origins`: HTTP/2 pools kept at most while idle (tests lower it)."""
        if not settings.vapid_private_key_file:
            raise ConfigError("webpush.vapid_private_key_file is required for Web Push")
        self._signer = VapidSigner(load_vapid_key(settings.vapid_private_key_file), settings.vapid_subject, clock=clock)
        self._policy = EndpointPolicy(settings)
        self._declarative = settings.declarative
        self._declarative_navigate = settings.declarative_navigate
        self._tls = tls_contexts(settings.ca_file, "webpush")
        self._timeout_s = provider_settings.timeout_s
        self._concurrency = max(1, provider_settings.concurrency)
        self._http1 = Http1Client(limit=self._concurrency, ssl_context=self._tls.http1, body_limit=_BODY_READ,
                                  resolver=functools.partial(CheckedResolver, self._policy, EndpointRefused), redirects=False)
        self._resolver: CheckedResolver | None = None  # the HTTP/2 path's (made in the loop); aiohttp has its own
        self._max_origins = max(1, max_origins)
        self._origins: OrderedDict[str, _Origin] = OrderedDict()  # least recently used first
        self._http1_origins: OrderedDict[str, None] = OrderedDict()  # origins without HTTP/2, oldest first
        self._endpoints: dict[str, Endpoint] = {}  # endpoint URL -> its checks and parts, oldest first
        self._clock = clock
        self._transport: Transport[str] = Transport("webpush", self._timeout_s, fallback=self, error_text=False)

    @property
    def application_server_key(self) -> str:
        return self._signer.public_key

    @property
    def signer(self) -> VapidSigner:
        return self._signer

    def __repr__(self) -> str:
        return f"WebPushProvider(key={self._signer.public_key[:12]}…)"

    @property
    def pools(self) -> dict[str, H2Pool]:
        """The HTTP/2 pools by origin (scheme://host:port), least recently used first: tests, diagnostics."""
        return {k: o.pool for k, o in self._origins.items()}

    @property
    def http1_origins(self) -> list[str]:
        """Origins served over HTTP/1.1 because they did not negotiate HTTP/2."""
        return list(self._http1_origins)

    def check_payload(self, message: Message) -> None:
        check_payload_limits(message, ("webpush",))

    def _headers(self, d: Delivery, authorization: str) -> CIMultiDict[str]:
        msg = d.message
        ttl = max(0, int(d.expires_at - self._clock())) if d.expires_at is not None else DEFAULT_TTL_S
        headers = CIMultiDict({
            "Authorization": authorization,
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(ttl),
            "Urgency": "high" if msg.priority == "high" else "normal",
        })
        # Always a Topic (the sender's collapse_key, else from the message id), so a delivery repeated
        # after a crash replaces the copy still pending at the push service (RFC 8030 section 5.4).
        headers["Topic"] = topic_for(replacement_key(msg))
        if msg.overrides is not None and msg.overrides.webpush_headers:
            headers.update(msg.overrides.webpush_headers)  # the message's webpush.headers block (RFC 8030)
        return headers

    def _h2_headers(self, d: Delivery, origin: _Origin, target: bytes, authorization: str,
                    body: bytes) -> list[tuple[bytes, bytes]]:
        msg = d.message
        ttl = max(0, int(d.expires_at - self._clock())) if d.expires_at is not None else DEFAULT_TTL_S
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", origin.authority),
            (b":path", target),
            (b"authorization", origin.authorization(authorization)),
            _CONTENT_ENCODING,
            _CONTENT_TYPE,
            (b"ttl", str(ttl).encode()),
            _URGENCY["high" if msg.priority == "high" else "normal"],
        ]
        headers.append((b"topic", topic_for(replacement_key(msg)).encode()))  # as in `_headers`
        if msg.overrides is not None and msg.overrides.webpush_headers:
            over = msg.overrides.webpush_headers  # the message's webpush.headers block, names in lower case
            headers = [(k, over[k.decode()].encode()) if k.decode() in over else (k, v) for k, v in headers]
        headers.append((b"content-length", str(len(body)).encode()))
        return headers

    def endpoint(self, url: str) -> Endpoint:
        """The endpoint's checks and parts, worked out on its first push and kept (`ENDPOINTS_MAX`, oldest dropped)."""
        ep = self._endpoints.get(url)
        if ep is None:
            if len(self._endpoints) >= ENDPOINTS_MAX:
                del self._endpoints[next(iter(self._endpoints))]
            ep = self._endpoints[url] = Endpoint(url, self._policy)
        return ep

    def _origin(self, key: str, parts: SplitResult) -> _Origin:
        """The origin's pool, made on first use; makes room by closing the least recently used idle one."""
        origin = self._origins.get(key)
        if origin is not None:
            self._origins.move_to_end(key)
            return origin
        if len(self._origins) >= self._max_origins:
            idle = next((k for k, o in self._origins.items() if o.inflight == 0), None)
            if idle is not None:
                self._drop(idle)
        if self._resolver is None:
            self._resolver = CheckedResolver(self._policy, EndpointRefused)
        pool = h2_pool(parts.hostname or "", parts.port or 443, self._tls.h2, size=CONNECTIONS,
                       max_streams=self._concurrency, timeout_s=self._timeout_s, resolve=self._resolver.addresses)
        origin = self._origins[key] = _Origin(pool, _authority(parts))
        return origin

    def _drop(self, key: str) -> None:
        """Forget an origin's pool; it is closed now, or by its last request in flight (`send`)."""
        origin = self._origins.pop(key, None)
        if origin is not None and origin.inflight == 0:
            origin.pool.close()

    def no_http2(self, key: str, reason: str) -> None:
        """`Fallback`: the origin did not negotiate HTTP/2; remember it (bounded) and drop its pool."""
        self._drop(key)
        if key not in self._http1_origins:
            if len(self._http1_origins) >= HTTP1_ORIGINS_MAX:
                self._http1_origins.popitem(last=False)
            self._http1_origins[key] = None
            log.warning("Web Push endpoint does not speak HTTP/2, sending over HTTP/1.1 from now on",
                        extra={"provider": "webpush", "address": key, "reason": reason[:REASON_MAX]})

    def http1_request(self, key: str, delivery: Delivery, authorization: str) -> Http1Request:
        """`Fallback`: the push over HTTP/1.1, to the endpoint URL as the browser gave it."""
        return Http1Request(self._http1, delivery.device.token, self._headers(delivery, authorization))

    def _plaintext(self, msg: Message, device: Device, parts: SplitResult) -> bytes:
        """The declarative push message (W3C Push API) for a subscription flagged `declarative`, for every one
        when `webpush.declarative` is set, and always for Apple's push service, whose Safari shows it without
        a service worker; otherwise, or when the message cannot be declarative, the service worker's JSON."""
        if uses_declarative(device, parts, always=self._declarative):
            declarative = webpush_declarative(msg, self._declarative_navigate)
            if declarative is not None and len(declarative) <= WEBPUSH_MAX_PLAINTEXT:
                return declarative
        return webpush_plaintext(msg)

    async def send(self, delivery: Delivery) -> Outcome:
        device = delivery.device
        ep = self.endpoint(device.token)
        if ep.refusal is not None:
            return ep.refusal
        if not device.p256dh or not device.auth:
            return Rejected("webpush subscription has no keys")
        parts = ep.parts
        try:
            body = encrypt(self._plaintext(delivery.message, device, parts), device.p256dh, device.auth)
        except EncryptionError as e:
            return TokenInvalid(f"webpush {e}")  # a subscription with broken keys can never be delivered
        # The VAPID audience, as the push service spells its origin (RFC 8292 section 2).
        authorization = self._signer.authorization(ep.audience)
        key = ep.key
        if key in self._http1_origins:
            resp = await self._transport.send(None, key, b"", body, delivery, authorization)
        else:
            origin = self._origin(key, parts)
            origin.inflight += 1
            try:
                resp = await self._transport.send(origin.pool, key,
                                                  self._h2_headers(delivery, origin, ep.target, authorization, body),
                                                  body, delivery, authorization)
            finally:
                origin.inflight -= 1
                if origin.inflight == 0 and self._origins.get(key) is not origin:
                    origin.pool.close()  # dropped (fallback, refusal) while this request was on it
        if not isinstance(resp, H2Response):
            if isinstance(resp, Rejected):
                self._drop(key)  # a refused address: the next push resolves afresh, with no reconnect gap
            return resp
        status = resp.status
        if 200 <= status < 300:
            return Delivered(resp.headers.get(b"location", b"").decode("latin-1"))
        text = resp.body[:_BODY_READ].decode("utf-8", "replace").strip()
        reason = f"webpush HTTP {status}" + (f": {text[:100]}" if text else "")
        if status in (404, 410):
            return TokenInvalid(reason, status)
        if status == 429 or status >= 500:
            return Retry(reason, after=retry_after_seconds(resp.headers.get(b"retry-after")), status=status)
        return Rejected(reason, status)

    async def close(self) -> None:
        for origin in self._origins.values():
            origin.pool.close()
        self._origins.clear()
        await self._http1.close()
