"""FCM HTTP v1 provider: one `messages:send` POST per delivery, OAuth2 service-account auth.

FCM HTTP v1 has no batch endpoint (the legacy XMPP and HTTP APIs aiofcm speaks are shut down), so
throughput comes from many concurrent requests, which HTTP/2 carries on a few connections: each app
(Firebase project) keeps a small HTTP/2 pool (`providers.transport.h2_pool` on `providers.h2`) of
at most `connections` connections per process, another opened only while every open one has as many
streams in flight as the server allows (its MAX_CONCURRENT_STREAMS, RFC 9113 section 6.5.2). The
request header block (with the bearer token) is encoded once per access token (no content-length:
HTTP/2 frames the body), the body once per delivery (a stream refused by GOAWAY is resent as is on
another connection), and the access token comes from a cache (`providers.oauth2`). The OAuth2 token
endpoint is called about once an hour and stays on aiohttp.

When the FCM endpoint does not speak HTTP/2 (`base_url` on plain http://, or a TLS server that does not
choose ALPN "h2", e.g. an HTTP/1.1-only egress proxy), the app sends over HTTP/1.1
(`providers.transport`), logs one warning, and stays on it for the life of the process. It falls back
rather than fails because `base_url` exists for proxies and sandboxes, and one that speaks only
HTTP/1.1 must keep delivering: failing would turn a slower path into an outage (every FCM delivery
retried until dead-lettered). Outcomes are the same on both paths, and `tests/test_fcm.py` runs both
against the fake.

Each configured app has its own service account, access token and connections; the app is
chosen per delivery by `device.app or message.app`.

Outcome mapping (FcmError `errorCode` first, then `error.status`, then the HTTP status) follows
Google's guidance (FCM HTTP v1 "Error codes" and "Best practices for handling errors"):
UNREGISTERED/404 -> token gone; INVALID_ARGUMENT -> token gone only when the
message is about the registration token (payloads were validated before queueing), else rejected;
SENDER_ID_MISMATCH, THIRD_PARTY_AUTH_ERROR -> rejected; UNAUTHENTICATED -> our access token was
refused: drop it (once: concurrent refusals of one token cause one refresh) and retry at once;
QUOTA_EXCEEDED/429 -> retry after Retry-After or 60 s; UNAVAILABLE/INTERNAL/5xx -> retry, after
Retry-After if given. Network failures and timeouts are retries (`providers.transport`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
from multidict import CIMultiDict

from ..core.config import ConfigError, FcmApp, ProviderSettings
from ..core.schema import Message
from .base import Delivered, Delivery, Outcome, Rejected, Retry, TokenInvalid, retry_after_seconds
from .h2 import H2Response, encode_headers
from .oauth2 import AccessTokenSource, TokenUnavailable, load_service_account
from .payloads import check_payload_limits, fcm_message
from .transport import CONNECTIONS, REASON_MAX, Http1Client, Http1Request, Transport, h2_pool, tls_contexts

QUOTA_DEFAULT_RETRY_S = 60.0  # Google: back off at least a minute after QUOTA_EXCEEDED
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_CONTENT_TYPE = "application/json; charset=UTF-8"
log = logging.getLogger("pushgw.fcm")


class _App:
    """One Firebase project: its endpoint, credentials, token cache and connections."""

    def __init__(self, app: FcmApp, settings: ProviderSettings, refresh_margin_s: float, auth_backoff_s: float,
                 connections: int) -> None:
        account = load_service_account(app.service_account_file, where=f"fcm.{app.name}")
        self.name = app.name
        self.project_id = app.project_id or account.project_id
        if not self.project_id:
            raise ConfigError(f"fcm.{app.name}: no project_id in the settings or the service account file")
        base = app.base_url.rstrip("/")
        self.url = f"{base}/v1/projects/{self.project_id}/messages:send"
        try:
            parts = urlsplit(self.url)
            port = parts.port
        except ValueError:
            raise ConfigError(f"fcm.{app.name}.base_url {app.base_url!r} is not a valid URL") from None
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(f"fcm.{app.name}.base_url {app.base_url!r} must be an https:// (or http://) URL")
        tls = tls_contexts(app.ca_file, f"fcm.{app.name}")
        self._concurrency = max(1, settings.concurrency)
        self.auth = AccessTokenSource(
            account,
            token_uri=app.token_uri or None,
            ssl_context=tls.http1,
            timeout_s=settings.timeout_s,
            refresh_margin_s=refresh_margin_s,
            backoff_s=auth_backoff_s,
        )
        self.pool = h2_pool(parts.hostname, port or 443, tls.h2, size=connections, max_streams=self._concurrency,
                            timeout_s=settings.timeout_s)
        self._authority = parts.netloc.rpartition("@")[2].encode()
        self._path = (parts.path + (f"?{parts.query}" if parts.query else "")).encode()
        # HTTP/1.1 only when the endpoint cannot do HTTP/2 (see the module docstring).
        self.http1 = parts.scheme == "http"
        self.http1_client = Http1Client(limit=self._concurrency, ssl_context=tls.http1)
        self._headers_token: str | None = None
        self._h2_headers = b""
        self._http1_token: str | None = None
        self._http1_headers: CIMultiDict[str] = CIMultiDict()

    def h2_headers(self, token: str) -> bytes:
        """The HTTP/2 header block (HPACK bytes) for `token`, encoded only when the token changes (about hourly)."""
        if token is not self._headers_token:
            self._h2_headers = encode_headers([
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", self._authority),
                (b":path", self._path),
                (b"authorization", b"Bearer " + token.encode()),
                (b"content-type", _CONTENT_TYPE.encode()),
            ])
            self._headers_token = token
        return self._h2_headers

    def use_http1(self, reason: str) -> None:
        if not self.http1:
            self.http1 = True
            self.pool.close()
            log.warning("FCM endpoint does not speak HTTP/2, sending over HTTP/1.1 from now on",
                        extra={"app": self.name, "provider": "fcm", "reason": reason[:REASON_MAX]})

    def http1_headers(self, token: str) -> CIMultiDict[str]:
        """HTTP/1.1 request headers for `token`, rebuilt only when the token changes.

        A ready CIMultiDict spares aiohttp converting a plain dict on every request.
        """
        if token is not self._http1_token:
            self._http1_headers = CIMultiDict({"Authorization": f"Bearer {token}", "Content-Type": _CONTENT_TYPE})
            self._http1_token = token
        return self._http1_headers

    async def close(self) -> None:
        self.pool.close()
        await self.auth.close()
        await self.http1_client.close()

    def __repr__(self) -> str:
        return f"_App(name={self.name!r}, project_id={self.project_id!r})"


class FcmProvider:
    """Sends to FCM HTTP v1; never raises for a provider-side failure (see module docstring)."""

    name = "fcm"

    def __init__(
        self,
        apps: Sequence[FcmApp],
        settings: ProviderSettings,
        *,
        refresh_margin_s: float = 300.0,
        auth_backoff_s: float = 1.0,
        connections: int = CONNECTIONS,
    ) -> None:
        """`refresh_margin_s`: refresh the access token when less than this remains (tests shorten it);
        `connections`: HTTP/2 connections per app, at most."""
        self._apps = {a.name: _App(a, settings, refresh_margin_s, auth_backoff_s, connections) for a in apps}
        self._transport: Transport[_App] = Transport("fcm", settings.timeout_s, fallback=self)

    def __repr__(self) -> str:
        apps = ", ".join(f"{a.name}:{a.project_id}" for a in self._apps.values())
        return f"FcmProvider(apps=[{apps}])"

    def check_payload(self, message: Message) -> None:
        """Raise `PayloadTooLarge` if FCM would refuse the message for its size."""
        check_payload_limits(message, ("fcm",))

    def token_source(self, app: str) -> AccessTokenSource:
        """The access-token cache of one app (for metrics and tests)."""
        return self._apps[app].auth

    def app(self, name: str) -> _App:
        """One app's state (connections, protocol in use): for tests and diagnostics."""
        return self._apps[name]

    async def send(self, delivery: Delivery) -> Outcome:
        app_name = delivery.device.app or delivery.message.app
        app = self._apps.get(app_name)
        if app is None:
            return Rejected(f"fcm app {app_name!r} is not configured")
        try:
            token = await app.auth.token()
        except TokenUnavailable as e:
            return Retry(e.reason, after=e.retry_after)
        body = orjson.dumps({"message": fcm_message(delivery.message, delivery.device.token)})
        resp = await self._transport.send(None if app.http1 else app.pool, app, app.h2_headers(token), body,
                                          delivery, token)
        if not isinstance(resp, H2Response):
            return resp
        if resp.status == 200:
            return Delivered(_message_name(resp.body))
        return self._failure(app, token, resp.status, resp.body, resp.headers.get(b"retry-after"))

    def no_http2(self, app: _App, reason: str) -> None:
        """`Fallback`: the app's endpoint did not negotiate HTTP/2."""
        app.use_http1(reason)

    def http1_request(self, app: _App, delivery: Delivery, token: str) -> Http1Request:
        """`Fallback`: the same request over HTTP/1.1."""
        return Http1Request(app.http1_client, app.url, app.http1_headers(token))

    def _failure(self, app: _App, token: str, status: int, raw: bytes, retry_after: bytes | None) -> Outcome:
        code, message = _error_code(raw)
        code = code or _STATUS_NAMES.get(status, f"HTTP {status}")
        reason = f"fcm {code}"
        if code == "UNREGISTERED" or status == 404:
            return TokenInvalid(reason, status)
        if code == "INVALID_ARGUMENT" or status == 400:
            if "registration token" in message.lower():
                return TokenInvalid(f"{reason}: {message}"[:REASON_MAX], status)
            return Rejected(f"{reason}: {message}"[:REASON_MAX] if message else reason, status)
        if code in ("SENDER_ID_MISMATCH", "THIRD_PARTY_AUTH_ERROR", "PERMISSION_DENIED"):
            return Rejected(reason, status)
        if code == "UNAUTHENTICATED" or status == 401:
            app.auth.invalidate(token)
            return Retry(f"{reason}: access token refused", after=0.0, status=status)
        if code in ("QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED") or status == 429:
            after = retry_after_seconds(retry_after)
            return Retry(reason, after=QUOTA_DEFAULT_RETRY_S if after is None else after, status=status)
        if status >= 500 or code in ("UNAVAILABLE", "INTERNAL"):
            return Retry(reason, after=retry_after_seconds(retry_after), status=status)
        return Rejected(f"{reason}: {message}"[:REASON_MAX] if message else reason, status)

    async def close(self) -> None:
        await asyncio.gather(*(a.close() for a in self._apps.values()))


_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "UNREGISTERED",
    429: "QUOTA_EXCEEDED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _message_name(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    name = body.get("name") if isinstance(body, dict) else None
    return name if isinstance(name, str) else ""


def _error_code(raw: bytes) -> tuple[str, str]:
    """(FcmError errorCode, else error.status, else ""; error.message) from Google's error JSON."""
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", ""
    message = error.get("message")
    message = message if isinstance(message, str) else ""
    details = error.get("details")
    if isinstance(details, list):
        for d in details:
            if isinstance(d, dict) and isinstance(d.get("errorCode"), str) and d.get("@type", _FCM_ERROR_TYPE) == _FCM_ERROR_TYPE:
                return d["errorCode"], message
    status = error.get("status")
    return (status if isinstance(status, str) else ""), message
