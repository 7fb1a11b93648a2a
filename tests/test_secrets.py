"""Secrets never leave: run the API and a worker with every provider (failures included) at DEBUG, then grep.

Everything an operator or an attacker could read is collected: the JSON logs, /metrics, API
responses (errors included), dead letters and invalid-token events. None may contain a private
key, a signed provider token, an OAuth2 access token or an API token.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from pushgw.core.config import (
    ApiClient,
    ApiSettings,
    ApnsApp,
    FcmApp,
    ProviderSettings,
    RedisSettings,
    Settings,
    WebPushSettings,
    WorkerSettings,
)
from pushgw.core.logs import setup_logging
from pushgw.gateway.api.app import create_app
from pushgw.gateway.worker import Worker
from pushgw.providers import build_providers
from pushgw.providers.fakes.apns import FakeApns, make_apns_key
from pushgw.providers.fakes.fcm import FakeFcm, make_service_account
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.fakes.webpush import FakePushService
from pushgw.providers.vapid import make_vapid_key
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue

TOPIC = "org.example.campus"
API_TOKEN = "s3cret-api-token-for-tests"
ADMIN_TOKEN = "s3cret-admin-token-for-tests"


def pem_lines(path: Path) -> list[str]:
    """The base64 lines of a PEM (or of the PEM inside a service-account JSON)."""
    text = path.read_text()
    if path.suffix == ".json":
        text = orjson.loads(text)["private_key"]
    return [ln for ln in text.splitlines() if ln and not ln.startswith("-----")]


async def test_no_secret_in_logs_metrics_responses_or_dead_letters(
    redis: aioredis.Redis, local_ca: LocalCA, tmp_path: Path
) -> None:
    log_buffer = io.StringIO()
    setup_logging("DEBUG", stream=log_buffer)
    apns_key = make_apns_key(tmp_path / "apns")
    vapid_file = make_vapid_key(tmp_path / "vapid")
    async with (
        FakeApns(local_ca, keys=[apns_key], topics=[TOPIC]) as apns,
        FakeFcm(local_ca) as fcm,
        FakePushService(local_ca) as webpush,
    ):
        sa = fcm.service_account(tmp_path / "fcm", "campus")
        untrusted_sa = make_service_account(tmp_path / "fcm-untrusted", fcm.token_uri, "other")  # token endpoint refuses it
        settings = Settings(
            redis=RedisSettings(prefix="secrets"),
            api=ApiSettings(clients=(ApiClient("svc", API_TOKEN, ("enqueue", "devices")),
                                     ApiClient("ops", ADMIN_TOKEN, ("enqueue", "devices", "admin")))),
            worker=WorkerSettings(batch_size=50, block_ms=20, max_attempts=2, backoff_base_s=0.01, backoff_cap_s=0.05,
                                  janitor_interval_s=0.05),
            providers=ProviderSettings(timeout_s=3.0),
            apns=(ApnsApp("default", TOPIC, team_id=apns_key.team_id, key_id=apns_key.key_id,
                          key_file=str(apns_key.key_file), host="127.0.0.1", port=apns.port,
                          ca_file=str(local_ca.ca_file)),),
            fcm=(FcmApp("default", service_account_file=str(sa), base_url=fcm.base_url, ca_file=str(local_ca.ca_file)),
                 FcmApp("other", service_account_file=str(untrusted_sa), base_url=fcm.base_url,
                        ca_file=str(local_ca.ca_file))),
            webpush=WebPushSettings(vapid_private_key_file=str(vapid_file), allowed_hosts=("127.0.0.1",),
                                    allow_private=True, ca_file=str(local_ca.ca_file)),
            log_level="DEBUG",
        )
        sub = webpush.new_subscription()
        sub_id = sub["endpoint"].rsplit("/", 1)[-1]
        apns_ok, apns_dead = "a" * 64, "b" * 64
        apns.program(apns_dead, [(410, "Unregistered", None)])
        fcm.program("fcm-rejected", [(403, "SENDER_ID_MISMATCH", None)])
        webpush.program(sub_id, [(400, None)])

        client: TestClient[object, object] = TestClient(TestServer(create_app(settings, redis)))
        await client.start_server()
        texts: list[str] = []
        user_auth = {"Authorization": f"Bearer {API_TOKEN}"}
        for device in ({"apns": apns_ok}, {"apns": apns_dead}, {"fcm": "fcm-ok"}, {"fcm": "fcm-rejected"},
                       {"fcm": "fcm-other-app", "app": "other"}, {"webpush": sub}):
            resp = await client.put("/v1/users/learner-1/devices", json=device, headers=user_auth)
            assert resp.status == 201
            texts.append(await resp.text())
        resp = await client.post("/v1/messages", json={"id": "secret-test-1", "user": "learner-1", "title": "Badge",
                                                       "body": "You scored 92%"}, headers=user_auth)
        assert resp.status == 202
        for headers in ({"Authorization": "Bearer wrong-" + API_TOKEN}, {"Authorization": API_TOKEN}, {}):
            texts.append(await (await client.post("/v1/messages", json={}, headers=headers)).text())

        providers = build_providers(settings)
        worker = Worker(settings, redis, providers, consumer="secrets-0")
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        q = StreamQueue(redis, Keys("secrets"))
        for _ in range(300):  # bounded: at most ~15 s
            await asyncio.sleep(0.05)
            stats = await q.stats()
            if stats.lag == 0 and stats.pending == 0 and stats.delayed == 0 and len(apns.received) == 1:
                break
        stop.set()
        await asyncio.wait_for(task, 10)
        for p in providers.values():
            await p.close()

        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        dead = await (await client.get("/v1/deadletters?count=100", headers=admin)).json()
        events = await (await client.get("/v1/events/invalid-tokens", headers=admin)).json()
        texts += [orjson.dumps(dead).decode(), orjson.dumps(events).decode(), await (await client.get("/metrics")).text()]
        await client.close()
        logging.getLogger().handlers.clear()

        logs = log_buffer.getvalue()
        # The run did what it should, so the grep below looks at real output, not at nothing.
        assert len(apns.received) == 1 and len(fcm.received) == 1
        assert {e["reason"] for e in dead["dead_letters"]} >= {"rejected: fcm SENDER_ID_MISMATCH"}
        assert {e["key"] for e in events["events"]} == {f"apns:{apns_dead}"}
        assert "secret-test-1" in logs and "dead letter" in logs

        secrets = [API_TOKEN, ADMIN_TOKEN, *apns.jwts_seen, *(t.access_token for t in fcm.tokens), *webpush.vapid_tokens]
        secrets += pem_lines(apns_key.key_file) + pem_lines(sa) + pem_lines(untrusted_sa) + pem_lines(vapid_file)
        secrets.append(orjson.loads(sa.read_bytes())["private_key_id"])
        assert len(apns.jwts_seen) >= 1 and len(fcm.tokens) >= 1 and webpush.vapid_tokens
        corpus = "\n".join([logs, *texts])
        leaked = [s[:12] + "…" for s in secrets if s in corpus]
        assert leaked == []
