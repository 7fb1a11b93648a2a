"""Google service-account OAuth2 (JWT bearer grant, RFC 7523) for FCM HTTP v1.

FCM v1 accepts only short-lived OAuth2 access tokens (about an hour). Minting one costs an RSA
signature and a round trip to the token endpoint, so a process holds one token per service
account and shares it across every send:

- the cached token is returned without awaiting anything on the hot path;
- once less than `refresh_margin_s` remains, one background refresh starts while sends keep
  using the still-valid token, so nobody waits at the hourly rollover;
- with no usable token, all concurrent callers await the same single refresh (single flight:
  500 concurrent sends cause one token request, not 500);
- RSA signing runs in a worker thread (`asyncio.to_thread`) so the event loop never stalls;
- a failing token endpoint is not hammered: failures back off exponentially, and callers get a
  `TokenUnavailable` with the time left, which the provider turns into a `Retry`.

Secrets (the private key, access tokens) are kept out of `repr()`, exception messages and logs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..core.config import ConfigError
from .jose import b64url
from .transport import REASON_MAX

log = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL, not a secret)
ASSERTION_LIFETIME_S = 3600  # Google's maximum for exp - iat


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The parts of a Google service-account JSON file we use; the key never shows in a repr."""

    client_email: str
    project_id: str
    token_uri: str
    private_key: rsa.RSAPrivateKey = field(repr=False, compare=False)
    private_key_id: str = field(default="", repr=False)


def load_service_account(path: str | Path, *, where: str = "fcm") -> ServiceAccount:
    """Read and check a service-account JSON once; errors name the setting, never the key."""
    try:
        raw = orjson.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{where}.service_account_file {path} does not exist") from None
    except (OSError, orjson.JSONDecodeError):
        raise ConfigError(f"{where}.service_account_file {path} is not a readable JSON file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.service_account_file {path} must hold a JSON object")
    for name in ("client_email", "private_key"):
        if not isinstance(raw.get(name), str) or not raw[name]:
            raise ConfigError(f"{where}.service_account_file {path} lacks {name}")
    try:
        key = serialization.load_pem_private_key(raw["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        # `from None`: the parser's message must not drag key material into a traceback.
        raise ConfigError(f"{where}.service_account_file {path}: private_key is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{where}.service_account_file {path}: private_key must be an RSA key (RS256)")
    token_uri = raw.get("token_uri")
    project_id = raw.get("project_id")
    key_id = raw.get("private_key_id")
    return ServiceAccount(
        client_email=raw["client_email"],
        project_id=project_id if isinstance(project_id, str) else "",
        token_uri=token_uri if isinstance(token_uri, str) and token_uri else DEFAULT_TOKEN_URI,
        private_key=key,
        private_key_id=key_id if isinstance(key_id, str) else "",
    )


def make_assertion(account: ServiceAccount, token_uri: str, scope: str, now: int) -> str:
    """The RS256-signed JWT the jwt-bearer grant exchanges for an access token (CPU-bound: ~1 ms)."""
    header: dict[str, str] = {"alg": "RS256", "typ": "JWT"}
    if account.private_key_id:
        header["kid"] = account.private_key_id
    claims = {"iss": account.client_email, "scope": scope, "aud": token_uri, "iat": now, "exp": now + ASSERTION_LIFETIME_S}
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}".encode("ascii")
    signature = account.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


class TokenUnavailable(Exception):
    """No access token can be had right now; `retry_after` is when the next attempt is allowed."""

    def __init__(self, reason: str, retry_after: float | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class AccessTokenSource:
    """One cached, proactively refreshed OAuth2 access token for one service account."""

    def __init__(
        self,
        account: ServiceAccount,
        *,
        token_uri: str | None = None,
        scope: str = FCM_SCOPE,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        refresh_margin_s: float = 300.0,
        backoff_s: float = 1.0,
        backoff_cap_s: float = 60.0,
    ) -> None:
        self._account = account
        self._token_uri = token_uri or account.token_uri
        self._scope = scope
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._margin = refresh_margin_s
        self._backoff = backoff_s
        self._backoff_cap = backoff_cap_s
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._refresh_at = 0.0  # monotonic: start a background refresh from here on
        self._expires_at = 0.0  # monotonic: the token is unusable from here on
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._retry_at = 0.0  # monotonic: no token request before this (backoff after failures)
        self._last_error = ""
        self.requests = 0  # token requests made: for metrics and tests

    def __repr__(self) -> str:
        state = "valid" if self._token is not None and time.monotonic() < self._expires_at else "none"
        return f"AccessTokenSource(client_email={self._account.client_email!r}, token_uri={self._token_uri!r}, token={state})"

    @property
    def token_uri(self) -> str:
        return self._token_uri

    @property
    def refreshing(self) -> bool:
        """A token request is in flight."""
        return self._task is not None

    async def token(self) -> str:
        """A usable access token; raises `TokenUnavailable` (never a network error) if there is none."""
        tok = self._token
        if tok is not None:
            now = time.monotonic()
            if now < self._refresh_at:
                return tok
            if now < self._expires_at:
                # Close to expiry but still good: refresh behind the scenes, keep sending meanwhile.
                if self._task is None and now >= self._retry_at:
                    self._start_refresh()
                return tok
        return await self._await_refresh()

    def invalidate(self, token: str) -> None:
        """Forget `token` after the API refused it; a token minted since then is kept."""
        if self._token == token:
            self._token = None
            self._refresh_at = self._expires_at = 0.0

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _await_refresh(self) -> str:
        now = time.monotonic()
        if self._task is None:
            if now < self._retry_at:
                raise TokenUnavailable(self._last_error, self._retry_at - now)
            self._start_refresh()
        task = self._task
        assert task is not None
        # shield: a caller that times out or is cancelled must not cancel the refresh others await.
        await asyncio.shield(task)
        tok = self._token
        now = time.monotonic()
        if tok is not None and now < self._expires_at:
            return tok
        raise TokenUnavailable(self._last_error or "fcm auth: no access token", max(0.0, self._retry_at - now))

    def _start_refresh(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh(), name="fcm-oauth2-refresh")

    async def _refresh(self) -> None:
        """Fetch a new token; records failures instead of raising, so waiters see one clear state."""
        try:
            started = time.monotonic()
            self.requests += 1
            assertion = await asyncio.to_thread(
                make_assertion, self._account, self._token_uri, self._scope, int(time.time())
            )
            token, expires_in = await self._request(assertion)
            self._token = token
            self._expires_at = started + expires_in
            # Refresh `margin` before expiry, but never sooner than a quarter of the lifetime, so a
            # short-lived token does not turn into one token request per send.
            self._refresh_at = started + max(expires_in - self._margin, expires_in / 4)
            self._failures = 0
            self._retry_at = 0.0
            self._last_error = ""
            log.debug("fcm access token refreshed for %s, valid %ss", self._account.client_email, expires_in)
        except Exception as e:  # any failure becomes a backoff and a Retry, never a crash
            self._failures += 1
            delay = min(self._backoff_cap, self._backoff * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            self._last_error = e.reason if isinstance(e, TokenUnavailable) else f"fcm auth: {_describe(e)}"
            log.warning(
                "fcm access token request failed (%s); next attempt in %.1fs", self._last_error, delay
            )
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def _request(self, assertion: str) -> tuple[str, float]:
        if self._session is None:
            # A small private pool: token requests never queue behind a saturated send pool.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=2, ssl=self._ssl), timeout=self._timeout
            )
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
        async with self._session.post(self._token_uri, data=form, headers={"Accept": "application/json"}) as resp:
            raw = await resp.read()
            status = resp.status
        body: Any
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if status != 200:
            detail = ""
            if isinstance(body, dict):
                detail = " ".join(str(body.get(k, "")) for k in ("error", "error_description")).strip()
            raise TokenUnavailable(f"fcm auth: token endpoint answered {status} {detail}"[:REASON_MAX].rstrip(), None)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise TokenUnavailable("fcm auth: token endpoint answer has no access_token", None)
        expires_in = body.get("expires_in", 3600)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = 3600
        return body["access_token"], float(expires_in)


def _describe(e: BaseException) -> str:
    """A short, secret-free description of a network failure."""
    if isinstance(e, TimeoutError):
        return "token endpoint timed out"
    text = str(e)
    return f"{type(e).__name__}: {text}"[:REASON_MAX] if text else type(e).__name__
