"""Throughput of `FcmProvider` against FakeFcm in another process, over TLS: HTTP/2 (default) or HTTP/1.1.

    python -m pushgw.bench.fcm_throughput [--n 20000] [--concurrency 256] [--http1] [--sink nginx] [--rate R]

`--http1` makes the fake serve HTTP/1.1 only, so the provider takes its HTTP/1.1 path (aiohttp,
one keep-alive connection per request in flight): the two runs compare the transports with the
same provider code around them. The fake runs in a child process so that the figure is the
client's (plus loopback TLS), not the two sharing one event loop. `--sink nginx` sends to the bench's
nginx sink instead (bench/sinks.py, HTTP/2: many answers per read, as in `pushgw bench`); `--rate R`
paces the sends (`apns_throughput.time_sends`). Prints pushes per second and
the client process's CPU time per push, as JSON; pushes/s is bounded by the fake (Python, on the
other core), CPU per push is the client's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from ..core.config import FcmApp, ProviderSettings
from ..core.schema import Device, Message
from ..gateway.pool import install_loop
from ..providers.base import Delivery
from ..providers.fakes.fcm import FakeFcm, make_service_account
from ..providers.fakes.tls import make_local_ca
from ..providers.fcm import FcmProvider
from .apns_throughput import time_sends
from .sinks import NginxSinks


def _serve(directory: str, http2: bool, conn: Connection) -> None:

    install_loop()

    async def main() -> None:
        ca = make_local_ca(Path(directory) / "tls")
        async with FakeFcm(ca, http2=http2) as fake:
            fake.service_account(Path(directory) / "sa", "bench")
            conn.send(fake.port)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the parent is done
            conn.send([len(fake.received), fake.connections, fake.http1_connections])

    asyncio.run(main())


async def _run(directory: Path, port: int, n: int, concurrency: int, rate: float = 0.0) -> dict[str, Any]:

    [sa] = (directory / "sa").glob("*.json")
    app = FcmApp("default", service_account_file=str(sa), base_url=f"https://127.0.0.1:{port}",
                 ca_file=str(directory / "tls" / "ca.pem"))
    provider = FcmProvider([app], ProviderSettings(timeout_s=30.0, concurrency=concurrency))
    msg = Message(id="bench", title="New module available", body="Module 4 of Data Science is out",
                  data={"track": "data-science", "module": "4"}, category="new_content", campaign="module-launch")
    deliveries = [Delivery(msg, Device("fcm", f"fcm-{i}-0-{i:010x}")) for i in range(n)]
    await provider.send(deliveries[0])  # access token and a first connection before timing
    return await time_sends(provider, deliveries, concurrency, rate)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=256, help="sends in flight (providers.concurrency)")
    ap.add_argument("--http1", action="store_true", help="the fake serves HTTP/1.1 only")
    ap.add_argument("--sink", choices=("fake", "nginx"), default="fake")
    ap.add_argument("--rate", type=float, default=0.0, help="pushes started per second (0: all at once)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca = make_local_ca(directory / "tls")
        if args.sink == "nginx":
            sinks = NginxSinks(directory / "nginx", ca).start()
            try:
                make_service_account(directory / "sa", f"https://127.0.0.1:{sinks.fcm_port}/token", "bench")
                install_loop()
                result = asyncio.run(_run(directory, sinks.fcm_port, args.n, args.concurrency, args.rate))
            finally:
                sinks.stop()
            result["sink"] = "nginx"
            sys.stdout.write(orjson.dumps(result).decode() + "\n")
            return 0 if result["delivered"] == args.n else 1
        parent, child = mp.Pipe()
        proc = mp.get_context("spawn").Process(target=_serve, args=(tmp, not args.http1, child), daemon=True)
        proc.start()
        port = parent.recv()
        install_loop()
        result = asyncio.run(_run(directory, port, args.n, args.concurrency, args.rate))
        parent.send("done")
        received, h2_conns, http1_conns = parent.recv()
        result.update(transport="http/1.1" if args.http1 else "h2", fake_received=received,
                      h2_connections=h2_conns, http1_connections=http1_conns)
        proc.join(5)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0 if result["delivered"] == args.n else 1


if __name__ == "__main__":
    raise SystemExit(main())
