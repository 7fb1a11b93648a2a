"""The README's campaign walk-through, run as written, so it cannot rot.

The README's script block is saved as `campaign_walkthrough.py` and every line of its command block
is run in a subprocess (the real `pushgw` CLI and Python), against this run's private Redis. What
`pushgw serve` would do meanwhile runs here in a thread: a worker (with a stand-in for FCM that
accepts every push) and a fan-out runner, the two background jobs of a worker process. The pilot
report the README shows must be exactly what the command prints, and the script's printed lines
must be the ones the README quotes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import redis.asyncio as aioredis
from pushgw.campaigns.fanout import FanoutRunner
from pushgw.core.config import RedisSettings, Settings, WorkerSettings
from pushgw.gateway.worker import Worker
from pushgw.providers.fakes.accept import AcceptAll
from pushgw.queue.keys import Keys
from pushgw.ratelimit.policy import DeliveryPolicy

README = Path(__file__).resolve().parent.parent / "README.md"
PREFIX = "readme"


def block(text: str, name: str) -> str:
    m = re.search(rf"<!-- readme-example: {re.escape(name)} -->\n```\w*\n(.*?)```", text, re.S)
    assert m, f"README has no example block {name!r}"
    return m.group(1)


class Gateway:
    """A worker and a fan-out runner in a thread of their own: the part of `pushgw serve` the walk-through needs."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        redis = aioredis.from_url(self.redis_url)
        settings = Settings(redis=RedisSettings(prefix=PREFIX), worker=WorkerSettings(block_ms=50, drain_deadline_s=5))
        worker = Worker(settings, redis, {"fcm": AcceptAll()}, consumer="readme-worker",
                        limiter=DeliveryPolicy(redis, Keys(PREFIX), settings.policy))
        tasks = [asyncio.create_task(worker.run(self.stop)),
                 asyncio.create_task(FanoutRunner(redis, settings).run(self.stop, poll_s=0.1))]
        self.ready.set()
        try:
            await asyncio.gather(*tasks)
        finally:
            await redis.aclose()

    def __enter__(self) -> Gateway:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        if self.thread.is_alive():
            frame = sys._current_frames().get(self.thread.ident or 0)
            tasks = [t.get_stack() for t in asyncio.all_tasks(self.loop)]
            raise AssertionError(f"the worker thread did not stop: {traceback.format_stack(frame)} {tasks}")


def test_the_readme_campaign_walkthrough_runs_as_written(redis_url: str, tmp_path: Path) -> None:
    text = README.read_text()
    (tmp_path / "campaign_walkthrough.py").write_text(block(text, "campaign_walkthrough.py"))
    commands = [line for line in block(text, "commands").splitlines() if line.strip()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHGW_")}
    env |= {"PUSHGW_REDIS_URL": redis_url, "PUSHGW_REDIS_PREFIX": PREFIX}
    pushgw = Path(sys.executable).with_name("pushgw")

    async def flush() -> None:
        r = aioredis.from_url(redis_url)
        await r.flushall()
        await r.aclose()

    asyncio.run(flush())
    outputs: list[str] = []
    with Gateway(redis_url):
        for line in commands:
            argv = shlex.split(line)
            if argv[0] == "python":
                argv[0] = sys.executable
            else:
                assert argv[0] == "pushgw", line
                argv[0] = str(pushgw)
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (line, done.stderr)
            outputs.append(done.stdout)
    script, report, launch, status = outputs
    for printed in script.splitlines():
        assert f"`{printed}`" in text, f"the README does not quote the script's line {printed!r}"
    assert report == block(text, "report")
    assert (tmp_path / "stats-2-pilot.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(launch)["stages"][-1] == {"percent": 100.0, "weights": {"social": 1.0}}
    job = json.loads(status)["fanout"]
    pilot = re.search(r"pilot: (\d+) learners sent to, (\d+) held out, (\d+) left for the rollout", script)
    assert pilot is not None
    assert job["state"] == "done" and job["sent"] == int(pilot.group(3)) and job["control"] == int(pilot.group(2))
    assert job["sent"] + job["control"] + job["outside"] == job["members"] == 4000
