"""The `pushgw` command line against this run's private Redis: dead letters and configuration errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pushgw.core.schema import Device, Message
from pushgw.gateway.cli import main
from pushgw.queue.keys import Keys
from pushgw.queue.streams import Commit, DeadLetter, StreamQueue

PREFIX = "clitest"


def _config(tmp: Path, redis_url: str) -> str:
    path = tmp / "pushgw.toml"
    path.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}"\n')
    return str(path)


def _run(coro_fn, redis_url: str):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        client = aioredis.from_url(redis_url)
        try:
            return await coro_fn(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _seed_dead_letters(redis_url: str) -> None:
    async def seed(r: aioredis.Redis) -> None:
        await r.delete(*(Keys(PREFIX).dead, Keys(PREFIX).stream)) if await r.exists(Keys(PREFIX).dead) else None
        q = StreamQueue(r, Keys(PREFIX))
        dev = Device("fcm", "tok-dead")
        await q.commit(Commit(dead=[
            DeadLetter(Message(id=f"quiz-{i}", body="b").with_devices((dev,)), f"max_attempts: 503 #{i}", 8, "fcm", 1)
            for i in range(3)
        ]))

    _run(seed, redis_url)


def _json_out(capsys: pytest.CaptureFixture[str]) -> object:
    return json.loads(capsys.readouterr().out)


def test_dlq_count_list_replay_purge(redis_url: str, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp, redis_url)
    _seed_dead_letters(redis_url)
    assert main(["--config", cfg, "dlq", "count"]) == 0
    assert _json_out(capsys) == {"dead_letters": 3}
    assert main(["--config", cfg, "dlq", "list", "--count", "2"]) == 0
    listed = _json_out(capsys)
    assert isinstance(listed, list) and len(listed) == 2
    assert listed[0]["reason"] == "max_attempts: 503 #0" and listed[0]["attempts"] == 8
    assert listed[0]["message"]["id"] == "quiz-0"
    assert main(["--config", cfg, "dlq", "replay", listed[0]["entry_id"]]) == 0
    assert _json_out(capsys) == {"replayed": 1}
    stream_len = _run(lambda r: r.xlen(Keys(PREFIX).stream), redis_url)
    assert stream_len >= 1
    assert main(["--config", cfg, "dlq", "replay"]) == 2  # neither ids nor --all: refused, nothing replayed
    assert "--all" in capsys.readouterr().err
    assert main(["--config", cfg, "dlq", "purge", "--all"]) == 0
    assert _json_out(capsys) == {"purged": 2}


def test_config_error_names_the_setting_and_stops(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp / "bad.toml"
    path.write_text("[worker]\nbatch_size = \"lots\"\n")
    assert main(["--config", str(path), "dlq", "count"]) == 2
    err = capsys.readouterr().err
    assert "worker.batch_size" in err


def test_send_and_devices(redis_url: str, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp, redis_url)
    assert main(["-c", cfg, "devices", "add", "learner-3", "--device", '{"fcm": "tok-cli"}']) == 0
    assert _json_out(capsys) == {"registered": "learner-3"}
    assert main(["-c", cfg, "devices", "list", "learner-3"]) == 0
    assert _json_out(capsys) == [{"fcm": "tok-cli", "key": "fcm:tok-cli"}]
    args = ["-c", cfg, "send", "--user", "learner-3", "--title", "New module", "--body", "Module 4 is out", "--id", "cli-1"]
    assert main(args) == 0
    assert _json_out(capsys) == [{"id": "cli-1", "status": "queued"}]
    assert main(args) == 0
    assert _json_out(capsys) == [{"id": "cli-1", "status": "duplicate"}]
    batch = tmp / "batch.json"
    batch.write_text(json.dumps([{"id": "cli-2", "user": "learner-3", "body": "b"}, {"user": "learner 3", "body": "b"}]))
    assert main(["-c", cfg, "send", "--json", str(batch)]) == 2
    err = capsys.readouterr().err
    assert "messages[1].user" in err

    async def ids(r: aioredis.Redis) -> list[str]:
        return [json.loads(f[b"m"])["id"] for _, f in await r.xrange(Keys(PREFIX).stream)]

    assert _run(ids, redis_url)[-1] == "cli-1"  # the invalid batch queued nothing
    assert main(["-c", cfg, "devices", "rm", "learner-3", "--key", "fcm:tok-cli"]) == 0
    assert _json_out(capsys) == {"removed": True}


def test_vapid_keygen_prints_the_application_server_key(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vapid-keygen", str(tmp / "v")]) == 0
    out = _json_out(capsys)
    assert isinstance(out, dict) and Path(out["vapid_private_key_file"]).exists() and len(out["application_server_key"]) == 87
    assert main(["vapid-keygen", str(tmp / "v")]) != 0  # never overwrites
    assert "already exists" in capsys.readouterr().err
