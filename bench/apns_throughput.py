"""Throughput of `ApnsProvider` (our HTTP/2 client, providers/h2/) against FakeApns in another process, over TLS.

    python -m pushgw.bench.apns_throughput [--n 20000] [--concurrency 500] [--connections 2] [--sink nginx]
        [--rate R]

The fake runs in a child process so that the figure is the client's (plus loopback TLS), not the
two sharing one event loop. Prints pushes per second and the client process's CPU time per push,
as JSON. Both include TLS and the fake's JWT checks on its own core. `--sink nginx` sends to the
bench's nginx sink instead (bench/sinks.py: C, no JWT check, so many answers per read, as in
`pushgw bench`); `--rate R` starts pushes at R per second instead of all at once (the client's cost
when each event-loop wakeup has few answers).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from ..core.config import ApnsApp, ProviderSettings
from ..core.schema import Device, Message
from ..gateway.pool import install_loop
from ..providers.apns import ApnsProvider
from ..providers.base import Delivered, Delivery
from ..providers.fakes.apns import ApnsKey, FakeApns, make_apns_key
from ..providers.fakes.tls import make_local_ca
from .sinks import NginxSinks

TOPIC = "org.example.bench"


def _serve(directory: str, conn: Connection) -> None:

    install_loop()

    async def main() -> None:
        ca = make_local_ca(Path(directory) / "tls")
        key = ApnsKey(Path(directory) / "AuthKey_BENCH00001.p8", "BENCH00001", "TEAMBENCH1")
        async with FakeApns(ca, keys=[key], topics=[TOPIC]) as fake:
            conn.send(fake.port)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the parent is done
            conn.send(len(fake.received))

    asyncio.run(main())


async def _run(directory: Path, port: int, n: int, concurrency: int, connections: int,
               rate: float = 0.0) -> dict[str, Any]:

    app = ApnsApp("default", TOPIC, team_id="TEAMBENCH1", key_id="BENCH00001",
                  key_file=str(directory / "AuthKey_BENCH00001.p8"), host="127.0.0.1", port=port,
                  ca_file=str(directory / "tls" / "ca.pem"), connections=connections)
    provider = ApnsProvider([app], ProviderSettings(timeout_s=30.0, concurrency=1000))
    msg = Message(id="bench", title="Live session in 15 minutes", body="Statistics 101 starts at 14:00",
                  data={"link": "/sessions/812"}, category="reminder", priority="high")
    deliveries = [Delivery(msg, Device("apns", f"{i:064x}")) for i in range(n)]
    await provider.send(deliveries[0])  # connect and authenticate before timing
    return await time_sends(provider, deliveries, concurrency, rate)


async def time_sends(provider: Any, deliveries: list[Any], concurrency: int, rate: float = 0.0) -> dict[str, Any]:
    """Send every delivery with `concurrency` senders in flight; wall time, rate and client CPU per push.
    With `rate`, a pacer hands deliveries to idle senders as they fall due (checked every 1 ms, not a
    timer per push), as the gateway's lanes wake an idle sender per delivery. Shared by the APNs and
    FCM client benchmarks; closes the provider."""

    n, ok = len(deliveries), 0
    items = list(deliveries)
    idle: list[asyncio.Future[Any]] = []  # paced: senders waiting to be handed a delivery
    given = 0  # paced: deliveries handed out

    async def sender() -> None:
        nonlocal ok
        loop = asyncio.get_running_loop()
        while True:
            if rate:
                if given == n:
                    return
                wait = loop.create_future()
                idle.append(wait)
                item = await wait
                if item is None:
                    return
            elif items:
                item = items.pop()
            else:
                return
            if isinstance(await provider.send(item), Delivered):
                ok += 1

    async def pace() -> None:
        nonlocal given
        start = time.perf_counter()
        while given < n:
            due = min(n, int((time.perf_counter() - start) * rate))
            while given < due and idle:  # more due than idle senders: the rest waits for the next tick
                idle.pop().set_result(items.pop())
                given += 1
            await asyncio.sleep(0.001)
        for wait in idle:  # the senders busy now return after their send
            wait.set_result(None)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)), *([pace()] if rate else []))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await provider.close()
    return {"pushes": n, "delivered": ok, "seconds": round(wall, 3), "pushes_per_s": round(n / wall),
            "client_cpu_us_per_push": round(cpu / n * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--sink", choices=("fake", "nginx"), default="fake")
    ap.add_argument("--rate", type=float, default=0.0, help="pushes started per second (0: all at once)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca = make_local_ca(directory / "tls")
        make_apns_key(directory, key_id="BENCH00001", team_id="TEAMBENCH1")
        if args.sink == "nginx":
            sinks = NginxSinks(directory / "nginx", ca).start()
            try:
                install_loop()
                result = asyncio.run(_run(directory, sinks.apns_port, args.n, args.concurrency, args.connections,
                                          args.rate))
            finally:
                sinks.stop()
            result["sink"] = "nginx"
            sys.stdout.write(orjson.dumps(result).decode() + "\n")
            return 0 if result["delivered"] == args.n else 1
        parent, child = mp.Pipe()
        proc = mp.get_context("spawn").Process(target=_serve, args=(tmp, child), daemon=True)
        proc.start()
        port = parent.recv()
        install_loop()
        result = asyncio.run(_run(directory, port, args.n, args.concurrency, args.connections, args.rate))
        parent.send("done")
        result["fake_received"] = parent.recv()
        proc.join(5)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0 if result["delivered"] == args.n else 1


if __name__ == "__main__":
    raise SystemExit(main())
