"""Routes of messages, devices, preferences, dead letters and invalid-token events."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from ...core.schema import ID_RE, FieldError, MessageInvalid
from ...queue.deadletter import ShardedDeadLetters
from ...queue.sharded import BadShardedId
from ...users.registry import RegistryFull, invalid_token_events
from .auth import Authenticator, require_scope
from .context import INTAKE, REDIS, SETTINGS
from .errors import ApiError, json_response, read_json

ENTRY_ID = "a stream id such as 1700000000000-0; on Redis Cluster <shard>/<stream id>"


class Routes:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def message(self, request: web.Request) -> web.Response:
        client = require_scope(request, "enqueue")
        body = await read_json(request)
        await self.auth.charge(client, 1)
        [(msg_id, queued)] = await request.app[INTAKE].submit([body], reads_users="devices" in client.scopes,
                                                              client=client.name)
        return json_response({"id": msg_id, "status": "queued" if queued else "duplicate"}, 202)

    async def batch(self, request: web.Request) -> web.Response:
        client = require_scope(request, "enqueue")
        body = await read_json(request)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ApiError(422, "invalid_message", "the body must be {\"messages\": [ ...at least one message ]}",
                           fields=[{"field": "messages", "message": "must be a non-empty list"}])
        if len(messages) > request.app[SETTINGS].api.max_batch:
            raise ApiError(413, "batch_too_large", f"at most {request.app[SETTINGS].api.max_batch} messages per batch")
        await self.auth.charge(client, len(messages))
        results = await request.app[INTAKE].submit(messages, reads_users="devices" in client.scopes,
                                                   client=client.name)
        return json_response({"results": [{"id": i, "status": "queued" if ok else "duplicate"} for i, ok in results],
                      "queued": sum(ok for _, ok in results)}, 202)

    async def cancel(self, request: web.Request) -> web.Response:
        """Withdraw one message still waiting (scheduled or held): 200 cancelled, 409 sent, 404 unknown."""
        client = require_scope(request, "enqueue")
        await self.auth.charge(client, 1)
        msg_id = request.match_info["id"]
        if not ID_RE.match(msg_id):
            raise MessageInvalid([FieldError("id", f"must match {ID_RE.pattern}")])
        [found] = await request.app[INTAKE].queue.cancel([msg_id], client.name, admin="admin" in client.scopes)
        status = "cancelled" if found.status == "cancelled_before" else found.status
        code = {"cancelled": 200, "sent": 409, "unknown": 404}[status]
        return json_response({"id": msg_id, "status": status}, code)

    async def cancel_ref(self, request: web.Request) -> web.Response:
        """Withdraw every message of this API client with `?ref=` that is still waiting."""
        client = require_scope(request, "enqueue")
        await self.auth.charge(client, 1)
        ref = request.query.get("ref")
        if ref is None or not ID_RE.match(ref):
            raise MessageInvalid([FieldError("ref", f"give ?ref= matching {ID_RE.pattern}")])
        ids = await request.app[INTAKE].queue.cancel_ref(ref, client.name)
        return json_response({"ref": ref, "cancelled": len(ids), "ids": ids})

    async def put_device(self, request: web.Request) -> web.Response:
        client = require_scope(request, "devices")
        body = await read_json(request)
        await self.auth.charge(client, 1)
        try:
            device = await request.app[INTAKE].register_device(request.match_info["user"], body)
        except RegistryFull as e:
            raise ApiError(409, "too_many_devices", str(e)) from None
        return json_response({"key": device.key, "device": device.to_json()}, 201)

    async def list_devices(self, request: web.Request) -> web.Response:
        client = require_scope(request, "devices")
        await self.auth.charge(client, 1)
        user = request.match_info["user"]
        devices = await request.app[INTAKE].registry_for(user).devices(user)
        return json_response({"devices": [d.to_json() | {"key": d.key} for d in devices]})

    async def delete_device(self, request: web.Request) -> web.Response:
        client = require_scope(request, "devices")
        await self.auth.charge(client, 1)
        user = request.match_info["user"]
        if not await request.app[INTAKE].registry_for(user).unregister(user, request.match_info["key"]):
            raise ApiError(404, "not_found", "no such device for this user")
        return web.Response(status=204)

    async def put_preferences(self, request: web.Request) -> web.Response:
        """PUT replaces the user's preferences, PATCH changes only the fields it names."""
        client = require_scope(request, "devices")
        body = await read_json(request)
        await self.auth.charge(client, 1)
        user = request.match_info["user"]
        prefs = await request.app[INTAKE].profiles_for(user).update(user, body, merge=request.method == "PATCH")
        return json_response(prefs.to_json())

    async def get_preferences(self, request: web.Request) -> web.Response:
        client = require_scope(request, "devices")
        await self.auth.charge(client, 1)
        user = request.match_info["user"]
        prefs = await request.app[INTAKE].profiles_for(user).get(user)
        return json_response(prefs.to_json())

    async def dead_letters(self, request: web.Request) -> web.Response:
        require_scope(request, "admin")
        try:
            count = min(1000, max(1, int(request.query.get("count", "50"))))
        except ValueError:
            raise ApiError(400, "invalid_query", "count must be a whole number") from None
        start = request.query.get("start", "-")
        dl = ShardedDeadLetters(request.app[REDIS], request.app[INTAKE].shards)
        try:
            entries = await dl.list(count, start)
        except (aioredis.ResponseError, BadShardedId):
            raise ApiError(400, "invalid_query", f"start must be a dead-letter id from a listing ({ENTRY_ID})") from None
        return json_response({"dead_letters": [e.to_json() for e in entries], "total": await dl.count()})

    async def replay(self, request: web.Request) -> web.Response:
        require_scope(request, "admin")
        body = await read_json(request)
        ids = body.get("ids") if isinstance(body, dict) else None
        replay_all = isinstance(body, dict) and body.get("all") is True
        if not replay_all and (not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids)):
            raise ApiError(422, "invalid_request", "send {\"ids\": [\"<dead-letter id>\", ...]} or {\"all\": true}")
        try:
            n = await ShardedDeadLetters(request.app[REDIS], request.app[INTAKE].shards).replay(
                None if replay_all else ids)
        except (aioredis.ResponseError, BadShardedId):
            raise ApiError(400, "invalid_request", f"ids must be dead-letter ids from a listing ({ENTRY_ID})") from None
        return json_response({"replayed": n})

    async def invalid_tokens(self, request: web.Request) -> web.Response:
        require_scope(request, "admin")
        after = request.query.get("after", "-")
        try:
            count = min(1000, max(1, int(request.query.get("count", "100"))))
        except ValueError:
            raise ApiError(400, "invalid_query", "count must be a whole number") from None
        try:
            events = await invalid_token_events(request.app[INTAKE].registries, count, after)
        except (aioredis.ResponseError, BadShardedId):
            raise ApiError(400, "invalid_query", f"after must be an event id from a listing ({ENTRY_ID})") from None
        return json_response({"events": events})


def add_routes(app: web.Application, auth: Authenticator) -> None:
    r = Routes(auth)
    app.router.add_post("/v1/messages", r.message)
    app.router.add_post("/v1/messages/batch", r.batch)
    app.router.add_delete("/v1/messages", r.cancel_ref)
    app.router.add_delete("/v1/messages/{id:.+}", r.cancel)
    app.router.add_put("/v1/users/{user}/devices", r.put_device)
    app.router.add_get("/v1/users/{user}/devices", r.list_devices)
    app.router.add_delete("/v1/users/{user}/devices/{key}", r.delete_device)
    app.router.add_put("/v1/users/{user}/preferences", r.put_preferences)
    app.router.add_patch("/v1/users/{user}/preferences", r.put_preferences)
    app.router.add_get("/v1/users/{user}/preferences", r.get_preferences)
    app.router.add_get("/v1/deadletters", r.dead_letters)
    app.router.add_post("/v1/deadletters/replay", r.replay)
    app.router.add_get("/v1/events/invalid-tokens", r.invalid_tokens)
