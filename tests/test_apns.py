"""ApnsProvider against FakeApns over HTTP/2 + TLS (ALPN h2): JWT and certificate auth, headers, outcomes, connections."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pushgw.core.config import ApnsApp, ConfigError, ProviderSettings
from pushgw.core.schema import Device, Message
from pushgw.providers.apns import _APNS_ID_NS, ApnsProvider, apns_id
from pushgw.providers.base import Delivered, Delivery, Provider, Rejected, Retry, TokenInvalid
from pushgw.providers.fakes.apns import ApnsKey, FakeApns, make_apns_key
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA, make_client_cert

TOPIC = "org.example.campus"
Factory = Callable[..., ApnsProvider]


def token(i: int = 0) -> str:
    return f"{i:064x}"


def delivery(tok: str = token(), *, expires_at: float | None = None, **kw: Any) -> Delivery:
    fields: dict[str, Any] = {"id": "m-1", "title": "Live session in 15 minutes", "body": "Q&A with your mentor"}
    fields.update(kw)
    msg = Message(**fields)
    return Delivery(msg, Device("apns", tok), 1, expires_at)


@pytest.fixture
def key(tmp_path: Path) -> ApnsKey:
    return make_apns_key(tmp_path / "apns")


@pytest.fixture
async def fake(local_ca: LocalCA, key: ApnsKey) -> AsyncIterator[FakeApns]:
    async with FakeApns(local_ca, keys=[key], topics=[TOPIC]) as f:
        yield f


@pytest.fixture
async def make_provider(fake: FakeApns, local_ca: LocalCA, key: ApnsKey) -> AsyncIterator[Factory]:
    made: list[ApnsProvider] = []

    def factory(*, port: int | None = None, timeout_s: float = 5.0, concurrency: int = 1000,
                clock: Callable[[], float] = time.time, **kw: Any) -> ApnsProvider:
        fields: dict[str, Any] = {"team_id": key.team_id, "key_id": key.key_id, "key_file": str(key.key_file)}
        fields.update(kw)
        app = ApnsApp("default", TOPIC, host="127.0.0.1", port=port or fake.port, ca_file=str(local_ca.ca_file), **fields)
        p = ApnsProvider([app], ProviderSettings(timeout_s=timeout_s, concurrency=concurrency), clock=clock)
        made.append(p)
        return p

    yield factory
    for p in made:
        await p.close()


async def test_alert_goes_out_with_apple_headers_and_payload(fake: FakeApns, make_provider: Factory) -> None:
    provider = make_provider()
    assert isinstance(provider, Provider)
    expires = time.time() + 900
    out = await provider.send(delivery(priority="high", collapse_key="session-7", data={"link": "/live/7"},
                                       campaign="launch", variant="b", expires_at=expires))
    assert isinstance(out, Delivered)
    [r] = fake.received
    assert r.token == token() and r.topic == TOPIC and r.auth == "jwt"
    assert r.headers["apns-push-type"] == "alert"
    assert r.headers["apns-priority"] == "10"
    assert r.headers["apns-collapse-id"] == "session-7"
    assert r.headers["apns-expiration"] == str(int(expires))
    # apns-id is stable for (message, device): a resent push carries the same id, and APNs echoes it.
    assert uuid.UUID(r.apns_id) and out.provider_id == r.apns_id
    assert r.payload["aps"]["alert"] == {"title": "Live session in 15 minutes", "body": "Q&A with your mentor"}
    assert r.payload["link"] == "/live/7"
    assert r.payload["pushgw"] == {"id": "m-1", "category": "general", "campaign": "launch", "variant": "b"}
    again = await provider.send(delivery(priority="high", collapse_key="session-7"))
    assert isinstance(again, Delivered) and again.provider_id == out.provider_id


async def test_silent_push_is_background_priority_5(fake: FakeApns, make_provider: Factory) -> None:
    out = await make_provider().send(delivery(title=None, body=None, data={"sync": "1"}, priority="high"))
    assert isinstance(out, Delivered)
    [r] = fake.received
    assert r.headers["apns-push-type"] == "background" and r.headers["apns-priority"] == "5"
    assert r.payload["aps"] == {"content-available": 1}
    assert "apns-expiration" not in r.headers


async def test_jwt_is_signed_once_and_refreshed_after_50_minutes(fake: FakeApns, make_provider: Factory) -> None:
    now = [time.time() - 52 * 60]  # a clock that APNs, on real time, still accepts 51 minutes later
    provider = make_provider(clock=lambda: now[0])
    outs = await asyncio.gather(*(provider.send(delivery(token(i))) for i in range(50)))
    assert all(isinstance(o, Delivered) for o in outs)
    jwt = provider.app("default").jwt
    assert jwt is not None and jwt.signed == 1 and len(fake.jwts_seen) == 1
    now[0] += 49 * 60
    assert isinstance(await provider.send(delivery(token(99))), Delivered)
    assert jwt.signed == 1
    now[0] += 2 * 60  # 51 minutes: due
    assert isinstance(await provider.send(delivery(token(100))), Delivered)
    assert jwt.signed == 2 and len(fake.jwts_seen) == 2


async def test_expired_provider_token_is_resigned_but_not_more_often_than_every_20_minutes(
    fake: FakeApns, make_provider: Factory
) -> None:
    now = [time.time() - 3700]  # our clock runs an hour late: APNs finds the token's iat too old
    provider = make_provider(clock=lambda: now[0])
    out = await provider.send(delivery())
    # A token signed a moment ago cannot be refreshed yet (Apple: TooManyProviderTokenUpdates): wait.
    assert isinstance(out, Retry) and out.after == 60.0 and out.status == 403 and "clock skew" in out.reason
    jwt = provider.app("default").jwt
    assert jwt is not None and jwt.signed == 1
    now[0] += 21 * 60  # 21 minutes later by our clock: the token may be replaced, and the new iat is accepted
    out = await provider.send(delivery())
    assert isinstance(out, Retry) and out.after == 0.0 and "ExpiredProviderToken" in out.reason
    assert isinstance(await provider.send(delivery()), Delivered)
    assert jwt.signed == 2


def test_retry_after_is_finite_and_capped() -> None:
    from pushgw.providers.base import retry_after_seconds as seconds  # shared by APNs, FCM and Web Push

    assert seconds(b"inf") is None and seconds(b"nan") is None and seconds(b"1e9") == 3600.0
    assert seconds(b"-5") == 0.0 and seconds(b"2.5") == 2.5 and seconds(b"soon") is None
    assert seconds("inf") is None and seconds("86400") == 3600.0
    assert seconds("Infinity") is None and seconds("120") == 120.0 and seconds(None) is None


async def test_unknown_key_is_rejected_not_retried(fake: FakeApns, make_provider: Factory, tmp_path: Path) -> None:
    other = make_apns_key(tmp_path / "other", key_id="ZZZ999ZZZZ")
    out = await make_provider(key_file=str(other.key_file), key_id=other.key_id).send(delivery())
    assert isinstance(out, Rejected) and out.status == 403 and "InvalidProviderToken" in out.reason
    assert fake.received == []


async def test_certificate_auth(fake: FakeApns, make_provider: Factory, local_ca: LocalCA, tmp_path: Path) -> None:
    cert = make_client_cert(local_ca, tmp_path / "cert", uid=TOPIC)
    provider = make_provider(team_id="", key_id="", key_file="", cert_file=str(cert))
    out = await provider.send(delivery())
    assert isinstance(out, Delivered)
    [r] = fake.received
    assert r.auth == "certificate" and "authorization" not in r.headers


async def test_certificate_for_another_topic_is_rejected(fake: FakeApns, make_provider: Factory, local_ca: LocalCA,
                                                         tmp_path: Path) -> None:
    cert = make_client_cert(local_ca, tmp_path / "cert", uid="org.example.other")
    out = await make_provider(team_id="", key_id="", key_file="", cert_file=str(cert)).send(delivery())
    assert isinstance(out, Rejected) and "BadTopic" in out.reason


@pytest.mark.parametrize(
    ("status", "reason", "retry_after", "kind", "after"),
    [
        (410, "Unregistered", None, TokenInvalid, None),
        (410, "ExpiredToken", None, TokenInvalid, None),
        (400, "BadDeviceToken", None, TokenInvalid, None),
        (400, "DeviceTokenNotForTopic", None, TokenInvalid, None),
        (429, "TooManyRequests", 7, Retry, 7.0),
        (429, "TooManyRequests", None, Retry, None),
        (503, "ServiceUnavailable", 3, Retry, 3.0),
        (500, "InternalServerError", None, Retry, None),
        (413, "PayloadTooLarge", None, Rejected, None),
        (400, "BadCollapseId", None, Rejected, None),
        (403, "Forbidden", None, Rejected, None),
    ],
)
async def test_outcome_mapping(fake: FakeApns, make_provider: Factory, status: int, reason: str,
                               retry_after: float | None, kind: type, after: float | None) -> None:
    fake.program(token(5), [(status, reason, retry_after)])
    out = await make_provider().send(delivery(token(5)))
    assert isinstance(out, kind), out
    assert reason in out.reason and out.status == status
    if isinstance(out, Retry):
        assert out.after == after


async def test_many_concurrent_pushes_share_two_connections(fake: FakeApns, make_provider: Factory) -> None:
    fake.max_streams = 50  # the client must respect the server's limit: more streams would be a protocol error
    provider = make_provider(connections=2)
    outs = await asyncio.gather(*(provider.send(delivery(token(i), id=f"m-{i}")) for i in range(600)))
    assert [type(o) for o in outs] == [Delivered] * 600, [o for o in outs if not isinstance(o, Delivered)][:3]
    assert len(fake.received) == 600 and fake.connections == 2
    conns = provider.app("default").conns
    assert len(conns) == 2 and all(c.active == 0 for c in conns)  # nothing kept per finished stream
    assert sum(c.requests for c in conns) == 600


async def test_flow_control_with_large_payloads(fake: FakeApns, make_provider: Factory) -> None:
    provider = make_provider(connections=1)
    big = "x" * 3500  # 300 x ~3.6 KB is far beyond the 64 KB initial connection window
    outs = await asyncio.gather(*(provider.send(delivery(token(i), body=big)) for i in range(300)))
    assert all(isinstance(o, Delivered) for o in outs)
    assert len(fake.received) == 300 and fake.connections == 1


async def test_goaway_moves_unprocessed_streams_to_a_new_connection(fake: FakeApns, make_provider: Factory) -> None:
    fake.goaway_after = 100
    provider = make_provider(connections=2)
    outs = await asyncio.gather(*(provider.send(delivery(token(i), id=f"g-{i}")) for i in range(300)))
    assert all(isinstance(o, Delivered) for o in outs), [o for o in outs if not isinstance(o, Delivered)][:3]
    keys = [(r.payload["pushgw"]["id"], r.token) for r in fake.received]
    assert len(keys) == 300 and len(set(keys)) == 300  # each exactly once
    assert fake.connections > 2


async def test_timeout_resets_the_stream_and_keeps_the_connection(fake: FakeApns, make_provider: Factory) -> None:
    provider = make_provider(timeout_s=0.3)
    assert isinstance(await provider.send(delivery(token(1))), Delivered)
    fake.hang = True
    out = await provider.send(delivery(token(2)))
    assert isinstance(out, Retry) and out.reason == "apns timeout"
    fake.hang = False
    assert isinstance(await provider.send(delivery(token(3))), Delivered)
    assert fake.connections == 1


async def test_a_cancelled_send_resets_its_stream_and_frees_its_slot(fake: FakeApns, make_provider: Factory) -> None:
    provider = make_provider(concurrency=1, connections=1)  # one stream: a slot kept would hold the next send
    assert isinstance(await provider.send(delivery(token(1))), Delivered)
    fake.hang = True
    task = asyncio.create_task(provider.send(delivery(token(2))))
    for _ in range(100):
        if fake.hanging:
            break
        await asyncio.sleep(0.02)
    [conn] = provider.app("default").conns
    assert fake.hanging == 1 and conn.active == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn.active == 0
    for _ in range(100):  # the server saw RST_STREAM and stopped answering that stream
        if not fake.hanging:
            break
        await asyncio.sleep(0.02)
    assert fake.hanging == 0
    fake.hang = False
    assert isinstance(await asyncio.wait_for(provider.send(delivery(token(3))), 5), Delivered)
    assert fake.connections == 1 and not conn.closed


async def test_connection_refused_is_a_retry(make_provider: Factory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = await make_provider(port=port, timeout_s=2.0).send(delivery())
    assert isinstance(out, Retry) and "connection error" in out.reason


async def test_server_without_http2_is_a_retry(local_ca: LocalCA, make_provider: Factory) -> None:
    async with FakeFcm(local_ca, http2=False) as http1:  # TLS, but HTTP/1.1 only
        out = await make_provider(port=http1.port, timeout_s=2.0).send(delivery())
    assert isinstance(out, Retry) and "did not negotiate HTTP/2" in out.reason


async def test_server_dropping_connection_mid_request_is_a_retry(fake: FakeApns, make_provider: Factory) -> None:
    provider = make_provider(timeout_s=5.0)
    fake.hang = True
    task = asyncio.create_task(provider.send(delivery()))
    for _ in range(100):
        if fake.hanging:
            break
        await asyncio.sleep(0.02)
    for p in list(fake._protocols):
        p.abort()
    out = await task
    assert isinstance(out, Retry) and "connection" in out.reason
    fake.hang = False
    assert isinstance(await provider.send(delivery(token(9))), Delivered)  # reconnects


async def test_unknown_app_is_rejected(make_provider: Factory) -> None:
    d = delivery()
    out = await make_provider().send(Delivery(d.message, Device("apns", token(), app="other")))
    assert isinstance(out, Rejected) and "not configured" in out.reason


def test_bad_key_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "AuthKey.p8"
    bad.write_text("not a key")
    app = ApnsApp("default", TOPIC, team_id="T", key_id="K", key_file=str(bad))
    with pytest.raises(ConfigError, match="key_file"):
        ApnsProvider([app], ProviderSettings())


def test_repr_shows_no_key(key: ApnsKey) -> None:
    app = ApnsApp("default", TOPIC, team_id=key.team_id, key_id=key.key_id, key_file=str(key.key_file))
    text = repr(ApnsProvider([app], ProviderSettings())) + repr(app)
    assert str(key.key_file) not in text and key.key_file.read_text() not in text


async def test_several_apps_with_their_own_topics_and_keys(fake: FakeApns, local_ca: LocalCA, key: ApnsKey,
                                                           tmp_path: Path) -> None:
    other_key = make_apns_key(tmp_path / "k2", key_id="KEY2222222", team_id="TEAM222222")
    fake.trust(other_key)
    fake.topics.add("org.example.teacher")
    common: dict[str, Any] = {"host": "127.0.0.1", "port": fake.port, "ca_file": str(local_ca.ca_file)}
    provider = ApnsProvider([
        ApnsApp("default", TOPIC, team_id=key.team_id, key_id=key.key_id, key_file=str(key.key_file), **common),
        ApnsApp("teacher", "org.example.teacher", team_id=other_key.team_id, key_id=other_key.key_id,
                key_file=str(other_key.key_file), **common),
    ], ProviderSettings())
    try:
        assert isinstance(await provider.send(delivery(token(1))), Delivered)
        assert isinstance(await provider.send(delivery(token(2), app="teacher")), Delivered)  # the message picks the app
        d = delivery(token(3))
        assert isinstance(await provider.send(Delivery(d.message, Device("apns", token(3), app="teacher"))), Delivered)
    finally:
        await provider.close()
    assert [(r.token, r.topic) for r in fake.received] == [
        (token(1), TOPIC), (token(2), "org.example.teacher"), (token(3), "org.example.teacher")]
    assert len(fake.jwts_seen) == 2


@given(st.text(max_size=80), st.text(alphabet="0123456789abcdef", min_size=1, max_size=200))
def test_apns_id_is_the_uuid5_of_message_and_token(message_id: str, token: str) -> None:
    assert apns_id(message_id, token) == str(uuid.uuid5(_APNS_ID_NS, f"{message_id}/{token}"))


@pytest.mark.parametrize("collapse", ["with\nnewline", " leading", "trailing\t", "nul\x00"])
async def test_collapse_key_that_is_no_valid_header_value_is_rejected_before_sending(
    fake: FakeApns, make_provider: Factory, collapse: str
) -> None:
    out = await make_provider().send(delivery(collapse_key=collapse))
    assert isinstance(out, Rejected) and "collapse_key" in out.reason
    assert fake.requests == 0  # nothing reached APNs, so nothing counts against the circuit
