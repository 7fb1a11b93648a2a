"""The worker's own CPU per delivery, with providers that answer Delivered at once.

    python -m pushgw.bench.worker_overhead [--messages 50000] [--users 10000] [--runs 3] [--policy default]
                                           [--status on|off]

`pushgw bench` measures the gateway with real provider clients, whose CPU dominates; this isolates
what the gateway adds around them (stream reads, decode, policy, registry, lanes, settle, metrics,
the flush transaction). It starts a private redis-server (no AOF), registers the benchmark's users
and enqueues its message mix (bench/run.py) before the clock starts, then runs one `Worker` in this
process with in-process providers until every delivery was made, drained and flushed. Reported per
run: worker CPU µs per delivery (`time.process_time`: this process only, the headline on a shared
machine), Redis's CPU µs per delivery (its INFO counters, apart), deliveries/s (wall time), lost and
duplicate deliveries, and what was left pending, delayed or dead-lettered. Prometheus runs in
multiprocess mode, as in production; the harness's own objects are frozen out of the collector, and
the gateway's modules are imported inside the functions, after `main` sets PROMETHEUS_MULTIPROC_DIR
(prometheus-client picks its mode when it is first imported).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson


class Tally:
    """What the instant providers were sent; `done` is set once `expected` sends were made."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received: Counter[tuple[str, str]] = Counter()
        self.sends = 0
        self.done = asyncio.Event()
        self.last_at = 0.0


class InstantProvider:
    """A `Provider` that accepts every push at once: no network, no payload, so only the gateway costs CPU."""

    def __init__(self, name: str, tally: Tally) -> None:
        from ..providers.base import Delivered

        self.name = name
        self._tally = tally
        self._ok = Delivered("instant")

    async def send(self, delivery: Any) -> Any:
        t = self._tally
        t.received[(delivery.message.id, delivery.device.key)] += 1
        t.sends += 1
        if t.sends >= t.expected and not t.done.is_set():
            t.last_at = time.perf_counter()
            t.done.set()
        return self._ok

    async def close(self) -> None:
        return None


async def run_once(messages: int, users: int, policy: str, seed: int, profile: str | None = None,
                   status: bool = True) -> dict[str, Any]:
    from ..core.config import ProviderSettings, RedisSettings, Settings, StatusSettings, WorkerSettings
    from ..gateway.embedded import EmbeddedRedis
    from ..gateway.pool import make_redis
    from ..gateway.worker import Worker
    from ..queue.keys import Keys
    from ..queue.shards import ShardMap
    from ..queue.streams import StreamQueue
    from ..ratelimit.policy import DeliveryPolicy
    from ..ratelimit.provider_rate import rates_for
    from .run import BENCH_AUTH, BENCH_P256DH, ENQUEUE_CHUNK, Bench, Options, bench_policy, store_population

    with tempfile.TemporaryDirectory(prefix="pushgw-overhead-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", aof=False)
        url = server.start()
        redis = make_redis(url)
        try:
            # The load generator of `pushgw bench`: same users, device mix and message mix for a seed.
            bench = Bench(Options(messages=messages, users=users, policy=policy, seed=seed), Path(tmp))
            subs = 0

            def new_subscription() -> dict[str, Any]:
                nonlocal subs
                subs += 1
                keys = {"p256dh": BENCH_P256DH, "auth": BENCH_AUTH}
                return {"endpoint": f"https://push.example.net/push/s{subs}", "keys": keys}

            pop = bench.population(new_subscription)
            keys = Keys("overhead")
            settings = Settings(
                redis=RedisSettings(url=url, prefix=keys.prefix),
                worker=WorkerSettings(batch_size=512, block_ms=200, max_inflight=4096, max_attempts=5,
                                      backoff_base_s=0.2, backoff_cap_s=2.0, drain_deadline_s=10),
                providers=ProviderSettings(timeout_s=10.0, concurrency=256),
                policy=bench_policy(policy),
                status=StatusSettings(enabled=status, events=status),  # as `pushgw bench --status on|off`
                log_level="WARNING",
            )
            q = StreamQueue(redis, keys)
            await q.ensure_group()
            await store_population(redis, ShardMap.single(keys.prefix), pop, policy)
            msgs = bench.messages(messages, "m")
            expected = {(m.id, d.key) for m in msgs for d in pop.devices[m.user or ""]}
            for i in range(0, len(msgs), ENQUEUE_CHUNK):
                await q.enqueue(msgs[i:i + ENQUEUE_CHUNK])

            tally = Tally(len(expected))
            providers = {name: InstantProvider(name, tally) for name in ("apns", "fcm", "webpush")}
            limiter = DeliveryPolicy(redis, keys, settings.policy) if settings.policy.enabled else None
            rates = rates_for(redis, keys, settings.policy.provider_rates)
            worker = Worker(settings, redis, providers, consumer="overhead:0", limiter=limiter, rates=rates)
            stop = asyncio.Event()

            async def stop_when_done() -> None:
                await tally.done.wait()
                stop.set()

            profiler: Any = None
            if profile:
                import cProfile

                profiler = cProfile.Profile()
            watcher = asyncio.create_task(stop_when_done())
            # The harness's own objects (users, messages, the expected set) are not the worker's: kept out
            # of the collector's scans, which would otherwise bill their size to the worker.
            gc.collect()
            gc.freeze()
            redis_cpu0 = await _redis_cpu(redis)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            await worker.run(stop)  # returns after the drain and the final flush
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile)
            cpu = time.process_time() - cpu0
            wall = (tally.last_at or time.perf_counter()) - wall0
            gc.unfreeze()
            redis_cpu = await _redis_cpu(redis) - redis_cpu0
            await watcher

            stats = await q.stats()
            got = tally.received
            lost = sum(1 for p in expected if not got[p])
            duplicates = sum(c - 1 for c in got.values() if c > 1) + sum(c for p, c in got.items() if p not in expected)
            return {
                "messages": messages,
                "deliveries": len(expected),
                "delivered": sum(1 for p in expected if got[p]),
                "lost": lost,
                "duplicates": duplicates,
                "left_pending": stats.pending,
                "left_unread": stats.lag,
                "left_delayed": stats.delayed,
                "dead_letters": stats.dead_letters,
                "cpu_s": round(cpu, 3),
                "cpu_us_per_delivery": round(cpu / len(expected) * 1e6, 2),
                "redis_cpu_us_per_delivery": round(redis_cpu / len(expected) * 1e6, 2),
                "deliveries_per_s": round(len(expected) / wall) if wall > 0 else 0,
            }
        finally:
            await redis.aclose()
            server.stop()


async def _redis_cpu(redis: Any) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _ok(r: dict[str, Any]) -> bool:
    return bool(r["lost"] == 0 and r["duplicates"] == 0 and r["delivered"] == r["deliveries"]
                and r["left_pending"] == r["left_unread"] == r["left_delayed"] == r["dead_letters"] == 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--policy", choices=("default", "off", "full"), default="default")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--status", choices=("on", "off"), default="on",
                    help="message status and outcome events written by the worker (default on, as deployed)")
    ap.add_argument("--profile", metavar="FILE", help="cProfile stats of the last run's worker to FILE")
    args = ap.parse_args(argv)
    # As in production (and before prometheus_client is imported): every sample goes to an mmapped file.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pushgw-overhead-metrics-")
    from ..core.logs import setup_logging
    from ..gateway.pool import install_loop

    setup_logging("WARNING")
    install_loop()
    runs = []
    for i in range(args.runs):
        profile = args.profile if i == args.runs - 1 else None
        r = asyncio.run(run_once(args.messages, args.users, args.policy, args.seed, profile,
                                   status=args.status == "on"))
        runs.append(r)
        sys.stderr.write(f"  run {i + 1}: {r['cpu_us_per_delivery']} µs worker CPU per delivery (Redis "
                         f"{r['redis_cpu_us_per_delivery']} µs), {r['deliveries_per_s']:,} deliveries/s, "
                         f"lost {r['lost']}, duplicates {r['duplicates']}\n")
    out = {
        "runs": runs,
        "cpu_us_per_delivery": [r["cpu_us_per_delivery"] for r in runs],
        "cpu_us_per_delivery_median": statistics.median(r["cpu_us_per_delivery"] for r in runs),
        "redis_cpu_us_per_delivery": [r["redis_cpu_us_per_delivery"] for r in runs],
        "deliveries_per_s": [r["deliveries_per_s"] for r in runs],
        "status": args.status,
        "load_avg": os.getloadavg(),
    }
    sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    ok = all(_ok(r) for r in runs)
    sys.stdout.write("  OK: lost 0, duplicates 0, nothing left over\n" if ok else "  FAILED: lost, duplicated or left over\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
