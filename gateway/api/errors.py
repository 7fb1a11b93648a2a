"""The API's error shape and JSON helpers: every failure is `{"error": {"code", "message"[, "fields"]}}`."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ...core import metrics
from ...core.schema import MessageInvalid
from .context import SETTINGS

SERVER_NAME = "pushgw"  # the Server header: no framework, no version


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None, close: bool = False) -> None:
        """`close`: the connection is closed after the answer (part of the request is still unread)."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers
        self.close = close

    def response(self) -> web.Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            error["fields"] = self.fields
        response = json_response({"error": error}, self.status, self.headers)
        if self.close:
            response.force_close()
        return response


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; a wrong content type, an empty body or invalid JSON is an ApiError."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    try:
        async with asyncio.timeout(request.app[SETTINGS].api.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        metrics.API_REJECTED.labels("body_timeout").inc()
        raise ApiError(408, "body_timeout", "the body did not arrive in time", close=True) from None
    except web.RequestPayloadError:  # the body ended before its length, or its chunks are malformed
        raise ApiError(400, "invalid_body", "the body could not be read", close=True) from None
    if not raw:
        raise ApiError(400, "invalid_json", "the body is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def invalid_message(e: MessageInvalid) -> ApiError:
    """A validation error as a 422 naming the fields."""
    return ApiError(422, "invalid_message", str(e.errors[0]) if len(e.errors) == 1 else f"{len(e.errors)} errors",
                    fields=e.as_json())
