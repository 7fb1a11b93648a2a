"""Per-message CPU cost of preparing one Web Push request: pywebpush + py_vapid versus `providers.webpush`.

    python -m pushgw.bench.webpush_encode [--n 2000]

Both sides do what a send needs besides the HTTP request: encrypt the payload (aes128gcm) for one
subscription and produce the VAPID Authorization header. pywebpush signs a new VAPID JWT per
message (`Vapid.sign`), ours reuses one per push-service origin and the subscription's parsed
public key (`pushgw_us_per_msg`: a subscription seen before; `pushgw_first_msg_us`: the key cache
emptied before every message, what a subscription's first message costs). Prints microseconds per
message (median of 5 runs) and the ratio, as JSON.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid
from pywebpush import WebPusher

from ..providers.vapid import VapidSigner, load_vapid_key, make_vapid_key
from ..providers.webpush import encrypt, subscription_key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _per_message_us(fn: Callable[[], object], n: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="messages per run (5 runs)")
    args = ap.parse_args(argv)

    browser = ec.generate_private_key(ec.SECP256R1())
    public = browser.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    p256dh, auth = _b64(public), _b64(os.urandom(16))
    sub = {"endpoint": "https://fcm.googleapis.com/fcm/send/abc", "keys": {"p256dh": p256dh, "auth": auth}}
    payload = orjson.dumps({"id": "reminder-1", "category": "reminder", "title": "Live session in 15 minutes",
                            "body": "data-science: Q&A with your mentor", "data": {"link": "/live/1"}})
    with tempfile.TemporaryDirectory() as tmp:
        key_path = make_vapid_key(tmp)
        key = load_vapid_key(key_path)
        vapid = Vapid.from_file(str(key_path))
        signer = VapidSigner(key, "mailto:ops@example.org")
        claims = {"sub": "mailto:ops@example.org", "aud": "https://fcm.googleapis.com"}
        pusher = WebPusher(sub)

        def theirs() -> object:
            pusher.encode(payload, "aes128gcm")
            return vapid.sign(dict(claims, exp=int(time.time()) + 43200))

        def ours() -> object:
            encrypt(payload, p256dh, auth)
            return signer.authorization("https://fcm.googleapis.com")

        def ours_first() -> object:
            subscription_key.cache_clear()
            return ours()

        theirs_us = _per_message_us(theirs, args.n)
        ours_us = _per_message_us(ours, args.n)
        first_us = _per_message_us(ours_first, args.n)
    result = {"pywebpush_us_per_msg": round(theirs_us, 1), "pushgw_us_per_msg": round(ours_us, 1),
              "pushgw_first_msg_us": round(first_us, 1), "speedup": round(theirs_us / ours_us, 2), "n": args.n,
              "python": sys.version.split()[0]}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
