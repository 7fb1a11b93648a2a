"""Routes of message status (queue/status.py): one message's timeline and devices, a learner's recent messages.

Scope `enqueue`: a client sees the messages it enqueued, and only those; `admin` sees every message. A message
that exists but belongs to another client answers the same 404 as one that does not, so ids cannot be probed.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...core.config import ApiClient
from ...core.schema import MessageInvalid, parse_user
from ...queue.sharded import ShardedStatus
from .auth import Authenticator, require_scope
from .context import INTAKE, REDIS, SETTINGS
from .errors import ApiError, json_response

MAX_LIMIT = 1000


def _visible(client: ApiClient, status: dict[str, Any]) -> bool:
    return "admin" in client.scopes or status.get("client") == client.name


class StatusRoutes:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def message(self, request: web.Request) -> web.Response:
        client = require_scope(request, "enqueue")
        await self.auth.charge(client, 1)
        reader = ShardedStatus(request.app[REDIS], request.app[INTAKE].shards, request.app[SETTINGS].status.retention_s)
        status = await reader.message(request.match_info["id"])
        if status is None or not _visible(client, status):
            raise ApiError(404, "not_found", "no status for this message id (unknown, not yours, or past "
                                             "status.retention_s)")
        return json_response(status)

    async def user_messages(self, request: web.Request) -> web.Response:
        client = require_scope(request, "enqueue")
        try:
            user = parse_user(request.match_info["user"])
        except MessageInvalid as e:
            problem = e.errors[0].message
            raise ApiError(422, "invalid_request", f"user: {problem}", fields=[{"field": "user", "message": problem}]) from None
        settings = request.app[SETTINGS].status
        raw = request.query.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise ApiError(422, "invalid_request", f"limit must be a whole number from 1 to {MAX_LIMIT}",
                           fields=[{"field": "limit", "message": f"must be 1 to {MAX_LIMIT}"}])
        await self.auth.charge(client, 1)
        reader = ShardedStatus(request.app[REDIS], request.app[INTAKE].shards, request.app[SETTINGS].status.retention_s)
        found = await reader.user(user, settings.user_messages)  # the kept ones, then this client's of them
        mine = [s for s in found if _visible(client, s)][: int(raw)]
        return json_response({"user": user, "messages": mine})


def add_routes(app: web.Application, auth: Authenticator) -> None:
    r = StatusRoutes(auth)
    app.router.add_get("/v1/messages/{id:.+}", r.message)  # an id may hold a /
    app.router.add_get("/v1/users/{user}/messages", r.user_messages)
