"""Message status and outcome events: a real worker against the provider fakes (real wire protocols over TLS),
driven through every state, then read back through the API, the Python client and the CLI's renderer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import replace
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from pushgw.campaigns.report import campaign_report
from pushgw.core.config import (
    ApiClient,
    ApiSettings,
    CategoryCap,
    PolicySettings,
    ProviderSettings,
    Settings,
    StatusSettings,
    WebPushSettings,
    WorkerSettings,
)
from pushgw.core.schema import Device, Message, parse_message
from pushgw.gateway.cli import main as cli_main
from pushgw.gateway.client import PushClient
from pushgw.gateway.intake import Intake
from pushgw.gateway.tracking import Tracker
from pushgw.gateway.worker import Worker
from pushgw.providers.apns import ApnsProvider
from pushgw.providers.base import Provider
from pushgw.providers.fakes.apns import FakeApns
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.webpush import FakePushService
from pushgw.providers.fcm import FcmProvider
from pushgw.providers.webpush import WebPushProvider
from pushgw.queue.keys import Keys
from pushgw.queue.status import IN_FLIGHT_AFTER_S, Outcome, StatusReader, Step, device_ref, record_accepted
from pushgw.queue.streams import Commit, Entry, StreamQueue
from pushgw.ratelimit.policy import DeliveryPolicy
from pushgw.users.profiles import Profiles
from pushgw.users.registry import DeviceRegistry

SVC_TOKEN = "svc-token-0123456789"
OTHER_TOKEN = "other-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"


def token(i: int) -> str:
    return f"{i:064x}"


def settings(**status: Any) -> Settings:
    return Settings(
        api=ApiSettings(clients=(ApiClient("svc", SVC_TOKEN, ("enqueue",)), ApiClient("other", OTHER_TOKEN, ("enqueue",)),
                                 ApiClient("ops", ADMIN_TOKEN, ("enqueue", "admin")))),
        worker=WorkerSettings(batch_size=50, block_ms=20, claim_idle_s=5, janitor_interval_s=0.2, drain_deadline_s=5,
                              max_attempts=2, backoff_base_s=0.01, backoff_cap_s=0.05),
        providers=ProviderSettings(timeout_s=5, concurrency=16),
        webpush=WebPushSettings(allowed_hosts=("127.0.0.1",), allow_private=True),
        policy=PolicySettings(caps=(CategoryCap("reminder", 1, 3600.0, "defer"),)),
        status=StatusSettings(**status),
    )


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def until(cond: Callable[[], Any], timeout: float = 15.0) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def outcome_events(redis: aioredis.Redis) -> list[dict[str, Any]]:
    """Every event on the stream, oldest first (an entry holds the events of one worker commit)."""
    return [e for _, f in await redis.xrange(Keys().outcome_events) for e in orjson.loads(f[b"events"])]


def worker(s: Settings, redis: aioredis.Redis, providers: dict[str, Provider]) -> Worker:
    return Worker(s, redis, providers, consumer="w1", limiter=DeliveryPolicy(redis, Keys(), s.policy))


async def test_status_follows_every_device_through_every_state(
    redis: aioredis.Redis, apns: tuple[FakeApns, ApnsProvider], fcm: tuple[FakeFcm, FcmProvider],
    web: tuple[FakePushService, WebPushProvider, Device], make_client: Callable[..., Any],
) -> None:
    (fake_apns, apns_p), (fake_fcm, fcm_p), (_, web_p, web_dev) = apns, fcm, web
    s = settings()
    reg = DeviceRegistry(redis, Keys())
    await reg.register("ada", Device("apns", token(1)))
    await reg.register("ada", Device("fcm", "fcm-ada"))
    await reg.register("ada", web_dev)
    await Profiles(redis, Keys()).update("olga", {"opt_out": {"all": True}}, merge=True)
    fake_apns.program(token(2), [(500, "InternalServerError", None)])  # once: a retry, then delivered
    fake_apns.program(token(3), [(410, "Unregistered", None)])
    fake_apns.program(token(4), [(500, "InternalServerError", None)] * 2)  # max_attempts 2: dead letter
    fake_fcm.program("fcm-late", [(503, "UNAVAILABLE", 30)])  # Retry-After beyond the ttl: expired
    api = await make_client(s)
    auth = {"Authorization": f"Bearer {SVC_TOKEN}"}
    send_at = time.time() + 3600
    messages = [
        {"id": "m-all", "user": "ada", "title": "Quiz at 9"},
        {"id": "m-retry", "devices": [{"apns": token(2)}], "title": "t"},
        {"id": "m-invalid", "devices": [{"apns": token(3)}], "title": "t"},
        {"id": "m-dead", "devices": [{"apns": token(4)}], "title": "t"},
        {"id": "m-late", "devices": [{"fcm": "fcm-late"}], "title": "t", "ttl": 5},
        {"id": "m-later", "devices": [{"fcm": "fcm-x"}], "title": "t", "send_at": send_at},
        {"id": "m-optout", "user": "olga", "title": "t"},
        {"id": "m-cap1", "devices": [{"fcm": "fcm-y"}], "user": "bea", "title": "t", "category": "reminder"},
        {"id": "m-nodev", "user": "nobody", "title": "t"},
    ]
    r = await api.post("/v1/messages/batch", json={"messages": messages}, headers=auth)
    assert r.status == 202, await r.text()
    # The second reminder to bea goes over her cap: held until the window has room again.
    r = await api.post("/v1/messages", json={"id": "m-cap2", "user": "bea", "title": "t", "category": "reminder",
                                             "devices": [{"fcm": "fcm-y"}]}, headers=auth)
    assert r.status == 202
    w = worker(s, redis, {"apns": apns_p, "fcm": fcm_p, "webpush": web_p})

    async def state(mid: str) -> str:
        r = await api.get(f"/v1/messages/{mid}", headers=auth)
        return str((await r.json())["state"]) if r.status == 200 else ""

    finals = {"m-all": "delivered", "m-retry": "delivered", "m-invalid": "failed", "m-dead": "failed",
              "m-late": "failed", "m-optout": "dropped", "m-cap1": "delivered", "m-nodev": "no_device"}
    async with running(w):
        for mid, final in finals.items():
            await until(lambda mid=mid, final=final: _is(state(mid), final))  # type: ignore[misc]
        await until(lambda: _has_step(api, auth, "m-cap2", "held"))

    async def status(mid: str, token_: str = SVC_TOKEN) -> dict[str, Any]:
        r = await api.get(f"/v1/messages/{mid}", headers={"Authorization": f"Bearer {token_}"})
        assert r.status == 200, (mid, r.status)
        return dict(await r.json())

    every = await status("m-all")
    assert every["client"] == "svc" and every["user"] == "ada"
    by_provider = {d["provider"]: d for d in every["devices"]}
    assert set(by_provider) == {"apns", "fcm", "webpush"} and all(d["state"] == "delivered" for d in every["devices"])
    assert len(by_provider["apns"]["provider_id"]) == 36  # the apns-id UUID APNs answered
    assert by_provider["fcm"]["provider_id"].startswith("projects/demo-project/messages/")
    assert by_provider["webpush"]["provider_id"].startswith("https://127.0.0.1:")  # the Location of the message
    assert every["timeline"][0]["state"] == "queued"
    assert {d["device"] for d in every["devices"]} == {device_ref(Device("apns", token(1))), "fcm:fcm-ada",
                                                        device_ref(web_dev)}

    retried = await status("m-retry")
    # (an in_flight step is written only when the delivery is still under way at the next commit: see below)
    steps = [s["state"] for s in retried["timeline"] if s["state"] != "in_flight"]
    assert steps == ["queued", "retrying", "delivered"], steps
    retrying = next(s for s in retried["timeline"] if s["state"] == "retrying")
    assert retrying["attempt"] == 2 and "InternalServerError" in retrying["last_error"] and retrying["next_attempt_at"] > 0
    assert retried["devices"][0]["attempt"] == 2

    invalid = await status("m-invalid")
    assert invalid["devices"][0]["state"] == "token_invalid" and "Unregistered" in invalid["devices"][0]["reason"]
    dead = await status("m-dead")
    assert dead["devices"][0]["state"] == "dead_lettered" and dead["devices"][0]["reason"].startswith("max_attempts")
    late = await status("m-late")
    assert late["devices"][0]["state"] == "expired"
    later = await status("m-later")
    assert later["state"] == "scheduled" and later["timeline"][0]["until"] == pytest.approx(send_at)
    optout = await status("m-optout")
    assert optout["timeline"][-1] == {**optout["timeline"][-1], "state": "dropped", "rule": "opted_out"}
    held = await status("m-cap2")
    assert held["state"] == "held" and held["timeline"][-1]["rule"] == "cap_reminder"
    assert held["timeline"][-1]["until"] > time.time()

    # Only the client that enqueued a message reads it; another gets the 404 of an unknown id; admin reads any.
    other = await api.get("/v1/messages/m-all", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    unknown = await api.get("/v1/messages/no-such-id", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert other.status == unknown.status == 404 and (await other.json()) == (await unknown.json())
    assert (await status("m-all", ADMIN_TOKEN))["state"] == "delivered"

    # A learner's recent messages, newest first, with their final state; the other client sees none of them.
    r = await api.get("/v1/users/bea/messages?limit=5", headers=auth)
    listed = (await r.json())["messages"]
    assert [m["id"] for m in listed] == ["m-cap2", "m-cap1"] and [m["state"] for m in listed] == ["held", "delivered"]
    r = await api.get("/v1/users/bea/messages", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert (await r.json())["messages"] == []
    r = await api.get("/v1/users/bea/messages?limit=0", headers=auth)
    assert r.status == 422 and (await r.json())["error"]["fields"][0]["field"] == "limit"

    # The event stream: one event per final outcome of a delivery, and the policy drop; ids unique.
    events = await outcome_events(redis)
    kinds = sorted((e["message"], e["type"]) for e in events)
    assert kinds == sorted([("m-all", "delivered")] * 3 + [("m-retry", "delivered"), ("m-invalid", "token_invalid"),
                           ("m-dead", "dead_lettered"), ("m-late", "expired"), ("m-optout", "dropped"),
                           ("m-cap1", "delivered")])
    assert len({e["id"] for e in events}) == len(events)
    assert all(e["client"] == "svc" for e in events)
    apns_event = next(e for e in events if e["message"] == "m-all" and e["provider"] == "apns")
    assert apns_event["provider_id"] == by_provider["apns"]["provider_id"]

    # The Python client reads the same status, as an admin would.
    client = PushClient(redis, s)
    assert (await client.message_status("m-dead"))["devices"][0]["state"] == "dead_lettered"  # type: ignore[index]
    assert [m["id"] for m in await client.user_messages("bea", 1)] == ["m-cap2"]


async def test_a_delivery_under_way_shows_in_flight_and_stays_in_the_timeline_once_delivered(
    redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider],
) -> None:
    fake, provider = fcm
    fake.hang = True  # FCM holds its answer: the delivery stays in flight
    s = settings()
    await Intake(redis, s).submit([{"id": "slow", "devices": [{"fcm": "slow-tok"}], "title": "t"}], client="svc")
    client = PushClient(redis, s)
    async with running(worker(s, redis, {"fcm": provider})):
        await until(lambda: fake.hanging == 1)
        await until(lambda: _state_is(client, "slow", "in_flight"))
        under_way = await client.message_status("slow")
        assert under_way is not None
        assert under_way["devices"] == [{"device": "fcm:slow-tok", "state": "in_flight", "at": under_way["timeline"][1]["at"],
                                         "attempt": 1}]
        fake.resume()
        await until(lambda: _state_is(client, "slow", "delivered"))
    done = await client.message_status("slow")
    assert done is not None and [s["state"] for s in done["timeline"]] == ["queued", "in_flight", "delivered"]


async def _state_is(client: PushClient, mid: str, state: str) -> bool:
    status = await client.message_status(mid)
    return status is not None and status["state"] == state


async def _is(state: Any, want: str) -> bool:
    return bool(await state == want)


async def _has_step(api: Any, auth: dict[str, str], mid: str, step: str) -> bool:
    r = await api.get(f"/v1/messages/{mid}", headers=auth)
    return r.status == 200 and step in [s["state"] for s in (await r.json())["timeline"]]


async def test_status_and_events_off_write_nothing(redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider]) -> None:
    s = settings(enabled=False, events=False)
    await Intake(redis, s).submit([{"id": "quiet", "devices": [{"fcm": "t1"}], "title": "t"}])
    w = worker(s, redis, {"fcm": fcm[1]})
    assert w.track is None
    async with running(w):
        await until(lambda: len(fcm[0].received) == 1)
        q = StreamQueue(redis, Keys())
        await until(lambda: _drained(q))
    assert await redis.keys("pushgw:ms:*") == await redis.keys("pushgw:stu:*") == []
    assert await redis.exists(Keys().outcome_events) == 0


@pytest.mark.parametrize(("enabled", "events"), [(True, False), (False, True)])
async def test_status_and_events_are_turned_off_apart(redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider],
                                                      enabled: bool, events: bool) -> None:
    s = settings(enabled=enabled, events=events)
    await Intake(redis, s).submit([{"id": "half", "user": "ines", "devices": [{"fcm": "t1"}], "title": "t"}])
    async with running(worker(s, redis, {"fcm": fcm[1]})):
        await until(lambda: len(fcm[0].received) == 1)
        await until(lambda: _drained(StreamQueue(redis, Keys())))
    status = await PushClient(redis, s).message_status("half")
    assert (status is not None and status["state"] == "delivered") is enabled
    assert bool(await redis.keys("pushgw:stu:*")) is enabled
    assert [e["type"] for e in await outcome_events(redis)] == (["delivered"] if events else [])


async def _drained(q: StreamQueue) -> bool:
    s = await q.stats()
    return s.pending == 0 and s.lag == 0


async def test_retention_bounds_status_keys_and_measures_their_memory(
    redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider], capsys: pytest.CaptureFixture[str],
) -> None:
    """Every status key carries the retention TTL (so keys expire), and the bytes one retained message costs
    are measured with MEMORY USAGE (docs/benchmarks.md quotes this test's output)."""
    s = settings(retention_s=2)
    n = 200
    await Intake(redis, s).submit([{"id": f"r-{i}", "user": f"u{i % 50}", "title": "Your weekly summary is ready",
                                    "devices": [{"fcm": f"fcm-token-{i:0>140}"}]}
                                   for i in range(n)], client="svc")
    async with running(worker(s, redis, {"fcm": fcm[1]})):
        await until(lambda: _all_delivered(redis, n))
    keys = [k async for k in redis.scan_iter(match="pushgw:ms:*", count=1000)]
    users = [k async for k in redis.scan_iter(match="pushgw:stu:*", count=1000)]
    assert len(keys) == n and len(users) == 50
    for k in keys:
        assert 0 < await redis.ttl(k) <= 2
    for k in users:  # a learner's list outlives the statuses it names: two retention periods
        assert 0 < await redis.ttl(k) <= 4
    status_bytes = sum([await redis.memory_usage(k) or 0 for k in keys])
    user_bytes = sum([await redis.memory_usage(k) or 0 for k in users])
    stream_bytes = await redis.memory_usage(Keys().outcome_events, samples=0) or 0
    with capsys.disabled():
        print(f"\nstatus memory: {status_bytes / n:.0f} B per message (status string, 1 device, delivered), "
              f"{user_bytes / n:.0f} B per message in the learners' lists, "
              f"{stream_bytes / n:.0f} B per outcome event")
    assert status_bytes / n < 2048  # a bound for the documentation, measured above
    await until(lambda: _none_left(redis), timeout=10)


async def _all_delivered(redis: aioredis.Redis, n: int) -> bool:
    return len(await outcome_events(redis)) == n


async def _none_left(redis: aioredis.Redis) -> bool:
    return not (await redis.keys("pushgw:ms:*") or await redis.keys("pushgw:stu:*"))


def test_trace_prints_a_message_and_a_learners_messages(redis_url: str, tmp_path: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    async def seed() -> None:
        r = aioredis.from_url(redis_url)
        await r.flushall()
        await Intake(r, settings()).submit([{"id": "tr-1", "user": "cleo", "title": "t",
                                             "devices": [{"fcm": "t"}]}], client="svc")
        await r.aclose()

    asyncio.run(seed())
    config = tmp_path / "c.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\n')
    assert cli_main(["--config", str(config), "trace", "tr-1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("message tr-1: queued (user cleo, client svc)") and " queued " in out
    assert cli_main(["--config", str(config), "trace", "--user", "cleo", "--json"]) == 0
    assert '"id": "tr-1"' in capsys.readouterr().out
    assert cli_main(["--config", str(config), "trace", "nope"]) == 1
    assert cli_main(["--config", str(config), "trace"]) == 2


async def test_campaign_report_counts_a_learner_delivered_once_beside_one_event_per_device(
    redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider],
) -> None:
    """Two devices, one of them retried: two `delivered` events (one per delivery, for upstream feeds) while the
    campaign report, fed by the sets written in the same commit, counts the learner delivered once."""
    fake, provider = fcm
    s = settings()
    reg = DeviceRegistry(redis, Keys())
    await reg.register("dana", Device("fcm", "dana-phone"))
    await reg.register("dana", Device("fcm", "dana-tablet"))
    fake.program("dana-tablet", [(503, "UNAVAILABLE", None)])
    await Intake(redis, s).submit([{"id": "spring-dana", "user": "dana", "title": "New module", "campaign": "spring"}],
                                  client="svc")
    async with running(worker(s, redis, {"fcm": provider})):
        await until(lambda: _delivered_events(redis, 2))
    events = await outcome_events(redis)
    assert sorted((e["type"], e["campaign"], e["device"]) for e in events) == [
        ("delivered", "spring", "fcm:dana-phone"), ("delivered", "spring", "fcm:dana-tablet")]
    report = await campaign_report(redis, Keys(), "spring")
    assert [(a["arm"], a["delivered"], a["failed"]) for a in report["arms"]] == [("default", 1, 0)]


async def _delivered_events(redis: aioredis.Redis, n: int) -> bool:
    return len([e for e in await outcome_events(redis) if e["type"] == "delivered"]) == n


async def test_an_id_with_a_slash_is_found_and_an_enqueue_only_client_needs_its_scope(
    redis: aioredis.Redis, make_client: Callable[..., Any],
) -> None:
    s = replace(settings(), api=ApiSettings(clients=(ApiClient("svc", SVC_TOKEN, ("enqueue",)),
                                                     ApiClient("dev", OTHER_TOKEN, ("devices",)))))
    api = await make_client(s)
    auth = {"Authorization": f"Bearer {SVC_TOKEN}"}
    r = await api.post("/v1/messages", json={"id": "course/42/quiz", "user": "ada", "title": "t"}, headers=auth)
    assert r.status == 202
    r = await api.get("/v1/messages/course/42/quiz", headers=auth)
    assert r.status == 200 and (await r.json())["state"] == "queued"
    r = await api.get("/v1/messages/course/42/quiz", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert r.status == 403  # the devices scope alone does not read message status


async def test_a_commit_written_twice_reads_back_once_and_a_key_the_intake_did_not_write_still_expires(
    redis: aioredis.Redis,
) -> None:
    """A message enqueued straight into the queue (as campaign fan-outs and automations do) has no status until a
    worker writes one: the worker's append creates the key with the retention TTL. A commit retried after a
    lost reply appends its records again; the reader keeps one of each."""
    q = StreamQueue(redis, Keys(), status_retention_s=600, events_maxlen=1000)
    msg = parse_message({"id": "fanned-1", "user": "ines", "title": "t", "campaign": "spring"})
    delivered = Outcome("delivered", msg, 1_764_800_000_123, "fcm:ines-phone", "fcm", 1, provider_id="pid-1")
    commit = Commit(outcomes=[delivered])
    await q.commit(commit)
    await q.commit(commit)
    assert 590 < await redis.ttl(Keys().status("fanned-1")) <= 600
    status = await StatusReader(redis, Keys(), 600).message("fanned-1")
    assert status is not None and status["state"] == "delivered"
    assert status["timeline"] == [{"at": 1_764_800_000.123, "state": "delivered", "device": "fcm:ines-phone",
                                   "provider": "fcm", "attempt": 1, "provider_id": "pid-1"}]


async def test_a_step_that_puts_a_message_off_keeps_its_status_that_much_longer(redis: aioredis.Redis) -> None:
    """Scheduled (by the intake) or held (by a worker) until a later time: the status is kept the retention
    after that time, so it outlives the message's last step however far it was put off."""
    s = settings(retention_s=600)
    now = time.time()
    await Intake(redis, s).submit([{"id": "later", "devices": [{"fcm": "t1"}], "title": "t", "send_at": now + 3600},
                                   {"id": "held", "devices": [{"fcm": "t2"}], "title": "t"}])
    # (lower bounds with room for a slow machine; without the rule both would be at most 600)
    assert 600 + 3000 < await redis.ttl(Keys().status("later")) <= 600 + 3601
    assert 0 < await redis.ttl(Keys().status("held")) <= 600
    q = StreamQueue(redis, Keys(), status_retention_s=600, events_maxlen=1000)
    held = Step("held", int(time.time() * 1000) + 1, "held", "", {"rule": "quiet_hours", "until": now + 7200}, 7200)
    await q.commit(Commit(steps=[held]))
    assert 600 + 7000 < await redis.ttl(Keys().status("held")) <= 600 + 7200
    status = await StatusReader(redis, Keys(), 600).message("held")
    assert status is not None and status["state"] == "held" and status["timeline"][-1]["rule"] == "quiet_hours"


async def test_the_intakes_write_after_a_workers_held_step_keeps_the_longer_ttl(redis: aioredis.Redis) -> None:
    """A worker can take a message and hold it before the intake's status write runs (between the enqueue and
    that call): the intake's records are appended and the held step's longer TTL stays."""
    now = time.time()
    q = StreamQueue(redis, Keys(), status_retention_s=600, events_maxlen=1000)
    held = Step("early", int(now * 1000), "held", "", {"rule": "quiet_hours", "until": now + 7200}, 7200)
    await q.commit(Commit(steps=[held]))
    await record_accepted(redis, Keys(), [Message(id="early", devices=(Device("fcm", "t1"),), title="t")],
                          int(now * 1000) - 1, retention_s=600)
    assert 600 + 7000 < await redis.ttl(Keys().status("early")) <= 600 + 7200
    status = await StatusReader(redis, Keys(), 600).message("early")
    assert status is not None and [t["state"] for t in status["timeline"]] == ["queued", "held"]


class _Job:
    """The worker's job as the tracker sees it (gateway/settle.py `Job`)."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.entry = Entry("1-0", b"", 1, 0)
        self.started_ms = 0
        self.devices: Collection[Device] = ()


def test_an_in_flight_step_is_written_only_for_a_job_still_under_way_a_second_after_it_started() -> None:
    now = [1_764_800_000.0]
    commits = [Commit()]
    tracker = Tracker(StatusSettings(), lambda: commits[-1], lambda: now[0])
    msg = parse_message({"id": "m", "title": "t", "devices": [{"fcm": "a"}, {"fcm": "b"}]})
    quick, slow = _Job(msg), _Job(msg)
    tracker.in_flight(quick, msg.devices[:1])
    tracker.in_flight(slow, msg.devices[1:])
    under_way = [slow]  # the settler's jobs: `quick` settled within the flush interval
    now[0] += IN_FLIGHT_AFTER_S / 2
    tracker.due_in_flight(commits[-1], under_way)
    assert commits[-1].started == []  # not due yet
    now[0] += IN_FLIGHT_AFTER_S / 2
    tracker.due_in_flight(commits[-1], under_way)
    assert [(f.message, f.attempt, list(f.devices)) for f in commits[-1].started] == [("m", 1, list(msg.devices[1:]))]
    commits.append(Commit())
    now[0] += 10
    tracker.due_in_flight(commits[-1], under_way)
    assert commits[-1].started == []  # written once


async def test_a_learners_list_reads_newest_first_across_two_periods_and_passes_over_expired_statuses(
    redis: aioredis.Redis,
) -> None:
    retention = 1000
    now_ms = int(time.time() * 1000)
    earlier_ms = now_ms - retention * 1000  # the period before this one
    older = [parse_message({"id": f"old-{i}", "user": "olga", "title": "t", "devices": [{"fcm": "x"}]}) for i in range(3)]
    newer = [parse_message({"id": f"new-{i}", "user": "olga", "title": "t", "devices": [{"fcm": "x"}]}) for i in range(2)]
    await record_accepted(redis, Keys(), older, earlier_ms, retention_s=retention)
    await record_accepted(redis, Keys(), newer, now_ms, retention_s=retention)
    await redis.delete(Keys().status("old-1"))  # its retention ran out
    reader = StatusReader(redis, Keys(), retention)
    assert [m["id"] for m in await reader.user("olga", 10)] == ["new-1", "new-0", "old-2", "old-0"]
    assert [m["id"] for m in await reader.user("olga", 3)] == ["new-1", "new-0", "old-2"]
    assert await reader.user("nobody", 3) == []
