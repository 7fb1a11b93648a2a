"""The JWT pieces every signer and verifier here shares: unpadded base64url, ES256 in JWS form, P-256 keys.

APNs provider tokens and VAPID tokens are both ES256 JWTs (RFC 7515/7518): the signature is the
raw 64-byte r||s, not the DER that `cryptography` produces and expects, so both directions convert.
The FCM OAuth2 assertion (RS256, providers/oauth2.py) uses `b64url` from here too.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from ..core.config import ConfigError

_ES256 = ec.ECDSA(hashes.SHA256())


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JWTs use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_p256_key(path: str | Path, setting: str) -> ec.EllipticCurvePrivateKey:
    """A PEM (PKCS#8, e.g. Apple's .p8) P-256 private key; errors name the setting, never the key."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{setting} {path} is not a readable PEM private key ({type(e).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"{setting} {path} must hold a P-256 (ES256) key")
    return key


def sign_es256(key: ec.EllipticCurvePrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A compact JWS: base64url(header).base64url(claims).base64url(r || s)."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    r, s = decode_dss_signature(key.sign(signing_input.encode("ascii"), _ES256))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """(header, claims, signing input, signature) of a compact JWS; ValueError if it is malformed."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("a JWT has three parts")
    try:
        header, claims = orjson.loads(b64url_decode(parts[0])), orjson.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except (ValueError, orjson.JSONDecodeError):
        raise ValueError("a JWT part is not base64url JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("JWT header and claims must be objects")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def es256_valid(public_key: ec.EllipticCurvePublicKey, signing_input: bytes, signature: bytes) -> bool:
    """Whether a raw r || s ES256 signature is valid for `signing_input`."""
    if len(signature) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, signing_input, _ES256)
    except InvalidSignature:
        return False
    return True
