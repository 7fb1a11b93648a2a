"""VAPID (RFC 8292): the gateway's identity towards Web Push services.

One P-256 key identifies the application server; browsers subscribe with its public half (the
"application server key"), and every push carries `Authorization: vapid t=<JWT>, k=<public key>`.
The JWT's audience is the push service's origin, so one signed token serves every subscription
on that service: `VapidSigner` signs once per origin and reuses the token until it is an hour from
its 12-hour expiry (RFC 8292 allows at most 24 hours).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..core.config import ConfigError
from .jose import b64url, load_p256_key, sign_es256

TOKEN_LIFETIME_S = 12 * 3600
REFRESH_BEFORE_S = 3600


def make_vapid_key(directory: str | Path, name: str = "vapid.pem") -> Path:
    """Create a new VAPID private key (PEM, mode 0600) in `directory`; never overwrites one.

    Replacing the key invalidates every browser subscription made with the old public key, so an
    existing file is an error rather than something to overwrite.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; a new VAPID key would orphan every subscription made with it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def load_vapid_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    return load_p256_key(path, "webpush.vapid_private_key_file")


def application_server_key(key: ec.EllipticCurvePrivateKey) -> str:
    """The public key browsers pass to `pushManager.subscribe` (base64url, uncompressed point)."""
    raw = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b64url(raw)


class VapidSigner:
    """Signs VAPID JWTs, one per push-service origin, cached until an hour before they expire."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, subject: str, *, clock: Callable[[], float] = time.time) -> None:
        if not subject.startswith(("mailto:", "https://")):
            raise ConfigError("webpush.vapid_subject must be a mailto: or https: URL (RFC 8292)")
        self._key = key
        self._subject = subject
        self._clock = clock
        self.public_key = application_server_key(key)
        self._cache: dict[str, tuple[float, str]] = {}  # origin -> (expiry, Authorization header value)
        self.signed = 0

    def authorization(self, origin: str) -> str:
        """The `Authorization` header value for a push service at `origin` (scheme://host[:port])."""
        now = self._clock()
        cached = self._cache.get(origin)
        if cached is not None and cached[0] - now > REFRESH_BEFORE_S:
            return cached[1]
        exp = int(now) + TOKEN_LIFETIME_S
        token = sign_es256(self._key, {"typ": "JWT", "alg": "ES256"}, {"aud": origin, "exp": exp, "sub": self._subject})
        value = f"vapid t={token}, k={self.public_key}"
        if len(self._cache) > 10_000:  # origins are a handful of push services; bound it anyway
            self._cache.clear()
        self._cache[origin] = (exp, value)
        self.signed += 1
        return value
