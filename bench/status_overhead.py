"""Worker CPU per delivery spent on message status and outcome events, without Redis.

    python -m pushgw.bench.status_overhead [--n 512] [--rounds 40]

For each delivery of a commit of `--n` (one device each, a 150-character FCM token): the tracker's in-flight
record and final outcome (gateway/tracking.py), the flush's look at the in-flight records due, then
`queue/status.write` building the commit's one EVAL (the status records, and the events as one JSON array)
and hiredis packing that command, as `StreamQueue.commit` sends it. Two cases: the delivery settled within
`IN_FLIGHT_AFTER_S` (its in-flight step is left out, the common case) and still under way then (the step is
written). Then the same commits written for real, in MULTI/EXEC, to a private redis-server: Redis CPU per
delivery (`INFO cpu`) for status and events, status only, events only; and the intake's part
(`record_accepted`, one EVAL per batch of `--n` messages): its CPU here and Redis's, per message. Prints
microseconds per delivery (CPU here: median of 5 runs of `--rounds` commits), as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Collection
from typing import Any

import orjson
from hiredis import pack_command

from ..core.config import StatusSettings
from ..core.schema import Device, Message, parse_message
from ..gateway.embedded import EmbeddedRedis
from ..gateway.tracking import Tracker
from ..queue import status
from ..queue.connection import redis_from_url
from ..queue.keys import Keys
from ..queue.streams import Commit, Entry


class _Pipe:
    """Takes the EVAL the way a redis-py pipeline would, and packs it as the gateway's connections do."""

    def __init__(self) -> None:
        self.packed = b""

    def eval(self, *args: Any) -> None:
        self.packed = pack_command(("EVAL", *args))

    def xadd(self, name: str, fields: dict[str, bytes], **_: Any) -> None:
        args: list[Any] = ["XADD", name]
        for kv in fields.items():
            args += kv
        self.packed = pack_command(tuple(args))


class _Job:
    """The worker's job as the tracker sees it (gateway/settle.py `Job`)."""

    def __init__(self, message: Message, entry: Entry) -> None:
        self.message = message
        self.entry = entry
        self.started_ms = 0
        self.devices: Collection[Device] = ()


def _deliveries(n: int, tag: str) -> list[tuple[_Job, Device]]:
    entry = Entry("1-0", b"", 1, 0)
    return [(_Job(parse_message({"id": f"reminder-{tag}-{i}", "user": f"learner-{i}", "title": "Live session in 15 minutes",
                                 "campaign": "spring", "variant": "a"}), entry), Device("fcm", f"{i:0>150}"))
            for i in range(n)]


def _track(deliveries: list[tuple[_Job, Device]], under_way: bool) -> Commit:
    """The commit the tracker collects for these deliveries, each sent and delivered, with the in-flight steps
    due at a flush `IN_FLIGHT_AFTER_S` later: none if the jobs settled (they are no longer under way), one per
    job if they are still `under_way`."""
    holder = [Commit()]
    now = [time.time()]
    tracker = Tracker(StatusSettings(), lambda: holder[0], lambda: now[0])
    for job, d in deliveries:
        tracker.in_flight(job, (d,))
        tracker.final("delivered", job.message, d, "fcm", 1, provider_id="projects/campus/messages/0:1700000000%abc")
    now[0] += status.IN_FLIGHT_AFTER_S
    tracker.due_in_flight(holder[0], [job for job, _ in deliveries] if under_way else ())
    return holder[0]


def _us_per_delivery(n: int, rounds: int, under_way: bool) -> float:
    deliveries, keys = _deliveries(n, "w"), Keys()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            c = _track(deliveries, under_way)
            status.write(_Pipe(), keys, c.steps, c.started, c.outcomes, retention_s=604800, events_maxlen=1_000_000)
        runs.append((time.perf_counter() - start) / (rounds * n) * 1e6)
    return statistics.median(runs)


async def _redis_us_per_delivery(n: int, rounds: int) -> dict[str, float]:
    """Redis CPU per delivery of the commits' EVAL/XADD, on a private redis-server (no persistence)."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(tmp, aof=False)
        redis = redis_from_url(server.start())
        try:
            for name, retention, maxlen in (("status_and_events", 604800, 100_000), ("status_only", 604800, 0),
                                            ("events_only", 0, 100_000)):
                commits = [_track(_deliveries(n, f"{name}-{r}"), False) for r in range(rounds)]
                before = await redis.info("cpu")
                for c in commits:
                    async with redis.pipeline(transaction=True) as pipe:
                        status.write(pipe, Keys(), c.steps, c.started, c.outcomes, retention_s=retention,
                                     events_maxlen=maxlen)
                        await pipe.execute()
                after = await redis.info("cpu")
                used = sum(after[k] - before[k] for k in ("used_cpu_user", "used_cpu_sys"))
                out[f"redis_{name}_us"] = round(used / (rounds * n) * 1e6, 2)
                await redis.flushall()
            batches = [[job.message for job, _ in _deliveries(n, f"intake-{r}")] for r in range(rounds)]
            before, cpu0 = await redis.info("cpu"), time.process_time()
            for batch in batches:
                await status.record_accepted(redis, Keys(), batch, int(time.time() * 1000), retention_s=604800)
            cpu1, after = time.process_time(), await redis.info("cpu")
            used = sum(after[k] - before[k] for k in ("used_cpu_user", "used_cpu_sys"))
            out["intake_record_accepted_us"] = round((cpu1 - cpu0) / (rounds * n) * 1e6, 2)
            out["redis_intake_us"] = round(used / (rounds * n) * 1e6, 2)
            await redis.flushall()
        finally:
            await redis.aclose()
            server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="deliveries per commit (FLUSH_MAX_ITEMS is 512)")
    ap.add_argument("--rounds", type=int, default=40, help="commits per run (5 runs)")
    args = ap.parse_args(argv)
    out: dict[str, float] = {"settled_in_time_us": round(_us_per_delivery(args.n, args.rounds, False), 2),
                             "still_in_flight_us": round(_us_per_delivery(args.n, args.rounds, True), 2)}
    out.update(asyncio.run(_redis_us_per_delivery(args.n, args.rounds)))
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
