"""FCM topic and condition sends: validated at the door, planned as one delivery per message, sent as FCM v1
`message.topic` / `message.condition` to the FCM fake, which checks both as FCM does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pushgw.core.config import FcmApp, ProviderSettings, RedisSettings, Settings, WorkerSettings
from pushgw.core.schema import FcmTarget, MessageInvalid, condition_topics, loads_message, parse_message
from pushgw.gateway.worker import Worker
from pushgw.providers.base import Delivered, Delivery, Rejected
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.fcm import FcmProvider
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue

CONDITION = "'a' in topics && ('b' in topics || !('c' in topics))"


def refused(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(MessageInvalid) as e:
        parse_message(obj)
    return [err.field for err in e.value.errors]


def test_topic_and_condition_are_targets_of_their_own() -> None:
    assert parse_message({"fcm_topic": "module-news", "body": "b"}).fcm_target == FcmTarget("topic", "module-news")
    assert parse_message({"fcm_condition": CONDITION, "body": "b"}).fcm_target == FcmTarget("condition", CONDITION)


@pytest.mark.parametrize(("obj", "field"), [
    ({"fcm_topic": "/topics/news"}, "fcm_topic"),
    ({"fcm_topic": "news feed"}, "fcm_topic"),
    ({"fcm_topic": "x" * 901}, "fcm_topic"),
    ({"fcm_topic": 7}, "fcm_topic"),
    ({"fcm_topic": "news", "user": "u"}, "user"),
    ({"fcm_topic": "news", "devices": [{"fcm": "tok"}]}, "devices"),
    ({"fcm_topic": "news", "fcm_condition": "'a' in topics"}, "fcm_condition"),
    ({"fcm_condition": "'a' in topics &&"}, "fcm_condition"),
    ({"fcm_condition": "('a' in topics"}, "fcm_condition"),
    ({"fcm_condition": "'a' in topics & 'b' in topics"}, "fcm_condition"),
    ({"fcm_condition": "'a' in topics || 'b' in topics || 'c' in topics || 'd' in topics || 'e' in topics "
                       "|| 'f' in topics"}, "fcm_condition"),
])
def test_bad_topic_targets_are_refused_by_name(obj: dict[str, Any], field: str) -> None:
    assert refused({**obj, "body": "b"}) == [field]


def test_condition_grammar_accepts_nesting_and_counts_topics() -> None:
    assert condition_topics("(('a' in topics))") == ["a"]
    assert condition_topics("'a' in topics || 'b' in topics && 'c' in topics") == ["a", "b", "c"]
    assert condition_topics("'a' in topics && !('b' in topics)") == ["a", "b"]
    assert condition_topics("'a' in topics !") is None
    assert condition_topics("'a' in topics 'b' in topics") is None
    assert condition_topics("()") is None


def test_a_topic_message_round_trips_through_the_queue_form_and_its_retry() -> None:
    msg = parse_message({"id": "n1", "fcm_topic": "module-news", "body": "New module"})
    assert loads_message(msg.dumps()).fcm_target == msg.fcm_target
    retry = loads_message(msg.with_devices((FcmTarget("topic", "module-news").device,)).dumps())
    assert retry.fcm_target == msg.fcm_target and retry.resolved and retry.devices == ()


@pytest.fixture
async def fcm(local_ca: LocalCA, tmp_path: Path) -> AsyncIterator[tuple[FakeFcm, FcmProvider, FcmApp]]:
    async with FakeFcm(local_ca) as fake:
        account = fake.service_account(tmp_path / "sa", "demo-project")
        app = FcmApp("default", service_account_file=str(account), base_url=fake.base_url, ca_file=str(local_ca.ca_file))
        provider = FcmProvider([app], ProviderSettings(timeout_s=5.0))
        yield fake, provider, app
        await provider.close()


async def test_topic_and_condition_are_sent_as_fcm_v1_targets(fcm: tuple[FakeFcm, FcmProvider, FcmApp]) -> None:
    fake, provider, _ = fcm
    for obj, target in (({"fcm_topic": "module-news"}, {"topic": "module-news"}),
                        ({"fcm_condition": CONDITION}, {"condition": CONDITION})):
        msg = parse_message({"id": "n1", "body": "New module", **obj})
        assert msg.fcm_target is not None
        out = await provider.send(Delivery(msg, msg.fcm_target.device))
        assert isinstance(out, Delivered), out
        assert fake.received[-1].message == {
            **target, "notification": {"body": "New module"},
            "data": {"pushgw_id": "n1", "pushgw_category": "general"},
            "android": {"priority": "normal", "notification": {"tag": "n1"}},
        }


async def test_fcm_fake_refuses_a_condition_with_six_topics_as_fcm_does(
        fcm: tuple[FakeFcm, FcmProvider, FcmApp]) -> None:
    fake, provider, _ = fcm
    msg = parse_message({"id": "n2", "body": "b", "fcm_condition": "'a' in topics"})
    six = " || ".join(f"'t{i}' in topics" for i in range(6))
    target = FcmTarget("condition", six)
    bad = replace(msg, fcm_target=target)  # past the door's check: the fake checks on its own
    out = await provider.send(Delivery(bad, target.device))
    assert isinstance(out, Rejected) and "5 topics" in out.reason
    assert not fake.received


async def test_worker_sends_a_topic_message_once_with_the_app_it_names(
        redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider, FcmApp]) -> None:
    fake, provider, app = fcm
    settings = Settings(redis=RedisSettings(prefix="topics"), worker=WorkerSettings(block_ms=20),
                        providers=ProviderSettings(timeout_s=5), fcm=(app,))
    q = StreamQueue(redis, Keys("topics"))
    await q.enqueue([parse_message({"id": "t1", "fcm_topic": "module-news", "body": "New module"}),
                     parse_message({"id": "t2", "fcm_condition": CONDITION, "body": "Quiz"})])
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(settings, redis, {"fcm": provider}, consumer="topics").run(stop))
    try:
        deadline = time.monotonic() + 20
        while len(fake.received) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # nothing more arrives: one request per message, not per device
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    targets = sorted(str(r.message.get("topic") or r.message.get("condition")) for r in fake.received)
    assert targets == sorted([CONDITION, "module-news"])
    assert all("token" not in r.message for r in fake.received)
    assert (await q.stats()).pending == 0


async def test_a_failed_topic_send_is_retried_as_the_same_topic_send(
        redis: aioredis.Redis, fcm: tuple[FakeFcm, FcmProvider, FcmApp]) -> None:
    fake, provider, app = fcm
    fake.program("module-news", [(503, "UNAVAILABLE", 0)])
    settings = Settings(redis=RedisSettings(prefix="topicretry"), worker=WorkerSettings(block_ms=20, backoff_base_s=0.05),
                        providers=ProviderSettings(timeout_s=5), fcm=(app,))
    await StreamQueue(redis, Keys("topicretry")).enqueue(
        [parse_message({"id": "t3", "fcm_topic": "module-news", "body": "New module"})])
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(settings, redis, {"fcm": provider}, consumer="topicretry").run(stop))
    try:
        deadline = time.monotonic() + 20
        while not fake.received and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert [r.message.get("topic") for r in fake.failed_then_ok] == ["module-news"]
    assert len(fake.received) == 1 and "token" not in fake.received[0].message
