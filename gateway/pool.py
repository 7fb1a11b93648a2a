"""Worker processes on one host: spawn N, restart the ones that crash, drain them all on SIGTERM.

Each process is one consumer of the group with a stable name (`<host>:<index>`), so a process
that restarts re-reads its own pending entries at once instead of waiting for the janitor.
Processes share nothing but Redis and the Prometheus multiprocess folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from typing import Any

from redis.exceptions import RedisError

from ..automations.engine import AutomationRunner
from ..campaigns.fanout import FanoutRunner
from ..core.config import Settings
from ..core.logs import setup_logging
from ..core.metrics import HELD, mark_process_dead
from ..providers import build_providers
from ..queue.connection import blocking_redis
from ..queue.keys import Keys
from ..queue.sharded import shard_clients, shard_map
from ..ratelimit.policy import DeliveryPolicy
from ..ratelimit.provider_rate import rates_for
from .multishard import OwnedShards, ShardedPolicy, ShardedRegistry, key_client
from .shard_owner import BEAT_S, ShardOwner
from .worker import Worker

try:
    import uvloop
except ImportError:  # pragma: no cover - a dependency everywhere but Windows (pyproject.toml)
    uvloop = None  # type: ignore[assignment]

log = logging.getLogger("pushgw.pool")


def consumer_name(index: int, prefix: str | None = None) -> str:
    return f"{prefix or socket.gethostname()}:{index}"


def install_loop() -> None:
    """uvloop where available: measurably cheaper per callback than the default loop."""
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def make_redis(redis_url: str, max_connections: int = 64, timeout_s: float | None = None) -> Any:
    """A Redis client on a blocking pool (queue/connection.py `blocking_redis`: also for Sentinel URLs)."""

    return blocking_redis(redis_url, max_connections=max_connections, timeout_s=timeout_s)


async def run_worker(settings: Settings, redis_url: str, consumer: str, stop: asyncio.Event | None = None) -> None:
    """One worker in this process until SIGTERM/SIGINT (or `stop`), then drain and close."""

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = make_redis(redis_url)
    providers = build_providers(settings)

    keys = Keys(settings.redis.prefix)
    rates = rates_for(client, keys, settings.policy.provider_rates)
    # Every worker process also runs campaign fan-outs (one lease per job), so a launch never blocks the API ...
    background = [asyncio.create_task(FanoutRunner(client, settings).run(stop), name="fanout")]
    if not settings.redis.cluster:  # ... and the inactivity rules' sweep (automations/engine.py): atomic pops, so
        # every worker may run it. Automations are not sharded: on Redis Cluster their routes answer 501.
        background.append(asyncio.create_task(AutomationRunner(client, settings).run(stop), name="automations"))
    try:
        if settings.redis.cluster:
            await _run_cluster_worker(settings, client, providers, consumer, rates, stop)
        else:
            limiter = DeliveryPolicy(client, keys, settings.policy) if settings.policy.enabled else None
            await Worker(settings, client, providers, consumer=consumer, limiter=limiter, rates=rates).run(stop)
    finally:
        stop.set()
        for task in background:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, settings.worker.drain_deadline_s)
        for p in providers.values():
            await p.close()

        HELD.apply()  # the last few milliseconds of provider latencies
        await client.aclose()


async def _run_cluster_worker(settings: Settings, client: Any, providers: Any, consumer: str, rates: Any,
                              stop: asyncio.Event) -> None:
    """Redis Cluster: one worker for every shard this process owns (gateway/multishard.py), the share renewed at
    every heartbeat (gateway/shard_owner.py). A shard given up is no longer read; what is in flight of it finishes
    here while its new owner reads it. On stop the lease is given back at once, so the others take the shards
    while this process drains."""
    shards = shard_map(settings.redis)
    clients = await shard_clients(client, shards)  # each shard's keys on one node, looked up once
    owner = ShardOwner(await key_client(client, shards.shared.live_workers), shards.shared, consumer, shards.count)
    ws = settings.worker
    queue = OwnedShards(client, shards, clients, idempotency_window_s=ws.idempotency_window_s,
                        done_ttl_s=ws.done_ttl_s,
                        status_retention_s=settings.status.retention_s if settings.status.enabled else 0,
                        events_maxlen=settings.status.events_maxlen if settings.status.events else 0)
    limiter = ShardedPolicy(client, shards, settings.policy, clients) if settings.policy.enabled else None
    worker = Worker(settings, client, providers, consumer=consumer, limiter=limiter, rates=rates,
                    keys=shards.shared, queue=queue, registry=ShardedRegistry(client, shards, clients))
    queue.held = worker.settler.unwritten_acks

    async def beat() -> None:
        while not stop.is_set():
            try:
                owned = await owner.beat()
            except (ConnectionError, OSError, RedisError) as e:  # keep the current share meanwhile
                log.warning("lease heartbeat failed", extra={"consumer": consumer, "error": type(e).__name__})
            else:
                if owned != frozenset(queue.owned):
                    log.info("shards owned", extra={"consumer": consumer, "count": len(owned)})
                    queue.own(owned)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), BEAT_S)
        with contextlib.suppress(ConnectionError, OSError, RedisError):
            await owner.leave()
        queue.own(())

    while not stop.is_set() and not queue.owned:  # the first share before the first read
        with contextlib.suppress(ConnectionError, OSError, RedisError):
            queue.own(await owner.beat())
        if not queue.owned:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), BEAT_S)
    beats = asyncio.create_task(beat(), name="shard-leases")
    try:
        await worker.run(stop)
    finally:
        stop.set()
        await beats


async def _orphan_watch(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILLed, crashed) drains and exits instead of running on unseen."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("supervisor gone; draining", extra={"pid": parent})
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def _child(settings: Settings, redis_url: str, consumer: str, parent: int | None = None) -> None:

    setup_logging(settings.log_level)
    install_loop()

    async def main() -> None:
        stop = asyncio.Event()
        watch = asyncio.create_task(_orphan_watch(parent, stop)) if parent else None
        try:
            await run_worker(settings, redis_url, consumer, stop)
        finally:
            if watch is not None:
                watch.cancel()

    asyncio.run(main())


class Pool:
    """Supervises worker processes; `stop()` forwards SIGTERM and waits for the drain."""

    def __init__(self, settings: Settings, redis_url: str, processes: int, consumer_prefix: str | None = None):
        self.settings = settings
        self.redis_url = redis_url
        self.processes = processes
        self.prefix = consumer_prefix
        self.ctx = mp.get_context("spawn")
        self.children: dict[int, BaseProcess] = {}
        self.stopping = False

    def _spawn(self, index: int) -> None:
        p = self.ctx.Process(
            target=_child, args=(self.settings, self.redis_url, consumer_name(index, self.prefix), os.getpid()),
            name=f"pushgw-worker-{index}", daemon=False,
        )
        p.start()
        self.children[index] = p
        log.info("worker started", extra={"pid": p.pid, "consumer": consumer_name(index, self.prefix)})

    def start(self) -> None:
        for i in range(self.processes):
            self._spawn(i)

    def supervise_once(self) -> None:
        """Restart any child that died while the pool is not stopping."""

        for index, p in list(self.children.items()):
            if not p.is_alive() and not self.stopping:
                log.warning("worker exited, restarting", extra={"pid": p.pid, "exit_code": p.exitcode})
                if p.pid is not None:
                    mark_process_dead(p.pid)
                time.sleep(0.5)  # no tight restart loop on a crash at start
                self._spawn(index)

    def stop(self, deadline_s: float | None = None) -> None:
        """SIGTERM every child, wait for their drain, SIGKILL what is left after the deadline."""

        self.stopping = True
        deadline = time.monotonic() + (deadline_s or self.settings.worker.drain_deadline_s + 5)
        for p in self.children.values():
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)
        for p in self.children.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker did not drain in time; killing", extra={"pid": p.pid})
                p.kill()
                p.join()
            if p.pid is not None:
                mark_process_dead(p.pid)
