"""Webhooks: a real worker against the FCM fake, the dispatcher, and a local HTTPS receiver that checks every
POST with the README's own verification snippet (extracted from README.md and run as written)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from pushgw.core.config import (
    ApiClient,
    ApiSettings,
    ConfigError,
    ProviderSettings,
    Settings,
    WebhookSettings,
    WebhookSubscription,
    WorkerSettings,
    load_settings,
)
from pushgw.gateway.cli import main as cli_main
from pushgw.gateway.intake import Intake
from pushgw.gateway.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookDispatcher, dead_letters, replay, sign
from pushgw.gateway.worker import Worker
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.fcm import FcmProvider
from pushgw.queue.keys import Keys

SECRET = "whsec-0123456789abcdef"
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_verify() -> Callable[..., bool]:
    """The `verify` function of the README's webhook snippet, exactly as users copy it."""
    block = re.search(r"<!-- webhook-verify -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README lost its webhook verification snippet"
    scope: dict[str, Any] = {}
    exec(compile(block.group(1), "README.md#webhook-verify", "exec"), scope)  # noqa: S102  our own README
    return scope["verify"]  # type: ignore[no-any-return]


VERIFY = readme_verify()


class Receiver:
    """An HTTPS receiver: `mode` ok (verify with the README snippet, 200), hang (never answers), 500, or 400."""

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca
        self.mode = "ok"
        self.batches: list[dict[str, Any]] = []
        self.unsigned = self.hung = self.failed = 0
        self.refused_at: list[float] = []
        self.taken_at: list[float] = []
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.mode == "hang":
            self.hung += 1
            await self.release.wait()
            return web.Response(status=200)  # too late: the dispatcher gave up on this POST long ago
        if self.mode == "500":
            self.failed += 1
            return web.Response(status=500, text="down for maintenance")
        if self.mode == "429":
            self.failed += 1
            self.refused_at.append(time.monotonic())
            self.mode = "ok"  # once
            return web.Response(status=429, headers={"Retry-After": "1"})
        if self.mode == "400":
            self.failed += 1
            return web.Response(status=400, text="unknown subscription")
        if not VERIFY(SECRET, request.headers[TIMESTAMP_HEADER], request.headers[SIGNATURE_HEADER], body):
            self.unsigned += 1
            return web.Response(status=401)
        self.batches.append(orjson.loads(body))
        self.taken_at.append(time.monotonic())
        return web.Response(status=204)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for b in self.batches for e in b["events"]]

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ca.server_context())
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def receiver(local_ca: LocalCA) -> AsyncIterator[Receiver]:
    async with Receiver(local_ca) as r:
        yield r


def settings(receiver: Receiver, ca: LocalCA, events: tuple[str, ...] = ("delivered", "token_invalid"),
             **webhooks: Any) -> Settings:
    hooks = dict(timeout_s=0.5, max_attempts=1000, backoff_base_s=0.05, backoff_cap_s=0.2, batch_size=50,
                 allowed_hosts=("127.0.0.1",), allow_private=True, ca_file=str(ca.ca_file))
    hooks.update(webhooks)
    return Settings(
        api=ApiSettings(clients=(ApiClient("svc", "svc-token-0123456789"), ApiClient("other", "other-token-0123456789"))),
        worker=WorkerSettings(batch_size=100, block_ms=20, janitor_interval_s=0.2, drain_deadline_s=5, max_attempts=2,
                              backoff_base_s=0.01, backoff_cap_s=0.05),
        providers=ProviderSettings(timeout_s=5, concurrency=32),
        webhooks=WebhookSettings(subscriptions=(WebhookSubscription("lms", "svc", f"https://127.0.0.1:{receiver.port}/hook",
                                                                    SECRET, events),), **hooks),
    )


@contextlib.asynccontextmanager
async def running(s: Settings, redis: aioredis.Redis, fcm: FcmProvider) -> AsyncIterator[WebhookDispatcher]:
    """A worker and a dispatcher (groups created first, so every event of the test reaches the subscription)."""
    stop = asyncio.Event()
    dispatcher = WebhookDispatcher(s, redis, consumer="d1")
    await dispatcher.ensure_groups()
    tasks = [asyncio.create_task(Worker(s, redis, {"fcm": fcm}, consumer="w1").run(stop)),
             asyncio.create_task(dispatcher.run(stop))]
    try:
        yield dispatcher
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def until(cond: Callable[[], Any], timeout: float = 30.0) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def messages(n: int, tag: str) -> list[dict[str, Any]]:
    return [{"id": f"{tag}-{i}", "user": f"u{i}", "title": "Quiz tomorrow", "devices": [{"fcm": f"{tag}-tok-{i}"}]}
            for i in range(n)]


async def stream_event_ids(redis: aioredis.Redis, client: str = "svc") -> set[str]:
    return {e["id"] for _, f in await redis.xrange(Keys().outcome_events) for e in orjson.loads(f[b"events"])
            if e.get("client") == client}


async def test_posts_are_signed_as_the_readme_verifies_and_carry_each_outcome_of_the_client_once(
    redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider], receiver: Receiver, local_ca: LocalCA,
) -> None:
    fake, provider = fcm
    s = settings(receiver, local_ca)
    fake.program("a-tok-3", [(404, "UNREGISTERED", None)])
    fake.program("c-tok-0", [(403, "SENDER_ID_MISMATCH", None)])
    intake = Intake(redis, s)
    async with running(s, redis, provider):
        await intake.submit(messages(20, "a"), client="svc")
        await intake.submit(messages(5, "b"), client="other")  # another client's: never posted to lms
        await intake.submit(messages(1, "c"), client="svc")  # dead-lettered: not a type lms asked for
        await until(lambda: len(receiver.events) >= 20)
        await until(lambda: len(fake.received) == 24)  # all 26 pushes answered: two refused by the fake
        await asyncio.sleep(0.3)  # nothing more comes
    events = receiver.events
    assert receiver.unsigned == 0 and receiver.failed == 0
    assert sorted(e["message"] for e in events) == sorted(f"a-{i}" for i in range(20))
    assert {e["type"] for e in events if e["message"] == "a-3"} == {"token_invalid"}
    assert all(e["type"] == "delivered" and e["provider_id"].startswith("projects/") for e in events if e["message"] != "a-3")
    assert len({e["id"] for e in events}) == 20 and {e["id"] for e in events} <= await stream_event_ids(redis)
    assert all(b["subscription"] == "lms" for b in receiver.batches)

    # The snippet refuses what a receiver must refuse: another body, another secret, a replay 6 minutes later.
    body, ts = b'{"events": []}', str(int(time.time()))
    good = sign(SECRET, int(ts), body)
    assert VERIFY(SECRET, ts, good, body)
    assert not VERIFY(SECRET, ts, good, body + b" ")
    assert not VERIFY("another-secret-0123", ts, good, body)
    assert not VERIFY(SECRET, ts, good, body, now=int(ts) + 301)


async def test_a_hanging_then_failing_receiver_holds_back_no_push_and_webhooks_catch_up_without_loss(
    redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider], receiver: Receiver, local_ca: LocalCA,
) -> None:
    """Measured by counts, not time: every push of each phase is delivered while the receiver has taken nothing;
    once it answers again, every event of the client on the stream reaches it (repeats only with the same id)."""
    fake, provider = fcm
    s = settings(receiver, local_ca)
    intake = Intake(redis, s)
    receiver.mode = "hang"
    async with running(s, redis, provider):
        await intake.submit(messages(150, "h"), client="svc")
        await until(lambda: len(fake.received) == 150 and receiver.hung >= 2)
        assert receiver.batches == []  # all 150 delivered while the receiver hung every POST
        receiver.mode = "500"
        failed_before = receiver.failed
        await intake.submit(messages(150, "f"), client="svc")
        await until(lambda: len(fake.received) == 300 and receiver.failed >= failed_before + 2)
        assert receiver.batches == []  # all 300 delivered while it answered 500
        receiver.mode = "ok"
        expected = await stream_event_ids(redis)
        assert len(expected) == 300
        await until(lambda: {e["id"] for e in receiver.events} >= expected)
    ids = [e["id"] for e in receiver.events]
    assert set(ids) == expected
    by_id: dict[str, dict[str, Any]] = {}
    for e in receiver.events:
        assert by_id.setdefault(e["id"], e) == e  # a repeat is the same event
    assert sorted(e["message"] for e in by_id.values()) == sorted([f"h-{i}" for i in range(150)] + [f"f-{i}" for i in range(150)])


async def test_a_429_is_retried_no_sooner_than_its_retry_after(
    redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider], receiver: Receiver, local_ca: LocalCA,
) -> None:
    s = settings(receiver, local_ca)  # backoff alone would retry within 0.2 s
    receiver.mode = "429"
    async with running(s, redis, fcm[1]):
        await Intake(redis, s).submit(messages(1, "r"), client="svc")
        await until(lambda: len(receiver.events) == 1)
    assert receiver.failed == 1 and receiver.taken_at[0] - receiver.refused_at[0] >= 1.0  # a lower bound only


async def test_a_batch_is_dead_lettered_after_max_attempts_or_a_4xx_and_replayed(
    redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider], receiver: Receiver, local_ca: LocalCA,
) -> None:
    provider = fcm[1]
    s = settings(receiver, local_ca, max_attempts=3)
    intake = Intake(redis, s)
    receiver.mode = "500"
    async with running(s, redis, provider):
        await intake.submit(messages(3, "d"), client="svc")
        await until(lambda: receiver.failed >= 3)
        while not await redis.xlen(Keys().webhook_dead):
            await asyncio.sleep(0.02)
        receiver.mode = "400"
        await intake.submit(messages(1, "e"), client="svc")
        await until(lambda: receiver.failed >= 4)
        await asyncio.sleep(0.3)
    dead = await dead_letters(s, redis, 10)
    assert [(d["attempts"], d["reason"]) for d in dead] == [(3, "HTTP 500: down for maintenance"),
                                                            (1, "HTTP 400: unknown subscription")]
    assert sum(d["events"] for d in dead) == 4
    receiver.mode = "ok"
    assert await replay(s, redis, None) == {"replayed": 2, "failed": 0}
    assert sorted(e["message"] for e in receiver.events) == ["d-0", "d-1", "d-2", "e-0"]
    assert await redis.xlen(Keys().webhook_dead) == 0


async def test_webhook_urls_are_guarded_like_web_push_endpoints(
    redis: aioredis.Redis, receiver: Receiver, local_ca: LocalCA, tmp_path: Path,
) -> None:
    base = settings(receiver, local_ca)

    def with_url(url: str, **hooks: Any) -> Settings:
        sub = WebhookSubscription("lms", "svc", url, SECRET)
        return Settings(api=base.api, webhooks=WebhookSettings(subscriptions=(sub,), **hooks))

    with pytest.raises(ConfigError, match="not an allowed webhook host"):
        WebhookDispatcher(with_url("https://evil.example/hook", allowed_hosts=("hooks.example",)), redis, consumer="d")
    with pytest.raises(ConfigError, match="private, loopback or link-local"):
        WebhookDispatcher(with_url("https://10.0.0.5/hook", allowed_hosts=("10.0.0.5",)), redis, consumer="d")
    with pytest.raises(ConfigError, match="port 8443 is not allowed"):
        WebhookDispatcher(with_url("https://hooks.example:8443/hook", allowed_hosts=("hooks.example",)), redis, consumer="d")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[api.clients]]\nname = "svc"\ntoken = "svc-token-0123456789"\n'
                   '[[webhooks.subscriptions]]\nclient = "svc"\nurl = "http://hooks.example/x"\nsecret = "' + SECRET + '"\n')
    with pytest.raises(ConfigError, match=r"webhooks.subscriptions\[0\].url must be an https URL"):
        load_settings(cfg, env={})
    # A name that resolves to loopback is refused at connect time (no request is made) and dead-lettered at once.
    s = with_url(f"https://localhost:{receiver.port}/hook", allowed_hosts=("localhost",), allowed_ports=(str(receiver.port),),
                 ca_file=str(local_ca.ca_file))
    dispatcher = WebhookDispatcher(s, redis, consumer="d")
    result = await dispatcher.sender.post(s.webhooks.subscriptions[0], b"{}")
    await dispatcher.sender.close()
    assert not result.ok and not result.retry and "every address is private" in result.reason
    assert receiver.batches == [] and receiver.failed == 0


def test_subscriptions_load_from_the_config_with_their_secret_from_the_environment(tmp_path: Path) -> None:
    head = '[[api.clients]]\nname = "svc"\ntoken = "svc-token-0123456789"\n[[webhooks.subscriptions]]\nname = "lms"\n'
    cfg = tmp_path / "c.toml"
    cfg.write_text(head + 'client = "svc"\nurl = "https://hooks.example/x"\nsecret_env = "HOOK_SECRET"\n'
                          'events = ["delivered"]\n')
    s = load_settings(cfg, env={"HOOK_SECRET": SECRET})
    assert s.webhooks.subscriptions == (WebhookSubscription("lms", "svc", "https://hooks.example/x", SECRET, ("delivered",)),)
    assert SECRET not in repr(s)
    with pytest.raises(ConfigError, match="HOOK_SECRET is not set"):
        load_settings(cfg, env={})
    for body, error in [
        ('client = "nobody"\nurl = "https://h.example/"\nsecret = "' + SECRET + '"\n', r"\.client must name one of"),
        ('client = "svc"\nurl = "https://h.example/"\nsecret = "short"\n', r"\.secret must be a string of at least 16"),
        ('client = "svc"\nurl = "https://h.example/"\nsecret = "' + SECRET + '"\nevents = ["opened"]\n', r"\.events must be"),
    ]:
        cfg.write_text(head + body)
        with pytest.raises(ConfigError, match=error):
            load_settings(cfg, env={})


async def test_cli_lists_and_replays_dead_lettered_batches(
    redis: aioredis.Redis, redis_url: str, receiver: Receiver, local_ca: LocalCA, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\n[[api.clients]]\nname = "svc"\ntoken = "svc-token-0123456789"\n'
                   f'[webhooks]\nallowed_hosts = ["127.0.0.1"]\nallow_private = true\nca_file = "{local_ca.ca_file}"\n'
                   f'[[webhooks.subscriptions]]\nname = "lms"\nclient = "svc"\nurl = "https://127.0.0.1:{receiver.port}/hook"\n'
                   f'secret = "{SECRET}"\n')
    body = orjson.dumps({"subscription": "lms", "events": [{"id": "e1", "type": "delivered", "message": "m1"}]})
    await redis.xadd(Keys().webhook_dead, {"subscription": "lms", "body": body, "reason": "HTTP 500", "attempts": 8, "at": 1})
    assert await asyncio.to_thread(cli_main, ["--config", str(cfg), "webhooks", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["subscription"], d["reason"], d["attempts"], d["events"]) for d in listed] == [("lms", "HTTP 500", 8, 1)]
    assert await asyncio.to_thread(cli_main, ["--config", str(cfg), "webhooks", "replay"]) == 2  # ids or --all
    capsys.readouterr()
    receiver.mode = "500"
    assert await asyncio.to_thread(cli_main, ["--config", str(cfg), "webhooks", "replay", "--all"]) == 1
    assert json.loads(capsys.readouterr().out) == {"replayed": 0, "failed": 1}
    receiver.mode = "ok"
    assert await asyncio.to_thread(cli_main, ["--config", str(cfg), "webhooks", "replay", listed[0]["id"]]) == 0
    assert json.loads(capsys.readouterr().out) == {"replayed": 1, "failed": 0}
    assert [e["id"] for e in receiver.events] == ["e1"] and await redis.xlen(Keys().webhook_dead) == 0


async def test_a_dispatcher_stopped_mid_batch_posts_it_after_a_restart_under_the_same_name(
    redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider], receiver: Receiver, local_ca: LocalCA,
) -> None:
    s = settings(receiver, local_ca)
    receiver.mode = "hang"
    async with running(s, redis, fcm[1]):
        await Intake(redis, s).submit(messages(10, "k"), client="svc")
        await until(lambda: len(fcm[0].received) == 10 and receiver.hung >= 1)
    group = Keys().webhook_group("lms")
    pending = await redis.xpending(Keys().outcome_events, group)
    assert pending["pending"] >= 1 and receiver.batches == []  # read, never acknowledged
    receiver.mode = "ok"
    stop = asyncio.Event()
    task = asyncio.create_task(WebhookDispatcher(s, redis, consumer="d1").run(stop))
    await until(lambda: len(receiver.events) >= 10)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert sorted({e["message"] for e in receiver.events}) == sorted(f"k-{i}" for i in range(10))
    assert (await redis.xpending(Keys().outcome_events, group))["pending"] == 0
