"""A local FCM HTTP v1 service (OAuth2 token endpoint + `messages:send`) that speaks the real wire protocol.

It lets tests, the demo and the benchmark run `FcmProvider` unchanged against real TLS: the token
endpoint checks the RS256 JWT-bearer assertion against the service account's public key the way
Google does, `messages:send` checks the Bearer token it issued, the project in the path and the
message the way the v1 API validates it (every field of `notification`, `android.notification`,
`webpush` and `apns` by its documented name and type, an unknown one is a 400 INVALID_ARGUMENT),
and errors come back in Google's JSON error format with the FcmError `errorCode` detail. Failures
are programmed per device token, so a test can make one device dead, throttled or flaky without
touching the client code.

Like Google's front ends it serves HTTP/2 and HTTP/1.1 on one TLS port, chosen by ALPN: a client
offering "h2" gets HTTP/2 (`providers.fakes.h2server`, the machinery FakeApns uses, with
MAX_CONCURRENT_STREAMS and `goaway_after`), any other client HTTP/1.1 (aiohttp's server). Both
answer every route from the same handlers. `FakeFcm(ca, http2=False)` serves HTTP/1.1 only, as a
proxy without HTTP/2 would.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..jose import b64url_decode
from .apns import aps_fault
from .h2server import Answer, H2ServerProtocol, HandlerH2Protocol, Negotiated, aiohttp_protocol, hold
from .tls import LocalCA

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_TTL_RE = re.compile(r"^\d+(\.\d+)?s$")
_MESSAGE_FIELDS = {"name", "token", "topic", "condition", "notification", "data", "android", "apns", "webpush", "fcm_options"}
_NOTIFICATION_FIELDS = {"title", "body", "image"}
_TOPIC_RE = re.compile(r"^[a-zA-Z0-9_.~%-]{1,900}\Z")  # FCM's topic name rule
_CONDITION_TERM_RE = re.compile(r"'([^']*)'\s+in\s+topics")
_ANDROID_FIELDS = {
    "collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification", "fcm_options",
    "direct_boot_ok",
}
# AndroidNotification (FCM v1 reference, projects.messages#AndroidNotification): each field's JSON type.
_ANDROID_NOTIFICATION_STRINGS = {
    "title", "body", "icon", "color", "sound", "tag", "click_action", "title_loc_key", "body_loc_key", "channel_id",
    "ticker", "event_time", "image", "notification_priority", "visibility", "proxy",
}
_ANDROID_NOTIFICATION_LISTS = {"title_loc_args": "title_loc_key", "body_loc_args": "body_loc_key",
                               "vibrate_timings": ""}
_ANDROID_NOTIFICATION_BOOLS = {"sticky", "local_only", "default_sound", "default_vibrate_timings",
                               "default_light_settings", "bypass_proxy_notification"}
_ANDROID_NOTIFICATION_FIELDS = (_ANDROID_NOTIFICATION_STRINGS | _ANDROID_NOTIFICATION_LISTS.keys()
                                | _ANDROID_NOTIFICATION_BOOLS | {"notification_count", "light_settings"})
_NOTIFICATION_PRIORITIES = {"PRIORITY_UNSPECIFIED", "PRIORITY_MIN", "PRIORITY_LOW", "PRIORITY_DEFAULT", "PRIORITY_HIGH",
                            "PRIORITY_MAX"}
_VISIBILITIES = {"VISIBILITY_UNSPECIFIED", "PRIVATE", "PUBLIC", "SECRET"}
_WEBPUSH_FIELDS = {"headers", "data", "notification", "fcm_options"}  # WebpushConfig
_WEBPUSH_FCM_OPTIONS = {"link", "analytics_label"}  # WebpushFcmOptions
_APNS_FIELDS = {"headers", "payload", "fcm_options", "live_activity_token"}  # ApnsConfig
_APNS_FCM_OPTIONS = {"analytics_label", "image"}  # ApnsFcmOptions

# errorCode -> (HTTP status, google.rpc status, message) as FCM answers them.
_ERRORS: dict[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token"),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
}
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
_SEND_PATH = re.compile(r"^/v1/projects/([^/?]+)/([^/?]+)$")
# Streams per HTTP/2 connection: 100, the least RFC 9113 recommends and a common server default (Google's
# actual figure is whatever its SETTINGS say; the client reads it from there).
DEFAULT_MAX_STREAMS = 100

Programmed = tuple[int, str | None, float | str | None] | tuple[int, str | None, float | str | None, str]
"""(HTTP status, FcmError errorCode or None, Retry-After or None[, error message])."""


def make_service_account(directory: str | Path, token_uri: str, project_id: str = "demo-project") -> Path:
    """Write a Google-style service-account JSON with a fresh RSA key; returns its path (mode 0600)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    suffix = secrets.token_hex(3)
    email = f"pushgw-{suffix}@{project_id}.iam.gserviceaccount.com"
    doc = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbits(64)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    path = d / f"service-account-{project_id}-{suffix}.json"
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    path.chmod(0o600)
    return path


@dataclass(frozen=True, slots=True)
class Received:
    """A message the fake accepted (HTTP 200)."""

    project_id: str
    message: dict[str, Any]
    name: str
    access_token: str = field(repr=False)
    received_at: float = field(default_factory=time.time)
    protocol: str = "h2"  # "h2" or "http/1.1": how the request came


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An access token the token endpoint handed out; times are `time.monotonic()`."""

    client_email: str
    project_id: str
    issued_at: float
    expires_at: float
    access_token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Account:
    client_email: str
    project_id: str
    key_id: str
    public_key: rsa.RSAPublicKey = field(repr=False)


class _Invalid(Exception):
    pass


class FakeFcm:
    """FCM HTTP v1 over TLS on 127.0.0.1: `async with FakeFcm(local_ca) as fcm: ...`."""

    def __init__(self, ca: LocalCA, *, expires_in: float = 3600.0, host: str = "127.0.0.1", port: int = 0,
                 http2: bool = True, max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self._ca = ca
        self._host = host
        self._port = port
        self.http2 = http2  # offer HTTP/2 by ALPN (else HTTP/1.1 only)
        self.max_streams = max_streams  # MAX_CONCURRENT_STREAMS of each new HTTP/2 connection
        self.goaway_after: int | None = None  # HTTP/2: GOAWAY after this many requests on one connection
        self.expires_in = expires_in  # lifetime of the access tokens it issues; tests shorten it
        self.token_status: int | None = None  # when set, the token endpoint fails with this HTTP status
        self.hang = False  # when set, messages:send holds its answer until `resume()` or the fake stops
        self.delay_s = 0.0  # answer every accepted send this much later (a slow but healthy provider)
        self.received: list[Received] = []
        self.failed_then_ok: list[Received] = []  # accepted after a programmed failure for that token
        self.tokens: list[IssuedToken] = []
        self.token_requests = 0
        self.send_requests = 0
        self.requests_by_protocol: dict[str, int] = {"h2": 0, "http/1.1": 0}  # every request, any route
        self.connections = 0  # HTTP/2 connections accepted
        self.http1_connections = 0
        self.peak_streams = 0  # most requests in flight at once on one HTTP/2 connection
        self.hanging = 0  # requests held by hang mode right now
        self.answers: list[tuple[str, float, int]] = []  # (token, time.monotonic(), status) of programmed/accepted sends
        self._accounts: dict[str, _Account] = {}
        self._issued: dict[str, IssuedToken] = {}
        self._programmed: dict[str, deque[Programmed]] = {}
        self._failed: set[str] = set()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._protocols: set[H2ServerProtocol] = set()
        self._release = asyncio.Event()
        self._stopping = False

    # --- setup -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("FakeFcm is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def trust(self, service_account_file: str | Path) -> None:
        """Accept assertions signed by this service account (its public key, email and project)."""
        doc = orjson.loads(Path(service_account_file).read_bytes())
        key = serialization.load_pem_private_key(doc["private_key"].encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the service account key must be RSA")
        self._accounts[doc["client_email"]] = _Account(
            doc["client_email"], doc["project_id"], doc.get("private_key_id", ""), key.public_key()
        )

    def service_account(self, directory: str | Path, project_id: str = "demo-project") -> Path:
        """`make_service_account` for this fake's token endpoint, already trusted."""
        path = make_service_account(directory, self.token_uri, project_id)
        self.trust(path)
        return path

    def program(self, token: str, responses: Iterable[Programmed]) -> None:
        """Answer the next sends to `token` (or to this topic or condition) with these responses, in order,
        then accept again."""
        self._programmed.setdefault(token, deque()).extend(responses)

    def revoke(self) -> None:
        """Invalidate every access token issued so far (the next sends get 401 UNAUTHENTICATED)."""
        self._issued.clear()

    async def start(self) -> FakeFcm:
        app = web.Application()
        app.router.add_post("/token", self._token_http1)
        app.router.add_post("/v1/projects/{project}/{method}", self._send_http1)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        ctx = self._ca.server_context(alpn=["h2", "http/1.1"] if self.http2 else ["http/1.1"])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Negotiated(lambda: HandlerH2Protocol(self), self._http1_handler),
                                                self._host, self._port, ssl=ctx)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    def resume(self) -> None:
        """End hang mode: the requests held so far are answered as usual."""
        self.hang = False
        self._release.set()
        self._release = asyncio.Event()

    async def stop(self) -> None:
        self._stopping = True
        self._release.set()
        for p in list(self._protocols):
            p.abort()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()  # closes the HTTP/1.1 connections
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeFcm:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _http1_handler(self) -> asyncio.Protocol:
        assert self._runner is not None
        self.http1_connections += 1
        return aiohttp_protocol(self._runner)

    # --- routing: the same handlers for HTTP/1.1 and HTTP/2 -------------------------------------

    async def _token_http1(self, request: web.Request) -> web.Response:
        self.requests_by_protocol["http/1.1"] += 1
        form = await request.post()
        return _response(await self.handle_token({k: v for k, v in form.items() if isinstance(v, str)}))

    async def _send_http1(self, request: web.Request) -> web.Response:
        self.requests_by_protocol["http/1.1"] += 1
        answer = await self.handle_send(request.match_info["project"], request.match_info["method"],
                                 request.headers.get("Authorization", ""), await request.read(), "http/1.1")
        return _response(answer)

    async def handle_h2(self, headers: Mapping[str, str], body: bytes) -> Answer:
        """One HTTP/2 request: the routes of the HTTP/1.1 server, from the pseudo-headers."""
        self.requests_by_protocol["h2"] += 1
        path = headers.get(":path", "")
        if headers.get(":method") != "POST":
            return _error(405, None, "Method not allowed.")
        if path == "/token":
            if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                return _json({"error": "invalid_request", "error_description": "Bad Request"}, 400)
            return await self.handle_token(dict(parse_qsl(body.decode("utf-8", "replace"))))
        m = _SEND_PATH.match(path)
        if m is None:
            return _error(404, None, "Not found.")
        return await self.handle_send(m.group(1), m.group(2), headers.get("authorization", ""), body, "h2")

    # --- OAuth2 token endpoint ----------------------------------------------------------------

    async def handle_token(self, form: Mapping[str, str]) -> Answer:
        self.token_requests += 1
        if self.token_status is not None:
            return _json({"error": "internal_failure", "error_description": "token endpoint down"}, self.token_status)
        if form.get("grant_type") != JWT_BEARER_GRANT:
            return _json({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}, 400)
        assertion = form.get("assertion")
        try:
            if not isinstance(assertion, str):
                raise _Invalid("Missing assertion")
            account = self._verify_assertion(assertion)
        except _Invalid as e:
            return _json({"error": "invalid_grant", "error_description": str(e)}, 400)
        now = time.monotonic()
        access_token = "ya29.fake-" + secrets.token_urlsafe(32)
        issued = IssuedToken(account.client_email, account.project_id, now, now + self.expires_in, access_token)
        self._issued[access_token] = issued
        self.tokens.append(issued)
        return _json({"access_token": access_token, "expires_in": self.expires_in, "token_type": "Bearer"}, 200)

    def _verify_assertion(self, assertion: str) -> _Account:
        parts = assertion.split(".")
        if len(parts) != 3:
            raise _Invalid("Invalid JWT: not three segments")
        try:
            header = orjson.loads(b64url_decode(parts[0]))
            claims = orjson.loads(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
        except (ValueError, orjson.JSONDecodeError):
            raise _Invalid("Invalid JWT: bad encoding") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _Invalid("Invalid JWT: header and claims must be objects")
        if header.get("alg") != "RS256":
            raise _Invalid("Invalid JWT: alg must be RS256")
        account = self._accounts.get(str(claims.get("iss")))
        if account is None:
            raise _Invalid("Invalid JWT: unknown issuer")
        if "kid" in header and account.key_id and header["kid"] != account.key_id:
            raise _Invalid("Invalid JWT: unknown key id")
        try:
            account.public_key.verify(
                signature, f"{parts[0]}.{parts[1]}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            raise _Invalid("Invalid JWT Signature.") from None
        if claims.get("aud") != self.token_uri:
            raise _Invalid("Invalid JWT: aud must be the token endpoint")
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            raise _Invalid("Invalid JWT: scope must include firebase.messaging")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            raise _Invalid("Invalid JWT: iat and exp must be integers")
        now = time.time()
        if exp - iat > 3600 or exp <= iat:
            raise _Invalid("Invalid JWT: exp must be within an hour after iat")
        if exp < now or iat > now + 60:
            raise _Invalid("Invalid JWT: Token must be a short-lived token and in a reasonable timeframe")
        return account

    # --- messages:send ------------------------------------------------------------------------

    async def handle_send(self, project: str, method: str, auth: str, raw: bytes, protocol: str) -> Answer:
        """`POST /v1/projects/{project}/{method}` with this Authorization header and body."""
        self.send_requests += 1
        if method != "messages:send":
            return _error(404, None, "Method not found.")
        issued = self._issued.get(auth[7:]) if auth.startswith("Bearer ") else None
        if issued is None or time.monotonic() >= issued.expires_at:
            return _error(
                401, None, "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential."
            )
        if issued.project_id != project:
            return _error(
                403, None, f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
            )
        try:
            body = orjson.loads(raw)
            message = _validate(body)
        except orjson.JSONDecodeError:
            return _error(400, None, "Invalid JSON payload received.")
        except _Invalid as e:
            return _error(400, None, str(e))
        if not await hold(self):
            return _error(503, "UNAVAILABLE", "The service is shutting down.")
        target = message.get("token", message.get("topic", message.get("condition")))  # what `program` names
        queue = self._programmed.get(target) if isinstance(target, str) else None
        if queue:
            programmed = queue.popleft()
            status, code, retry_after = programmed[0], programmed[1], programmed[2]
            text = programmed[3] if len(programmed) == 4 else None
            self._failed.add(str(target))
            self.answers.append((str(target), time.monotonic(), status))
            return _error(status, code, text, retry_after)
        name = f"projects/{project}/messages/0:{next(self._ids)}%fake"
        received = Received(project, message, name, issued.access_token, protocol=protocol)
        self.received.append(received)
        self.answers.append((str(target), time.monotonic(), 200))
        if target in self._failed:
            self.failed_then_ok.append(received)
        return _json({"name": name}, 200)


def _validate(body: Any) -> dict[str, Any]:
    """The checks FCM v1 makes on a message; raises `_Invalid` with a Google-like message."""
    if not isinstance(body, dict) or set(body) - {"message", "validate_only"}:
        raise _Invalid("Invalid JSON payload received. Unknown name at top level.")
    message = body.get("message")
    if not isinstance(message, dict):
        raise _Invalid("Request contains an invalid argument: message is required.")
    unknown = set(message) - _MESSAGE_FIELDS
    if unknown:
        raise _Invalid(f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r} at 'message'.")
    targets = [k for k in ("token", "topic", "condition") if k in message]
    if len(targets) != 1:
        raise _Invalid("Exactly one of message.token, message.topic or message.condition must be set.")
    if not isinstance(message[targets[0]], str) or not message[targets[0]]:
        raise _Invalid(f"Invalid value at 'message.{targets[0]}' (TYPE_STRING).")
    if targets[0] == "topic" and not _TOPIC_RE.match(message["topic"]):
        raise _Invalid("Request contains an invalid argument: invalid topic name (no /topics/ prefix in v1).")
    if targets[0] == "condition":
        _condition(message["condition"])
    _string_map(message.get("data"), "message.data")
    notification = message.get("notification")
    if notification is not None:
        _string_map(notification, "message.notification")
        if set(notification) - _NOTIFICATION_FIELDS:
            raise _Invalid("Invalid JSON payload received. Unknown name at 'message.notification'.")
    android = message.get("android")
    if android is not None:
        if not isinstance(android, dict) or set(android) - _ANDROID_FIELDS:
            raise _Invalid("Invalid JSON payload received. Unknown name at 'message.android'.")
        ttl = android.get("ttl")
        if ttl is not None and (not isinstance(ttl, str) or not _TTL_RE.match(ttl)):
            raise _Invalid("Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration).")
        priority = android.get("priority")
        if priority is not None and (not isinstance(priority, str) or priority.upper() not in ("NORMAL", "HIGH")):
            raise _Invalid("Invalid value at 'message.android.priority' (TYPE_ENUM).")
        if not isinstance(android.get("collapse_key", ""), str):
            raise _Invalid("Invalid value at 'message.android.collapse_key' (TYPE_STRING).")
        _string_map(android.get("data"), "message.android.data")
        _android_notification(android.get("notification"))
    _webpush(message.get("webpush"))
    _apns(message.get("apns"))
    image = (notification or {}).get("image")
    if image is not None and not image.startswith("https://"):
        raise _Invalid("Invalid value at 'message.notification.image': the image URL must be https.")
    return message


def _condition(condition: str) -> None:
    """FCM "Send messages to topics": `'name' in topics` terms joined by && and ||, negated by !, in
    parentheses at will, at most five topics."""
    terms = _CONDITION_TERM_RE.findall(condition)
    if len(terms) > 5:
        raise _Invalid("Request contains an invalid argument: a condition may name at most 5 topics.")
    if not all(_TOPIC_RE.match(t) for t in terms):
        raise _Invalid("Request contains an invalid argument: invalid topic name in the condition.")
    reduced = _CONDITION_TERM_RE.sub("T", condition).replace(" ", "")
    previous = ""
    while reduced != previous:
        previous = reduced
        reduced = reduced.replace("!T", "T").replace("(T)", "T").replace("T&&T", "T").replace("T||T", "T")
    if reduced != "T":
        raise _Invalid("Request contains an invalid argument: invalid condition expression.")


def _android_notification(value: Any) -> None:
    """AndroidNotification: known fields, each of its type; loc args only with their key."""
    if value is None:
        return
    where = "message.android.notification"
    if not isinstance(value, dict):
        raise _Invalid(f"Invalid value at '{where}': must be an object.")
    unknown = set(value) - _ANDROID_NOTIFICATION_FIELDS
    if unknown:
        raise _Invalid(f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r} at '{where}'.")
    for k, v in value.items():
        if k in _ANDROID_NOTIFICATION_STRINGS and not isinstance(v, str):
            raise _Invalid(f"Invalid value at '{where}.{k}' (TYPE_STRING).")
        if k in _ANDROID_NOTIFICATION_BOOLS and not isinstance(v, bool):
            raise _Invalid(f"Invalid value at '{where}.{k}' (TYPE_BOOL).")
        if k in _ANDROID_NOTIFICATION_LISTS:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise _Invalid(f"Invalid value at '{where}.{k}' (TYPE_STRING).")
            key = _ANDROID_NOTIFICATION_LISTS[k]
            if key and key not in value:
                raise _Invalid(f"Invalid value at '{where}.{k}': needs {key}.")
    count = value.get("notification_count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < 2**31):
        raise _Invalid(f"Invalid value at '{where}.notification_count' (TYPE_INT32).")
    if value.get("notification_priority", "PRIORITY_UNSPECIFIED") not in _NOTIFICATION_PRIORITIES:
        raise _Invalid(f"Invalid value at '{where}.notification_priority' (TYPE_ENUM).")
    if value.get("visibility", "VISIBILITY_UNSPECIFIED") not in _VISIBILITIES:
        raise _Invalid(f"Invalid value at '{where}.visibility' (TYPE_ENUM).")


def _webpush(value: Any) -> None:
    """WebpushConfig: headers and data are string maps, notification an object, fcm_options.link https."""
    if value is None:
        return
    where = "message.webpush"
    if not isinstance(value, dict) or set(value) - _WEBPUSH_FIELDS:
        raise _Invalid(f"Invalid JSON payload received. Unknown name at '{where}'.")
    _string_map(value.get("headers"), f"{where}.headers")
    _string_map(value.get("data"), f"{where}.data")
    if not isinstance(value.get("notification", {}), dict):
        raise _Invalid(f"Invalid value at '{where}.notification': must be an object.")
    options = value.get("fcm_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - _WEBPUSH_FCM_OPTIONS:
            raise _Invalid(f"Invalid JSON payload received. Unknown name at '{where}.fcm_options'.")
        link = options.get("link")
        if link is not None and (not isinstance(link, str) or not link.startswith("https://")):
            raise _Invalid(f"Invalid value at '{where}.fcm_options.link': HTTPS is required.")


def _apns(value: Any) -> None:
    """ApnsConfig: headers a string map, payload an object with an `aps` dictionary when given."""
    if value is None:
        return
    where = "message.apns"
    if not isinstance(value, dict) or set(value) - _APNS_FIELDS:
        raise _Invalid(f"Invalid JSON payload received. Unknown name at '{where}'.")
    _string_map(value.get("headers"), f"{where}.headers")
    payload = value.get("payload")
    if payload is not None and (not isinstance(payload, dict) or not isinstance(payload.get("aps", {}), dict)):
        raise _Invalid(f"Invalid value at '{where}.payload': must be an object with an aps dictionary.")
    if payload is not None:
        # FCM passes the payload on to APNs, which checks `aps` by its payload key reference.
        push_type = (value.get("headers") or {}).get("apns-push-type", "alert")
        fault = aps_fault(payload.get("aps", {}), push_type)
        if fault is not None:
            raise _Invalid(f"Invalid value at '{where}.payload.aps': {fault}.")
    options = value.get("fcm_options")
    if options is not None and (not isinstance(options, dict) or set(options) - _APNS_FCM_OPTIONS):
        raise _Invalid(f"Invalid JSON payload received. Unknown name at '{where}.fcm_options'.")
    image = (options or {}).get("image")
    if image is not None and (not isinstance(image, str) or not image.startswith("https://")):
        raise _Invalid(f"Invalid value at '{where}.fcm_options.image': HTTPS is required.")


def _string_map(value: Any, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _Invalid(f"Invalid value at '{where}': must be an object.")
    for k, v in value.items():
        if not isinstance(v, str):
            raise _Invalid(f"Invalid value at '{where}[{k}]' (TYPE_STRING).")


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Answer:
    return status, {"content-type": "application/json", **(headers or {})}, orjson.dumps(body)


def _response(answer: Answer) -> web.Response:
    status, headers, body = answer
    return web.Response(body=body, status=status, headers=headers)


def _error(status: int, code: str | None, message: str | None, retry_after: float | str | None = None) -> Answer:
    """Google's error JSON; with `code`, an FcmError detail carrying the errorCode.

    A status Google's API never sends (e.g. 502) comes back as a front-end proxy's HTML page.
    """
    if code is None and status not in _STATUS_NAMES:
        return status, {"content-type": "text/html"}, f"<html><body>Error {status}</body></html>".encode()
    default = _ERRORS.get(code or "")
    error: dict[str, Any] = {
        "code": status,
        "message": message or (default[2] if default else "Error."),
        "status": default[1] if default and default[0] == status else _STATUS_NAMES.get(status, "UNKNOWN"),
    }
    if code:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": code}]
    headers = None
    if retry_after is not None:
        headers = {"retry-after": retry_after if isinstance(retry_after, str) else str(int(retry_after))}
    return _json({"error": error}, status, headers)
