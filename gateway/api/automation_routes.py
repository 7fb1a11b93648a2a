"""HTTP routes of automation rules (automations/*): save, list, show, pause, resume, delete, report (scope campaigns).

Learning events arrive on `POST /v1/events` (campaign_routes.py, scope events); these routes manage what
they trigger. A rule is validated when it is saved (422 naming the field, e.g. `conditions[0].value`), and
its report is the campaign report of `auto-<id>` with the funnel in front (automations/report.py).
"""

from __future__ import annotations

from aiohttp import web

from ...automations.report import automation_report
from ...automations.rules import PREFIX
from ...automations.store import RuleNotFound, RuleStore, TooManyRules
from ...campaigns.audiences import VALUE_RE
from .auth import Authenticator, require_scope
from .context import INTAKE, REDIS
from .errors import ApiError, json_response, read_json


def _rule_id(request: web.Request) -> str:
    """The path's rule id; one that no rule can have is not found (and never names another key)."""
    rule_id = request.match_info["id"]
    if not VALUE_RE.match(rule_id):
        raise ApiError(404, "not_found", "no such automation")
    return rule_id


class AutomationRoutes:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def _store(self, request: web.Request) -> RuleStore:
        client = require_scope(request, "campaigns")
        await self.auth.charge(client, 1)
        return RuleStore(request.app[REDIS], request.app[INTAKE].keys)

    async def put(self, request: web.Request) -> web.Response:
        store = await self._store(request)
        body = await read_json(request)
        try:
            rule, created = await store.save(request.match_info["id"], body)
        except TooManyRules as e:
            raise ApiError(409, "too_many_rules", str(e)) from None
        return json_response(rule.to_json(), 201 if created else 200)

    async def list(self, request: web.Request) -> web.Response:
        store = await self._store(request)
        return json_response({"automations": [r.to_json() for r in await store.all()]})

    async def get(self, request: web.Request) -> web.Response:
        store = await self._store(request)
        rule = await store.get(_rule_id(request))
        if rule is None:
            raise ApiError(404, "not_found", "no such automation")
        return json_response(rule.to_json())

    async def pause(self, request: web.Request) -> web.Response:
        store = await self._store(request)
        try:
            rule = await store.set_paused(_rule_id(request), request.path.endswith("/pause"))
        except RuleNotFound:
            raise ApiError(404, "not_found", "no such automation") from None
        return json_response(rule.to_json())

    async def delete(self, request: web.Request) -> web.Response:
        store = await self._store(request)
        if not await store.delete(_rule_id(request)):
            raise ApiError(404, "not_found", "no such automation")
        return web.Response(status=204)

    async def report(self, request: web.Request) -> web.Response:
        store = await self._store(request)
        rule_id = _rule_id(request)
        if not await store.redis.exists(store.keys.campaign(f"{PREFIX}{rule_id}")):
            raise ApiError(404, "not_found", "no such automation (no definition and no figures)")
        return json_response(await automation_report(store.redis, store.keys, rule_id))


def add_routes(app: web.Application, auth: Authenticator) -> None:
    r = AutomationRoutes(auth)
    app.router.add_get("/v1/automations", r.list)
    app.router.add_put("/v1/automations/{id}", r.put)
    app.router.add_get("/v1/automations/{id}", r.get)
    app.router.add_delete("/v1/automations/{id}", r.delete)
    app.router.add_post("/v1/automations/{id}/pause", r.pause)
    app.router.add_post("/v1/automations/{id}/resume", r.pause)
    app.router.add_get("/v1/automations/{id}/report", r.report)
