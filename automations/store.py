"""Stored automation rules: saved validated, listed, paused, deleted; read by every API and worker process.

Saving checks what only Redis knows: the template exists and every locale of it renders with the rule's
variables and the trigger's event variables (a rule that could never send fails when it is saved, not at
3 am). It also stores the rule's campaign view (`auto-<id>`, campaigns/fanout.py `put_running`), so events
and reports find it, and a new inactivity rule starts with no cursor: its first sweep reaches every learner already idle.
Every change bumps a version counter: processes keep the rules in memory and reload when it moves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
import redis.asyncio as aioredis

from ..campaigns.experiments import Campaign
from ..campaigns.fanout import CampaignStore
from ..campaigns.templates import RenderError, Templates
from ..core.schema import FieldError, MessageInvalid
from ..queue.keys import Keys
from .rules import MAX_RULES, Rule, load_rule, parse_rule, sample_vars


class RuleNotFound(LookupError):
    pass


class TooManyRules(RuntimeError):
    pass


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RuleStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._version: bytes | str | None = None
        self._rules: tuple[Rule, ...] = ()
        self._campaigns: dict[str, tuple[Rule, Campaign]] = {}

    def campaign_of(self, rule: Rule) -> Campaign:
        """The rule's campaign view, built once per loaded rule (the engine asks for it per event)."""
        cached = self._campaigns.get(rule.id)
        if cached is not None and cached[0] is rule:
            return cached[1]
        c = rule.campaign()
        self._campaigns[rule.id] = (rule, c)
        return c

    async def save(self, rule_id: str, obj: Any, now: float | None = None) -> tuple[Rule, bool]:
        """Validate and store (create or replace); (rule, created)."""
        now = time.time() if now is None else now
        rule = parse_rule(obj, rule_id)
        await self._check_templates(rule)
        k = self.keys
        exists = bool(await self.redis.exists(k.automation(rule.id)))
        if not exists and await self.redis.scard(k.automations) >= MAX_RULES:
            raise TooManyRules(f"at most {MAX_RULES} automation rules")
        await CampaignStore(self.redis, k).put_running(rule.campaign(), now)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(k.automation(rule.id), mapping={"def": orjson.dumps(rule.to_json()), "updated_at": str(now)})
            pipe.hsetnx(k.automation(rule.id), "created_at", str(now))
            pipe.sadd(k.automations, rule.id)
            pipe.incr(k.automations_version)
            await pipe.execute()
        return rule, not exists

    async def save_many(self, objs: Sequence[Any], now: float | None = None) -> list[tuple[Rule, bool]]:
        """Save rules all or nothing: every one is validated (and its templates checked) before any is stored; errors
        name `automations[i].<field>`. Each needs its `id`."""
        errors: list[FieldError] = []
        for i, obj in enumerate(objs):
            try:
                if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                    raise MessageInvalid([FieldError("id", "every rule needs its id")])
                await self._check_templates(parse_rule(obj))
            except MessageInvalid as e:
                errors += [FieldError(f"automations[{i}].{err.field}", err.message) for err in e.errors]
        if errors:
            raise MessageInvalid(errors)
        return [await self.save(obj["id"], obj, now) for obj in objs]

    async def _check_templates(self, rule: Rule) -> None:
        templates = Templates(self.redis, self.keys)
        errors: list[FieldError] = []
        for i, v in enumerate(rule.variants or rule.campaign().variants):
            name = v.template or rule.template or ""
            where = f"variants[{i}].template" if v.template else "template"
            t = await templates.get(name)
            if t is None:
                errors.append(FieldError(where, f"no template named {name!r}"))
                continue
            for loc in t.locales:
                try:
                    t.render({**sample_vars(rule.trigger), **rule.vars, **v.vars}, loc)
                except RenderError as e:
                    errors.append(FieldError(where, f"{loc}: {e}"))
        if errors:
            raise MessageInvalid(errors)

    async def get(self, rule_id: str) -> Rule | None:
        raw = await self.redis.hget(self.keys.automation(rule_id), "def")
        return load_rule(orjson.loads(raw)) if raw else None

    async def require(self, rule_id: str) -> Rule:
        rule = await self.get(rule_id)
        if rule is None:
            raise RuleNotFound(rule_id)
        return rule

    async def set_paused(self, rule_id: str, paused: bool) -> Rule:
        rule = replace(await self.require(rule_id), paused=paused)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.automation(rule_id), "def", orjson.dumps(rule.to_json()))
            pipe.incr(self.keys.automations_version)
            await pipe.execute()
        return rule

    async def delete(self, rule_id: str) -> bool:
        """Forget the rule (its messages already queued still go; its report stays readable as `auto-<id>`)."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(k.automation(rule_id))
            pipe.srem(k.automations, rule_id)
            pipe.delete(k.idle(rule_id))
            pipe.incr(k.automations_version)
            removed, *_ = await pipe.execute()
        return bool(removed)

    async def all(self) -> tuple[Rule, ...]:
        """Every rule, from memory while the version counter has not moved (one GET)."""
        version = await self.redis.get(self.keys.automations_version)
        if version is not None and version == self._version:
            return self._rules
        ids = sorted(_s(x) for x in await self.redis.smembers(self.keys.automations))
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.hget(self.keys.automation(rid), "def")
            raws = await pipe.execute()
        self._rules = tuple(load_rule(orjson.loads(r)) for r in raws if r)
        self._version = version
        return self._rules
