"""Security hardening: every bad input is refused at the door naming its field, what cannot be
delivered is never accepted, stored data is not readable through another scope, and figures cannot be forged."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client import REGISTRY
from pushgw.campaigns.audiences import UserAttributes
from pushgw.campaigns.fanout import CampaignStore
from pushgw.campaigns.report import campaign_report, chart_png, wilson
from pushgw.campaigns.templates import Templates
from pushgw.core import metrics, schema
from pushgw.core.config import (
    ApiClient,
    ApiSettings,
    CategoryCap,
    ConfigError,
    FcmApp,
    PolicySettings,
    ProviderSettings,
    RedisSettings,
    Settings,
    WebPushSettings,
    WorkerSettings,
    load_settings,
)
from pushgw.core.schema import MAX_TTL_S, Device, Message, MessageInvalid, parse_message
from pushgw.gateway.api import create_app
from pushgw.gateway.worker import Worker
from pushgw.providers.base import Delivered, Delivery, TokenInvalid
from pushgw.providers.endpoints import EndpointPolicy
from pushgw.providers.vapid import make_vapid_key
from pushgw.providers.webpush import WebPushProvider
from pushgw.queue.connection import redis_from_url
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue
from pushgw.users.registry import MAX_DEVICES_PER_USER, DeviceRegistry, RegistryFull

ENQUEUER = "sec-enqueue-token-0123456789"
DEVICES = "sec-devices-token-0123456789"
FCM_TOKEN = "fcm-token-abc"
P256DH = "B" + "A" * 86
AUTH = "Q" * 22
NOW = 1_800_000_000.0
DEFAULT_POLICY = EndpointPolicy(WebPushSettings())


def settings() -> Settings:
    clients = (ApiClient("course-service", ENQUEUER, ("enqueue",)),
               ApiClient("profile-service", DEVICES, ("enqueue", "devices", "campaigns")))
    return Settings(redis=RedisSettings(prefix="sectest"), api=ApiSettings(clients=clients), fcm=(FcmApp("campus"),))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def api(redis: aioredis.Redis) -> AsyncIterator[TestClient[Any, Any]]:
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings(), redis)))
    await client.start_server()
    yield client
    await client.close()


def refused_fields(obj: dict[str, Any]) -> set[str]:
    with pytest.raises(MessageInvalid) as e:
        parse_message(obj, now=NOW)
    return {err.field for err in e.value.errors}


def subscription(endpoint: str) -> dict[str, Any]:
    return {"webpush": {"endpoint": endpoint, "keys": {"p256dh": P256DH, "auth": AUTH}}}


# ---------------------------------------------------------------- 9: SSRF through IPv4 embedded in IPv6


@pytest.mark.parametrize("address", [
    "64:ff9b::7f00:1",  # NAT64 well-known prefix (RFC 6052) + 127.0.0.1
    "64:ff9b::a00:5",  # NAT64 + 10.0.0.5
    "2002:7f00:1::1",  # 6to4 (RFC 3056) of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "::7f00:1",  # IPv4-compatible (RFC 4291 2.5.5.1) 127.0.0.1
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254 (cloud metadata)
    "::ffff:10.1.2.3",  # IPv4-mapped (RFC 4291 2.5.5.2)
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT, RFC 2765 2.1) 127.0.0.1
])
def test_private_ipv4_embedded_in_ipv6_is_refused_by_the_embedded_class(address: str) -> None:
    refusal = DEFAULT_POLICY.check_address(address)
    assert refusal is not None and "private" in refusal


@pytest.mark.parametrize("address", [
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64 (RFC 8215) carrying 169.254.169.254 in a /96
    "64:ff9b:1:a9fe:a9:fe00::",  # the same network with a /48 prefix (RFC 6052 2.2 layout)
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo (RFC 4380), client 127.0.0.1
])
def test_local_use_nat64_and_teredo_addresses_are_refused(address: str) -> None:
    assert DEFAULT_POLICY.check_address(address) is not None


def test_public_ipv4_embedded_in_ipv6_passes() -> None:
    assert DEFAULT_POLICY.check_address("64:ff9b::808:808") is None  # NAT64 of 8.8.8.8
    assert DEFAULT_POLICY.check_address("2002:808:808::1") is None


def test_an_allowlisted_literal_nat64_loopback_endpoint_is_refused() -> None:
    policy = EndpointPolicy(WebPushSettings(allowed_hosts=("64:ff9b::7f00:1",)))
    assert "private" in (policy.check("https://[64:ff9b::7f00:1]/push/1") or "")


# ---------------------------------------------------------------- 13: the allowlist checks the port


def test_webpush_endpoint_port_is_443_unless_configured() -> None:
    assert "port 6379" in (DEFAULT_POLICY.check("https://fcm.googleapis.com:6379/x") or "")
    assert DEFAULT_POLICY.check("https://fcm.googleapis.com:443/x") is None
    lab = EndpointPolicy(WebPushSettings(allowed_ports=("8443",)))
    assert lab.check("https://fcm.googleapis.com:8443/x") is None
    assert lab.check("https://fcm.googleapis.com:6379/x") is not None


def test_allowed_ports_must_be_tcp_ports(tmp_path: Path) -> None:
    cfg = tmp_path / "pushgw.toml"
    cfg.write_text('[webpush]\nallowed_ports = ["8443"]\n')
    assert load_settings(cfg, env={}).webpush.allowed_ports == ("8443",)
    cfg.write_text('[webpush]\nallowed_ports = ["http"]\n')
    with pytest.raises(ConfigError, match="allowed_ports"):
        load_settings(cfg, env={})


async def test_a_webpush_endpoint_on_another_port_is_refused_at_the_door(api: TestClient[Any, Any]) -> None:
    resp = await api.post("/v1/messages", json={"devices": [subscription("https://fcm.googleapis.com:6379/x")],
                                                "body": "b"}, headers=auth(ENQUEUER))
    assert resp.status == 422
    assert [f["field"] for f in (await resp.json())["error"]["fields"]] == ["devices[0].webpush.endpoint"]


# ---------------------------------------------------------------- 10: refused at the door, not dead-lettered

ZWSP_ENDPOINT = "https://updates\u200b.push.services.mozilla.com/wpush/v2/x"


@pytest.mark.parametrize("key", ["a\r\nb", "a\nx-evil: 1", "nul\x00", " leading", "trailing ", "\t", "del\x7f"])
def test_a_collapse_key_that_is_no_header_value_is_refused(key: str) -> None:
    assert refused_fields({"user": "u", "body": "b", "collapse_key": key}) == {"collapse_key"}


def test_a_collapse_key_with_inner_spaces_is_a_header_value() -> None:
    assert parse_message({"user": "u", "body": "b", "collapse_key": "quiz 42"}, now=NOW).collapse_key == "quiz 42"


async def test_an_app_that_is_not_configured_is_refused_at_the_door(api: TestClient[Any, Any]) -> None:
    resp = await api.post("/v1/messages", json={"user": "u1", "body": "b", "app": "nope"}, headers=auth(ENQUEUER))
    assert resp.status == 422 and [f["field"] for f in (await resp.json())["error"]["fields"]] == ["app"]
    resp = await api.post("/v1/messages", json={"devices": [{"fcm": FCM_TOKEN, "app": "nope"}], "body": "b"},
                          headers=auth(ENQUEUER))
    assert resp.status == 422 and [f["field"] for f in (await resp.json())["error"]["fields"]] == ["devices[0].app"]
    resp = await api.put("/v1/users/u1/devices", json={"fcm": FCM_TOKEN, "app": "nope"}, headers=auth(DEVICES))
    assert resp.status == 422 and [f["field"] for f in (await resp.json())["error"]["fields"]] == ["device.app"]
    for app in ("campus", "default"):  # a configured app, and the default
        resp = await api.post("/v1/messages", json={"user": "u1", "body": "b", "app": app}, headers=auth(ENQUEUER))
        assert resp.status == 202


async def test_a_webpush_host_that_fails_idna_is_refused_at_the_door(api: TestClient[Any, Any]) -> None:
    resp = await api.post("/v1/messages", json={"devices": [subscription(ZWSP_ENDPOINT)], "body": "b"},
                          headers=auth(ENQUEUER))
    assert resp.status == 422
    [field] = (await resp.json())["error"]["fields"]
    assert field["field"] == "devices[0].webpush.endpoint" and "IDNA" in field["message"]
    resp = await api.put("/v1/users/u1/devices", json=subscription(ZWSP_ENDPOINT), headers=auth(DEVICES))
    assert resp.status == 422


async def test_a_stored_webpush_device_that_can_never_work_is_an_invalid_token(tmp_path: Path) -> None:
    """Registered before the door checked IDNA: the provider answers TokenInvalid (the worker removes the device)."""
    webpush = WebPushSettings(vapid_private_key_file=str(make_vapid_key(tmp_path / "vapid")))
    provider = WebPushProvider(webpush, ProviderSettings(timeout_s=2.0))
    try:
        out = await provider.send(Delivery(Message(id="m", body="b"), Device("webpush", ZWSP_ENDPOINT, None, P256DH, AUTH)))
    finally:
        await provider.close()
    assert isinstance(out, TokenInvalid) and "IDNA" in out.reason


async def test_a_worker_removes_a_stored_device_that_can_never_work(redis: aioredis.Redis, tmp_path: Path) -> None:
    """Stored before the door checked IDNA (with valid keys): the first message removes it, no dead letter, no retry."""
    keys = Keys("sectest")
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    stored = Device("webpush", ZWSP_ENDPOINT, None, base64.urlsafe_b64encode(point).rstrip(b"=").decode(), AUTH)
    await redis.hset(keys.devices("learner-1"), stored.key, orjson.dumps(stored.to_json()))
    queue = StreamQueue(redis, keys)
    await queue.ensure_group()
    assert await queue.enqueue([parse_message({"id": "m-1", "user": "learner-1", "body": "b"})]) == [True]
    webpush = WebPushSettings(vapid_private_key_file=str(make_vapid_key(tmp_path / "vapid")))
    worker_settings = replace(settings(), webpush=webpush,
                              worker=WorkerSettings(batch_size=50, block_ms=20, janitor_interval_s=0.05))
    provider = WebPushProvider(webpush, ProviderSettings(timeout_s=2.0))
    worker = Worker(worker_settings, redis, {"webpush": provider}, consumer="w1")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(1000):  # bounded: until the commit removed the device
            if not await redis.exists(keys.devices("learner-1")) and (await queue.stats()).pending == 0:
                break
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert not await redis.exists(keys.devices("learner-1"))
    stats = await queue.stats()
    assert (stats.pending, stats.delayed, await redis.xlen(keys.dead)) == (0, 0, 0)
    [event] = await DeviceRegistry(redis, keys).invalid_token_events()
    assert (event["user"], event["key"]) == ("learner-1", stored.key) and "IDNA" in event["reason"]


# ---------------------------------------------------------------- 12: expires_at and send_at are bounded like ttl


@pytest.mark.parametrize(("field", "value"), [
    ("expires_at", 1e308), ("expires_at", NOW + MAX_TTL_S + 10), ("expires_at", float("inf")),
    ("send_at", -9.2e18), ("send_at", 1e308), ("send_at", NOW - MAX_TTL_S - 10),
])
def test_expires_at_and_send_at_are_bounded(field: str, value: float) -> None:
    assert refused_fields({"user": "u", "body": "b", field: value}) == {field}


def test_expires_at_is_bounded_from_send_at() -> None:
    m = parse_message({"user": "u", "body": "b", "send_at": NOW + 86400, "expires_at": NOW + 86400 + MAX_TTL_S},
                      now=NOW)
    assert m.expires_at == NOW + 86400 + MAX_TTL_S
    assert refused_fields({"user": "u", "body": "b", "send_at": NOW + 86400,
                           "expires_at": NOW + 86400 + MAX_TTL_S + 1}) == {"expires_at"}


def test_a_slightly_past_send_at_is_due_now() -> None:
    assert parse_message({"user": "u", "body": "b", "send_at": NOW - 3600}, now=NOW).send_at == NOW - 3600


# ---------------------------------------------------------------- 14: version, empty title, bounded error body


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_only_the_integer_1_is_schema_version_1(version: Any) -> None:
    assert refused_fields({"user": "u", "body": "b", "v": version}) == {"v"}


def test_an_empty_title_is_refused() -> None:
    assert refused_fields({"user": "u", "title": "", "body": "b"}) == {"title"}


async def test_a_batch_of_invalid_messages_answers_a_bounded_error(api: TestClient[Any, Any]) -> None:
    bad = {"user": "u", "title": 3, "ttl": -1, "priority": "urgent"}
    resp = await api.post("/v1/messages/batch", json={"messages": [bad] * 1000}, headers=auth(ENQUEUER))
    assert resp.status == 422
    raw = await resp.read()
    error = orjson.loads(raw)["error"]
    assert error["message"] == "4000 errors"
    assert len(error["fields"]) == getattr(schema, "MAX_LISTED_ERRORS", 0) + 1 and len(raw) < 20_000
    assert error["fields"][-1] == {"field": "$", "message": "3900 more errors not listed (fix the ones above and send again)"}


# ---------------------------------------------------------------- 7: the chart of an arm with 0 of n


@pytest.mark.parametrize("n", [3, 6, 7])
def test_the_chart_draws_an_arm_with_0_of_n_conversions(n: int) -> None:
    """At 0 of 3 the Wilson lower bound computes to 5.6e-17: the interval must still hold the rate, and the
    error bars must not be negative (matplotlib refuses them)."""
    lo, hi = wilson(0, n)  # type: ignore[misc]
    assert lo == 0.0 and 0.0 < hi < 1.0
    assert wilson(n, n)[1] == 1.0  # type: ignore[index]
    rate = {"value": 0.0, "ci95": [lo, hi], "count": 0, "of": n}
    arm = {"arm": "a", "delivered": n, "assigned": n, "ctr": rate, "cr": rate, "opt_out_rate": rate,
           "conversion_itt": rate}
    png = chart_png({"campaign": "c", "stage_percent": 100, "arms": [arm]})
    assert png[:4] == b"\x89PNG"


# ---------------------------------------------------------------- 5: the device cap holds under concurrency


async def test_the_device_cap_holds_for_300_concurrent_registrations(redis: aioredis.Redis, redis_url: str) -> None:
    crowd = redis_from_url(redis_url, max_connections=300)  # each registration on its own connection
    registry = DeviceRegistry(crowd, Keys("sectest"))
    try:
        outcomes = await asyncio.gather(*(registry.register("crowded", Device("fcm", f"tok-{i}")) for i in range(300)),
                                        return_exceptions=True)
    finally:
        await crowd.aclose()
    assert sum(o is None for o in outcomes) == MAX_DEVICES_PER_USER
    assert {type(o) for o in outcomes if o is not None} == {RegistryFull}
    assert await redis.hlen(Keys("sectest").devices("crowded")) == MAX_DEVICES_PER_USER
    stored = next(i for i, o in enumerate(outcomes) if o is None)
    await DeviceRegistry(redis, Keys("sectest")).register("crowded", Device("fcm", f"tok-{stored}"))  # no room needed


# ---------------------------------------------------------------- 11: templates and campaigns that can never be sent


def long_title_template() -> dict[str, Any]:
    """Each text is within its 1024 bytes, but the fallbacks make the title 1,800 bytes."""
    return {"default_locale": "en", "variables": {"a": "x" * 200, "b": "y" * 200, "c": "z" * 200, "d": "w" * 200},
            "locales": {"en": {"title": "{a}{b}{c}{d}" + "t" * 1000, "body": "b"}}}


async def test_a_template_whose_fallbacks_render_a_title_over_1024_bytes_is_refused(redis: aioredis.Redis) -> None:
    with pytest.raises(MessageInvalid) as e:
        await Templates(redis, Keys("sectest")).save("too-long", long_title_template())
    assert [err.field for err in e.value.errors] == ["locales.en.title"]
    assert await Templates(redis, Keys("sectest")).get("too-long") is None


async def test_a_template_with_a_reserved_data_key_is_refused(redis: aioredis.Redis) -> None:
    t = {"default_locale": "en", "locales": {"en": {"title": "t", "data": {"aps": "x", "google.c": "y", "link": "/"}}}}
    with pytest.raises(MessageInvalid) as e:
        await Templates(redis, Keys("sectest")).save("reserved", t)
    assert {err.field for err in e.value.errors} == {"locales.en.data.aps", "locales.en.data.google.c"}


async def test_a_campaign_whose_rendered_message_can_never_be_sent_is_refused(redis: aioredis.Redis) -> None:
    """The template is fine; the campaign's vars make its title 1,250 bytes."""
    keys = Keys("sectest")
    names = [f"t{i}" for i in range(5)]
    await Templates(redis, keys).save("greeting", {
        "default_locale": "en", "variables": dict.fromkeys(names), "locales": {"en": {
            "title": "".join(f"{{{n}}}" for n in names), "body": "b"}}})
    store = CampaignStore(redis, keys)
    with pytest.raises(MessageInvalid) as e:
        await store.create({"id": "huge", "template": "greeting", "audience": {"filter": {"cohort": "a"}},
                            "vars": {n: "x" * 250 for n in names}})
    assert [err.field for err in e.value.errors] == ["template"] and "title" in e.value.errors[0].message
    assert await store.get("huge") is None


# ---------------------------------------------------------------- 6 and 8: campaign figures and metric labels


class AlwaysDelivered:
    name = "fcm"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, delivery: Delivery) -> Delivered:
        self.sent.append(delivery.message.id)
        return Delivered("ok")

    async def close(self) -> None:
        return None


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def deliver_everything(redis: aioredis.Redis, provider: AlwaysDelivered, expected: int) -> None:
    """Run a worker until `expected` deliveries were made and the queue is settled (a bounded poll)."""
    worker_settings = replace(settings(), worker=WorkerSettings(batch_size=50, block_ms=20, janitor_interval_s=0.05))
    worker = Worker(worker_settings, redis, {"fcm": provider}, consumer="w1")
    queue = StreamQueue(redis, Keys("sectest"))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(1000):
            stats = await queue.stats()
            if len(provider.sent) >= expected and stats.pending == 0 and stats.lag == 0:
                break
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert len(provider.sent) == expected


async def test_an_upstream_message_labelled_with_a_stored_campaign_does_not_change_its_report(
    redis: aioredis.Redis, api: TestClient[Any, Any]
) -> None:
    keys = Keys("sectest")
    await Templates(redis, keys).save("hello", {"default_locale": "en", "locales": {"en": {"title": "Hi", "body": "b"}}})
    await CampaignStore(redis, keys).create({"id": "forge-me", "template": "hello",
                                             "audience": {"filter": {"cohort": "a"}}})
    forged = {"campaign": "forge-me", "variant": "main", "outcome": "delivered"}
    other = {"campaign": "other", "variant": "other", "outcome": "delivered"}
    before = sample("pushgw_campaign_messages_total", forged), sample("pushgw_campaign_messages_total", other)
    for i in range(5):
        resp = await api.post("/v1/messages", json={"user": f"learner-{i}", "devices": [{"fcm": f"{FCM_TOKEN}-{i}"}],
                                                    "body": "b", "campaign": "forge-me", "variant": "main"},
                              headers=auth(ENQUEUER))
        assert resp.status == 202
    await deliver_everything(redis, AlwaysDelivered(), 5)
    report = await campaign_report(redis, keys, "forge-me")
    assert [(a["arm"], a["assigned"], a["delivered"]) for a in report["arms"]] == [("main", 0, 0)]
    assert refused_fields({"user": "u", "body": "b", "fanout": True}) == {"$"}  # the mark is the fan-out's alone
    # The metric: the stored campaign's label values are its fan-out's; the upstream messages count as "other".
    assert sample("pushgw_campaign_messages_total", forged) == before[0]
    assert sample("pushgw_campaign_messages_total", other) == before[1] + 5


def test_metric_labels_come_from_configured_categories() -> None:
    policy = PolicySettings(caps=(CategoryCap("reminder", 3, 86400.0),), opt_out_exempt=("security",),
                            categories=("new_content",))
    configured = policy.labelled_categories()
    assert configured == {"general", "reminder", "security", "new_content"}
    junk = [metrics.category_label(f"junk_{i}", configured) for i in range(100)]
    assert set(junk) == {"other"}
    assert [metrics.category_label(c, configured) for c in ("reminder", "security", "general", "new_content")] == [
        "reminder", "security", "general", "new_content"]  # never crowded out by the junk before them


def test_campaign_metric_labels_come_from_stored_campaigns_only() -> None:
    assert metrics.campaign_labels("stats-2", "social", stored=True) == ("stats-2", "social")
    assert {metrics.campaign_labels(f"one-off-{i}", "v", stored=False) for i in range(100)} == {("other", "other")}


# ---------------------------------------------------------------- 3: learner attributes need the devices scope


async def queued(redis: aioredis.Redis) -> list[dict[str, Any]]:
    keys = Keys("sectest")
    return [orjson.loads(f[b"m"]) for stream in (keys.stream, keys.stream_high) for _, f in await redis.xrange(stream)]


async def learner_with_a_grade(redis: aioredis.Redis) -> None:
    keys = Keys("sectest")
    await UserAttributes(redis, keys).update("learner-1", {"first_name": "Ada", "locale": "fr", "vars": {"grade": "B+"}})
    await Templates(redis, keys).save("grade", {"default_locale": "en", "variables": {"grade": None},
                                                "locales": {"en": {"title": "Your grade", "body": "{grade}"}}})
    await Templates(redis, keys).save("hello", {
        "default_locale": "en", "missing_locale": "error", "variables": {"first_name": "there"},
        "locales": {"en": {"title": "Hi {first_name}", "body": "b"}}})


async def test_an_enqueue_client_cannot_send_a_learners_attributes_to_a_device_it_chose(
    redis: aioredis.Redis, api: TestClient[Any, Any]
) -> None:
    await learner_with_a_grade(redis)
    msg = {"user": "learner-1", "template": "grade", "devices": [{"fcm": "attackers-phone"}]}
    resp = await api.post("/v1/messages", json=msg, headers=auth(ENQUEUER))
    assert resp.status == 422 and [f["field"] for f in (await resp.json())["error"]["fields"]] == ["devices"]
    assert await queued(redis) == []
    resp = await api.post("/v1/messages", json=msg, headers=auth(DEVICES))  # the scope that reads learners' data
    assert resp.status == 202
    [m] = await queued(redis)
    assert m["body"] == "B+" and m["devices"] == [{"fcm": "attackers-phone"}]


async def test_error_answers_do_not_reveal_stored_attributes_without_the_devices_scope(
    redis: aioredis.Redis, api: TestClient[Any, Any]
) -> None:
    await learner_with_a_grade(redis)
    answers = []
    for user in ("learner-1", "nobody"):  # one has the attribute and a French locale, the other nothing stored
        for template in ("grade", "hello"):
            resp = await api.post("/v1/messages", json={"user": user, "template": template}, headers=auth(ENQUEUER))
            answers.append((template, resp.status, (await resp.json()).get("error")))
    assert answers[:2] == answers[2:]
    assert [(t, s) for t, s, _ in answers[:2]] == [("grade", 422), ("hello", 202)]
    # Accepted messages still go to the learner's own devices, personalised (in the default locale: fr has no variant).
    assert sorted(m["title"] for m in await queued(redis)) == ["Hi Ada", "Hi there"]


async def test_a_stored_attribute_too_long_for_the_title_is_not_revealed_without_the_devices_scope(
    redis: aioredis.Redis, api: TestClient[Any, Any]
) -> None:
    """With the learner's long first name the title would pass 1024 bytes: an enqueue-only client gets the same
    202 as for a learner with nothing stored, and the learner gets the fallback text."""
    keys = Keys("sectest")
    await UserAttributes(redis, keys).update("learner-1", {"first_name": "A" * 64})
    await Templates(redis, keys).save("long", {"default_locale": "en", "variables": {"first_name": "there"},
                                               "locales": {"en": {"title": "Hi {first_name} " + "x" * 1000}}})
    for user in ("learner-1", "nobody"):
        resp = await api.post("/v1/messages", json={"user": user, "template": "long"}, headers=auth(ENQUEUER))
        assert resp.status == 202
    assert {m["title"][:9] for m in await queued(redis)} == {"Hi there "}
    resp = await api.post("/v1/messages", json={"user": "learner-1", "template": "long"}, headers=auth(DEVICES))
    assert resp.status == 422  # a client that may read the learner's data is told what is wrong
    assert (await resp.json())["error"]["fields"][0] == {"field": "title", "message": "must be at most 1024 bytes"}


async def test_acceptance_does_not_depend_on_the_length_of_a_stored_attribute_without_the_devices_scope(
    redis: aioredis.Redis, api: TestClient[Any, Any]
) -> None:
    """A client pads the title with its own vars until the fallback first name ("there") just passes the
    limit: a short stored name would fit where the fallback does not. Both learners get the same answer."""
    keys = Keys("sectest")
    await UserAttributes(redis, keys).update("learner-1", {"first_name": "Al"})
    await Templates(redis, keys).save("pad", {"default_locale": "en", "variables": {"first_name": "there", "pad": None},
                                              "locales": {"en": {"title": "Hi {first_name} {pad}"}}})
    pad = "x" * (1024 - len("Hi there ") + 1)  # the fallback renders 1025 bytes, "Al" 1022
    answers = {}
    for user in ("learner-1", "nobody"):
        resp = await api.post("/v1/messages", json={"user": user, "template": "pad", "vars": {"pad": pad}},
                              headers=auth(ENQUEUER))
        answers[user] = (resp.status, await resp.json())
    assert answers["learner-1"] == answers["nobody"]
    assert answers["nobody"][0] == 422
