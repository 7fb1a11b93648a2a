"""How the scheduler holds up with millions of scheduled messages: enqueue rate, Redis memory, move rate.

    python -m pushgw.bench.scheduler [--items 1000000] [--movers 2]

Starts a private redis-server (no AOF), enqueues `--items` messages with `send_at` spread over the
next day through the same Lua call the API uses, then makes them all due and lets `--movers`
concurrent movers (as workers run them) move them to the streams in batches of 1000. Checks that
every item was moved exactly once, and prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import replace

import orjson

from ..core.schema import Message
from ..gateway.embedded import EmbeddedRedis
from ..gateway.pool import make_redis
from ..queue.keys import Keys
from ..queue.streams import StreamQueue


async def _run(items: int, movers: int) -> dict[str, float | int]:

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(tmp, aof=False)
        server.start()
        redis = make_redis(server.url, max_connections=movers + 2)
        try:
            keys = Keys("sched")
            q = StreamQueue(redis, keys)
            await q.ensure_group()
            t0 = time.time()
            base = [Message(id=f"s-{i}", user=f"learner-{i % 100_000}", title="Live session at 18:00",
                            body="Statistics 101: Q&A with your mentor", category="reminder",
                            send_at=t0 + 3600 + (i % 86400)) for i in range(min(items, 500))]
            started = time.perf_counter()
            for i in range(0, items, 500):
                chunk = [replace(m, id=f"s-{i + j}") for j, m in enumerate(base[: min(500, items - i)])]
                await q.enqueue(chunk, now_ms=int(t0 * 1000))
                if i % 100_000 == 0:
                    sys.stderr.write(f"\renqueued {i:,}/{items:,}")
            enqueue_s = time.perf_counter() - started
            sys.stderr.write(f"\renqueued {items:,}/{items:,}\n")
            info = await redis.info("memory")
            held = await redis.zcard(keys.delayed)
            moved_total = 0

            async def mover() -> int:
                n = 0
                while (k := await q.move_due(t0 + 2 * 86400, 1000)) > 0:
                    n += k
                return n

            started = time.perf_counter()
            counts = await asyncio.gather(*(mover() for _ in range(movers)))
            move_s = time.perf_counter() - started
            moved_total = sum(counts)
            in_stream = await redis.xlen(keys.stream) + await redis.xlen(keys.stream_high)
            return {
                "items": items,
                "held_in_delayed_set": int(held),
                "enqueue_per_s": round(items / enqueue_s),
                "redis_used_memory_mb": round(int(info["used_memory"]) / 2**20, 1),
                "bytes_per_item": round(int(info["used_memory"]) / max(1, items)),
                "movers": movers,
                "moved": moved_total,
                "in_streams": int(in_stream),
                "move_per_s": round(moved_total / move_s),
            }
        finally:
            await redis.aclose()
            server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--movers", type=int, default=2)
    args = ap.parse_args(argv)
    result = asyncio.run(_run(args.items, args.movers))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    ok = result["moved"] == result["items"] == result["in_streams"] == result["held_in_delayed_set"]
    if not ok:
        sys.stderr.write("error: items were lost or moved twice\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
