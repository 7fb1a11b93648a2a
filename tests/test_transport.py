"""The one provider transport: its error-to-outcome table and its HTTP/1.1 path, shared by APNs, FCM and Web Push.

The providers' own tests drive these paths end to end against the fakes; these pin the table itself,
so that a change to it shows here once rather than as three providers' reasons drifting apart.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict
from pushgw.providers.base import Rejected, Retry
from pushgw.providers.h2 import ConnectionLost, H2Error, NoHttp2, StreamRefused
from pushgw.providers.transport import REASON_MAX, AddressRefused, Http1Client, Transport


def connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    key = ConnectionKey("push.example", 443, True, True, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


def test_a_timeout_is_a_retry_named_after_the_provider() -> None:
    assert Transport("fcm", 1.0).failure(TimeoutError()) == Retry("fcm timeout")
    assert Transport("webpush", 1.0, error_text=False).failure(TimeoutError()) == Retry("webpush timeout")


def test_a_refused_address_is_rejected_whether_or_not_aiohttp_wraps_it() -> None:
    transport = Transport("webpush", 1.0, error_text=False)
    refused = AddressRefused("push.example: every address is private")
    expected = Rejected("webpush endpoint refused: push.example: every address is private")
    assert transport.failure(refused) == expected
    assert transport.failure(connector_error(refused)) == expected
    assert transport.failure(connector_error(ConnectionRefusedError(111, "refused"))) == Retry(
        "webpush connection error: ClientConnectorError")


def test_refused_streams_and_lost_connections_keep_their_own_words() -> None:
    transport = Transport("apns", 1.0)
    assert transport.failure(StreamRefused("request refused on 3 connections")) == Retry(
        "apns: request refused on 3 connections")
    assert transport.failure(ConnectionLost("connection lost")) == Retry("apns connection lost")
    assert transport.failure(NoHttp2("server did not negotiate HTTP/2")) == Retry(
        "apns connection error: NoHttp2: server did not negotiate HTTP/2")
    assert transport.failure(ConnectionResetError()) == Retry("apns connection error: ConnectionResetError")


def test_without_error_text_a_reason_names_the_type_only() -> None:
    transport = Transport("webpush", 1.0, error_text=False)
    assert transport.failure(StreamRefused("request refused on 3 connections")) == Retry(
        "webpush connection error: StreamRefused")
    assert transport.failure(H2Error("GOAWAY PROTOCOL_ERROR")) == Retry("webpush connection error: H2Error")


def test_reasons_are_capped() -> None:
    out = Transport("fcm", 1.0).failure(OSError("x" * 1000))
    assert isinstance(out, Retry) and len(out.reason) == REASON_MAX


@pytest.fixture
async def http1_server() -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        response = web.Response(status=429, body=body * 4, headers={"X-Echo": request.headers["Authorization"]})
        response.headers.add("Retry-After", "7")
        response.headers.add("Retry-After", "99")
        return response

    app = web.Application()
    app.router.add_post("/push", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/push"
    finally:
        await runner.cleanup()


async def test_http1_answers_come_back_in_the_http2_shape(http1_server: str) -> None:
    """Header names lowercased bytes, the first of a repeated field, the body cut at `body_limit`."""
    client = Http1Client(limit=4, ssl_context=None, body_limit=6)
    try:
        resp = await client.post(http1_server, CIMultiDict({"Authorization": "vapid t=1"}), b"abcd")
    finally:
        await client.close()
    assert resp.status == 429
    assert resp.headers[b"retry-after"] == b"7" and resp.headers[b"x-echo"] == b"vapid t=1"
    assert resp.body == b"abcdab"
