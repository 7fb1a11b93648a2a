"""WebPushProvider against FakePushService over TLS: aes128gcm checked by http_ece, VAPID, headers, outcomes, SSRF guard."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import http_ece
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pushgw.gateway.config import ConfigError, ProviderSettings, WebPushSettings
from pushgw.gateway.schema import Device, Message
from pushgw.providers.base import Delivered, Delivery, Provider, Rejected, Retry, TokenInvalid
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.fakes.webpush import FakePushService
from pushgw.providers.vapid import VapidSigner, application_server_key, load_vapid_key, make_vapid_key
from pushgw.providers.webpush import (
    SUBSCRIPTION_KEY_CACHE,
    EncryptionError,
    WebPushProvider,
    encrypt,
    subscription_key,
    topic_for,
)

Factory = Callable[..., WebPushProvider]


def device(sub: dict[str, Any]) -> Device:
    return Device("webpush", sub["endpoint"], None, sub["keys"]["p256dh"], sub["keys"]["auth"])


def delivery(sub: dict[str, Any], *, expires_at: float | None = None, **kw: Any) -> Delivery:
    fields: dict[str, Any] = {"id": "w-1", "title": "Badge earned", "body": "You scored 92% on the quiz"}
    fields.update(kw)
    return Delivery(Message(**fields), device(sub), 1, expires_at)


def sub_id(sub: dict[str, Any]) -> str:
    return str(sub["endpoint"]).rsplit("/", 1)[-1]


@pytest.fixture
async def svc(local_ca: LocalCA) -> AsyncIterator[FakePushService]:
    async with FakePushService(local_ca) as s:
        yield s


@pytest.fixture
async def make_provider(local_ca: LocalCA, tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[WebPushProvider] = []
    key = make_vapid_key(tmp_path / "vapid")

    def factory(*, timeout_s: float = 5.0, clock: Callable[[], float] = time.time, **kw: Any) -> WebPushProvider:
        fields: dict[str, Any] = {"vapid_private_key_file": str(key), "vapid_subject": "mailto:ops@campus.example",
                                  "allowed_hosts": ("127.0.0.1",), "allow_private": True, "ca_file": str(local_ca.ca_file)}
        fields.update(kw)
        p = WebPushProvider(WebPushSettings(**fields), ProviderSettings(timeout_s=timeout_s), clock=clock)
        made.append(p)
        return p

    yield factory
    for p in made:
        await p.close()


def test_encrypt_is_readable_by_an_independent_implementation() -> None:
    browser = ec.generate_private_key(ec.SECP256R1())
    auth = os.urandom(16)
    public = browser.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    b64 = base64.urlsafe_b64encode
    for size in (0, 1, 100, 3993):
        plaintext = os.urandom(size)
        body = encrypt(plaintext, b64(public).decode().rstrip("="), b64(auth).decode().rstrip("="))
        assert len(body) == 86 + size + 1 + 16  # header, plaintext, delimiter, tag
        assert len(body) <= 4096  # 3993 bytes of plaintext fill one record exactly
        assert http_ece.decrypt(body, private_key=browser, auth_secret=auth, version="aes128gcm") == plaintext


def test_rfc8291_example_vector() -> None:
    """RFC 8291 appendix A: fixed keys and salt give exactly the published message."""
    def d(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    as_private = ec.derive_private_key(int.from_bytes(d("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"), "big"), ec.SECP256R1())
    body = encrypt(b"When I grow up, I want to be a watermelon",
                   "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
                   "BTBZMqHH6r4Tts7J_aSIgg", salt=d("DGv6ra1nlYgDCS1FRnbzlw"), server_key=as_private)
    expected = ("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6P"
                "Bru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN")
    assert base64.urlsafe_b64encode(body).decode().rstrip("=") == expected


async def test_push_is_delivered_encrypted_with_vapid(svc: FakePushService, make_provider: Factory) -> None:
    provider = make_provider()
    assert isinstance(provider, Provider)
    sub = svc.new_subscription()
    expires = time.time() + 900
    out = await provider.send(delivery(sub, priority="high", collapse_key="session-7", campaign="launch",
                                       data={"link": "/live/7"}, expires_at=expires))
    assert isinstance(out, Delivered) and out.provider_id.startswith(svc.origin)
    [r] = svc.received
    doc = orjson.loads(r.plaintext)
    assert doc == {"id": "w-1", "category": "general", "title": "Badge earned", "body": "You scored 92% on the quiz",
                   "data": {"link": "/live/7"}, "campaign": "launch"}
    assert r.urgency == "high" and r.topic == "session-7"
    assert 895 <= r.ttl <= 900
    assert r.vapid_key == provider.application_server_key
    assert r.headers["Content-Encoding"] == "aes128gcm"


async def test_no_expiry_gets_the_longest_ttl_and_odd_collapse_keys_are_hashed(svc: FakePushService,
                                                                               make_provider: Factory) -> None:
    sub = svc.new_subscription()
    out = await make_provider().send(delivery(sub, collapse_key="module 3: data science / week 2"))
    assert isinstance(out, Delivered)
    [r] = svc.received
    assert r.ttl == 28 * 24 * 3600 and r.urgency == "normal"
    assert r.topic == topic_for("module 3: data science / week 2") and len(r.topic) == 32


async def test_vapid_token_is_signed_once_per_origin(svc: FakePushService, make_provider: Factory) -> None:
    provider = make_provider()
    subs = [svc.new_subscription() for _ in range(20)]
    outs = await asyncio.gather(*(provider.send(delivery(s, id=f"w-{i}")) for i, s in enumerate(subs)))
    assert all(isinstance(o, Delivered) for o in outs)
    assert provider.signer.signed == 1 and len(svc.vapid_tokens) == 1 and len(svc.received) == 20


def test_vapid_cache_renews_an_hour_before_expiry(tmp_path: Path) -> None:
    now = [1_000_000.0]
    signer = VapidSigner(load_vapid_key(make_vapid_key(tmp_path)), "mailto:a@b.example", clock=lambda: now[0])
    first = signer.authorization("https://push.example")
    now[0] += 10 * 3600
    assert signer.authorization("https://push.example") == first
    now[0] += 1.5 * 3600
    assert signer.authorization("https://push.example") != first
    assert signer.authorization("https://other.example") != first and signer.signed == 3


@pytest.mark.parametrize(
    ("status", "retry_after", "kind", "after"),
    [
        (404, None, TokenInvalid, None),
        (410, None, TokenInvalid, None),
        (429, 9, Retry, 9.0),
        (503, None, Retry, None),
        (500, 2, Retry, 2.0),
        (413, None, Rejected, None),
        (400, None, Rejected, None),
        (401, None, Rejected, None),
        (403, None, Rejected, None),
    ],
)
async def test_outcome_mapping(svc: FakePushService, make_provider: Factory, status: int, retry_after: float | None,
                               kind: type, after: float | None) -> None:
    sub = svc.new_subscription()
    svc.program(sub_id(sub), [(status, retry_after)])
    out = await make_provider().send(delivery(sub))
    assert isinstance(out, kind), out
    assert out.status == status
    if isinstance(out, Retry):
        assert out.after == after


async def test_unsubscribed_browser_is_token_invalid(svc: FakePushService, make_provider: Factory) -> None:
    sub = svc.new_subscription()
    svc.unsubscribe(sub_id(sub))
    out = await make_provider().send(delivery(sub))
    assert isinstance(out, TokenInvalid) and out.status == 410


async def test_wrong_vapid_subject_is_refused_by_config(make_provider: Factory) -> None:
    with pytest.raises(ConfigError, match="vapid_subject"):
        make_provider(vapid_subject="ops@campus.example")


async def test_broken_subscription_keys_are_token_invalid(svc: FakePushService, make_provider: Factory) -> None:
    sub = svc.new_subscription()
    sub["keys"]["p256dh"] = "B" + "A" * 86  # 65 bytes, not a point on the curve
    out = await make_provider().send(delivery(sub))
    assert isinstance(out, TokenInvalid) and "P-256" in out.reason
    assert svc.requests == 0


async def test_endpoint_off_the_allowlist_is_rejected_before_any_request(svc: FakePushService, make_provider: Factory) -> None:
    sub = svc.new_subscription()
    out = await make_provider(allowed_hosts=("fcm.googleapis.com",)).send(delivery(sub))
    assert isinstance(out, Rejected) and "not an allowed push service" in out.reason
    assert svc.requests == 0


async def test_private_address_is_rejected_unless_allowed(svc: FakePushService, make_provider: Factory) -> None:
    sub = svc.new_subscription()  # https://127.0.0.1:<port>/push/...
    out = await make_provider(allow_private=False).send(delivery(sub))
    assert isinstance(out, Rejected) and "private, loopback" in out.reason
    assert svc.requests == 0


async def test_host_name_resolving_to_loopback_is_rejected_at_connect(svc: FakePushService, make_provider: Factory) -> None:
    """DNS rebinding: the URL passes (a name on the allowlist), the address it resolves to does not."""
    sub = svc.new_subscription()
    sub["endpoint"] = sub["endpoint"].replace("127.0.0.1", "localhost")
    out = await make_provider(allowed_hosts=("localhost",), allow_private=False).send(delivery(sub))
    assert isinstance(out, Rejected) and "endpoint refused" in out.reason
    assert svc.requests == 0


async def test_plain_http_endpoint_is_rejected(make_provider: Factory) -> None:
    d = Delivery(Message(id="x", body="b"), Device("webpush", "http://127.0.0.1:9/push/x", None, "A" * 87, "A" * 22))
    out = await make_provider().send(d)
    assert isinstance(out, Rejected) and "https" in out.reason


async def test_timeout_and_refused_connection_are_retries(svc: FakePushService, make_provider: Factory) -> None:
    sub = svc.new_subscription()
    svc.hang = True
    out = await make_provider(timeout_s=0.3).send(delivery(sub))
    assert isinstance(out, Retry) and out.reason == "webpush timeout"
    svc.hang = False
    closed = dict(sub, endpoint="https://127.0.0.1:9/push/none")  # port 9 (discard) is closed on loopback
    out = await make_provider(timeout_s=2.0).send(delivery(closed))
    assert isinstance(out, Retry) and "connection error" in out.reason


def test_make_vapid_key_never_overwrites(tmp_path: Path) -> None:
    path = make_vapid_key(tmp_path)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        make_vapid_key(tmp_path)
    assert path.read_bytes() == before and (path.stat().st_mode & 0o777) == 0o600
    key = load_vapid_key(path)
    assert len(base64.urlsafe_b64decode(application_server_key(key) + "=")) == 65


def test_repr_shows_no_private_key(tmp_path: Path) -> None:
    path = make_vapid_key(tmp_path)
    settings = WebPushSettings(vapid_private_key_file=str(path))
    text = repr(WebPushProvider(settings, ProviderSettings())) + repr(settings)
    assert str(path) not in text and "PRIVATE" not in text


def test_subscription_key_is_parsed_once_per_subscription_and_the_cache_is_bounded() -> None:
    browsers = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
    keys = [base64.urlsafe_b64encode(b.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)).rstrip(b"=").decode() for b in browsers]
    auth_secret = os.urandom(16)
    auth = base64.urlsafe_b64encode(auth_secret).rstrip(b"=").decode()
    subscription_key.cache_clear()
    bodies = [encrypt(b"hello", keys[i % 2], auth) for i in range(6)]
    info = subscription_key.cache_info()
    assert (info.misses, info.hits, info.currsize) == (2, 4, 2)
    assert info.maxsize == SUBSCRIPTION_KEY_CACHE
    for i, body in enumerate(bodies):  # a cached key encrypts exactly as a fresh one: each still decrypts
        assert http_ece.decrypt(body, private_key=browsers[i % 2], auth_secret=auth_secret, version="aes128gcm") == b"hello"
    for _ in range(2):  # a broken key is refused every time and never cached
        with pytest.raises(EncryptionError):
            encrypt(b"hello", "not-a-key", auth)
    assert subscription_key.cache_info().currsize == 2
