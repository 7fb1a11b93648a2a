"""Worker CPU per delivery spent on message status and outcome events, without Redis.

    python -m pushgw.bench.status_overhead [--n 512] [--rounds 40]

For each delivery of a commit of `--n` (one device each, a 150-character FCM token): the tracker's in-flight
record and final outcome (gateway/tracking.py), then `queue/status.write` building the commit's one EVAL (the
status fields, and the events as one JSON array) and hiredis packing that command, as `StreamQueue.commit`
sends it. Two cases: the delivery settled before the
commit (its in-flight step is left out, the common case) and still under way (the step is written). Prints
microseconds per delivery (median of 5 runs of `--rounds` commits), as JSON. What Redis spends running the
script shows in `pushgw bench` (Redis CPU per delivery, `--status on` against `off`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import orjson
from hiredis import pack_command

from ..core.config import StatusSettings
from ..core.schema import Device, parse_message
from ..gateway.tracking import Tracker
from ..queue import status
from ..queue.keys import Keys
from ..queue.streams import Commit


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
    def __init__(self, pending: int) -> None:
        self.pending = pending


def _us_per_delivery(n: int, rounds: int, pending: int) -> float:
    keys = Keys()
    messages = [parse_message({"id": f"reminder-{i}", "user": f"learner-{i}", "title": "Live session in 15 minutes",
                               "campaign": "spring", "variant": "a"}) for i in range(n)]
    devices = [Device("fcm", f"{i:0>150}") for i in range(n)]
    job = _Job(pending)
    holder = [Commit()]
    tracker = Tracker(StatusSettings(), lambda: holder[0], time.time)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            holder[0] = c = Commit()
            for m, d in zip(messages, devices, strict=True):
                tracker.in_flight(m, 1, (d,), job)
                tracker.final("delivered", m, d, "fcm", 1, provider_id="projects/campus/messages/0:1700000000%abc")
            status.write(_Pipe(), keys, c.steps, c.started, c.outcomes, retention_s=604800, events_maxlen=1_000_000)
        runs.append((time.perf_counter() - start) / (rounds * n) * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="deliveries per commit (FLUSH_MAX_ITEMS is 512)")
    ap.add_argument("--rounds", type=int, default=40, help="commits per run (5 runs)")
    args = ap.parse_args(argv)
    out = {"settled_before_commit_us": round(_us_per_delivery(args.n, args.rounds, 0), 2),
           "in_flight_at_commit_us": round(_us_per_delivery(args.n, args.rounds, 1), 2)}
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
