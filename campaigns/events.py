"""App events (opened, converted, dismissed, opt-out) attributed to a campaign and variant, each counted once.

Apps report what learners did with a push: the message id they received (campaign messages are
`cmp:{campaign}:{user}`, and the campaign and variant travel in the payload), or a campaign and a
user. For a campaign created here the variant is recomputed from the assignment hash, so an app
cannot misattribute an event, and a conversion of a control-group learner (who got no push) counts
for the control group; learners outside the audience or the launched stages are ignored.

Each (campaign, event type, learner) is counted once: the learner is added to one set per (campaign,
arm, type) and the `HINCRBY` happens only when `SADD` added them, in one Lua call, so an app that
retries a report after a timeout does not inflate the figures. The report intersects these sets with
the arm's `delivered` set for the rates over delivered learners. `clicked` is counted as `opened` (an
open is a tap on the notification). Events for a campaign that is not stored here are ignored
(`unknown_campaign`), so the `events` scope cannot make Redis grow with made-up campaigns or variants.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from ..core import metrics
from ..core.schema import FieldError, MessageInvalid
from ..queue.keys import Keys
from .audiences import VALUE_RE
from .experiments import CONTROL, message_id_names, parse_message_id
from .fanout import CampaignStore, Stored

TYPES = ("opened", "clicked", "converted", "dismissed", "opt_out")
COUNTED = {"clicked": "opened"}
EVENT_TTL_S = 180 * 86400
MAX_EVENTS = 1000
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}\Z")

# KEYS: (event set, kpi hash) per event   ARGV: ttl, then (subject, kpi field) per event   -> {1|0, ...}
_COUNT = """
local out = {}
for i = 1, #KEYS, 2 do
  local subject = ARGV[i + 1]
  local field = ARGV[i + 2]
  if redis.call('SADD', KEYS[i], subject) == 1 then
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    redis.call('HINCRBY', KEYS[i + 1], field, 1)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    campaign: str
    user: str | None = None
    message_id: str | None = None
    variant: str | None = None


def parse_events(objs: Any) -> list[Event]:
    """Validate a list of events; `MessageInvalid` names `events[i].field` for every problem."""
    if not isinstance(objs, list) or not 1 <= len(objs) <= MAX_EVENTS:
        raise MessageInvalid([FieldError("events", f"must be a list of 1-{MAX_EVENTS} events")])
    out: list[Event] = []
    errors: list[FieldError] = []
    for i, o in enumerate(objs):
        w = f"events[{i}]"
        if not isinstance(o, dict):
            errors.append(FieldError(w, "must be an object with type and message_id, or type, campaign and user"))
            continue
        bad = set(o) - {"type", "campaign", "user", "message_id", "variant", "at"}
        if bad:
            errors.append(FieldError(w, f"unknown field(s) {sorted(bad)}"))
        kind = o.get("type")
        if kind not in TYPES:
            errors.append(FieldError(f"{w}.type", f"must be one of {list(TYPES)}"))
        values: dict[str, str | None] = {}
        for name, pattern in (("campaign", VALUE_RE), ("user", _ID_RE), ("message_id", _ID_RE), ("variant", _ID_RE)):
            v = o.get(name)
            if v is not None and (not isinstance(v, str) or not pattern.match(v)):
                errors.append(FieldError(f"{w}.{name}", f"must match {pattern.pattern}"))
                v = None
            values[name] = v
        mid = values["message_id"]
        parsed = parse_message_id(mid) if mid else None
        if parsed is not None and mid is not None:
            user = values["user"]
            if values["campaign"] not in (None, parsed[0]) or (user is not None and not message_id_names(mid, user)):
                errors.append(FieldError(f"{w}.message_id", "names another campaign or user than the event"))
                continue
            values["campaign"] = parsed[0]
            if parsed[1] is not None:
                values["user"] = parsed[1]
            # else: the id holds a digest of a long user id; without "user" the event is ignored (user_unknown)
        if values["campaign"] is None:
            errors.append(FieldError(f"{w}.campaign", "is required (or a campaign message_id such as cmp:<campaign>:<user>)"))
            continue
        if values["user"] is None and mid is None:
            errors.append(FieldError(f"{w}.user", "is required when there is no message_id"))
            continue
        at = o.get("at")
        if at is not None and (isinstance(at, bool) or not isinstance(at, int | float)):
            errors.append(FieldError(f"{w}.at", "must be a unix time"))
        if isinstance(kind, str) and kind in TYPES:
            out.append(Event(kind, str(values["campaign"]), values["user"], mid, values["variant"]))
    if errors:
        raise MessageInvalid(errors)
    return out


class EventRecorder:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.store = CampaignStore(redis, keys)
        self._count = redis.register_script(_COUNT)

    async def record(self, objs: Any) -> list[dict[str, Any]]:
        """Validate all, attribute, count once each; per event {"status": counted|duplicate|ignored, ...}."""
        events = parse_events(objs)
        stored: dict[str, Stored | None] = {}
        for e in events:
            if e.campaign not in stored:
                stored[e.campaign] = await self.store.get(e.campaign)
        checks = [(i, e) for i, e in enumerate(events) if stored[e.campaign] is not None and e.user]
        members: dict[int, bool] = {}
        if checks:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, e in checks:
                    pipe.sismember(self.keys.campaign_members(e.campaign), e.user or "")
                replies = await pipe.execute()
            members = {i: bool(r) for (i, _), r in zip(checks, replies, strict=True)}
        results: list[dict[str, Any]] = [{} for _ in events]
        keys: list[str] = []
        fields: list[str] = []  # (subject, kpi field) per event
        counted: list[int] = []
        for i, e in enumerate(events):
            kind = COUNTED.get(e.type, e.type)
            s = stored[e.campaign]
            if s is None:  # not a campaign of ours: counting it would let the events scope grow Redis without limit
                results[i] = {"status": "ignored", "campaign": e.campaign, "reason": "unknown_campaign"}
                continue
            if e.user is None:
                results[i] = {"status": "ignored", "campaign": e.campaign, "reason": "user_unknown"}
                continue
            if not members.get(i):
                results[i] = {"status": "ignored", "campaign": e.campaign, "reason": "not_in_audience"}
                continue
            variant = s.arm(e.user)
            if variant is None:
                results[i] = {"status": "ignored", "campaign": e.campaign, "reason": "not_in_stage"}
                continue
            keys += [self.keys.event_users(e.campaign, variant, kind), self.keys.kpi(e.campaign)]
            fields += [e.user, f"{variant}:{kind}"]
            counted.append(i)
            results[i] = {"campaign": e.campaign, "variant": variant, "type": kind}
        if keys:
            flags = await self._count(keys=keys, args=[EVENT_TTL_S, *fields])
            for i, flag in zip(counted, flags, strict=True):
                results[i]["status"] = "counted" if flag else "duplicate"
                if flag:
                    r = results[i]
                    labels = metrics.campaign_labels(r["campaign"], r["variant"], stored=True)  # checked above
                    metrics.CAMPAIGN_EVENTS.labels(*labels, r["type"]).inc()
        return results


def summary(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    out = {"counted": 0, "duplicate": 0, "ignored": 0}
    for r in results:
        out[r["status"]] += 1
    return out


__all__ = ["CONTROL", "EventRecorder", "parse_events", "summary"]
