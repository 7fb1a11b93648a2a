"""Web Push provider: RFC 8030 delivery, RFC 8291 (aes128gcm) encryption, RFC 8292 (VAPID) auth.

Why not pywebpush for sending: it builds a new `py_vapid` token and goes through `http_ece` for
every message; measured here (`python -m pushgw.bench.webpush_encode`, 2026-11-25) encrypt + VAPID
header cost 199 us per message with pywebpush + py_vapid and 99 us with `encrypt` and a cached
header (most of what is left is the ephemeral ECDH key RFC 8291 requires per message); each
subscription's parsed public key is cached too (`subscription_key`). The
format is small and fixed (one record, one key derivation), so it is implemented here on
`cryptography`, and the fake push service decrypts with `http_ece`, an independent implementation,
so the two are checked against each other on every test.

The endpoint URL comes from a browser, so it is untrusted: `EndpointPolicy` checks the URL before
each send (https, allowed host, no private literal address), and a resolver checks every address
a host name resolves to at connect time, so DNS rebinding to 127.0.0.1 is refused too. Redirects
are never followed. A refused endpoint is `Rejected`: retrying cannot make it acceptable.

Outcomes: 2xx -> delivered; 404/410 -> subscription gone; 429 -> retry after Retry-After;
5xx -> retry; 413 and other 4xx (bad VAPID, bad request) -> rejected.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
import re
import socket
import ssl
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from multidict import CIMultiDict
from pushgw.gateway.config import ConfigError, ProviderSettings, WebPushSettings
from pushgw.gateway.metrics import PROVIDER_LATENCY
from pushgw.gateway.schema import Message
from pushgw.providers.base import Delivered, Delivery, Outcome, Rejected, Retry, TokenInvalid, retry_after_seconds
from pushgw.providers.endpoints import EndpointPolicy
from pushgw.providers.jose import b64url, b64url_decode
from pushgw.providers.payloads import check_payload_limits, webpush_plaintext
from pushgw.providers.vapid import VapidSigner, load_vapid_key

RECORD_SIZE = 4096
DEFAULT_TTL_S = 28 * 24 * 3600  # no expiry given: keep it as long as the services allow
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_KEY_INFO = b"WebPush: info\x00"
_CEK_INFO = b"Content-Encoding: aes128gcm\x00\x01"
_NONCE_INFO = b"Content-Encoding: nonce\x00\x01"
_REASON_MAX = 200


class EncryptionError(ValueError):
    """The subscription's keys are unusable (not a P-256 point, wrong auth length)."""


SUBSCRIPTION_KEY_CACHE = 4096  # parsed p256dh keys kept per process (about 1 KB each)


@functools.lru_cache(maxsize=SUBSCRIPTION_KEY_CACHE)
def subscription_key(p256dh: str) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """A subscription's p256dh as (65 raw bytes, parsed P-256 point), parsed once per subscription.

    Parsing checks the point is on the curve, a fixed cost paid on every message before; a
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


class EndpointRefused(OSError):
    """Every address of an endpoint's host is private/loopback while that is not allowed."""


class _CheckedResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver, then drops addresses the policy refuses."""

    def __init__(self, policy: EndpointPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.check_address(r["host"]) is None]
        if not allowed:
            raise EndpointRefused(f"{host}: every address is private, loopback or link-local")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class WebPushProvider:
    """Sends Web Push messages; never raises for a provider-side failure (see module docstring)."""

    name = "webpush"

    def __init__(self, settings: WebPushSettings, provider_settings: ProviderSettings, *,
                 clock: Any = time.time) -> None:
        if not settings.vapid_private_key_file:
            raise ConfigError("webpush.vapid_private_key_file is required for Web Push")
        self._signer = VapidSigner(load_vapid_key(settings.vapid_private_key_file), settings.vapid_subject, clock=clock)
        self._policy = EndpointPolicy(settings)
        self._ssl: ssl.SSLContext | bool = True
        if settings.ca_file:
            try:
                self._ssl = ssl.create_default_context(cafile=settings.ca_file)
            except (OSError, ssl.SSLError):
                raise ConfigError(f"webpush.ca_file {settings.ca_file} is not a readable PEM CA file") from None
        self._timeout_s = provider_settings.timeout_s
        self._concurrency = max(1, provider_settings.concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._latency = PROVIDER_LATENCY.labels("webpush")

    @property
    def application_server_key(self) -> str:
        return self._signer.public_key

    @property
    def signer(self) -> VapidSigner:
        return self._signer

    def __repr__(self) -> str:
        return f"WebPushProvider(key={self._signer.public_key[:12]}…)"

    def check_payload(self, message: Message) -> None:
        check_payload_limits(message, ("webpush",))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._concurrency, ssl=self._ssl, resolver=_CheckedResolver(self._policy),
                                             keepalive_timeout=60.0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def _headers(self, d: Delivery, origin: str) -> CIMultiDict[str]:
        msg = d.message
        ttl = max(0, int(d.expires_at - self._clock())) if d.expires_at is not None else DEFAULT_TTL_S
        headers = CIMultiDict({
            "Authorization": self._signer.authorization(origin),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(ttl),
            "Urgency": "high" if msg.priority == "high" else "normal",
        })
        if msg.collapse_key:
            headers["Topic"] = topic_for(msg.collapse_key)
        return headers

    async def send(self, delivery: Delivery) -> Outcome:
        device = delivery.device
        endpoint = device.token
        refusal = self._policy.check(endpoint)
        if refusal is not None:
            return Rejected(f"webpush endpoint refused: {refusal}")
        if not device.p256dh or not device.auth:
            return Rejected("webpush subscription has no keys")
        try:
            body = encrypt(webpush_plaintext(delivery.message), device.p256dh, device.auth)
        except EncryptionError as e:
            return TokenInvalid(f"webpush {e}")  # a subscription with broken keys can never be delivered
        parts = urlsplit(endpoint)
        origin = f"{parts.scheme}://{parts.netloc}"
        headers = self._headers(delivery, origin)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._http().post(endpoint, data=body, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    location = resp.headers.get("Location", "")
                    text = (await resp.content.read(512)).decode("utf-8", "replace")
        except TimeoutError:
            return Retry("webpush timeout")
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, EndpointRefused):
                return Rejected(f"webpush endpoint refused: {e.os_error}"[:_REASON_MAX])
            return Retry(f"webpush connection error: {type(e).__name__}"[:_REASON_MAX])
        except (aiohttp.ClientError, OSError) as e:
            return Retry(f"webpush connection error: {type(e).__name__}"[:_REASON_MAX])
        finally:
            self._latency.observe(time.perf_counter() - started)
        if 200 <= status < 300:
            return Delivered(location)
        reason = f"webpush HTTP {status}" + (f": {text.strip()[:100]}" if text.strip() else "")
        if status in (404, 410):
            return TokenInvalid(reason, status)
        if status == 429 or status >= 500:
            return Retry(reason, after=retry_after_seconds(retry_after), status=status)
        return Rejected(reason, status)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
