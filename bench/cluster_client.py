"""What redis-py's cluster client costs per call, against a client of one Redis, on loopback servers.

    python -m pushgw.bench.cluster_client [--rounds 2000]

Starts one redis-server and a 1-node Redis Cluster (gateway/topology.py), and for each call shape the worker
makes (one command, a Lua script, a pipeline of reads, a MULTI/EXEC of a commit) measures the client process's
CPU time per call (`time.process_time`; the servers are other processes) with:

- `single`: the gateway's client of one Redis (queue/connection.py `blocking_redis`);
- `cluster`: the gateway's cluster client (queue/connection.py `ShardedCluster`);
- `slot client`: a shard's direct client of its slot's master (queue/connection.py `SlotClient`).

The keys share one hash tag, as a shard's do (queue/shards.py). Figures are µs of client CPU per call; compare
rows, not runs on a busy machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..gateway.embedded import EmbeddedRedis
from ..gateway.topology import LocalCluster
from ..queue.connection import blocking_redis
from ..queue.shards import key_slot

TAG = "{bench:0}"


def shapes(r: Any) -> dict[str, Callable[[], Awaitable[Any]]]:
    stream, done = f"{TAG}:stream", f"{TAG}:done"
    script = r.register_script("return redis.call('SCARD', KEYS[1])")

    async def command() -> None:
        await r.sadd(done, "a")

    async def lua() -> None:
        await script(keys=[done])

    async def pipeline() -> None:
        async with r.pipeline(transaction=False) as pipe:
            for i in range(4):
                pipe.smembers(f"{done}:{i}")
            await pipe.execute()

    async def transaction() -> None:
        async with r.pipeline(transaction=True) as pipe:
            pipe.sadd(done, "a")
            pipe.expire(done, 60)
            pipe.zadd(f"{TAG}:delayed", {"m": 1.0})
            pipe.xack(stream, "g", "1-0")
            await pipe.execute()

    async def xreadgroup() -> None:
        await r.xreadgroup("g", "c", {stream: ">"}, count=16)

    return {"command": command, "lua script": lua, "pipeline of 4 reads": pipeline,
            "MULTI/EXEC of 4 writes": transaction, "XREADGROUP (empty)": xreadgroup}


async def measure(r: Any, rounds: int) -> dict[str, float]:
    await r.delete(f"{TAG}:stream")
    await r.xgroup_create(f"{TAG}:stream", "g", id="0", mkstream=True)
    out: dict[str, float] = {}
    for name, call in shapes(r).items():
        for _ in range(50):
            await call()
        t0 = time.process_time()
        for _ in range(rounds):
            await call()
        out[name] = (time.process_time() - t0) / rounds * 1e6
    await r.aclose()
    return out


async def measure_slot(cluster: LocalCluster, rounds: int) -> dict[str, float]:
    client = blocking_redis("redis+cluster://" + cluster.seeds[0])
    try:
        return await measure(await client.slot_client(key_slot(TAG)), rounds)
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ns = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pushgw-cc-") as tmp:
        single = EmbeddedRedis(Path(tmp) / "single", aof=False)
        single.start()
        cluster = LocalCluster(Path(tmp) / "cluster", masters=1).start()
        try:
            rows = {
                "single": asyncio.run(measure(blocking_redis(single.url), ns.rounds)),
                "cluster": asyncio.run(measure(blocking_redis("redis+cluster://" + cluster.seeds[0]), ns.rounds)),
                "slot client": asyncio.run(measure_slot(cluster, ns.rounds)),
            }
        finally:
            cluster.stop()
            single.stop()
    clients = list(rows)
    sys.stdout.write(f"{'call':<26}" + "".join(f"{c:>12}" for c in clients) + "   (µs of client CPU per call)\n")
    for name in rows["single"]:
        sys.stdout.write(f"{name:<26}" + "".join(f"{rows[c][name]:>12.1f}" for c in clients) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
