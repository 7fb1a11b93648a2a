"""The door into the queue: validate, check payload limits, enqueue, count. Shared by the API, the CLI and `PushClient`.

A batch is all-or-nothing: every message is validated (schema, Web Push endpoint policy, each
provider's payload limit) before any is queued, and the errors name the message by index, so a
caller fixes its input and sends the same batch again; idempotency ids make that resend safe.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from ..campaigns.audiences import NO_ATTRIBUTES, ShardedAttributes
from ..campaigns.besttime import BestTimes
from ..campaigns.templates import Rendered, RenderError, Template, Templates
from ..core import metrics
from ..core.config import Settings
from ..core.schema import (
    PROVIDERS,
    ApnsPush,
    Device,
    FieldError,
    Message,
    MessageInvalid,
    parse_device,
    parse_message,
    parse_user,
)
from ..providers.base import PayloadTooLarge
from ..providers.endpoints import EndpointPolicy
from ..providers.payloads import check_payload_limits
from ..queue.keys import Keys
from ..queue.sharded import ShardedQueue, home_keys, shard_map
from ..users.profiles import Profiles
from ..users.registry import DeviceRegistry

ENQUEUE_CHUNK = 500  # messages per Lua call: keeps one script run short for other Redis clients


def _with_rendered(obj: dict[str, Any], r: Rendered) -> dict[str, Any]:
    """The message with the rendered title, body, data and rich fields (its own data keys and rich fields win)."""
    out = r.rich | obj
    if r.title is not None:
        out["title"] = r.title
    if r.body is not None:
        out["body"] = r.body
    if r.data:
        data = obj.get("data")
        out["data"] = r.data | (data if isinstance(data, dict) else {})
    return out


class Intake:
    """Validates and enqueues messages, registers devices; `source` labels pushgw_enqueued_total."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, *, source: str = "api") -> None:
        self.settings = settings
        self.keys = Keys(settings.redis.prefix)
        # One queue per shard (one under today's keys with a single Redis); a user's devices live on its shard.
        self.shards = shard_map(settings.redis)
        self.queue = ShardedQueue(redis, self.shards, idempotency_window_s=settings.worker.idempotency_window_s,
                                  done_ttl_s=settings.worker.done_ttl_s, wait_replicas=settings.redis.wait_replicas,
                                  wait_timeout_ms=settings.redis.wait_timeout_ms)
        self.registries = [DeviceRegistry(redis, k) for k in self.shards.all_keys()]
        self.registry = self.registries[0]
        self.profiles = [Profiles(redis, k) for k in self.shards.all_keys()]
        self.home = home_keys(self.shards)  # saved templates (one fixed hash tag on Redis Cluster)
        self.attributes = ShardedAttributes(redis, self.shards)
        self.policy = EndpointPolicy(settings.webpush)
        # `app` names an [apns.<name>] or [fcm.<name>] section; "default" (the field's default) always passes.
        self.apps = frozenset({"default", *(a.name for a in settings.apns), *(a.name for a in settings.fcm)})
        self._enqueued = metrics.ENQUEUED.labels(source)
        self._scheduled = metrics.SCHEDULED.labels(source)
        self._group_ready = False
        # Learners' opens (their best hour) are kept with the global records on Redis Cluster: one home, read by the
        # intake and the fan-out alike.
        self.best = BestTimes(redis, self.home, settings.policy, self.attributes)

    def validate(self, objs: Sequence[Any]) -> list[Message]:
        """Parse every message; raise `MessageInvalid` with `[i].field` errors for all that fail."""
        if len(objs) > self.settings.api.max_batch:
            raise MessageInvalid([FieldError("messages", f"at most {self.settings.api.max_batch} messages per batch")])
        out: list[Message] = []
        errors: list[FieldError] = []
        batch = len(objs) > 1
        for i, obj in enumerate(objs):
            where = f"messages[{i}]." if batch else ""
            try:
                msg = parse_message(obj, endpoint_check=self.policy.check)
                self._check_apps(msg)
                # A message to a user may reach any provider; explicit devices only their own.
                providers = PROVIDERS if msg.user is not None else tuple({d.provider for d in msg.devices})
                if msg.fcm_target is not None:
                    providers = ("fcm",)
                check_payload_limits(msg, providers, declarative_navigate=self.settings.webpush.declarative_navigate)
                if msg.rich is not None and msg.rich.critical:
                    rich = msg.rich
                    self._check_critical(msg, "sound.critical" if rich.sound is not None and rich.sound.critical
                                         else "interruption_level")
                if msg.overrides is not None and msg.overrides.critical_field is not None:
                    self._check_critical(msg, msg.overrides.critical_field)
                if msg.apns_push is not None:
                    self._check_apns_push(msg, msg.apns_push)
            except MessageInvalid as e:
                errors += [FieldError(where + err.field, err.message) for err in e.errors]
                continue
            except PayloadTooLarge as e:
                errors.append(FieldError(where + "$", f"{e} (the final {e.provider} payload: title, body, data "
                                                      "and the rich fields together)"))
                continue
            out.append(msg)
        if errors:
            raise MessageInvalid(errors)
        return out

    def _check_critical(self, msg: Message, field: str) -> None:
        """A critical sound or interruption level (`field` names where it was asked for) needs Apple's
        critical-alerts entitlement on every APNs app the message can reach, said in the config. A user's
        registered devices may name any configured app, so a message to a user needs it on all of them."""
        apps = {d.app or msg.app for d in msg.devices if d.provider == "apns"}
        if msg.user is not None:
            apps |= {msg.app, *(a.name for a in self.settings.apns)}
        missing = sorted(a for a in apps if not ((cfg := self.settings.apns_app(a)) and cfg.critical_alerts))
        if missing:
            raise MessageInvalid([FieldError(field, f"critical alerts need Apple's entitlement: set apns.{missing[0]}."
                                                    "critical_alerts = true once Apple granted it")])

    def _check_apns_push(self, msg: Message, push: ApnsPush) -> None:
        """A Live Activity needs token auth (APNs refuses certificate auth for liveactivity); mdm needs the
        app's MDM topic in the config."""
        if push.push_type not in ("liveactivity", "mdm"):
            return
        for app in sorted({d.app or msg.app for d in msg.devices}):
            cfg = self.settings.apns_app(app)
            if cfg is None:
                continue  # _check_apps names an unknown app
            if push.push_type == "liveactivity" and not cfg.key_file:
                raise MessageInvalid([FieldError("live_activity", f"Live Activities need token auth: apns.{app} "
                                                                  "uses a certificate (set key_file, key_id, team_id)")])
            if push.push_type == "mdm" and not cfg.mdm_topic:
                raise MessageInvalid([FieldError("apns_push_type", f"mdm pushes need apns.{app}.mdm_topic "
                                                                   "(the MDM push certificate's topic)")])

    async def expand_templates(self, objs: Sequence[Any], *, reads_users: bool = True) -> list[Any]:
        """Messages naming a `template` (+ `vars`, optional `locale`) get their title, body and data rendered here,
        for the `user`'s locale and first name; errors name the field (`vars.score`, `locale`, `template`), and a
        message that cannot be rendered completely is refused, never sent with a gap.

        `reads_users` is false for a caller that may not read learners' data (an API client without the `devices`
        scope). Its templated message to a user goes only to that user's registered devices (explicit `devices`
        are refused), and whether it is accepted does not depend on what is stored: it must render with its own
        `vars`, `locale` and the template's fallbacks alone, and when the learner's stored locale has no variant it
        gets the default one rather than an error."""
        if not any(isinstance(o, dict) and "template" in o for o in objs):
            return list(objs)

        templates = Templates(self.queue.redis, self.home)
        cache: dict[str, Template] = {}
        # The learners' attributes (locale, first name) for the whole batch in one round trip; an
        # invalid user id is left out here and refused with its field below.
        valid: set[str] = set()
        for o in objs:
            if isinstance(o, dict) and "template" in o and isinstance(o.get("user"), str):
                with suppress(MessageInvalid):
                    valid.add(parse_user(o["user"]))
        learners = await self.attributes.get_many(sorted(valid))
        out: list[Any] = []
        errors: list[FieldError] = []
        batch = len(objs) > 1
        for i, obj in enumerate(objs):
            if not isinstance(obj, dict) or "template" not in obj:
                out.append(obj)
                continue
            where = f"messages[{i}]." if batch else ""
            obj = dict(obj)
            name, variables, locale = obj.pop("template"), obj.pop("vars", None) or {}, obj.pop("locale", None)
            clash = [f for f in ("title", "body") if f in obj]
            if clash:
                errors.append(FieldError(where + clash[0], "give either a template or a title/body"))
                continue
            if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
                errors.append(FieldError(where + "vars", "must be an object of string values"))
                continue
            if locale is not None and not isinstance(locale, str):
                errors.append(FieldError(where + "locale", "must be a language tag such as fr"))
                continue
            if not reads_users and "user" in obj and obj.get("devices"):
                errors.append(FieldError(where + "devices", "a template rendered for a user is sent to that user's "
                                                            "registered devices; explicit devices need the devices scope"))
                continue
            try:
                t = cache.get(name) if isinstance(name, str) else None
                if t is None:
                    t = cache[name] = await templates.require(name)
                user = obj.get("user")
                attrs = learners.get(parse_user(user), NO_ATTRIBUTES) if isinstance(user, str) else NO_ATTRIBUTES
                if reads_users:
                    r = t.render({**attrs.template_vars(), **variables}, locale or attrs.locale)
                else:
                    # Accepted or refused on the caller's own text alone (its vars and the template's fallbacks),
                    # so neither the answer nor its errors depend on what is stored about the learner.
                    r = plain = t.render(variables, locale)
                    if self._fits(_with_rendered(obj, plain)):
                        try:
                            r = t.render({**attrs.template_vars(), **variables}, locale or attrs.locale)
                        except RenderError:  # only the stored locale can fail once the plain render passed
                            r = t.render({**attrs.template_vars(), **variables}, locale)
                        if not self._fits(_with_rendered(obj, r)):
                            r = plain  # a stored attribute too long for the limits: the fallback text
            except MessageInvalid as e:
                errors += [FieldError(where + err.field, err.message) for err in e.errors]
                continue
            except RenderError as e:
                errors.append(FieldError(where + e.field, e.message))
                continue
            out.append(_with_rendered(obj, r))
        if errors:
            raise MessageInvalid(errors)
        return out

    async def best_times(self, objs: Sequence[Any], now: float | None = None) -> list[Any]:
        """Messages asking for `send_time: "best"` get the `send_at` of their user's best hour (campaigns/besttime.py):
        within the next 24 h, inside the category's send windows; errors name `send_time`."""
        asked = [i for i, o in enumerate(objs) if isinstance(o, dict) and "send_time" in o]
        if not asked:
            return list(objs)
        now = time.time() if now is None else now
        errors: list[FieldError] = []
        wanted: list[tuple[int, tuple[str, str, str]]] = []
        for i in asked:
            o = objs[i]
            where = f"messages[{i}].send_time" if len(objs) > 1 else "send_time"
            category = o.get("category", "general")
            if o["send_time"] != "best":
                errors.append(FieldError(where, 'must be "best"'))
            elif "send_at" in o:
                errors.append(FieldError(where, "give either send_at or send_time"))
            elif not isinstance(o.get("user"), str) or not isinstance(category, str):
                errors.append(FieldError(where, "needs a user: the hour is the one at which that learner opens most"))
            else:
                with suppress(MessageInvalid):  # an invalid user id is refused with its own field by validate
                    user = parse_user(o["user"])
                    wanted.append((i, (user, category, str(o.get("id") or user))))
        if errors:
            raise MessageInvalid(errors)
        chosen = set(asked)
        out = [dict(o) if i in chosen else o for i, o in enumerate(objs)]
        for i in asked:
            del out[i]["send_time"]
        times = await self.best.send_times([w for _, w in wanted], now)
        for (i, _), bt in zip(wanted, times, strict=True):
            if bt.at > now:
                out[i]["send_at"] = bt.at
        return out

    def _fits(self, obj: Any) -> bool:
        """Whether `validate` would accept this one message."""
        try:
            self.validate([obj])
        except MessageInvalid:
            return False
        return True

    async def submit(self, objs: Sequence[Any], *, reads_users: bool = True,
                     client: str | None = None) -> list[tuple[str, bool]]:
        """Validate all, then enqueue; returns (message id, True if queued / False if a duplicate id).
        `reads_users`: see `expand_templates`; `client`: the API client enqueuing (it alone may withdraw the
        messages or read their status, and its webhooks get their outcome events)."""
        objs = await self.best_times(objs)
        messages = self.validate(await self.expand_templates(objs, reads_users=reads_users))
        if client is not None:
            messages = [replace(m, client=client) for m in messages]
        if not self._group_ready:
            await self.queue.ensure_group()  # so a message queued before any worker started is delivered
            self._group_ready = True
        flags: list[bool] = []
        status = self.settings.status
        for i in range(0, len(messages), ENQUEUE_CHUNK):
            now_ms = int(time.time() * 1000)
            chunk = messages[i:i + ENQUEUE_CHUNK]
            chunk_flags = await self.queue.enqueue(chunk, now_ms, owner=client or "")
            flags += chunk_flags
            if status.enabled and any(chunk_flags):  # a duplicate keeps the status of the message first accepted
                await self.queue.record_accepted([m for m, f in zip(chunk, chunk_flags, strict=True) if f], now_ms,
                                                 retention_s=status.retention_s)
        queued = sum(flags)
        if queued:
            self._enqueued.inc(queued)
            now = time.time()
            scheduled = sum(1 for m, f in zip(messages, flags, strict=True) if f and m.send_at is not None and m.send_at > now)
            if scheduled:
                self._scheduled.inc(scheduled)
        if len(flags) - queued:
            metrics.DUPLICATES.inc(len(flags) - queued)
        return [(m.id, f) for m, f in zip(messages, flags, strict=True)]

    def _unknown_app(self, where: str, app: str | None) -> FieldError | None:
        if app is None or app in self.apps:
            return None
        return FieldError(where, f"no app {app!r} is configured (an [apns.<name>] or [fcm.<name>] section)")

    def _check_apps(self, msg: Message) -> None:
        found = [self._unknown_app("app", msg.app)]
        found += [self._unknown_app(f"devices[{i}].app", d.app) for i, d in enumerate(msg.devices)]
        errors = [e for e in found if e is not None]
        if errors:
            raise MessageInvalid(errors)

    def parse_device(self, obj: Any) -> Device:
        errors: list[FieldError] = []
        device = parse_device(obj, "device", errors, self.policy.check)
        if device is None:
            raise MessageInvalid(errors or [FieldError("device", "invalid device")])
        unknown = self._unknown_app("device.app", device.app)
        if unknown is not None:
            raise MessageInvalid([unknown])
        return device

    async def register_device(self, user: str, obj: Any) -> Device:
        """Validate and add a device for `user`; raises `MessageInvalid` or `RegistryFull`."""
        user = parse_user(user)
        device = self.parse_device(obj)
        await self.registry_for(user).register(user, device)
        return device

    def registry_for(self, user: str) -> DeviceRegistry:
        """The registry of the user's shard (the only one with a single Redis)."""
        return self.registries[self.shards.shard_of(user)]

    def profiles_for(self, user: str) -> Profiles:
        """The preferences store of the user's shard, where the workers' policy reads them."""
        return self.profiles[self.shards.shard_of(user)]
