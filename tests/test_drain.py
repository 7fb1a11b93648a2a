"""SIGTERM drains a real `pushgw worker` process: it stops reading, finishes in flight, acks, exits.

The worker runs as a separate process (the console script), talks to this run's private Redis and
delivers to the FCM fake over TLS; the fake answers slowly so that deliveries are in flight when
the signal arrives. The time to drain is printed, not asserted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import redis.asyncio as aioredis
from pushgw.core.config import FcmApp, ProviderSettings, Settings, WorkerSettings
from pushgw.core.schema import Device, Message
from pushgw.gateway.worker import Worker
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.tls import LocalCA
from pushgw.providers.fcm import FcmProvider
from pushgw.queue.keys import Keys
from pushgw.queue.streams import StreamQueue

N = 120
PREFIX = "drain"


async def test_sigterm_drains_in_flight_and_loses_nothing(
    redis: aioredis.Redis, redis_url: str, local_ca: LocalCA, tmp: Path
) -> None:
    async with FakeFcm(local_ca) as fcm:
        fcm.delay_s = 0.4
        account = fcm.service_account(tmp)
        cfg = tmp / "pushgw.toml"
        cfg.write_text(
            f"""
[redis]
url = "{redis_url}"
prefix = "{PREFIX}"
[worker]
processes = 1
block_ms = 50
max_inflight = 16
drain_deadline_s = 20
[providers]
concurrency = 16
timeout_s = 5
[fcm.default]
service_account_file = "{account}"
base_url = "{fcm.base_url}"
ca_file = "{local_ca.ca_file}"
[log]
level = "WARNING"
"""
        )
        q = StreamQueue(redis, Keys(PREFIX))
        await q.enqueue([Message(id=f"m{i}", body="quiz tomorrow", devices=(Device("fcm", f"tok{i}"),)) for i in range(N)])
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pushgw.gateway.cli", "--config", str(cfg), "worker", "--consumer-prefix", "drain-test",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while len(fcm.received) < 16:  # the worker is up and delivering
                assert time.monotonic() < deadline, "worker never delivered"
                assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            print(f"\ndrained in {time.monotonic() - t0:.2f} s; delivered before exit: {len(fcm.received)} of {N}")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        delivered_by_first = len(fcm.received)
        stats = await q.stats()
        assert stats.pending == 0  # everything it read was finished and acknowledged
        assert delivered_by_first + stats.lag == N  # the rest was never read: stopped reading at SIGTERM
        assert delivered_by_first < N

        # A second worker picks up exactly the rest: nothing lost, nothing sent twice.
        fcm.delay_s = 0.0
        settings = Settings(
            worker=WorkerSettings(block_ms=20), providers=ProviderSettings(timeout_s=5, concurrency=16),
            fcm=(FcmApp("default", str(account), base_url=fcm.base_url, ca_file=local_ca.ca_file),),
        )
        settings = _with_prefix(settings, PREFIX)
        provider = FcmProvider(settings.fcm, settings.providers)
        stop = asyncio.Event()
        task = asyncio.create_task(Worker(settings, redis, {"fcm": provider}, consumer="second").run(stop))
        try:
            deadline = time.monotonic() + 30
            while len(fcm.received) < N and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await provider.close()
        tokens = [r.message["token"] for r in fcm.received]
        assert sorted(tokens) == sorted(f"tok{i}" for i in range(N))


def _with_prefix(settings: Settings, prefix: str) -> Settings:
    return replace(settings, redis=replace(settings.redis, prefix=prefix))


def test_workers_of_a_killed_supervisor_drain_and_exit(redis_url: str, tmp: Path) -> None:
    """SIGKILL the process that supervises the pool: its workers notice, drain and exit by themselves."""
    import subprocess

    script = tmp / "supervisor.py"
    script.write_text(
        "import sys, time\n"
        "from pushgw.core.config import RedisSettings, Settings, WorkerSettings\n"
        "from pushgw.gateway.pool import Pool\n"
        "if __name__ == '__main__':\n"
        f"    s = Settings(redis=RedisSettings(prefix='orphan'), worker=WorkerSettings(block_ms=50, drain_deadline_s=2))\n"
        f"    pool = Pool(s, {redis_url!r}, 2, consumer_prefix='orphan')\n"
        "    pool.start()\n"
        "    print(' '.join(str(p.pid) for p in pool.children.values()), flush=True)\n"
        "    time.sleep(60)\n"
    )
    sup = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert sup.stdout is not None
    pids = [int(p) for p in sup.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(1.5)  # the workers are up and watching
    sup.kill()
    sup.wait()
    started = time.monotonic()
    alive = pids
    for _ in range(300):  # bounded: at most 30 s
        alive = [p for p in pids if _alive(p)]
        if not alive:
            break
        time.sleep(0.1)
    print(f"\norphaned workers exited {time.monotonic() - started:.1f} s after their supervisor was killed")
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
