"""`pushgw bench`: load-test the whole gateway on one machine and reconcile every delivery.

It starts a private Redis, provider sinks (fast: nginx; strict: the protocol-checking fakes) and N
worker processes; registers K users with a device mix; enqueues M messages for users drawn from a
skewed distribution (pipelined, 1000 per round trip; with status on, each batch's status is then written as
the intake writes it, one more round trip), either all at once (throughput) or at a steady `--rate`
(latency, soak); samples throughput, worker CPU and RSS while it runs; then reconciles
every (message, device) against the sinks' receipts: delivered, dead-lettered, lost, duplicated.
A baseline run sends the same deliveries with the same provider clients and no queue, in the same
number of processes, so `ratio` is what everything the gateway adds costs.

The gateway's processes, sinks and fakes are imported inside the functions that run them, after
`main` sets PROMETHEUS_MULTIPROC_DIR (prometheus-client picks its mode when it is first imported);
matplotlib (optional, the `test` extra) only when the plots are drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from ..core.config import (
    ApnsApp,
    CategoryCap,
    FcmApp,
    PolicySettings,
    ProviderSettings,
    RedisSettings,
    SentinelSettings,
    Settings,
    StatusSettings,
    WebPushSettings,
    WorkerSettings,
)
from ..core.schema import Device, Message, parse_message
from ..queue.connection import ShardedCluster

TOPIC = "org.example.bench"
ENQUEUE_CHUNK = 1000


@dataclass
class Options:
    messages: int = 50_000
    users: int = 10_000
    processes: int = 2
    mode: str = "fast"  # fast (nginx) or strict (protocol-checking fakes)
    rate: float = 0.0  # messages/s; 0: enqueue everything at once
    duration_s: float = 0.0  # with rate: run this long (soak); else messages/rate
    mix: tuple[float, float, float] = (0.6, 0.3, 0.1)  # fcm, apns, webpush
    baseline: bool = True
    # "default": as deployed (each batch's users' preferences read: opt-outs, time zones); "off": no
    # policy; "full": every rule evaluated with limits no message reaches, so "full" vs "off" is its cost.
    policy: str = "default"
    json_path: str | None = None
    plots_dir: str | None = None
    seed: int = 1
    timeout_s: float = 600.0
    rich: float = 0.0  # share of messages sent with rich fields (image, badge, sound, actions, thread, link)
    profile_dir: str | None = None  # py-spy the workers into this folder and bill their CPU by component
    cluster: int = 0  # masters of a loopback Redis Cluster to run on (16 shards); 0: one embedded Redis
    sentinel: bool = False  # a loopback master, one replica and three sentinels instead (redis.sentinel)
    status: bool = True  # message status and outcome events written by the workers (as deployed); False: both off


@dataclass
class Sample:
    t: float
    delivered: int
    rss_mb: list[float] = field(default_factory=list)


@dataclass
class Population:
    devices: dict[str, list[Device]]  # user -> devices
    subs: dict[str, Any]  # webpush subscription id -> device (strict mode keeps browser keys in the fake)


def proc_stat(pid: int) -> tuple[float, float, float]:
    """(cpu seconds, rss MB, peak rss MB) of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(parts[11]) + int(parts[12])) / ticks
        rss = hwm = 0.0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        return cpu, rss, hwm
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0, 0.0


def process_tree(pid: int) -> list[int]:
    """`pid` and its child processes (nginx: the master and its workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(c) for c in f.read().split())]
    except OSError:
        return [pid]


async def command_calls(redis: Any) -> Counter[str]:
    """Calls per command so far (`INFO commandstats`), summed over a cluster's masters."""
    if isinstance(redis, ShardedCluster):
        found = [await redis.info("commandstats", target_nodes=node) for node in redis.get_primaries()]
    else:
        found = [await redis.info("commandstats")]
    out: Counter[str] = Counter()
    for stats in found:
        for name, fields in stats.items():
            out[name.removeprefix("cmdstat_")] += int(fields.get("calls", 0))
    return out


class CpuMeter:
    """CPU seconds per component between `start()` and `stop()`: where the host's cores went.

    On one host the workers share the cores with Redis, the sinks and the load generator, so a
    throughput figure alone does not say what bounds it; this does."""

    def __init__(self, components: dict[str, list[int]]) -> None:
        self.components = components
        self._t0: dict[str, float] = {}
        self._wall0 = 0.0

    def _read(self) -> dict[str, float]:
        out = {name: sum(proc_stat(pid)[0] for pid in pids) for name, pids in self.components.items()}
        out["load generator"] = time.process_time()  # this process: enqueueing, progress, in-process fakes
        return out

    def start(self) -> None:
        self._t0 = self._read()
        self._wall0 = time.monotonic()

    def stop(self, deliveries: int) -> dict[str, Any]:
        """{component: µs per delivery}, plus the share of all cores that was busy."""
        t1 = self._read()
        wall = time.monotonic() - self._wall0
        used = {k: t1[k] - self._t0.get(k, 0.0) for k in t1}
        per = {k: round(v / deliveries * 1e6, 1) for k, v in used.items()} if deliveries else {}
        busy = sum(used.values()) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
        return {"us_per_delivery": per, "cores_busy": round(busy, 3)}


def _max_rss(sample: Sample) -> float:
    return round(max(sample.rss_mb), 1) if sample.rss_mb else 0.0


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def _progress(text: str, final: bool = False) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r  {text}   " + ("\n" if final else ""))
    else:
        sys.stderr.write(f"  {text}\n")
    sys.stderr.flush()


def _bar(done: int, total: int, width: int = 28) -> str:
    filled = int(width * min(done, total) / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}]"


class Bench:
    def __init__(self, opts: Options, tmp: Path) -> None:
        self.o = opts
        self.tmp = tmp
        self.rng = random.Random(opts.seed)

    # --- setup ------------------------------------------------------------------------------

    def population(self, new_subscription: Any) -> Population:
        fcm_share, apns_share, _ = self.o.mix
        devices: dict[str, list[Device]] = {}
        subs: dict[str, Any] = {}
        for i in range(self.o.users):
            user = f"u{i}"
            devs: list[Device] = []
            for j in range(1 if self.rng.random() < 0.7 else 2):
                r = self.rng.random()
                if r < fcm_share:
                    devs.append(Device("fcm", f"fcm-{i}-{j}-{self.rng.getrandbits(40):010x}"))
                elif r < fcm_share + apns_share:
                    devs.append(Device("apns", f"{self.rng.getrandbits(256):064x}"))
                else:
                    sub = new_subscription()
                    d = Device("webpush", sub["endpoint"], None, sub["keys"]["p256dh"], sub["keys"]["auth"])
                    subs[sub["endpoint"].rsplit("/", 1)[-1]] = d
                    devs.append(d)
            devices[user] = devs
        return Population(devices, subs)

    def messages(self, n: int, prefix: str) -> list[Message]:
        """A learning-platform mix; users drawn from a skewed distribution (a few very active learners).

        The same seed gives the same messages, so the baseline sends exactly what the gateway sent."""
        rng = random.Random(self.o.seed + 1)
        out: list[Message] = []
        k = self.o.users
        for i in range(n):
            user = f"u{min(k - 1, int(k * rng.random() ** 3))}"
            r = rng.random()
            if r < 0.5:
                out.append(Message(id=f"{prefix}{i}", user=user, title="Live session in 15 minutes",
                                   body="Statistics 101: Q&A with your mentor", category="reminder", priority="high",
                                   ttl=3600, collapse_key=f"session-{i % 50}", data={"link": f"/live/{i % 50}"}))
            elif r < 0.85:
                out.append(Message(id=f"{prefix}{i}", user=user, title="New module available",
                                   body="Module 4 of Data Science is out", category="new_content",
                                   data={"track": "data-science", "module": "4"}, campaign="module-launch",
                                   variant="a" if i % 2 else "b"))
            else:
                out.append(Message(id=f"{prefix}{i}", user=user, title="Badge earned", body="You scored 92% on the quiz",
                                   category="reward", data={"badge": "quiz-master"}))
        if self.o.rich > 0:
            self._enrich(out)
        return out

    def _enrich(self, messages: list[Message]) -> None:
        """Give a share (`rich`) of the messages the rich fields a real app uses, so their cost shows:
        an image, a badge, a sound, two action buttons, a thread and a link (its own random stream, so
        the plain messages stay the same as without the option)."""
        rng = random.Random(self.o.seed + 2)
        for i, m in enumerate(messages):
            if rng.random() >= self.o.rich:
                continue
            obj = m.to_json()
            obj.update({
                "image": f"https://cdn.campus.example/cards/{i % 20}.png", "badge": 1 + i % 9, "sound": "chime.caf",
                "actions": [{"id": "open", "title": "Open", "foreground": True}, {"id": "later", "title": "Later"}],
                "actions_category": "LEARN", "thread": f"course-{i % 12}",
                "link": f"https://campus.example/learn/{i % 50}",
            })
            messages[i] = parse_message(obj, now=0.0, internal=True)

    # --- the run ----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        from ..gateway.embedded import EmbeddedRedis
        from ..gateway.topology import LocalCluster, SentinelSetup
        from ..providers.fakes.tls import make_local_ca
        from ..providers.vapid import make_vapid_key
        from ..queue.connection import redis_from_url, redis_url_for

        o = self.o
        ca = make_local_ca(self.tmp / "tls")
        vapid = make_vapid_key(self.tmp / "vapid")
        redis_server: Any = None
        if o.cluster:
            redis_server = LocalCluster(self.tmp / "cluster", masters=o.cluster).start()
            redis_settings = RedisSettings(prefix="bench", cluster=True, cluster_nodes=redis_server.seeds)
            url = redis_url_for(redis_settings)
            redis_pids = [n.proc.pid for n in redis_server.nodes if n.proc]
        elif o.sentinel:  # the master and its replica (TCP loopback), found through three sentinels
            redis_server = SentinelSetup(self.tmp / "sentinel", master_name="bench", replicas=1).start()
            redis_settings = RedisSettings(prefix="bench", sentinel=SentinelSettings(
                addresses=redis_server.sentinel_addresses, master="bench"))
            url = redis_url_for(redis_settings)
            redis_pids = [n.proc.pid for n in redis_server.nodes if n.proc]
        else:
            redis_server = EmbeddedRedis(self.tmp / "redis", aof=False)
            url = redis_server.start()
            redis_settings = RedisSettings(url=url, prefix="bench")
            redis_pids = [redis_server.proc.pid] if redis_server.proc else []
        sinks: Any = None
        fakes: list[Any] = []
        ceiling: dict[str, float] = {}
        try:
            if o.mode == "fast":
                from ..providers.fakes.apns import make_apns_key
                from ..providers.fakes.fcm import make_service_account
                from .sinks import NginxSinks, sink_ceiling

                sinks = NginxSinks(self.tmp / "nginx", ca).start()
                _progress("measuring the sinks' own ceiling with h2load ...", final=True)
                ceiling = sink_ceiling(sinks)
                apns_key = make_apns_key(self.tmp / "apns")
                sa = make_service_account(self.tmp / "fcm", f"https://127.0.0.1:{sinks.fcm_port}/token", "bench")
                ports = (sinks.apns_port, sinks.fcm_port, sinks.webpush_port)
                counter = 0

                def new_subscription() -> dict[str, Any]:
                    nonlocal counter
                    counter += 1
                    return {"endpoint": f"https://127.0.0.1:{sinks.webpush_port}/push/s{counter}",
                            "keys": {"p256dh": BENCH_P256DH, "auth": BENCH_AUTH}}
            else:
                from ..providers.fakes.apns import FakeApns, make_apns_key
                from ..providers.fakes.fcm import FakeFcm
                from ..providers.fakes.webpush import FakePushService

                apns_key = make_apns_key(self.tmp / "apns")
                apns_fake = await FakeApns(ca, keys=[apns_key], topics=[TOPIC]).start()
                fcm_fake = await FakeFcm(ca).start()
                wp_fake = await FakePushService(ca).start()
                fakes = [apns_fake, fcm_fake, wp_fake]
                sa = fcm_fake.service_account(self.tmp / "fcm", "bench")
                ports = (apns_fake.port, fcm_fake.port, wp_fake.port)
                new_subscription = wp_fake.new_subscription

            settings = Settings(
                redis=redis_settings,
                # The default batch_size (256): reads of 512 measured 12.9k against 14.9k messages/s
                # (2 runs each, docs/benchmarks.md); the bench measures what a user runs.
                worker=WorkerSettings(processes=o.processes, block_ms=200, max_inflight=4096,
                                      max_attempts=5, backoff_base_s=0.2, backoff_cap_s=2.0, drain_deadline_s=10),
                providers=ProviderSettings(timeout_s=10.0, concurrency=256),
                apns=(ApnsApp("default", TOPIC, team_id=apns_key.team_id, key_id=apns_key.key_id,
                              key_file=str(apns_key.key_file), host="127.0.0.1", port=ports[0],
                              ca_file=str(ca.ca_file), connections=2),),
                fcm=(FcmApp("default", service_account_file=str(sa), base_url=f"https://127.0.0.1:{ports[1]}",
                            ca_file=str(ca.ca_file)),),
                webpush=WebPushSettings(vapid_private_key_file=str(vapid), allowed_hosts=("127.0.0.1",),
                                        allow_private=True, ca_file=str(ca.ca_file)),
                log_level="WARNING",
                # Every rule is evaluated and recorded, but the limits are out of reach (the skewed
                # users get thousands of messages), so the run measures the policy's cost alone.
                policy=bench_policy(o.policy),
                status=StatusSettings(enabled=o.status, events=o.status),  # off on a cluster (core/config.py)
            )
            pop = self.population(new_subscription)
            redis = redis_from_url(url)
            try:
                others = {"redis": redis_pids}
                if sinks is not None and sinks.proc is not None:
                    others["sinks"] = process_tree(sinks.proc.pid)
                result = await self._gateway_run(settings, url, redis, pop, sinks, fakes, others)
            finally:
                await redis.aclose()
            result["sink_ceiling_per_s"] = ceiling
            if o.baseline:
                result.update(await self._baseline(settings, pop, sinks, fakes, result["deliveries_expected"],
                                                   others.get("sinks", [])))
                if result.get("baseline_per_s"):
                    result["ratio"] = round(result["deliveries_per_s"] / result["baseline_per_s"], 3)
                clients = result.get("baseline_cpu_us_per_delivery", {}).get("clients")
                if clients:  # the gateway's CPU per delivery over the floor the same clients need alone
                    result["cpu_over_baseline"] = round(result["cpu_us_per_delivery"]["workers"] / clients, 2)
            return result
        finally:
            for f in fakes:
                await f.stop()
            if sinks is not None:
                sinks.stop()
            redis_server.stop()

    async def _gateway_run(self, settings: Settings, url: str, redis: Any, pop: Population, sinks: Any,
                           fakes: list[Any], others: dict[str, list[int]]) -> dict[str, Any]:
        from ..gateway.pool import Pool
        from ..queue.sharded import ShardedQueue, shard_map

        o = self.o
        shards = shard_map(settings.redis)  # one shard under today's keys with one Redis
        q = ShardedQueue(redis, shards)
        await q.ensure_group()
        await store_population(redis, shards, pop, o.policy)
        n = int(o.rate * o.duration_s) if o.rate and o.duration_s else o.messages
        msgs = self.messages(n, "m")
        expected = {(m.id, d.key) for m in msgs for d in pop.devices[m.user or ""]}
        _progress(f"{o.users} users, {sum(len(v) for v in pop.devices.values())} devices; {n} messages -> "
                  f"{len(expected)} deliveries; {o.processes} workers; {o.mode} sinks", final=True)

        pool = Pool(settings, url, o.processes, consumer_prefix="bench")
        pool.start()
        try:
            await self._workers_ready(redis, shards.all_keys(), o.processes)
            pids = [p.pid for p in pool.children.values() if p.pid]
            recorder = None
            if o.profile_dir:
                from .profile import Recorder

                recorder = Recorder(Path(o.profile_dir))
                recorder.attach(pids)
            calls0 = await command_calls(redis)
            cpu0 = sum(proc_stat(pid)[0] for pid in pids)
            meter = CpuMeter({"workers": pids, **others})
            nodes = others.get("redis", []) if o.cluster else []  # each cluster node's own share, beside the sum
            nodes0 = [proc_stat(pid)[0] for pid in nodes]
            meter.start()
            enqueued_at: dict[str, float] = {}
            samples: list[Sample] = []
            started = time.time()
            done_at = started

            status = settings.status

            async def enqueue(chunk: list[Message], now: float) -> None:
                """As the intake does (gateway/intake.py `Intake.submit`): the enqueue, then, with status on, the
                status of the messages it accepted (one more round trip)."""
                now_ms = int(now * 1000)
                flags = await q.enqueue(chunk, now_ms)
                if status.enabled:  # on each accepted message's shard, as the intake writes it
                    await q.record_accepted([m for m, f in zip(chunk, flags, strict=True) if f], now_ms,
                                            retention_s=status.retention_s)

            async def enqueue_all() -> None:
                if o.rate <= 0:
                    for i in range(0, len(msgs), ENQUEUE_CHUNK):
                        chunk = msgs[i:i + ENQUEUE_CHUNK]
                        now = time.time()  # before the call: a worker may deliver before it returns
                        await enqueue(chunk, now)
                        for m in chunk:
                            enqueued_at[m.id] = now
                    return
                step = max(1, int(o.rate / 50))  # 50 small batches a second
                t0 = time.monotonic()
                for i in range(0, len(msgs), step):
                    due = t0 + i / o.rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    chunk = msgs[i:i + step]
                    now = time.time()
                    await enqueue(chunk, now)
                    for m in chunk:
                        enqueued_at[m.id] = now

            samples.append(Sample(0.0, 0, [proc_stat(pid)[1] for pid in pids]))
            enqueue_task = asyncio.create_task(enqueue_all())
            deadline = time.monotonic() + o.timeout_s
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                acked = sum([await self._acked(redis, keys) for keys in shards.all_keys()])
                rss = [proc_stat(pid)[1] for pid in pids]
                samples.append(Sample(time.time() - started, acked, rss))
                stats = sum_stats([await sq.stats() for sq in q.queues])
                _progress(f"{_bar(len(enqueued_at), n)} enqueued {len(enqueued_at)}/{n}  lag {stats.lag}  pending "
                          f"{stats.pending}  retries {stats.delayed}  rss {'/'.join(f'{r:.0f}' for r in rss)} MB")
                if enqueue_task.done() and stats.lag == 0 and stats.pending == 0 and stats.delayed == 0:
                    done_at = time.time()
                    break
            else:
                _progress("gave up waiting (timeout)", final=True)
            await enqueue_task
            calls = await command_calls(redis)
            calls.subtract(calls0)
            cpu = sum(proc_stat(pid)[0] for pid in pids) - cpu0
            cpu_split = meter.stop(len(expected))
            by_node = [round((proc_stat(pid)[0] - t0) / max(1, len(expected)) * 1e6, 1) for pid, t0 in zip(nodes, nodes0,
                                                                                                         strict=True)]
            peak = [proc_stat(pid)[2] for pid in pids]
        finally:
            await asyncio.to_thread(pool.stop)  # also when the run failed: no worker outlives the bench
        profile_rows: list[dict[str, Any]] = []
        profile_sampled_over_cpu = 0.0
        if recorder is not None:
            from .profile import SAMPLE_RATE, table

            samples_by_component = await asyncio.to_thread(recorder.finish)
            profile_rows = table(samples_by_component, cpu_split["us_per_delivery"].get("workers", 0.0))
            if cpu > 0:  # py-spy's samples against the CPU the workers used: above 1, they waited for cores
                profile_sampled_over_cpu = round(sum(samples_by_component.values()) / SAMPLE_RATE / cpu, 2)
        elapsed = done_at - started
        _progress(f"done in {elapsed:.1f}s", final=True)

        # Reconcile every (message, device) against the sinks' receipts.
        if sinks is not None:
            sinks.flush()
            receipts = [(r.at, r.key) for r in sinks.receipts() if "ceiling" not in r.key and "00000000-0000" not in r.key]
        else:
            receipts = self._fake_receipts(fakes)
        from ..providers.apns import apns_id

        apns_ids = {apns_id(mid, key[5:]): (mid, key) for mid, key in expected
                    if key.startswith("apns:")}
        sub_keys = {sid: d.key for sid, d in pop.subs.items()}
        got: Counter[tuple[str, str]] = Counter()
        webpush_got: Counter[str] = Counter()  # fast mode: per subscription (nginx cannot read the message id)
        latencies: list[float] = []
        for at, rkey in receipts:
            kind, _, rest = rkey.partition(":")
            if kind == "apns":
                pair = apns_ids.get(rest)
            elif kind == "fcm":
                mid, _, token = rest.partition("/")
                pair = (mid, f"fcm:{token}")
            elif sinks is not None:
                webpush_got[sub_keys.get(rest, rest)] += 1
                continue
            else:
                mid, _, sid = rest.partition("|")
                pair = (mid, sub_keys.get(sid, ""))
            if pair is None:
                continue
            got[pair] += 1
            if pair[0] in enqueued_at:
                latencies.append((at - enqueued_at[pair[0]]) * 1000)
        dead_pairs: set[tuple[str, str]] = set()
        for keys in shards.all_keys():
            dead_pairs |= await self._dead_pairs(redis, keys)
        if sinks is not None:
            webpush_expected = Counter(k for _, k in expected if k.startswith("webpush:"))
            exact = [p for p in expected if not p[1].startswith("webpush:")]
            dead_wp = Counter(k for _, k in dead_pairs if k.startswith("webpush:"))
            delivered = sum(1 for p in exact if got[p]) + sum(min(n, webpush_got[k]) for k, n in webpush_expected.items())
            lost = sum(1 for p in exact if not got[p] and p not in dead_pairs) + sum(
                max(0, n - webpush_got[k] - dead_wp[k]) for k, n in webpush_expected.items())
            duplicates = sum(c - 1 for c in got.values() if c > 1) + sum(
                max(0, webpush_got[k] - n) for k, n in webpush_expected.items())
        else:
            delivered = sum(1 for p in expected if got[p])
            lost = sum(1 for p in expected if not got[p] and p not in dead_pairs)
            duplicates = sum(c - 1 for c in got.values() if c > 1)
        dead = len(dead_pairs)
        latencies.sort()
        deliveries = len(expected)
        out: dict[str, Any] = {
            "mode": o.mode,
            "policy": o.policy,
            "status": o.status,
            "rich": o.rich,
            "messages": n,
            "users": o.users,
            "workers": o.processes,
            "deliveries_expected": deliveries,
            "delivered": delivered,
            "dead_lettered": dead,
            "lost": lost,
            "duplicates": duplicates,
            "seconds": round(elapsed, 3),
            "throughput_per_s": round(n / elapsed) if elapsed > 0 else 0,
            "deliveries_per_s": round(deliveries / elapsed) if elapsed > 0 else 0,
            "rate_per_s": o.rate,
            "latency_ms": {"p50": round(_percentile(latencies, 50), 2), "p95": round(_percentile(latencies, 95), 2),
                           "p99": round(_percentile(latencies, 99), 2), "samples": len(latencies)},
            "cpu_s_per_1k": round(cpu / n * 1000, 3),
            "cpu_us_per_delivery": cpu_split["us_per_delivery"],
            "cores_busy": cpu_split["cores_busy"],
            "redis_us_per_delivery_by_node": by_node,
            # Commands Redis ran per delivery (INFO commandstats summed over the nodes, the bench's own polling
            # included): a count, free of the machine's noise.
            "redis_commands_per_delivery": {c: round(n / max(1, len(expected)), 3)
                                            for c, n in calls.most_common() if n > 0},
            "peak_rss_mb": round(max(peak), 1) if peak else 0.0,
            "rss_mb_start_end": [_max_rss(samples[0]), _max_rss(samples[-1])] if samples else [],
            "profile": profile_rows,
            "profile_sampled_over_cpu": profile_sampled_over_cpu,
            "timeline": [[round(s.t, 2), s.delivered, [round(r, 1) for r in s.rss_mb]] for s in samples],
        }
        out["_latencies"] = latencies
        return out

    async def _workers_ready(self, redis: Any, shard_keys: Any, processes: int, timeout_s: float = 60.0) -> None:
        """Wait until every worker process has joined the consumer group (imports done, providers built,
        first read issued), so neither the clock nor the CPU meter bills their start-up to the deliveries;
        on a loaded machine that takes several seconds, far more than a fixed pause would allow."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            joined: set[str] = set()
            for keys in shard_keys:
                for stream in (keys.stream, keys.stream_high):
                    with contextlib.suppress(Exception):  # the group exists once a worker created it
                        joined.update(str(c.get("name")) for c in await redis.xinfo_consumers(stream, keys.group))
            if len(joined) >= processes:
                break
            await asyncio.sleep(0.1)
        else:
            _progress("workers not all ready in time; measuring anyway", final=True)
        await asyncio.sleep(0.3)  # the read loop entered

    async def _dead_pairs(self, redis: Any, keys: Any) -> set[tuple[str, str]]:
        """(message id, device key) of every dead letter: what is accounted for without a receipt."""
        from ..core.schema import loads_message

        out: set[tuple[str, str]] = set()
        for _, fields in await redis.xrange(keys.dead):
            raw = fields.get(b"m")
            if raw:
                m = loads_message(raw)
                out |= {(m.id, d.key) for d in m.devices}
        return out

    async def _acked(self, redis: Any, keys: Any) -> int:
        """Deliveries settled so far, from the group's view: entries read minus still pending (fast mode)."""
        settled = 0
        for stream in (keys.stream, keys.stream_high):
            with contextlib.suppress(Exception):  # a lane's stream exists once its group is created
                for g in await redis.xinfo_groups(stream):
                    if g.get("name") in (b"workers", "workers"):
                        settled += int(g.get("entries-read") or 0) - int(g.get("pending") or 0)
        return settled

    def _fake_receipts(self, fakes: list[Any]) -> list[tuple[float, str]]:
        apns, fcm, wp = fakes
        out: list[tuple[float, str]] = []
        for r in apns.received:
            out.append((r.received_at, f"apns:{r.apns_id}"))
        for r in fcm.received:
            out.append((r.received_at, f"fcm:{r.message['data']['pushgw_id']}/{r.message['token']}"))
        for r in wp.received:
            out.append((r.received_at, f"webpush:{orjson.loads(r.plaintext)['id']}|{r.subscription_id}"))
        return out

    async def _baseline(self, settings: Settings, pop: Population, sinks: Any, fakes: list[Any],
                        expected: int, sink_pids: list[int]) -> dict[str, Any]:
        """The same deliveries through the same provider clients, no queue, same number of processes."""
        msgs = self.messages(self.o.messages if not (self.o.rate and self.o.duration_s) else
                             int(self.o.rate * self.o.duration_s), "b")
        work = [(m.dumps(), orjson.dumps(d.to_json())) for m in msgs for d in pop.devices[m.user or ""]]
        path = self.tmp / "baseline.jsonl"
        with path.open("wb") as f:
            for m, d in work:
                f.write(orjson.dumps({"m": orjson.loads(m), "d": orjson.loads(d)}) + b"\n")
        _progress(f"baseline: {len(work)} deliveries straight through the provider clients ...", final=True)
        ctx = mp.get_context("spawn")
        # In strict mode the fakes live in this process's loop: it keeps serving while the children send.
        queue: Any = ctx.Queue()
        children = [ctx.Process(target=_baseline_child, args=(settings, str(path), i, self.o.processes, queue))
                    for i in range(self.o.processes)]
        sink_cpu0 = sum(proc_stat(pid)[0] for pid in sink_pids)
        for c in children:
            c.start()
        results: list[BaselineShare] = []
        while len(results) < len(children):
            try:
                results.append(await asyncio.to_thread(queue.get, True, 1.0))
            except Exception:  # queue.Empty: keep the loop (and the fakes) running
                if not any(c.is_alive() for c in children) and len(results) < len(children):
                    break
        sink_cpu = sum(proc_stat(pid)[0] for pid in sink_pids) - sink_cpu0
        for c in children:
            c.join(10)
        if len(results) < len(children):
            return {"baseline_per_s": 0, "baseline_error": "a baseline process failed"}
        t0 = min(r.start for r in results)
        t1 = max(r.end for r in results)
        ok = sum(r.delivered for r in results)
        split = baseline_split(results)
        if sink_pids:
            split["sinks"] = round(sink_cpu / len(work) * 1e6, 1)  # includes the children's start-up wait
        counts = Counter[str]()
        for r in results:
            counts.update(r.deliveries)
        return {"baseline_per_s": round(len(work) / (t1 - t0)), "baseline_delivered": ok, "baseline_deliveries": len(work),
                "baseline_cpu_us_per_delivery": split, "baseline_deliveries_by_provider": dict(counts)}


def sum_stats(stats: list[Any]) -> Any:
    """The queue figures of every shard together."""
    return replace(stats[0], **{f: sum(getattr(s, f) for s in stats) for f in
                                ("lag", "lag_high", "pending", "delayed", "dead_letters", "length")})


async def store_population(redis: Any, shards: Any, pop: Population, policy: str) -> None:
    """Register every user's devices (and, for policy "full", some preferences) in one pipeline, each user's
    on its shard."""
    async with redis.pipeline(transaction=False) as pipe:
        zones = ("Europe/Paris", "America/New_York", "Asia/Kolkata", "Africa/Lagos")
        for i, (user, devs) in enumerate(pop.devices.items()):
            keys = shards.user_keys(user)
            pipe.hset(keys.devices(user), mapping={d.key: orjson.dumps(d.to_json()) for d in devs})
            if policy == "full" and i % 5 == 0:  # a fifth of the learners stored a time zone and an opt-out
                pipe.hset(keys.user(user), mapping={"tz": zones[i % 4], "opt_out": b'{"all":false,"categories":["x"]}'})
        await pipe.execute()


BENCH_P256DH = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
BENCH_AUTH = "BTBZMqHH6r4Tts7J_aSIgg"  # RFC 8291's example subscription keys: nginx does not decrypt


def _baseline_child(settings: Settings, path: str, index: int, count: int, queue: Any) -> None:
    from ..gateway.pool import install_loop

    install_loop()
    queue.put(asyncio.run(_baseline_send(settings, _load_share(path, index, count))))


def _load_share(path: str, index: int, count: int) -> list[Any]:
    """Every count-th delivery of the file, starting at index: this process's share of the baseline."""
    from ..core.schema import parse_device, parse_message
    from ..providers.base import Delivery

    deliveries: list[Delivery] = []
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i % count != index:
                continue
            doc = orjson.loads(line)
            errors: list[Any] = []
            device = parse_device(doc["d"], "d", errors, None)
            assert device is not None
            msg = parse_message(doc["m"], now=0.0)
            deliveries.append(Delivery(msg, device, 1, msg.expiry(time.time())))
    return deliveries


@dataclass
class BaselineShare:
    """One baseline process's run: its wall-clock span, deliveries made, and CPU seconds per provider."""

    start: float
    end: float
    delivered: int
    cpu_s: dict[str, float]  # provider -> CPU seconds of this process while sending that provider's share
    deliveries: dict[str, int]  # provider -> deliveries sent
    encryption_cpu_s: float  # RFC 8291 encryption of the Web Push share alone, timed apart


async def _baseline_send(settings: Settings, deliveries: list[Any]) -> BaselineShare:
    """The provider clients used as a careful library user would: one provider's share at a time, as
    many requests in flight as the gateway allows (`providers.concurrency`, so each event-loop wakeup
    handles many responses), messages parsed once before the clock. Each provider's CPU is measured on
    its own; the Web Push share is also encrypted once more apart (RFC 8291 ECDH + AES-GCM, a cost
    every message pays whoever sends it), so that inherent part shows as its own line."""
    from ..providers import build_providers
    from ..providers.base import Delivered, Delivery
    from ..providers.payloads import webpush_plaintext
    from ..providers.webpush import encrypt

    providers = build_providers(settings)
    by_provider: dict[str, list[Delivery]] = {name: [] for name in providers}
    for d in deliveries:
        by_provider[d.device.provider].append(d)
    ok = 0

    async def lane(provider: Any, items: list[Delivery]) -> None:
        nonlocal ok
        send = provider.send
        while items:
            if isinstance(await send(items.pop()), Delivered):
                ok += 1

    # Warm up connections and tokens outside the clock, as the gateway's workers were before theirs.
    for name, items in by_provider.items():
        if items:
            await providers[name].send(items[0])
    cpu: dict[str, float] = {}
    counts: dict[str, int] = {}
    t0 = time.time()
    for name, items in by_provider.items():
        counts[name] = len(items)
        cpu0 = time.process_time()
        await asyncio.gather(*(lane(providers[name], items) for _ in range(min(len(items), settings.providers.concurrency))))
        cpu[name] = time.process_time() - cpu0
    t1 = time.time()
    for p in providers.values():
        await p.close()
    wp = [d for d in deliveries if d.device.provider == "webpush"]
    plain = [webpush_plaintext(d.message) for d in wp]
    cpu0 = time.process_time()
    for d, text in zip(wp, plain, strict=True):
        encrypt(text, d.device.p256dh or "", d.device.auth or "")
    encryption = time.process_time() - cpu0
    return BaselineShare(t0, t1, ok, cpu, counts, encryption)


def baseline_split(shares: Sequence[BaselineShare]) -> dict[str, float]:
    """µs of CPU per delivery: `clients` over all deliveries, then each provider over its own deliveries,
    and `webpush_encryption` per Web Push delivery (part of `webpush`)."""
    total_cpu = sum(sum(s.cpu_s.values()) for s in shares)
    total = sum(sum(s.deliveries.values()) for s in shares)
    out = {"clients": round(total_cpu / total * 1e6, 1) if total else 0.0}
    for name in sorted({n for s in shares for n in s.deliveries}):
        n = sum(s.deliveries.get(name, 0) for s in shares)
        if n:
            out[name] = round(sum(s.cpu_s.get(name, 0.0) for s in shares) / n * 1e6, 1)
    n_wp = sum(s.deliveries.get("webpush", 0) for s in shares)
    if n_wp:
        out["webpush_encryption"] = round(sum(s.encryption_cpu_s for s in shares) / n_wp * 1e6, 1)
    return out


def plots(result: dict[str, Any], latencies: list[float], directory: Path) -> list[str]:
    """throughput.png (deliveries/s over time, RSS) and latency_cdf.png; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    tl = result["timeline"]
    if len(tl) > 1:
        fig, ax = plt.subplots(figsize=(8, 4))
        ts = [row[0] for row in tl]
        rates = [0.0] + [(tl[i][1] - tl[i - 1][1]) / max(1e-6, tl[i][0] - tl[i - 1][0]) for i in range(1, len(tl))]
        ax.plot(ts, rates, label="stream entries settled/s")
        ax.set_xlabel("seconds")
        ax.set_ylabel("entries/s")
        ax2 = ax.twinx()
        ax2.plot(ts, [max(row[2]) if row[2] else 0 for row in tl], color="tab:red", alpha=0.6, label="max worker RSS")
        ax2.set_ylabel("RSS MB")
        ax.set_title(f"pushgw {result['mode']} mode, {result['workers']} workers, {result['messages']} messages")
        fig.tight_layout()
        p = directory / "throughput.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(str(p))
    if latencies:
        fig, ax = plt.subplots(figsize=(6, 4))
        ys = [i / len(latencies) for i in range(len(latencies))]
        ax.plot(latencies, ys)
        ax.set_xscale("log")
        ax.set_xlabel("enqueue -> sink receipt, ms")
        ax.set_ylabel("fraction")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        p = directory / "latency_cdf.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(str(p))
    return written


def summary(result: dict[str, Any]) -> str:
    lat = result["latency_ms"]
    rows = [
        ("mode", f"{result['mode']}, policy {result.get('policy')}, rich share {result.get('rich', 0.0)}, "
                 f"status+events {'on' if result.get('status', True) else 'off'}"),
        ("messages / deliveries", f"{result['messages']} / {result['deliveries_expected']}"),
        ("delivered", result["delivered"]),
        ("dead-lettered", result["dead_lettered"]),
        ("lost / duplicates", f"{result['lost']} / {result['duplicates']}"),
        ("time", f"{result['seconds']} s"),
        ("throughput", f"{result['throughput_per_s']:,} messages/s, {result['deliveries_per_s']:,} deliveries/s"),
        ("baseline (no queue)", f"{result['baseline_per_s']:,} deliveries/s" if result.get("baseline_per_s") else "-"),
        ("gateway / baseline", result.get("ratio", "-")),
        ("latency p50/p95/p99", f"{lat['p50']} / {lat['p95']} / {lat['p99']} ms ({lat['samples']} samples)"),
        ("worker CPU", f"{result['cpu_s_per_1k']} s per 1000 messages"),
        ("CPU per delivery", ", ".join(f"{k} {v} µs" for k, v in result.get("cpu_us_per_delivery", {}).items())
         + f" ({result.get('cores_busy', 0):.0%} of all cores busy)"),
        ("Redis commands/delivery", f"{sum(result.get('redis_commands_per_delivery', {}).values()):.2f}"),
        ("Redis CPU per node", " / ".join(f"{v} µs" for v in result.get("redis_us_per_delivery_by_node", []))
         or "-"),
        ("baseline CPU per delivery", ", ".join(f"{k} {v} µs" for k, v in
                                                 result.get("baseline_cpu_us_per_delivery", {}).items()) or "-"),
        ("workers / baseline CPU", result.get("cpu_over_baseline", "-")),
        ("peak RSS per worker", f"{result['peak_rss_mb']} MB"),
        ("worker RSS start -> end", " -> ".join(f"{v} MB" for v in result.get("rss_mb_start_end", [])) or "-"),
        ("sink ceiling (h2load)", ", ".join(f"{k} {v:,.0f}/s" for k, v in result.get("sink_ceiling_per_s", {}).items())
         or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    if result.get("profile"):
        from .profile import render

        text += ("\n\n  worker CPU by component (py-spy samples x the workers' CPU per delivery; sampled time / CPU "
                 f"{result.get('profile_sampled_over_cpu')}: above 1, the workers waited for a core)\n"
                 + render(result["profile"]))
    return text


def run(opts: Options) -> int:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pushgw-bench-metrics-")
    from ..gateway.pool import install_loop

    install_loop()
    with tempfile.TemporaryDirectory(prefix="pushgw-bench-") as tmp:
        result = asyncio.run(Bench(opts, Path(tmp)).run())
    latencies = result.pop("_latencies", [])
    sys.stdout.write("\npushgw bench\n" + summary(result) + "\n")
    if opts.json_path:
        Path(opts.json_path).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        sys.stdout.write(f"  json: {opts.json_path}\n")
    if opts.plots_dir:
        for p in plots(result, latencies, Path(opts.plots_dir)):
            sys.stdout.write(f"  plot: {p}\n")
    ok = result["lost"] == 0 and result["duplicates"] == 0
    sys.stdout.write("  OK: lost 0, duplicates 0\n" if ok else "  FAILED: lost or duplicated deliveries\n")
    return 0 if ok else 1


def bench_policy(level: str) -> PolicySettings:
    if level == "off":
        return PolicySettings(enabled=False)
    if level == "default":
        return PolicySettings()
    # Every rule is evaluated and recorded, but the limits are out of reach (the skewed users get
    # thousands of messages) and the window is all day, so the run measures the policy's cost alone.
    return PolicySettings(
        enabled=True, user_limit=10**6, user_period_s=60.0,
        caps=(CategoryCap("reminder", 10**6, 7 * 86400.0), CategoryCap("new_content", 10**6, 86400.0),
              CategoryCap("reward", 10**6, 86400.0)),
        windows=("00:00-24:00",), timezone="Europe/Paris", opt_out_exempt=("account",),
        provider_rates=(("fcm", 10.0**6), ("apns", 10.0**6), ("webpush", 10.0**6)),
    )


def options_from(ns: Any) -> Options:
    return replace(Options(), messages=ns.messages, users=ns.users, processes=ns.processes, mode=ns.mode, rate=ns.rate,
                   duration_s=ns.duration, baseline=not ns.no_baseline, json_path=ns.json, plots_dir=ns.plots,
                   seed=ns.seed, policy=ns.policy, rich=ns.rich,
                   profile_dir=getattr(ns, "profile", None), cluster=_cluster_masters(ns.redis),
                   sentinel=ns.redis == "sentinel",
                   status=ns.status == "on")


def _cluster_masters(value: str) -> int:
    """`--redis single` (one embedded Redis), `sentinel` (a master and a replica behind three sentinels) or
    `cluster:N` (a loopback Redis Cluster of N masters)."""
    kind, _, masters = value.partition(":")
    if kind in ("single", "sentinel") and not masters:
        return 0
    if kind == "cluster" and masters.isdigit() and int(masters) >= 1:
        return int(masters)
    raise ValueError(f"--redis must be single, sentinel or cluster:N (N masters), not {value!r}")
