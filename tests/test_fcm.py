"""FcmProvider against FakeFcm over real TLS: OAuth2 token handling, outcome mapping, app routing, secrecy."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY
from pushgw.core.config import ConfigError, FcmApp, ProviderSettings
from pushgw.core.metrics import HELD
from pushgw.core.schema import Device, Message
from pushgw.providers.base import Delivered, Delivery, Outcome, Provider, Rejected, Retry, TokenInvalid
from pushgw.providers.fakes.fcm import FCM_ERROR_TYPE, FakeFcm, Programmed, make_service_account
from pushgw.providers.fakes.tls import LocalCA, make_local_ca
from pushgw.providers.fcm import FcmProvider
from pushgw.providers.h2 import H2ClientConnection
from pushgw.providers.payloads import fcm_message

Factory = Callable[..., FcmProvider]


@pytest.fixture
async def fake(local_ca: LocalCA) -> AsyncIterator[FakeFcm]:
    async with FakeFcm(local_ca) as f:
        yield f


@pytest.fixture
def account(fake: FakeFcm, tmp_path: Path) -> Path:
    return fake.service_account(tmp_path / "sa", "demo-project")


@pytest.fixture
async def make_provider(fake: FakeFcm, local_ca: LocalCA, account: Path) -> AsyncIterator[Factory]:
    """Build providers (closed at the end); by default one app "default" on the fake's demo-project."""
    made: list[FcmProvider] = []

    def factory(
        apps: list[FcmApp] | None = None, *, timeout_s: float = 5.0, concurrency: int = 64, **kw: Any
    ) -> FcmProvider:
        if apps is None:
            apps = [app("default", account, fake, local_ca)]
        p = FcmProvider(apps, ProviderSettings(timeout_s=timeout_s, concurrency=concurrency), **kw)
        made.append(p)
        return p

    yield factory
    for p in made:
        await p.close()


def app(name: str, sa: Path, fake: FakeFcm, ca: LocalCA, **kw: Any) -> FcmApp:
    return FcmApp(name, service_account_file=str(sa), base_url=fake.base_url, ca_file=str(ca.ca_file), **kw)


def delivery(target: str = "tok-1", *, app_name: str | None = None, msg_app: str = "default", **fields: Any) -> Delivery:
    """One delivery to the FCM device `target` (a registration token)."""
    fields.setdefault("body", "hello")
    msg = Message(id=fields.pop("id", "m-1"), app=msg_app, **fields)
    return Delivery(msg, Device("fcm", target, app_name))


def free_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(cond: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Poll a condition, bounded: fails the test instead of hanging."""
    for _ in range(int(limit_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# --- delivery and the request on the wire -----------------------------------------------------


async def test_delivered_with_expected_message_json(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider()
    assert isinstance(provider, Provider)
    d = delivery(
        "tok-abc", id="m-42", title="Quiz", body="You passed", data={"score": "97"}, priority="high", ttl=3600,
        collapse_key="quiz", campaign="spring", category="grades",
    )
    out = await provider.send(d)
    assert isinstance(out, Delivered)
    assert out.provider_id.startswith("projects/demo-project/messages/")
    [got] = fake.received
    assert got.project_id == "demo-project"
    assert got.name == out.provider_id
    assert got.message == fcm_message(d.message, "tok-abc")
    assert got.message == {
        "token": "tok-abc",
        "notification": {"title": "Quiz", "body": "You passed"},
        "data": {"score": "97", "pushgw_id": "m-42", "pushgw_category": "grades", "pushgw_campaign": "spring"},
        "android": {"priority": "high", "ttl": "3600s", "collapse_key": "quiz", "notification": {"tag": "quiz"}},
    }


async def test_silent_message_has_no_notification(fake: FakeFcm, make_provider: Factory) -> None:
    out = await make_provider().send(delivery(body=None, data={"sync": "1"}))
    assert isinstance(out, Delivered)
    assert "notification" not in fake.received[0].message
    assert fake.received[0].message["data"]["sync"] == "1"


async def test_latency_is_recorded(make_provider: Factory) -> None:
    def count() -> float:
        return REGISTRY.get_sample_value("pushgw_provider_request_seconds_count", {"provider": "fcm"}) or 0.0

    HELD.apply()  # what earlier tests' providers still hold
    before = count()
    provider = make_provider()
    for i in range(3):
        assert isinstance(await provider.send(delivery(f"t{i}")), Delivered)
    for _ in range(200):  # held, then written by the event loop a few milliseconds later
        if count() == before + 3:
            break
        await asyncio.sleep(0.005)
    assert count() == before + 3


# --- OAuth2 access token ------------------------------------------------------------------------


async def test_one_token_request_serves_500_concurrent_sends(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider(concurrency=128)
    outs = await asyncio.gather(*(provider.send(delivery(f"tok-{i}", id=f"m-{i}")) for i in range(500)))
    assert all(isinstance(o, Delivered) for o in outs)
    assert fake.token_requests == 1
    assert len(fake.received) == 500
    assert {r.access_token for r in fake.received} == {fake.tokens[0].access_token}
    assert provider.token_source("default").requests == 1


async def test_token_refreshed_before_expiry(fake: FakeFcm, make_provider: Factory) -> None:
    fake.expires_in = 3.0
    provider = make_provider(refresh_margin_s=2.5)  # refresh once less than 2.5 s of 3 s remain
    assert isinstance(await provider.send(delivery("a")), Delivered)
    assert fake.token_requests == 1
    await asyncio.sleep(1.0)  # inside the refresh window, well before expiry
    assert isinstance(await provider.send(delivery("b")), Delivered)  # served at once; refresh starts
    source = provider.token_source("default")
    await wait_for(lambda: fake.token_requests == 2 and not source.refreshing)
    assert isinstance(await provider.send(delivery("c")), Delivered)
    first, second = fake.tokens
    assert second.issued_at < first.expires_at  # refreshed before the old token ran out
    assert fake.received[-1].access_token == second.access_token != first.access_token
    assert fake.token_requests == 2


async def test_refused_access_token_is_dropped_and_replaced(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider()
    assert isinstance(await provider.send(delivery()), Delivered)
    fake.revoke()  # Google no longer accepts the cached token
    out = await provider.send(delivery())
    assert out == Retry("fcm UNAUTHENTICATED: access token refused", after=0.0, status=401)
    assert isinstance(await provider.send(delivery()), Delivered)
    assert fake.token_requests == 2
    assert fake.received[0].access_token != fake.received[1].access_token


async def test_failing_token_endpoint_gives_retry_and_is_not_hammered(fake: FakeFcm, make_provider: Factory) -> None:
    fake.token_status = 500
    provider = make_provider(auth_backoff_s=1.0)
    outs = await asyncio.gather(*(provider.send(delivery(f"t{i}")) for i in range(20)))
    assert all(isinstance(o, Retry) for o in outs)
    assert "token endpoint answered 500" in outs[0].reason  # type: ignore[union-attr]
    assert fake.token_requests == 1
    for _ in range(5):  # inside the backoff window: no new token request
        out = await provider.send(delivery())
        assert isinstance(out, Retry) and out.after is not None and 0 < out.after <= 1.0
    assert fake.token_requests == 1
    assert not fake.received
    fake.token_status = None
    await asyncio.sleep(1.05)  # the backoff (1 s) has passed
    assert isinstance(await provider.send(delivery()), Delivered)
    assert fake.token_requests == 2


async def test_unreachable_token_endpoint_gives_retry(fake: FakeFcm, local_ca: LocalCA, account: Path,
                                                      make_provider: Factory) -> None:
    dead_uri = f"https://127.0.0.1:{free_port()}/token"
    provider = make_provider([app("default", account, fake, local_ca, token_uri=dead_uri)])
    out = await provider.send(delivery())
    assert isinstance(out, Retry) and out.reason.startswith("fcm auth:")
    assert not fake.received


async def test_untrusted_service_account_is_refused_by_token_endpoint(
    fake: FakeFcm, local_ca: LocalCA, tmp_path: Path, make_provider: Factory
) -> None:
    stranger = make_service_account(tmp_path / "other", fake.token_uri)  # the fake never learns this key
    provider = make_provider([app("default", stranger, fake, local_ca)])
    out = await provider.send(delivery())
    assert isinstance(out, Retry)
    assert "invalid_grant" in out.reason
    assert fake.token_requests == 1 and not fake.tokens


async def test_assertion_with_wrong_audience_is_refused(
    fake: FakeFcm, local_ca: LocalCA, account: Path, make_provider: Factory
) -> None:
    # The assertion's aud is the configured token_uri; the fake requires its own endpoint URL.
    provider = make_provider([app("default", account, fake, local_ca, token_uri=fake.token_uri + "?x=1")])
    out = await provider.send(delivery())
    assert isinstance(out, Retry) and "invalid_grant" in out.reason
    assert not fake.tokens


# --- outcome mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("programmed", "expected"),
    [
        ((404, "UNREGISTERED", None), TokenInvalid("fcm UNREGISTERED", 404)),
        ((400, "INVALID_ARGUMENT", None),
         TokenInvalid("fcm INVALID_ARGUMENT: The registration token is not a valid FCM registration token", 400)),
        ((400, "INVALID_ARGUMENT", None, "Invalid value at 'message.data[0].value'"),
         Rejected("fcm INVALID_ARGUMENT: Invalid value at 'message.data[0].value'", 400)),
        ((403, "SENDER_ID_MISMATCH", None), Rejected("fcm SENDER_ID_MISMATCH", 403)),
        ((401, "THIRD_PARTY_AUTH_ERROR", None), Rejected("fcm THIRD_PARTY_AUTH_ERROR", 401)),
        ((429, "QUOTA_EXCEEDED", 7), Retry("fcm QUOTA_EXCEEDED", after=7.0, status=429)),
        ((429, "QUOTA_EXCEEDED", None), Retry("fcm QUOTA_EXCEEDED", after=60.0, status=429)),
        ((503, "UNAVAILABLE", 3), Retry("fcm UNAVAILABLE", after=3.0, status=503)),
        ((503, "UNAVAILABLE", None), Retry("fcm UNAVAILABLE", after=None, status=503)),
        ((500, "INTERNAL", None), Retry("fcm INTERNAL", after=None, status=500)),
        ((502, None, None), Retry("fcm HTTP 502", after=None, status=502)),
    ],
)
async def test_outcomes(fake: FakeFcm, make_provider: Factory, programmed: Programmed, expected: Outcome) -> None:
    provider = make_provider()
    fake.program("tok-x", [programmed])
    assert await provider.send(delivery("tok-x")) == expected
    # The failure was for this push only: the next one to the same device goes through, same token.
    assert isinstance(await provider.send(delivery("tok-x")), Delivered)
    assert len(fake.failed_then_ok) == 1
    assert fake.token_requests == 1


async def test_retry_after_http_date_is_honoured(fake: FakeFcm, make_provider: Factory) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    fake.program("tok-x", [(503, "UNAVAILABLE", when)])
    out = await make_provider().send(delivery("tok-x"))
    assert isinstance(out, Retry) and out.status == 503
    assert out.after is not None and 100 < out.after <= 120


async def test_hang_gives_retry_timeout_and_recovers(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider(timeout_s=1.0)
    assert isinstance(await provider.send(delivery()), Delivered)  # token cached before the hang
    fake.hang = True
    out = await provider.send(delivery())
    assert out == Retry("fcm timeout")
    fake.hang = False
    assert isinstance(await provider.send(delivery()), Delivered)


async def test_unreachable_fcm_gives_retry(fake: FakeFcm, local_ca: LocalCA, account: Path, make_provider: Factory) -> None:
    dead = FcmApp("default", service_account_file=str(account), base_url=f"https://127.0.0.1:{free_port()}",
                  token_uri=fake.token_uri, ca_file=str(local_ca.ca_file))
    out = await make_provider([dead]).send(delivery())
    assert isinstance(out, Retry) and out.reason.startswith("fcm connection error")


# --- apps -----------------------------------------------------------------------------------


async def test_app_is_chosen_per_message(fake: FakeFcm, local_ca: LocalCA, tmp_path: Path, make_provider: Factory) -> None:
    sa_a = fake.service_account(tmp_path / "a", "project-a")
    sa_b = fake.service_account(tmp_path / "b", "project-b")
    provider = make_provider([app("a", sa_a, fake, local_ca), app("b", sa_b, fake, local_ca)])
    assert isinstance(await provider.send(delivery("t1", msg_app="a")), Delivered)
    assert isinstance(await provider.send(delivery("t2", msg_app="a", app_name="b")), Delivered)  # device wins
    assert isinstance(await provider.send(delivery("t3", msg_app="b")), Delivered)
    assert [(r.message["token"], r.project_id) for r in fake.received] == [
        ("t1", "project-a"), ("t2", "project-b"), ("t3", "project-b"),
    ]
    assert fake.token_requests == 2  # one token per service account
    assert {t.project_id for t in fake.tokens} == {"project-a", "project-b"}
    out = await provider.send(delivery("t4", msg_app="nope"))
    assert out == Rejected("fcm app 'nope' is not configured")


async def test_project_id_override_is_used_in_path(fake: FakeFcm, local_ca: LocalCA, account: Path,
                                                   make_provider: Factory) -> None:
    # A token of demo-project is refused for another project: 403 PERMISSION_DENIED, no retry.
    provider = make_provider([app("default", account, fake, local_ca, project_id="someone-else")])
    out = await provider.send(delivery())
    assert isinstance(out, Rejected) and out.status == 403
    assert not fake.received


# --- secrets --------------------------------------------------------------------------------


async def test_secrets_never_in_repr_outcomes_or_logs(
    fake: FakeFcm, account: Path, make_provider: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pem = orjson.loads(await asyncio.to_thread(account.read_bytes))["private_key"]
    key_lines = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
    provider = make_provider(auth_backoff_s=0.01)
    outcomes: list[Outcome] = [await provider.send(delivery())]
    fake.program("bad", [(404, "UNREGISTERED", None), (400, "INVALID_ARGUMENT", None), (503, "UNAVAILABLE", 1)])
    outcomes += [await provider.send(delivery("bad")) for _ in range(3)]
    fake.revoke()
    outcomes.append(await provider.send(delivery()))
    fake.token_status = 503
    outcomes.append(await provider.send(delivery()))
    access_tokens = [t.access_token for t in fake.tokens]
    assert access_tokens
    texts = [repr(provider), str(provider), repr(provider.token_source("default")), caplog.text,
             *(repr(o) for o in outcomes), *(str(o) for o in outcomes)]
    for text in texts:
        for secret in [*key_lines, *access_tokens]:
            assert secret not in text
    assert "demo-project" in repr(provider)


def test_bad_service_account_file_names_the_setting_not_the_key(tmp_path: Path) -> None:
    pem_like = "-----BEGIN PRIVATE KEY-----\nTOPSECRETNOTAKEY\n-----END PRIVATE KEY-----\n"
    sa = tmp_path / "sa.json"
    sa.write_bytes(orjson.dumps({"client_email": "x@p.iam.gserviceaccount.com", "private_key": pem_like,
                                 "project_id": "p"}))
    with pytest.raises(ConfigError) as e:
        FcmProvider([FcmApp("default", service_account_file=str(sa))], ProviderSettings())
    assert "fcm.default" in str(e.value) and "TOPSECRET" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(ConfigError, match="does not exist"):
        FcmProvider([FcmApp("default", service_account_file=str(tmp_path / "missing.json"))], ProviderSettings())


# --- the fake speaks the v1 protocol ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ({"token": "t", "topic": "news", "data": {}}, "Exactly one of"),
        ({"data": {"a": "b"}}, "Exactly one of"),
        ({"token": "t", "data": {"n": 1}}, "message.data[n]"),
        ({"token": "t", "android": {"ttl": "3600"}}, "message.android.ttl"),
        ({"token": "t", "android": {"ttl": 3600}}, "message.android.ttl"),
        ({"token": "t", "notification": {"title": 5}}, "message.notification[title]"),
        ({"token": "t", "bogus": 1}, "Unknown name"),
    ],
)
async def test_fake_rejects_invalid_messages_like_fcm(
    fake: FakeFcm, local_ca: LocalCA, make_provider: Factory, message: dict[str, Any], fragment: str
) -> None:
    provider = make_provider()
    assert isinstance(await provider.send(delivery()), Delivered)
    token = fake.tokens[0].access_token
    url = f"{fake.base_url}/v1/projects/demo-project/messages:send"
    async with aiohttp.ClientSession() as s, s.post(
        url, json={"message": message}, headers={"Authorization": f"Bearer {token}"}, ssl=local_ca.client_context()
    ) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["status"] == "INVALID_ARGUMENT" and body["error"]["code"] == 400
    assert fragment in body["error"]["message"]
    assert len(fake.received) == 1


async def test_fake_error_format_and_auth(fake: FakeFcm, local_ca: LocalCA, make_provider: Factory) -> None:
    provider = make_provider()
    fake.program("gone", [(404, "UNREGISTERED", None)])
    assert isinstance(await provider.send(delivery("gone")), TokenInvalid)
    url = f"{fake.base_url}/v1/projects/demo-project/messages:send"
    ctx = local_ca.client_context()
    token = fake.tokens[0].access_token
    fake.program("gone", [(404, "UNREGISTERED", None)])
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"message": {"token": "gone"}}, headers={"Authorization": f"Bearer {token}"},
                          ssl=ctx) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == {
                "code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
                "details": [{"@type": FCM_ERROR_TYPE, "errorCode": "UNREGISTERED"}],
            }
        async with s.post(url, json={"message": {"token": "t"}}, headers={"Authorization": "Bearer forged"},
                          ssl=ctx) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["status"] == "UNAUTHENTICATED"
        async with s.post(fake.token_uri, data={"grant_type": "password", "assertion": "x.y.z"}, ssl=ctx) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "unsupported_grant_type"


# --- HTTP/2: the transport of messages:send -------------------------------------------------------


async def test_sends_go_over_http2_and_only_the_token_over_http1(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider()
    for i in range(5):
        assert isinstance(await provider.send(delivery(f"t{i}")), Delivered)
    assert fake.requests_by_protocol == {"h2": 5, "http/1.1": 1}  # the OAuth2 token request stays on aiohttp
    assert {r.protocol for r in fake.received} == {"h2"}
    assert fake.connections == 1 and fake.http1_connections == 1
    assert provider.app("default").pool.connects == 1 and not provider.app("default").http1


async def test_requests_in_flight_share_one_http2_connection(fake: FakeFcm, make_provider: Factory) -> None:
    fake.max_streams = 1000
    provider = make_provider(concurrency=256)
    assert isinstance(await provider.send(delivery("warm")), Delivered)  # token and connection first
    fake.hang = True  # hold every answer: all 200 requests are in flight at once
    sends = asyncio.gather(*(provider.send(delivery(f"tok-{i}", id=f"m-{i}")) for i in range(200)))
    await wait_for(lambda: fake.hanging == 200)
    assert fake.connections == 1 and fake.peak_streams == 200
    fake.resume()
    outs = await sends
    assert all(isinstance(o, Delivered) for o in outs)
    assert fake.connections == 1 and provider.app("default").pool.connects == 1
    assert sorted(r.message["token"] for r in fake.received[1:]) == sorted(f"tok-{i}" for i in range(200))


async def test_server_stream_limit_is_respected_with_a_small_pool(fake: FakeFcm, make_provider: Factory) -> None:
    fake.max_streams = 20  # a stream above it would be a protocol error: the fake drops the connection
    fake.delay_s = 0.05
    provider = make_provider(concurrency=256, connections=3)
    outs = await asyncio.gather(*(provider.send(delivery(f"tok-{i}", id=f"m-{i}")) for i in range(300)))
    assert all(isinstance(o, Delivered) for o in outs), [o for o in outs if not isinstance(o, Delivered)][:3]
    assert len(fake.received) == 300
    assert fake.connections == 3 and fake.peak_streams == 20  # the pool grew to its size, never past the limit


async def test_goaway_moves_unprocessed_requests_to_a_new_connection(fake: FakeFcm, make_provider: Factory) -> None:
    fake.goaway_after = 50
    provider = make_provider(concurrency=256)
    outs = await asyncio.gather(*(provider.send(delivery(f"g-{i}", id=f"m-{i}")) for i in range(200)))
    assert all(isinstance(o, Delivered) for o in outs), [o for o in outs if not isinstance(o, Delivered)][:3]
    tokens = [r.message["token"] for r in fake.received]
    assert len(tokens) == 200 and len(set(tokens)) == 200  # each exactly once: refused streams were resent, never doubled
    assert fake.connections >= 4  # one GOAWAY per 50 requests


async def test_refused_access_token_over_http2_is_refreshed_once(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider()
    assert isinstance(await provider.send(delivery()), Delivered)
    fake.revoke()
    outs = await asyncio.gather(*(provider.send(delivery(f"t{i}")) for i in range(50)))
    assert outs == [Retry("fcm UNAUTHENTICATED: access token refused", after=0.0, status=401)] * 50
    outs = await asyncio.gather(*(provider.send(delivery(f"t{i}")) for i in range(50)))
    assert all(isinstance(o, Delivered) for o in outs)
    assert fake.token_requests == 2  # 50 refusals of one token: one refresh
    assert {r.access_token for r in fake.received[1:]} == {fake.tokens[1].access_token}
    assert fake.connections == 1  # the new token goes on the same connection


async def test_quota_exceeded_over_http2_honours_retry_after(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider()
    fake.program("busy", [(429, "QUOTA_EXCEEDED", 17), (429, None, None), (503, "UNAVAILABLE", 4)])
    assert await provider.send(delivery("busy")) == Retry("fcm QUOTA_EXCEEDED", after=17.0, status=429)
    assert await provider.send(delivery("busy")) == Retry("fcm RESOURCE_EXHAUSTED", after=60.0, status=429)
    assert await provider.send(delivery("busy")) == Retry("fcm UNAVAILABLE", after=4.0, status=503)
    assert isinstance(await provider.send(delivery("busy")), Delivered)
    assert fake.requests_by_protocol["h2"] == 4 and fake.connections == 1


async def test_timeout_resets_the_stream_and_keeps_the_connection(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider(timeout_s=0.5)
    assert isinstance(await provider.send(delivery("a")), Delivered)
    fake.hang = True
    assert await provider.send(delivery("b")) == Retry("fcm timeout")
    await wait_for(lambda: fake.hanging == 0)  # the RST_STREAM reached the fake: it stopped answering
    fake.resume()
    assert isinstance(await provider.send(delivery("c")), Delivered)
    assert fake.connections == 1
    assert [r.message["token"] for r in fake.received] == ["a", "c"]


async def test_lost_connection_is_a_retry_and_the_next_send_reconnects(fake: FakeFcm, make_provider: Factory) -> None:
    provider = make_provider()
    assert isinstance(await provider.send(delivery("a")), Delivered)
    fake.hang = True
    task = asyncio.create_task(provider.send(delivery("b")))
    await wait_for(lambda: fake.hanging == 1)
    for p in list(fake._protocols):
        p.abort()
    out = await task
    assert isinstance(out, Retry) and out.reason.startswith("fcm connection")
    fake.resume()
    assert isinstance(await provider.send(delivery("c")), Delivered)  # the connection had answered: no reconnect gap
    assert fake.connections == 2


async def test_http2_server_certificate_is_verified(
    fake: FakeFcm, account: Path, local_ca: LocalCA, tmp_path: Path, make_provider: Factory
) -> None:
    stranger_ca = make_local_ca(tmp_path / "other-ca")  # a server certificate the app's ca_file does not vouch for
    async with FakeFcm(stranger_ca) as impostor:
        app_ = FcmApp("default", service_account_file=str(account), base_url=impostor.base_url,
                      token_uri=fake.token_uri, ca_file=str(local_ca.ca_file))
        out = await make_provider([app_]).send(delivery())
    assert isinstance(out, Retry) and out.reason.startswith("fcm connection error: SSLCertVerificationError")
    assert fake.token_requests == 1 and impostor.send_requests == 0


async def test_fake_serves_the_token_endpoint_over_http2_too(fake: FakeFcm, local_ca: LocalCA, make_provider: Factory) -> None:
    assert isinstance(await make_provider().send(delivery()), Delivered)
    conn = await H2ClientConnection.connect("127.0.0.1", fake.port, local_ca.client_context(alpn=["h2"]), timeout_s=5.0)
    try:
        headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{fake.port}".encode()),
                   (b":path", b"/token"), (b"content-type", b"application/x-www-form-urlencoded")]
        resp = await conn.request(headers, b"grant_type=password&assertion=x.y.z")
        assert resp.status == 400 and orjson.loads(resp.body)["error"] == "unsupported_grant_type"
        resp = await conn.request([*headers[:3], (b":path", b"/v1/projects/demo-project/messages:send"),
                                   (b"authorization", b"Bearer forged")], b"{}")
        assert resp.status == 401 and orjson.loads(resp.body)["error"]["status"] == "UNAUTHENTICATED"
    finally:
        conn.close()


# --- HTTP/1.1 fallback: an endpoint without HTTP/2 ----------------------------------------------


@pytest.fixture
async def http1_fake(local_ca: LocalCA) -> AsyncIterator[FakeFcm]:
    async with FakeFcm(local_ca, http2=False) as f:  # like an egress proxy that speaks HTTP/1.1 only
        yield f


async def test_endpoint_without_http2_falls_back_to_http1_with_every_behaviour(
    http1_fake: FakeFcm, local_ca: LocalCA, tmp_path: Path, make_provider: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pushgw.fcm")
    sa = http1_fake.service_account(tmp_path / "sa1")
    provider = make_provider([app("default", sa, http1_fake, local_ca)])
    outs = await asyncio.gather(*(provider.send(delivery(f"t{i}")) for i in range(20)))
    assert all(isinstance(o, Delivered) for o in outs)
    assert provider.app("default").http1 and provider.app("default").pool.conns == []
    assert http1_fake.requests_by_protocol["h2"] == 0 and http1_fake.connections == 0
    assert {r.protocol for r in http1_fake.received} == {"http/1.1"}
    warnings = [r for r in caplog.records if "HTTP/1.1" in r.getMessage()]
    assert len(warnings) == 1 and "did not negotiate HTTP/2" in warnings[0].reason  # type: ignore[attr-defined]
    http1_fake.program("x", [(429, "QUOTA_EXCEEDED", 9), (404, "UNREGISTERED", None)])
    assert await provider.send(delivery("x")) == Retry("fcm QUOTA_EXCEEDED", after=9.0, status=429)
    assert await provider.send(delivery("x")) == TokenInvalid("fcm UNREGISTERED", 404)
    http1_fake.revoke()
    assert await provider.send(delivery("x")) == Retry("fcm UNAUTHENTICATED: access token refused", after=0.0, status=401)
    assert isinstance(await provider.send(delivery("x")), Delivered)
    assert http1_fake.token_requests == 2


def test_base_url_scheme_chooses_the_transport(account: Path) -> None:
    plain = FcmProvider([FcmApp("default", str(account), base_url="http://127.0.0.1:9/")], ProviderSettings())
    assert plain.app("default").http1  # no TLS, no ALPN: HTTP/1.1
    tls = FcmProvider([FcmApp("default", str(account))], ProviderSettings())
    assert not tls.app("default").http1
    with pytest.raises(ConfigError, match=r"fcm\.default\.base_url"):
        FcmProvider([FcmApp("default", str(account), base_url="ftp://fcm.example")], ProviderSettings())
