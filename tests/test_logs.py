"""Structured JSON logs: one object per line, with message id, provider and outcome; extras are whitelisted."""

from __future__ import annotations

import asyncio
import io
import logging

import orjson
import redis.asyncio as aioredis
from pushgw.core.config import ApiClient, ApiSettings, Settings, WorkerSettings
from pushgw.core.logs import JsonFormatter, setup_logging
from pushgw.core.schema import Device, Message
from pushgw.gateway.worker import Worker
from pushgw.providers.base import Delivery, Outcome, Rejected, TokenInvalid
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue


class Answers:
    name = "apns"

    async def send(self, delivery: Delivery) -> Outcome:
        if delivery.device.token.startswith("d"):
            return TokenInvalid("Unregistered", status=410)
        return Rejected("BadCollapseId", status=400)

    async def close(self) -> None:
        return None


async def test_worker_logs_are_json_with_message_id_provider_and_outcome(redis: aioredis.Redis) -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream)
    try:
        q = StreamQueue(redis, Keys())
        await q.enqueue([
            Message(id="reminder-1", body="b", devices=(Device("apns", "d" * 64),)),
            Message(id="reminder-2", body="b", devices=(Device("apns", "e" * 64),)),
        ])
        stop = asyncio.Event()
        task = asyncio.create_task(Worker(Settings(worker=WorkerSettings(block_ms=20)), redis, {"apns": Answers()},
                                          consumer="w").run(stop))
        for _ in range(200):
            if await redis.xlen(Keys().dead) and await redis.xlen(Keys().invalid_tokens):
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        logging.getLogger().handlers.clear()
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    invalid = next(line for line in lines if line["msg"] == "token invalid")
    assert (invalid["msg_id"], invalid["provider"], invalid["outcome"]) == ("reminder-1", "apns", "token_invalid")
    dead = next(line for line in lines if line["msg"] == "dead letter")
    assert (dead["msg_id"], dead["provider"], dead["reason"]) == ("reminder-2", "apns", "rejected: BadCollapseId")


def test_extras_outside_the_whitelist_and_settings_secrets_are_not_written() -> None:
    token = "s3cret-token-for-course-service"
    settings = Settings(api=ApiSettings(clients=(ApiClient("course", token),)))
    record = logging.LogRecord("pushgw", logging.WARNING, __file__, 1, "settings loaded %s", (settings,), None)
    record.authorization = f"Bearer {token}"
    record.provider = "fcm"
    line = JsonFormatter().format(record)
    assert token not in line
    assert orjson.loads(line)["provider"] == "fcm"
    assert "authorization" not in orjson.loads(line)
