"""The API's HTTP/1.1 server: aiohttp's protocol, with limits for slow, malformed and too many connections.

aiohttp answers a request its parser refuses (a control byte in a header, CL and TE together, a 20 KB
header...) with text/plain and logs the parser's message, which quotes the raw header line, bearer
token included, with a traceback. Here such a request gets the API's JSON error shape, is counted in
`pushgw_api_rejected_total{reason}` and is logged by reason and count at most once per interval: never
its bytes, never a traceback. The same goes for connections refused for the limits below.

Limits (settings [api]):
- header_timeout_s: once a request's first byte is in, its header block must end within this, else the
  connection is closed;
- body_timeout_s: reading a body takes at most this (errors.read_json answers 408), and a body the
  handler did not read is drained for at most this (and 2 s) before the connection closes;
- idle_timeout_s: a connection with no request under way (and one that never sends anything) is closed
  after this (aiohttp's keep-alive timer);
- max_connections: past this many open connections per process a new one is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import orjson
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from ...core import metrics
from ...core.config import ApiSettings
from .errors import SERVER_NAME, ApiError

log = logging.getLogger("pushgw.api")

# Labels of pushgw_api_rejected_total: a fixed set, whatever the requests hold.
REASONS = ("bad_method", "bad_request_line", "invalid_header", "invalid_url", "too_large", "bad_body_framing",
           "bad_encoding", "bad_message", "header_timeout", "body_timeout", "too_many_connections", "server_error")
_PARSER_REASONS: tuple[tuple[type[Exception], str], ...] = (  # most specific first
    (http_exceptions.BadHttpMethod, "bad_method"),
    (http_exceptions.BadStatusLine, "bad_request_line"),
    (http_exceptions.LineTooLong, "too_large"),
    (http_exceptions.DecompressSizeError, "too_large"),
    (http_exceptions.InvalidHeader, "invalid_header"),
    (http_exceptions.InvalidURLError, "invalid_url"),
    (http_exceptions.TransferEncodingError, "bad_body_framing"),
    (http_exceptions.ContentLengthError, "bad_body_framing"),
    (http_exceptions.ContentEncodingError, "bad_encoding"),
    (http_exceptions.HttpProcessingError, "bad_message"),
)
LOG_INTERVAL_S = 60.0


def parser_reason(exc: BaseException | None) -> str:
    """The label for a request aiohttp's parser refused; never derived from the request's bytes."""
    for cls, reason in _PARSER_REASONS:
        if isinstance(exc, cls):
            return reason
    return "bad_message"


class Rejections:
    """Counts what the server refuses, by reason, and logs a summary at most once per `interval_s`."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.unlogged: Counter[str] = Counter()
        self.logged_at = -interval_s

    def record(self, reason: str) -> None:
        metrics.API_REJECTED.labels(reason).inc()
        self.unlogged[reason] += 1
        now = self.clock()
        if now - self.logged_at >= self.interval_s:
            self.logged_at = now
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.unlogged.items()))
            log.warning("requests refused before any route", extra={"reason": reasons, "count": self.unlogged.total()})
            self.unlogged.clear()


def _refusal(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole response written straight to the socket, for a connection refused before aiohttp reads it."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return (f"HTTP/1.1 {status} {reason}\r\nServer: {SERVER_NAME}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode() + body


_TOO_MANY = _refusal(503, "Service Unavailable", "too_many_connections", "the server has too many open connections")


class Limits:
    """What every connection of one server shares: its settings, its open-connection count, its rejections."""

    def __init__(self, settings: ApiSettings, rejections: Rejections | None = None) -> None:
        self.header_timeout_s = settings.header_timeout_s
        self.max_connections = settings.max_connections
        self.rejections = rejections or Rejections()
        self.open = 0


class ApiProtocol(RequestHandler):
    """One connection: aiohttp's request handler with a header deadline, the connection cap, and refusals
    answered in the API's JSON shape without logging what the client sent."""

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, limits: Limits, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self.event_loop = loop
        self.limits = limits
        self.refused = False
        self.in_request = False  # a request's header block has ended and its response is not finished yet
        self.seen = b""  # the last bytes of an unfinished header block (to find its end across reads)
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.limits.open += 1
        if self.limits.open > self.limits.max_connections:
            self.refused = True
            self.limits.rejections.record("too_many_connections")
            assert isinstance(transport, asyncio.Transport)
            transport.write(_TOO_MANY)
            self.force_close()  # closes once the answer is written

    def connection_lost(self, exc: BaseException | None) -> None:
        self.limits.open -= 1
        self._stop_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.refused and not self.in_request and data:
            if self.header_deadline is None:
                self.header_deadline = self.event_loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)
            joint = self.seen + data[:2]  # an end split across two reads
            if b"\n\r\n" in data or b"\n\n" in data or b"\n\r\n" in joint or b"\n\n" in joint:
                self.in_request = True  # an empty line: the header block is complete
                self.seen = b""
                self._stop_header_deadline()
            else:
                self.seen = (self.seen + data[-2:])[-2:]
        super().data_received(data)

    async def finish_response(self, request: BaseRequest, resp: StreamResponse,
                              start_time: float | None) -> tuple[StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            # A pipelined request parsed in the same read as this one is already under way: its body
            # bytes must not start a header deadline. `_messages` is aiohttp's queue of parsed requests
            # (web_protocol.RequestHandler); tests/test_api_server.py pins this.
            self.in_request = bool(self._messages)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> StreamResponse:
        """A request the parser refused (400) or a handler failure aiohttp caught: JSON, counted, no bytes logged."""
        if status == 400:
            reason = parser_reason(exc)
            error = ApiError(400, "malformed_request", f"the request is not valid HTTP/1.1 ({reason})")
        else:
            reason = "server_error"
            error = ApiError(status, "internal", "internal error")
        self.limits.rejections.record(reason)
        if request.writer.output_size > 0:  # a response has begun: the connection is broken
            raise ConnectionError("a response was sent already")
        resp = error.response()
        resp.headers["Server"] = SERVER_NAME
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's errors outside a handler are counted and summarised, never logged with what was received."""
        self.limits.rejections.record("server_error")

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if not self.in_request:
            self.limits.rejections.record("header_timeout")
            self.force_close()

    def _stop_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None


class ApiServer:
    """A listening API: an aiohttp application behind ApiProtocol on one socket."""

    def __init__(self, runner: web.AppRunner, listener: asyncio.Server, limits: Limits) -> None:
        self.runner = runner
        self.listener = listener
        self.limits = limits

    @property
    def port(self) -> int:
        return int(self.listener.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, finish the requests under way (up to 10 s), close every connection."""
        self.listener.close()
        await self.runner.cleanup()
        await self.listener.wait_closed()


async def start_api(app: web.Application, settings: ApiSettings, host: str | None = None, port: int | None = None, *,
                    reuse_port: bool = False, backlog: int = 1024, rejections: Rejections | None = None) -> ApiServer:
    """Serve `app` on host:port (default: the settings'; port 0 picks a free one) with the limits above."""
    handler_args: dict[str, Any] = {
        "access_log": None,  # requests are counted in metrics; an access log would hold user ids
        "keepalive_timeout": settings.idle_timeout_s,
        "lingering_time": min(settings.body_timeout_s, 2.0),
    }
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=10.0, **handler_args)
    await runner.setup()
    server = runner.server
    assert server is not None
    limits = Limits(settings, rejections)
    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(
            lambda: ApiProtocol(server, loop=loop, limits=limits, **handler_args),
            settings.host if host is None else host, settings.port if port is None else port,
            backlog=backlog, reuse_port=reuse_port or None)
    except BaseException:
        await runner.cleanup()
        raise
    return ApiServer(runner, listener, limits)


async def run_until_signal(supervise: Callable[[], None] | None, every_s: float) -> None:
    """Return at SIGTERM or SIGINT; meanwhile call `supervise` (a worker pool's, in a thread) every `every_s`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        if supervise is not None:
            await asyncio.to_thread(supervise)
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
