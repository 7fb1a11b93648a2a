"""The API's HTTP server over raw sockets on loopback: malformed requests, slow clients, the connection cap.

The server is started as `pushgw api` starts it (start_api), against the suite's private Redis, with
small timeouts; every wait below is bounded, and no figure of speed is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from pushgw.core.config import ApiClient, ApiSettings, ConfigError, RedisSettings, Settings, load_settings
from pushgw.gateway.api.app import create_app
from pushgw.gateway.api.server import REASONS, ApiServer, start_api

TOKEN = "secret-token-0123456789abcdef"
BOUND_S = 10.0  # the most any single read below may wait: far above every timeout configured here


def settings(**api: Any) -> Settings:
    limits = {"header_timeout_s": 0.3, "body_timeout_s": 0.3, "idle_timeout_s": 30.0, "max_connections": 64} | api
    return Settings(redis=RedisSettings(prefix="servertest"),
                    api=ApiSettings(clients=(ApiClient("course-service", TOKEN, ("enqueue",)),), **limits))


@pytest.fixture
async def serve(redis: aioredis.Redis) -> AsyncIterator[Callable[..., Any]]:
    started: list[ApiServer] = []

    async def start(**api: Any) -> ApiServer:
        s = settings(**api)
        server = await start_api(create_app(s, redis), s.api, "127.0.0.1", 0)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


async def connect(server: ApiServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded)."""
    return await asyncio.wait_for(reader.read(), BOUND_S)


async def one_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
    status, headers = parse_head(head)
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), BOUND_S)
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return int(lines[0].split()[1]), headers


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, body


async def exchange(server: ApiServer, request: bytes) -> bytes:
    reader, writer = await connect(server)
    try:
        writer.write(request)
        return await until_closed(reader)
    finally:
        writer.close()


def rejected(reason: str | None = None) -> float:
    reasons = REASONS if reason is None else (reason,)
    return sum(REGISTRY.get_sample_value("pushgw_api_rejected_total", {"reason": r}) or 0.0 for r in reasons)


def formatted(records: list[logging.LogRecord]) -> str:
    """Every record as a handler would write it, traceback included."""
    fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(fmt.format(r) for r in records)


MALFORMED = {
    "token with a control byte": (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                                  + TOKEN.encode() + b"\x7f\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"),
    "bad method": b"G@T /healthz HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n",
    "content-length and transfer-encoding": (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
                                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "negative content-length": b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n",
    "20 KB header": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "200 headers": b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
}


async def test_a_token_in_a_malformed_header_reaches_no_log_at_any_level(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = await serve()
    caplog.set_level(logging.DEBUG)
    raw = await exchange(server, MALFORMED["token with a control byte"])
    assert caplog.records, "the refusal is logged (without the token)"
    assert TOKEN not in formatted(caplog.records)
    assert all(r.exc_info is None for r in caplog.records)  # no traceback, whose text could quote the header
    assert TOKEN not in raw.decode("latin-1")  # nor is it echoed back
    status, headers, body = parse(raw)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert orjson.loads(body)["error"]["code"] == "malformed_request"


async def test_malformed_requests_get_json_errors_are_counted_and_logged_once_per_interval(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = await serve()
    caplog.set_level(logging.DEBUG)
    before = rejected()
    for name, request in MALFORMED.items():
        status, headers, body = parse(await exchange(server, request))
        assert status == 400, name
        assert headers["content-type"].startswith("application/json") and headers["server"] == "pushgw", name
        error = orjson.loads(body)["error"]
        assert error["code"] == "malformed_request" and error["message"], name
    assert rejected() == before + len(MALFORMED)  # each counted once, under a label of the fixed set
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(loud) == 1, formatted(loud)  # one summary for the interval, not one line (or trace) per request
    assert all(r.exc_info is None for r in caplog.records)
    assert TOKEN not in formatted(caplog.records)


async def test_server_header_names_no_framework_or_version(serve: Any) -> None:
    server = await serve()
    for request in (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
                    b"GET /nowhere HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
                    b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"):
        status, headers, _ = parse(await exchange(server, request))
        assert status in (200, 401, 404)
        assert headers["server"] == "pushgw", headers


async def test_headers_that_never_end_are_cut_off_after_the_header_timeout(serve: Any) -> None:
    server = await serve(header_timeout_s=0.3, idle_timeout_s=30.0)
    before = rejected("header_timeout")
    reader, writer = await connect(server)

    async def dribble() -> None:  # a byte of a header every 50 ms: never an end, always some progress
        with contextlib.suppress(ConnectionError):
            writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
            for _ in range(int(BOUND_S / 0.05)):
                await asyncio.sleep(0.05)
                writer.write(b"y")

    dribbler = asyncio.create_task(dribble())
    try:
        assert await until_closed(reader) == b""  # closed, without an answer, long before the dribble ends
        assert not dribbler.done()
    finally:
        dribbler.cancel()
        writer.close()
    assert rejected("header_timeout") == before + 1


async def test_the_header_timeout_spares_a_served_keep_alive_connection(serve: Any) -> None:
    server = await serve(header_timeout_s=0.3, idle_timeout_s=30.0)
    reader, writer = await connect(server)
    try:
        for piece in (b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r", b"\n"):  # the header block ends across two reads
            writer.write(piece)
            await asyncio.sleep(0.05)
        assert (await one_response(reader))[0] == 200
        await asyncio.sleep(0.6)  # twice the header timeout, idle: well within the idle timeout
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert (await one_response(reader))[0] == 200
    finally:
        writer.close()


async def test_a_pipelined_request_whose_body_comes_slowly_is_not_cut_by_the_header_timeout(serve: Any) -> None:
    # The second request's header block arrives in the same read as the first request: once the first
    # is answered, the second's body bytes are a body, not the start of a header block.
    server = await serve(header_timeout_s=0.3, body_timeout_s=5.0)
    body = b'{"user": "u1", "title": "Live session in 10 minutes"}'
    post = (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    reader, writer = await connect(server)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n" + post + body[:2])
        assert (await one_response(reader))[0] == 200
        for i in range(2, len(body), 6):  # the rest over about 0.8 s, well past the header timeout
            await asyncio.sleep(0.1)
            writer.write(body[i:i + 6])
        status, _, _ = await one_response(reader)
        assert status == 202
    finally:
        writer.close()


async def test_a_body_shorter_than_its_content_length_is_answered_408_and_closed(serve: Any) -> None:
    server = await serve(body_timeout_s=0.3)
    before = rejected("body_timeout")
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + TOKEN.encode()
               + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user\": ")
    status, headers, body = parse(await exchange(server, request))  # returns only once the server closed
    assert status == 408 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "body_timeout"
    assert rejected("body_timeout") == before + 1


async def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(serve: Any) -> None:
    server = await serve(idle_timeout_s=0.3)
    assert await exchange(server, b"") == b""


async def test_a_keep_alive_connection_is_closed_after_the_idle_timeout(serve: Any) -> None:
    server = await serve(idle_timeout_s=0.3)
    reader, writer = await connect(server)
    try:
        for _ in range(2):  # the connection serves several requests, then is closed once idle
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            status, headers, _ = await one_response(reader)
            assert status == 200 and headers.get("connection", "keep-alive").lower() != "close"
        assert await until_closed(reader) == b""
    finally:
        writer.close()


async def test_connections_past_the_cap_are_answered_503_and_closed(serve: Any) -> None:
    server = await serve(max_connections=3, idle_timeout_s=30.0)
    held = [await connect(server) for _ in range(3)]
    try:
        for reader, writer in held:  # each is open and served
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert (await one_response(reader))[0] == 200
        before = rejected("too_many_connections")
        status, headers, body = parse(await exchange(server, b""))  # answered at once, before any request
        assert status == 503 and headers["server"] == "pushgw"
        assert orjson.loads(body)["error"]["code"] == "too_many_connections"
        assert rejected("too_many_connections") == before + 1
        _, first = held.pop(0)
        first.close()  # a place frees up: a new connection is served again
        for _ in range(100):
            status, _, _ = parse(await exchange(server, b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"))
            if status == 200:
                break
            await asyncio.sleep(0.02)
        assert status == 200
    finally:
        for _, writer in held:
            writer.close()


def test_server_limits_are_settings_and_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "pushgw.toml"
    path.write_text("[api]\nheader_timeout_s = 5\nbody_timeout_s = 20\nidle_timeout_s = 30\nmax_connections = 100\n")
    api = load_settings(path, env={}).api
    assert (api.header_timeout_s, api.body_timeout_s, api.idle_timeout_s, api.max_connections) == (5, 20, 30, 100)
    assert load_settings(path, env={"PUSHGW_API_IDLE_TIMEOUT_S": "7.5"}).api.idle_timeout_s == 7.5
    for bad in ("header_timeout_s = 0", "max_connections = 0"):
        path.write_text(f"[api]\n{bad}\n")
        with pytest.raises(ConfigError, match="api"):
            load_settings(path, env={})
