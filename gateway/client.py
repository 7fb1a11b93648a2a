"""`PushClient`: enqueue straight into Redis from a Python service, without the HTTP hop.

Same validation, limits and idempotency as the API (both go through `gateway.intake.Intake`):

    client = PushClient.from_url("redis://localhost:6379/0", load_settings())
    await client.send({"id": "quiz-42-badge", "user": "learner-7", "title": "Badge earned", "category": "reward"})
    await client.aclose()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis

from ..campaigns.audiences import Attributes, count_all, parse_audience
from ..campaigns.events import EventRecorder
from ..campaigns.experiments import Campaign
from ..campaigns.fanout import CampaignError, CampaignStore
from ..campaigns.report import campaign_report, chart_png, report_exists
from ..campaigns.templates import Rendered, Template, Templates
from ..core.config import Settings
from ..core.schema import Device
from ..queue.connection import redis_from_url
from ..queue.sharded import ShardedStatus
from ..users.profiles import Preferences
from .intake import Intake


class Unset:
    """Marks an argument that was not given (None has a meaning of its own: clear the value)."""


UNSET = Unset()


class PushClient:
    def __init__(self, redis: aioredis.Redis, settings: Settings, *, owns_redis: bool = False) -> None:
        self.redis = redis
        self._intake = Intake(redis, settings, source="client")
        self._campaigns = CampaignStore(redis, self._intake.home, self._intake.shards)
        self._status = ShardedStatus(redis, self._intake.shards, settings.status.retention_s)
        self._user_messages = settings.status.user_messages
        self._owns = owns_redis

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> PushClient:
        return cls(redis_from_url(url), settings, owns_redis=True)

    async def send(self, message: dict[str, Any]) -> tuple[str, bool]:
        """Queue one message; (id, False) if that id was already accepted in the idempotency window."""
        return (await self._intake.submit([message]))[0]

    async def send_many(self, messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
        """Queue a batch, all or nothing: `MessageInvalid` lists every error and nothing is queued."""
        return await self._intake.submit(messages)

    async def message_status(self, message_id: str) -> dict[str, Any] | None:
        """The message's timeline and each device's state (as GET /v1/messages/{id}); None when unknown or past
        `status.retention_s`. This client reads Redis directly: it sees every message, like an admin."""
        return await self._status.message(message_id)

    async def user_messages(self, user: str, limit: int = 20) -> list[dict[str, Any]]:
        """A learner's most recent messages, newest first, with their state (as GET /v1/users/{user}/messages)."""
        return (await self._status.user(user, min(limit, self._user_messages)))[:limit]

    async def register_device(self, user: str, device: dict[str, Any]) -> Device:
        return await self._intake.register_device(user, device)

    async def unregister_device(self, user: str, key: str) -> bool:
        return await self._intake.registry_for(user).unregister(user, key)

    async def devices(self, user: str) -> list[Device]:
        return await self._intake.registry_for(user).devices(user)

    async def set_preferences(
        self, user: str, *, timezone: str | Unset | None = UNSET, opt_out_all: bool | None = None,
        opt_out_categories: Sequence[str] | None = None,
    ) -> Preferences:
        """Change only the preferences named (like PATCH /v1/users/{user}/preferences); `timezone=None` clears it."""
        update: dict[str, Any] = {}
        if not isinstance(timezone, Unset):
            update["timezone"] = timezone
        opt_out: dict[str, Any] = {}
        if opt_out_all is not None:
            opt_out["all"] = opt_out_all
        if opt_out_categories is not None:
            opt_out["categories"] = list(opt_out_categories)
        if opt_out:
            update["opt_out"] = opt_out
        return await self._intake.profiles_for(user).update(user, update)

    async def preferences(self, user: str) -> Preferences:
        return await self._intake.profiles_for(user).get(user)

    # ------------------------------------------------------------------ campaigns (campaigns/*)

    async def set_attributes(self, user: str, attributes: dict[str, Any], *, replace: bool = False) -> Attributes:
        """A learner's cohort, track, skills, locale, time zone, topics, first name, vars (PATCH; `replace`: PUT)."""
        return await self._intake.attributes.update(user, attributes, merge=not replace)

    async def attributes(self, user: str) -> Attributes:
        return await self._intake.attributes.get(user)

    async def import_attributes(self, learners: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Replace the attributes of many learners at once (validated first; pipelined chunks of 1000)."""
        return await self._intake.attributes.import_many(learners)

    async def audience_size(self, audience: dict[str, Any]) -> int:
        return await count_all(self.redis, self._intake.shards, parse_audience(audience))

    async def save_template(self, name: str, template: dict[str, Any]) -> Template:
        """Validate and store a template (`MessageInvalid` names each field at fault)."""
        return await Templates(self.redis, self._intake.home).save(name, template)

    async def render_template(self, name: str, variables: dict[str, str], locale: str | None = None) -> Rendered:
        return (await Templates(self.redis, self._intake.home).require(name)).render(variables, locale)

    async def create_campaign(self, campaign: dict[str, Any]) -> Campaign:
        return await self._campaigns.create(campaign,
                                            declarative_navigate=self._intake.settings.webpush.declarative_navigate)

    async def launch_campaign(self, campaign: str, percent: float, weights: dict[str, float] | None = None) -> dict[str, Any]:
        """Start the fan-out of a stage (10: a pilot; 100: rollout, `weights={"b": 1}` for only variant b to the
        learners not reached yet); the workers run it. Returns its status at once."""
        return await self._campaigns.launch(campaign, percent, weights)

    async def assignment(self, campaign: str, user: str) -> str | None:
        """"control", the learner's variant, or None if no launched stage includes them (deterministic: a hash)."""
        return (await self._campaigns.require(campaign)).arm(user)

    async def campaign_status(self, campaign: str) -> dict[str, Any]:
        return await self._campaigns.status(campaign)

    async def wait_for_fanout(self, campaign: str, timeout_s: float = 600.0, poll_s: float = 0.2) -> dict[str, Any]:
        """Poll the status until the fan-out is done; `TimeoutError` if the workers do not finish in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.campaign_status(campaign)
            if status["fanout"]["state"] == "done":
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"campaign {campaign}: fan-out not done after {timeout_s:g} s: {status['fanout']}")
            await asyncio.sleep(poll_s)

    async def wait_for_delivery(self, campaign: str, timeout_s: float = 600.0, poll_s: float = 0.2) -> dict[str, Any]:
        """Poll the report until the workers settled (delivered, failed or dropped) every learner sent to; returns the
        report. Messages scheduled for later (`send_at`, send windows) keep it waiting until they go."""
        deadline = time.monotonic() + timeout_s
        while True:
            report = await self.campaign_report(campaign)
            arms = [a for a in report["arms"] if not a["control"]]
            if all(a["delivered"] + a["failed"] + a["dropped"] >= a["sent"] for a in arms):
                return report
            if time.monotonic() > deadline:
                raise TimeoutError(f"campaign {campaign}: not every message settled after {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    async def campaign_report(self, campaign: str) -> dict[str, Any]:
        """The report; `CampaignError` (404) for a campaign neither stored nor with figures, as the API answers."""
        if not await report_exists(self.redis, self._intake.home, campaign, self._intake.shards):
            raise CampaignError(404, "not_found", f"no such campaign {campaign!r} (no definition and no figures)")
        return await campaign_report(self.redis, self._intake.home, campaign, self._intake.shards)

    async def campaign_chart(self, campaign: str) -> bytes:
        """The report as a PNG (needs matplotlib: `ChartUnavailable` otherwise)."""
        return chart_png(await self.campaign_report(campaign))

    async def report_events(self, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """App events: {"type": opened|clicked|converted|dismissed|opt_out, "message_id"} or {"type", "campaign",
        "user"}; each counted once per learner and type; per event {"status": counted|duplicate|ignored, ...}."""
        return await EventRecorder(self.redis, self._intake.home).record(list(events))

    async def report_event(self, type: str, *, message_id: str | None = None, campaign: str | None = None,
                           user: str | None = None) -> dict[str, Any]:
        event = {k: v for k, v in {"type": type, "message_id": message_id, "campaign": campaign, "user": user}.items()
                 if v is not None}
        return (await self.report_events([event]))[0]

    async def aclose(self) -> None:
        if self._owns:
            await self.redis.aclose()
