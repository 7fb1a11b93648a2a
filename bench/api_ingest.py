"""Batch ingestion through the HTTP API: messages/s accepted by `POST /v1/messages/batch`.

    python -m pushgw.bench.api_ingest [--batches 200] [--batch 1000] [--clients 4] [--api-processes 1]

Starts a private Redis and the API (`--api-processes` servers sharing the port with SO_REUSEPORT),
then posts batches of realistic messages from `--clients` concurrent connections in another
process. Prints messages/s and the API's CPU seconds per 100k messages as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from ..core.config import ApiClient, ApiSettings, RedisSettings, Settings
from ..gateway.api.app import create_app
from ..gateway.api.server import start_api
from ..gateway.embedded import EmbeddedRedis
from ..gateway.pool import install_loop, make_redis
from .run import proc_stat
from .sinks import free_port

TOKEN = "bench-api-token-0123456789"  # noqa: S105 - a throwaway token of this local benchmark


def _serve(redis_url: str, port: int) -> None:
    install_loop()
    settings = Settings(redis=RedisSettings(url=redis_url, prefix="ingest"),
                        api=ApiSettings(clients=(ApiClient("bench", TOKEN, ("enqueue",)),), max_body_bytes=8 << 20))

    async def main() -> None:
        redis = make_redis(redis_url)
        await start_api(create_app(settings, redis), settings.api, "127.0.0.1", port, reuse_port=True)  # as `pushgw api` serves
        await asyncio.Event().wait()

    asyncio.run(main())


async def _post(port: int, batches: int, size: int, clients: int) -> tuple[int, float]:

    body_template = [{"user": f"u{i % 5000}", "title": "Live session in 15 minutes", "body": "Statistics 101 at 14:00",
                      "category": "reminder", "priority": "high", "ttl": 900, "data": {"link": "/live/1"}}
                     for i in range(size)]
    bodies = []
    for b in range(batches):
        for i, m in enumerate(body_template):
            m["id"] = f"b{b}-{i}"
        bodies.append(orjson.dumps({"messages": body_template}))
    queued = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        async def worker() -> None:
            nonlocal queued
            while bodies:
                body = bodies.pop()
                async with http.post(f"http://127.0.0.1:{port}/v1/messages/batch", data=body, headers=headers) as r:
                    doc = await r.json()
                    if r.status != 202:
                        raise RuntimeError(f"API answered {r.status}: {doc}")
                    queued += doc["queued"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return queued, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--api-processes", type=int, default=1)
    args = ap.parse_args(argv)

    def _cpu_s(pid: int) -> float:
        return proc_stat(pid)[0]

    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", aof=False)
        url = redis.start()
        port = free_port()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_serve, args=(url, port), daemon=True) for _ in range(args.api_processes)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        time.sleep(0.5 * args.api_processes)
        cpu0 = sum(_cpu_s(p.pid) for p in procs if p.pid)
        redis_pid = redis.proc.pid if redis.proc else 0
        rcpu0 = _cpu_s(redis_pid) if redis_pid else 0.0
        queued, seconds = asyncio.run(_post(port, args.batches, args.batch, args.clients))
        cpu = sum(_cpu_s(p.pid) for p in procs if p.pid) - cpu0
        rcpu = (_cpu_s(redis_pid) if redis_pid else 0.0) - rcpu0
        for p in procs:
            p.terminate()
            p.join(5)
        redis.stop()
    result: dict[str, Any] = {"messages": queued, "seconds": round(seconds, 3), "messages_per_s": round(queued / seconds),
                              "api_processes": args.api_processes, "batch": args.batch, "clients": args.clients,
                              "api_cpu_s_per_100k": round(cpu / queued * 1e5, 2),
                              "redis_cpu_s_per_100k": round(rcpu / queued * 1e5, 2)}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
