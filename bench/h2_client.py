"""CPU of the HTTP/2 client alone: `H2ClientConnection` over an in-memory transport (no TLS, no socket, no server).

    python -m pushgw.bench.h2_client [--n 200000] [--batch 200]

Each round queues `batch` requests (an APNs-like POST), answers them all in one read, and awaits
them; the figure is the process's CPU time per request, as JSON, for answers in one HEADERS frame
and for answers in HEADERS + DATA. It isolates the framing, header coding and stream bookkeeping
from TLS and the network, which `apns_throughput` includes.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from typing import Any

import orjson

from ..gateway.pool import install_loop
from ..providers.h2 import H2ClientConnection, encode_field

REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"api.push.apple.com"),
           (b":path", b"/3/device/" + b"0" * 64), (b"authorization", b"bearer eyJhbGciOiJFUzI1NiJ9.e30.sig"),
           (b"apns-topic", b"org.example.bench")]
BODY = b'{"aps":{"alert":{"title":"Live session in 15 minutes"}}}'
ANSWER_BODY = b'{"reason":"BadDeviceToken"}'
HEADERS, DATA, SETTINGS = 0x1, 0x0, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">I", stream_id) + payload


class _SslObject:
    def selected_alpn_protocol(self) -> str:
        return "h2"


class MemoryTransport(asyncio.Transport):
    """Takes what the client writes and drops it; says ALPN chose h2."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return _SslObject() if name == "ssl_object" else default


async def _measure(n: int, batch: int, with_body: bool) -> float:
    conn = H2ClientConnection(max_streams=batch)
    conn.connection_made(MemoryTransport())
    conn.data_received(_frame(SETTINGS, 0, 0, struct.pack(">HI", 0x3, batch)))  # MAX_CONCURRENT_STREAMS
    head = b"\x88" + encode_field(b"apns-id", b"8e1c8a1e-1d6f-4f61-9a7e-3c4f1a2b3c4d")  # :status 200 (static index 8)
    cpu0 = time.process_time()
    for _ in range(n // batch):
        first = 2 * conn.requests + 1  # client streams take the odd ids in order
        waits = [asyncio.ensure_future(conn.request(REQUEST, BODY)) for _ in range(batch)]
        await asyncio.sleep(0)  # every request queues its frames
        if with_body:
            answer = b"".join(_frame(HEADERS, END_HEADERS, first + 2 * i, head)
                              + _frame(DATA, END_STREAM, first + 2 * i, ANSWER_BODY) for i in range(batch))
        else:
            answer = b"".join(_frame(HEADERS, END_HEADERS | END_STREAM, first + 2 * i, head) for i in range(batch))
        conn.data_received(answer)
        for w in waits:
            if (await w).status != 200:
                raise RuntimeError("unexpected answer")
    cpu = time.process_time() - cpu0
    conn.close()
    return cpu / (n // batch * batch) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args(argv)
    install_loop()
    result = {
        "requests": args.n,
        "cpu_us_per_request_headers_answer": round(asyncio.run(_measure(args.n, args.batch, False)), 2),
        "cpu_us_per_request_headers_data_answer": round(asyncio.run(_measure(args.n, args.batch, True)), 2),
    }
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
