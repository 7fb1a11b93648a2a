"""The API's error shape and JSON helpers: every failure is `{"error": {"code", "message"[, "fields"]}}`."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ...core.schema import MessageInvalid


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers

    def response(self) -> web.Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            error["fields"] = self.fields
        return json_response({"error": error}, self.status, self.headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; a wrong content type, an empty body or invalid JSON is an ApiError."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    raw = await request.read()
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
