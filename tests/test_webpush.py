"""WebPushProvider against FakePushService over TLS: aes128gcm checked by http_ece, VAPID, headers, outcomes, SSRF guard.

The shared `svc` fixture runs each test against a fake that speaks HTTP/2 (the provider's normal path) and one
that speaks HTTP/1.1 only (the provider's fallback), so every behaviour holds on both."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import http_ece
import orjson
import pushgw.providers.endpoints as endpoints_module
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pushgw.core.config import ConfigError, ProviderSettings, WebPushSettings
from pushgw.core.schema import Device, Message
from pushgw.providers.base import Delivered, Delivery, Provider, Rejected, Retry, TokenInvalid
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.fakes.webpush import FakePushService
from pushgw.providers.h2 import H2ClientConnection
from pushgw.providers.vapid import VapidSigner, application_server_key, load_vapid_key, make_vapid_key
from pushgw.providers.webpush import (
    MAX_ORIGINS,
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


async def wait_for(cond: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Poll until `cond()` holds, failing the test after `limit_s` rather than hanging."""
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture(params=[True, False], ids=["h2", "http1-only"])
async def svc(request: pytest.FixtureRequest, local_ca: LocalCA) -> AsyncIterator[FakePushService]:
    async with FakePushService(local_ca, http2=request.param) as s:
        yield s


@pytest.fixture
async def h2_svc(local_ca: LocalCA) -> AsyncIterator[FakePushService]:
    async with FakePushService(local_ca) as s:
        yield s


@pytest.fixture
async def http1_svc(local_ca: LocalCA) -> AsyncIterator[FakePushService]:
    async with FakePushService(local_ca, http2=False) as s:  # a push service behind an HTTP/1.1-only proxy
        yield s


@pytest.fixture
async def make_provider(local_ca: LocalCA, tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[WebPushProvider] = []
    key = make_vapid_key(tmp_path / "vapid")

    def factory(*, timeout_s: float = 5.0, clock: Callable[[], float] = time.time, max_origins: int = MAX_ORIGINS,
                **kw: Any) -> WebPushProvider:
        fields: dict[str, Any] = {"vapid_private_key_file": str(key), "vapid_subject": "mailto:ops@campus.example",
                                  "allowed_hosts": ("127.0.0.1",), "allow_private": True, "ca_file": str(local_ca.ca_file)}
        fields.update(kw)
        p = WebPushProvider(WebPushSettings(**fields), ProviderSettings(timeout_s=timeout_s), clock=clock,
                            max_origins=max_origins)
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
                   "data": {"link": "/live/7"}, "campaign": "launch", "tag": "session-7"}
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


async def test_a_plain_http_endpoint_is_an_invalid_subscription(make_provider: Factory) -> None:
    """A stored endpoint no request can ever reach is removed from the registry (TokenInvalid), not dead-lettered."""
    d = Delivery(Message(id="x", body="b"), Device("webpush", "http://127.0.0.1:9/push/x", None, "A" * 87, "A" * 22))
    out = await make_provider().send(d)
    assert isinstance(out, TokenInvalid) and "https" in out.reason


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


# --- HTTP/2: one pool per push-service origin -----------------------------------------------------


async def test_sends_go_over_http2_and_requests_in_flight_share_one_connection(h2_svc: FakePushService,
                                                                               make_provider: Factory) -> None:
    svc = h2_svc
    provider = make_provider()
    subs = [svc.new_subscription() for _ in range(51)]
    first = await provider.send(delivery(subs[0], collapse_key="session-7"))
    assert isinstance(first, Delivered) and first.provider_id.startswith(f"{svc.origin}/message/")
    svc.hang = True  # hold every answer: all 50 requests are in flight at once
    sends = asyncio.gather(*(provider.send(delivery(s, id=f"w-{i}")) for i, s in enumerate(subs[1:])))
    await wait_for(lambda: svc.hanging == 50)
    assert svc.connections == 1 and svc.peak_streams == 50
    svc.resume()
    outs = await sends
    assert all(isinstance(o, Delivered) for o in outs), outs
    assert svc.connections == 1 and svc.http1_connections == 0
    assert svc.requests_by_protocol == {"h2": 51, "http/1.1": 0}
    assert {r.protocol for r in svc.received} == {"h2"}
    assert sorted(r.subscription_id for r in svc.received) == sorted(sub_id(s) for s in subs)
    [(origin, pool)] = provider.pools.items()
    assert origin == svc.origin and pool.connects == 1 and provider.http1_origins == []
    r = svc.received[0]
    assert r.headers[":authority"] == f"127.0.0.1:{svc.port}" and r.headers[":path"] == f"/push/{sub_id(subs[0])}"
    assert r.headers["content-type"] == "application/octet-stream" and r.headers["content-encoding"] == "aes128gcm"
    assert r.topic == "session-7" and int(r.headers["content-length"]) > 86  # header + ciphertext + tag
    assert r.vapid_key == provider.application_server_key and provider.signer.signed == 1


async def test_fake_applies_its_checks_over_http2(h2_svc: FakePushService, local_ca: LocalCA,
                                                  make_provider: Factory) -> None:
    """The HTTP/2 side of the fake refuses what its HTTP/1.1 side refuses, so the provider's tests mean something."""
    svc = h2_svc
    sub = svc.new_subscription()
    body = encrypt(b"hello", sub["keys"]["p256dh"], sub["keys"]["auth"])
    base = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{svc.port}".encode()),
            (b":path", f"/push/{sub_id(sub)}".encode())]
    signer = make_provider().signer
    auth = (b"authorization", signer.authorization(svc.origin).encode())
    good = [*base, auth, (b"content-encoding", b"aes128gcm"), (b"ttl", b"60")]
    cases = [
        ([*base, (b"authorization", b"vapid t=a.b.c, k=BAAA"), *good[5:]], body, 401),
        ([*base, (b"authorization", signer.authorization("https://other.example").encode()), *good[5:]], body, 403),
        (good[:-1], body, 400),  # no TTL
        ([*good[:5], (b"content-encoding", b"aesgcm"), good[6]], body, 415),
        ([*good, (b"urgency", b"urgent")], body, 400),
        ([*good, (b"topic", b"not a topic!")], body, 400),
        (good, body[:-1] + bytes([body[-1] ^ 1]), 400),  # a flipped tag bit: http_ece cannot decrypt it
        (good, os.urandom(4097), 413),
        ([*base[:3], (b":path", b"/push/nobody"), *good[4:]], body, 404),
        (good, body, 201),
    ]
    conn = await H2ClientConnection.connect("127.0.0.1", svc.port, local_ca.client_context(alpn=["h2"]), timeout_s=5.0)
    try:
        for headers, payload, status in cases:
            resp = await conn.request(headers, payload)
            assert resp.status == status, (headers, resp.body)
    finally:
        conn.close()
    assert [r.plaintext for r in svc.received] == [b"hello"] and svc.requests_by_protocol["h2"] == len(cases)


async def test_http1_only_service_is_served_through_the_fallback(http1_svc: FakePushService, make_provider: Factory,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    svc = http1_svc
    caplog.set_level(logging.INFO, logger="pushgw.webpush")
    provider = make_provider()
    subs = [svc.new_subscription() for _ in range(10)]
    outs = await asyncio.gather(*(provider.send(delivery(s, id=f"w-{i}")) for i, s in enumerate(subs)))
    assert all(isinstance(o, Delivered) and o.provider_id.startswith(svc.origin) for o in outs), outs
    assert {r.protocol for r in svc.received} == {"http/1.1"} and len(svc.received) == 10
    assert orjson.loads(svc.received[0].plaintext)["title"] == "Badge earned"  # decrypted by http_ece
    assert svc.requests_by_protocol["h2"] == 0 and svc.connections == 0
    assert provider.http1_origins == [svc.origin] and provider.pools == {}
    sub = subs[0]
    svc.program(sub_id(sub), [(404, None), (410, None), (429, 9), (503, None), (400, None)])
    assert await provider.send(delivery(sub)) == TokenInvalid("webpush HTTP 404: programmed failure", 404)
    assert await provider.send(delivery(sub)) == TokenInvalid("webpush HTTP 410: programmed failure", 410)
    assert await provider.send(delivery(sub)) == Retry("webpush HTTP 429: programmed failure", after=9.0, status=429)
    assert await provider.send(delivery(sub)) == Retry("webpush HTTP 503: programmed failure", after=None, status=503)
    assert await provider.send(delivery(sub)) == Rejected("webpush HTTP 400: programmed failure", 400)
    assert isinstance(await provider.send(delivery(sub)), Delivered)
    warnings = [r for r in caplog.records if "HTTP/1.1" in r.getMessage()]
    assert len(warnings) == 1 and "did not negotiate HTTP/2" in warnings[0].reason  # type: ignore[attr-defined]
    assert warnings[0].address == svc.origin  # type: ignore[attr-defined]
    assert provider.pools == {} and svc.connections == 0  # remembered: no second HTTP/2 attempt


async def test_same_outcome_texts_over_http2(h2_svc: FakePushService, make_provider: Factory) -> None:
    """The reasons are those of the HTTP/1.1 path, word for word (dead letters and metrics are keyed on them)."""
    provider = make_provider()
    sub = h2_svc.new_subscription()
    h2_svc.program(sub_id(sub), [(404, None), (429, 9), (500, None), (400, None)])
    assert await provider.send(delivery(sub)) == TokenInvalid("webpush HTTP 404: programmed failure", 404)
    assert await provider.send(delivery(sub)) == Retry("webpush HTTP 429: programmed failure", after=9.0, status=429)
    assert await provider.send(delivery(sub)) == Retry("webpush HTTP 500: programmed failure", after=None, status=500)
    assert await provider.send(delivery(sub)) == Rejected("webpush HTTP 400: programmed failure", 400)
    assert h2_svc.requests_by_protocol == {"h2": 4, "http/1.1": 0}


class StaticResolver(AbstractResolver):
    """A DNS stand-in: names resolve to the addresses a test gives them."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.calls.append((host, port))
        return [ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                              proto=0, flags=0) for a in self.table[host]]

    async def close(self) -> None:
        pass


async def test_http2_path_connects_only_to_addresses_the_resolver_vetted(
    h2_svc: FakePushService, make_provider: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding on the HTTP/2 path: `push.example` resolves to loopback. Refused without allow_private; with
    it, the connection goes to that address while TLS still checks the name (the fake's certificate is for
    localhost, so the check fails: the connection was made to the vetted address, under the host's name)."""
    resolver = StaticResolver({"push.example": ["127.0.0.1"]})
    monkeypatch.setattr(endpoints_module, "DefaultResolver", lambda: resolver)  # the guard resolves through it
    sub = h2_svc.new_subscription()
    sub["endpoint"] = sub["endpoint"].replace("127.0.0.1", "push.example")
    provider = make_provider(allowed_hosts=("push.example",), allow_private=False, allowed_ports=(str(h2_svc.port),))
    out = await provider.send(delivery(sub))
    assert out == Rejected("webpush endpoint refused: push.example: every address is private, loopback or link-local")
    assert resolver.calls == [("push.example", h2_svc.port)]
    assert h2_svc.connections == 0 and h2_svc.http1_connections == 0 and h2_svc.requests == 0
    assert provider.pools == {} and provider.http1_origins == []  # refused, not mistaken for an HTTP/1.1 server
    out = await provider.send(delivery(sub))  # refused again at once: no reconnect gap for a refusal
    assert isinstance(out, Rejected) and len(resolver.calls) == 2

    out = await make_provider(allowed_hosts=("push.example",), allow_private=True).send(delivery(sub))
    assert isinstance(out, Retry) and out.reason == "webpush connection error: SSLCertVerificationError", out
    assert len(resolver.calls) == 3 and h2_svc.requests == 0


async def test_origin_bound_evicts_and_closes_the_least_recently_used_idle_pool(local_ca: LocalCA,
                                                                               make_provider: Factory) -> None:
    provider = make_provider(max_origins=2)
    async with FakePushService(local_ca) as a, FakePushService(local_ca) as b, FakePushService(local_ca) as c:
        a.hang = True
        held = asyncio.create_task(provider.send(delivery(a.new_subscription())))
        await wait_for(lambda: a.hanging == 1)
        assert isinstance(await provider.send(delivery(b.new_subscription())), Delivered)
        pool_a, pool_b = provider.pools[a.origin], provider.pools[b.origin]
        assert list(provider.pools) == [a.origin, b.origin]
        # a is the least recently used but has a request in flight: b, idle, makes room for c
        assert isinstance(await provider.send(delivery(c.new_subscription())), Delivered)
        assert list(provider.pools) == [a.origin, c.origin]
        assert pool_b.conns == [] and pool_a.conns
        await wait_for(lambda: not b._protocols)  # b's connection was closed, not left open
        a.resume()
        assert isinstance(await held, Delivered)
        assert isinstance(await provider.send(delivery(b.new_subscription())), Delivered)  # a new pool; a is idle now
        assert list(provider.pools) == [c.origin, b.origin] and pool_a.conns == []
        await wait_for(lambda: not a._protocols)
        assert (a.connections, b.connections, c.connections) == (1, 2, 1)
        assert (len(a.received), len(b.received), len(c.received)) == (1, 2, 1)
