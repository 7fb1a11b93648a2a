"""HTTP routes of engagement campaigns (campaigns/*): learner attributes, templates, campaigns, launches, events, reports.

Scopes: learner attributes go with devices and preferences (`devices`: the profile service owns
them); templates, campaigns, launches and reports need `campaigns`; app events need only `events`, a
scope small enough to give to a mobile backend. A launch answers 202 at once with the job's status:
the fan-out runs in the worker processes (campaigns/fanout.py).
"""

from __future__ import annotations

import re
import time
from typing import Any

from aiohttp import web

from ...automations.events import is_learning, parse_learning_event
from ...campaigns.audiences import count_all, parse_audience
from ...campaigns.events import MAX_EVENTS, EventRecorder, parse_events, summary
from ...campaigns.fanout import CampaignStore
from ...campaigns.report import ChartUnavailable, campaign_report, chart_png, report_exists
from ...campaigns.templates import RenderError, Templates
from ...core.schema import FieldError, MessageInvalid
from ...queue.keys import Keys
from ...queue.shards import ShardMap
from .auth import Authenticator, require_scope
from .context import ENGINE, INTAKE, REDIS, SETTINGS
from .errors import ApiError, json_response, read_json

MAX_IMPORT = 1000
OPEN_TYPES = ("opened", "clicked")  # the app events that teach a learner's best send time
_EVENT_RE = re.compile(r"^events\[(\d+)\]")


async def _known(redis: Any, keys: Keys, cid: str, shards: ShardMap) -> None:
    """A report exists for a stored campaign, or for any campaign label the workers have figures for."""
    if not await report_exists(redis, keys, cid, shards):
        raise ApiError(404, "not_found", f"no such campaign {cid!r} (no definition and no figures)")


class CampaignRoutes:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def _setup(self, request: web.Request, scope: str) -> tuple[Any, Any]:
        client = require_scope(request, scope)
        await self.auth.charge(client, 1)
        return request.app[REDIS], request.app[INTAKE].keys

    async def _templates(self, request: web.Request) -> Templates:
        """Saved templates, in the deployment's home for global records (queue/sharded.py `home_keys`)."""
        redis, _ = await self._setup(request, "campaigns")
        return Templates(redis, request.app[INTAKE].home)

    # ------------------------------------------------------------------ learners

    async def put_attributes(self, request: web.Request) -> web.Response:
        """PUT replaces a learner's attributes, PATCH changes the fields named (null clears one)."""
        await self._setup(request, "devices")
        body = await read_json(request)
        attrs = await request.app[INTAKE].attributes.update(request.match_info["user"], body,
                                                            merge=request.method == "PATCH")
        return json_response(attrs.to_json())

    async def get_attributes(self, request: web.Request) -> web.Response:
        await self._setup(request, "devices")
        attrs = await request.app[INTAKE].attributes.get(request.match_info["user"])
        return json_response(attrs.to_json())

    async def import_attributes(self, request: web.Request) -> web.Response:
        client = require_scope(request, "devices")
        body = await read_json(request)
        users = body.get("users") if isinstance(body, dict) else None
        if not isinstance(users, list) or not 1 <= len(users) <= MAX_IMPORT or not all(
                isinstance(u, dict) and set(u) == {"user", "attributes"} for u in users):
            raise MessageInvalid([FieldError("users", f"must be a list of 1-{MAX_IMPORT} "
                                                  '{"user": ..., "attributes": {...}}')])
        await self.auth.charge(client, len(users))
        try:
            n = await request.app[INTAKE].attributes.import_many(
                [(u["user"], u["attributes"]) for u in users])
        except MessageInvalid as e:
            raise MessageInvalid([FieldError(f"users{err.field}", err.message) for err in e.errors]) from None
        return json_response({"imported": n})

    async def audience_count(self, request: web.Request) -> web.Response:
        redis, _ = await self._setup(request, "campaigns")
        body = await read_json(request)
        audience = parse_audience(body.get("audience") if isinstance(body, dict) else None)
        size = await count_all(redis, request.app[INTAKE].shards, audience)
        return json_response({"audience": audience.to_json(), "count": size})

    # ------------------------------------------------------------------ templates

    async def put_template(self, request: web.Request) -> web.Response:
        templates = await self._templates(request)
        body = await read_json(request)
        t = await templates.save(request.match_info["name"], body)
        return json_response(t.to_json())

    async def get_template(self, request: web.Request) -> web.Response:
        templates = await self._templates(request)
        t = await templates.get(request.match_info["name"])
        if t is None:
            raise ApiError(404, "not_found", "no such template")
        return json_response(t.to_json())

    async def list_templates(self, request: web.Request) -> web.Response:
        templates = await self._templates(request)
        return json_response({"templates": await templates.names()})

    async def render_template(self, request: web.Request) -> web.Response:
        """A preview: what a learner with this locale and these variables would read."""
        templates = await self._templates(request)
        body = await read_json(request)
        if not isinstance(body, dict) or set(body) - {"vars", "locale"}:
            raise MessageInvalid([FieldError("$", 'send {"vars": {...}, "locale": "fr"}')])
        variables, locale = body.get("vars") or {}, body.get("locale")
        if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
            raise MessageInvalid([FieldError("vars", "must be an object of string values")])
        if locale is not None and not isinstance(locale, str):
            raise MessageInvalid([FieldError("locale", "must be a language tag such as fr")])
        t = await templates.get(request.match_info["name"])
        if t is None:
            raise ApiError(404, "not_found", "no such template")
        try:
            r = t.render(variables, locale)
        except RenderError as e:
            raise MessageInvalid([FieldError(e.field, e.message)]) from None
        return json_response({"locale": r.locale, "title": r.title, "body": r.body, "data": r.data, **r.rich})

    # ------------------------------------------------------------------ campaigns

    async def _campaigns(self, request: web.Request) -> tuple[Any, Keys, ShardMap]:
        """Campaigns live in the home of global records (queue/sharded.py `home_keys`), their learners on shards."""
        redis, _ = await self._setup(request, "campaigns")
        return redis, request.app[INTAKE].home, request.app[INTAKE].shards

    async def create_campaign(self, request: web.Request) -> web.Response:
        redis, keys, shards = await self._campaigns(request)
        body = await read_json(request)
        c = await CampaignStore(redis, keys, shards).create(
            body, declarative_navigate=request.app[INTAKE].settings.webpush.declarative_navigate)
        return json_response(c.to_json(), 201)

    async def list_campaigns(self, request: web.Request) -> web.Response:
        redis, keys, shards = await self._campaigns(request)
        return json_response({"campaigns": await CampaignStore(redis, keys, shards).ids()})

    async def get_campaign(self, request: web.Request) -> web.Response:
        redis, keys, shards = await self._campaigns(request)
        s = await CampaignStore(redis, keys, shards).require(request.match_info["id"])
        return json_response(s.campaign.to_json() | {"stage_percent": s.stage_percent,
                                                     "stages": [st.to_json() for st in s.stages], "created_at": s.created_at})

    async def launch(self, request: web.Request) -> web.Response:
        redis, keys, shards = await self._campaigns(request)
        body = await read_json(request)
        if not isinstance(body, dict) or "percent" not in body or set(body) - {"percent", "weights"}:
            raise MessageInvalid([FieldError("percent", 'send {"percent": 10} for a 10% pilot, 100 for all '
                                                                 '(and "weights": {"b": 1} to roll out only variant b)')])
        status = await CampaignStore(redis, keys, shards).launch(request.match_info["id"], body["percent"], body.get("weights"))
        return json_response(status, 202)

    async def status(self, request: web.Request) -> web.Response:
        redis, keys, shards = await self._campaigns(request)
        return json_response(await CampaignStore(redis, keys, shards).status(request.match_info["id"]))

    async def report(self, request: web.Request) -> web.Response:
        redis, keys, shards = await self._campaigns(request)
        cid = request.match_info["id"]
        await _known(redis, keys, cid, shards)
        return json_response(await campaign_report(redis, keys, cid, shards))

    async def report_png(self, request: web.Request) -> web.Response:
        redis, keys, shards = await self._campaigns(request)
        cid = request.match_info["id"]
        await _known(redis, keys, cid, shards)
        try:
            png = chart_png(await campaign_report(redis, keys, cid, shards))
        except ChartUnavailable as e:
            raise ApiError(501, "chart_unavailable", str(e)) from None
        return web.Response(body=png, content_type="image/png")

    # ------------------------------------------------------------------ events

    async def events(self, request: web.Request) -> web.Response:
        """App events (opened, converted, ...: campaign KPIs, and opens teach the best send time) and learning events
        (quiz_completed, session_scheduled, ...: automations/events.py), in any mix; validated all before any counts."""
        client = require_scope(request, "events")
        body = await read_json(request)
        events = body.get("events") if isinstance(body, dict) else None
        await self.auth.charge(client, len(events) if isinstance(events, list) and events else 1)
        if not isinstance(events, list) or not 1 <= len(events) <= MAX_EVENTS:
            raise MessageInvalid([FieldError("events", f"must be a list of 1-{MAX_EVENTS} events")])
        learning_at = [i for i, o in enumerate(events) if is_learning(o)]
        app_at = [i for i, o in enumerate(events) if not is_learning(o)]
        errors: list[FieldError] = []
        now = time.time()
        learning = [parse_learning_event(events[i], f"events[{i}]", errors, now) for i in learning_at]
        if app_at:
            try:
                parse_events([events[i] for i in app_at])
            except MessageInvalid as e:
                errors += [FieldError(_renumber(err.field, app_at), err.message) for err in e.errors]
        if errors:
            raise MessageInvalid(sorted(errors, key=lambda err: _index(err.field)))
        if learning_at and request.app[SETTINGS].redis.cluster:
            raise ApiError(501, "not_in_cluster_mode", "learning events (automations) do not work on Redis Cluster yet; "
                                                       "app events (opened, converted, ...) do")
        redis, keys = request.app[REDIS], request.app[INTAKE].home
        results: list[dict[str, Any]] = [{} for _ in events]
        if app_at:
            recorded = await EventRecorder(redis, keys).record([events[i] for i in app_at])
            for i, r in zip(app_at, recorded, strict=True):
                results[i] = r
            opens = [(str(o["user"]), float(o.get("at") or now)) for o in (events[i] for i in app_at)
                     if o.get("type") in OPEN_TYPES and isinstance(o.get("user"), str)]
            await request.app[INTAKE].best.record_opens(opens, now)
        if learning_at:
            parsed = [e for e in learning if e is not None]
            outcome = await request.app[ENGINE].handle(parsed, client.name)
            for i, ev, status in zip(learning_at, parsed, outcome.statuses, strict=True):
                results[i] = {"status": status, "id": ev.id, "type": ev.type}
        counts = summary([r for r in results if r["status"] != "handled"])
        counts["handled"] = sum(1 for r in results if r["status"] == "handled")
        return json_response({"results": results, **counts}, 202)


def _index(field: str) -> int:
    m = _EVENT_RE.match(field)
    return int(m.group(1)) if m else -1


def _renumber(field: str, positions: list[int]) -> str:
    """`events[j]...` of a sub-list -> `events[i]...` of the request."""
    m = _EVENT_RE.match(field)
    return f"events[{positions[int(m.group(1))]}]{field[m.end():]}" if m else field


def add_routes(app: web.Application, auth: Authenticator) -> None:
    r = CampaignRoutes(auth)
    app.router.add_put("/v1/users/{user}/attributes", r.put_attributes)
    app.router.add_patch("/v1/users/{user}/attributes", r.put_attributes)
    app.router.add_get("/v1/users/{user}/attributes", r.get_attributes)
    app.router.add_post("/v1/attributes/batch", r.import_attributes)
    app.router.add_post("/v1/audiences/count", r.audience_count)
    app.router.add_get("/v1/templates", r.list_templates)
    app.router.add_put("/v1/templates/{name}", r.put_template)
    app.router.add_get("/v1/templates/{name}", r.get_template)
    app.router.add_post("/v1/templates/{name}/render", r.render_template)
    app.router.add_post("/v1/campaigns", r.create_campaign)
    app.router.add_get("/v1/campaigns", r.list_campaigns)
    app.router.add_get("/v1/campaigns/{id}", r.get_campaign)
    app.router.add_post("/v1/campaigns/{id}/launch", r.launch)
    app.router.add_get("/v1/campaigns/{id}/status", r.status)
    app.router.add_get("/v1/campaigns/{id}/report", r.report)
    app.router.add_get("/v1/campaigns/{id}/report.png", r.report_png)
    app.router.add_post("/v1/events", r.events)

