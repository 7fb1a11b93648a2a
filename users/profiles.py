"""What a user told the gateway about themselves: time zone and opt-outs (global or per category).

One Redis hash per user, kept apart from the device registry so a preference survives every
device being replaced. The worker reads the preferences of a whole batch's users in one round
trip (`get_many`, one Lua call), and the policy (ratelimit/policy.py) applies them: an opted-out message is
dropped and counted, a message outside the user's local send window is deferred.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis

from ..core.schema import FieldError, MessageInvalid, parse_user
from ..core.windows import WindowError, zone
from ..queue.keys import Keys

_CATEGORY_RE = re.compile(r"^[a-z0-9_]{1,32}\Z")
# KEYS: user hashes -> [tz, opt_out] per key: one command per batch, not one per user (as in registry.py).
_PREFS_MANY = "local out = {} for i = 1, #KEYS do out[i] = redis.call('HMGET', KEYS[i], 'tz', 'opt_out') end return out"
MAX_OPT_OUT_CATEGORIES = 64


@dataclass(frozen=True, slots=True)
class Preferences:
    timezone: str | None = None  # IANA name; None: the policy's default zone
    opt_out_all: bool = False
    opt_out_categories: frozenset[str] = field(default_factory=frozenset)

    def opted_out(self, category: str, exempt: Iterable[str] = ()) -> bool:
        """True when this category must not reach the user: opted out of it, or of all but the exempt ones."""
        if category in self.opt_out_categories:
            return True
        return self.opt_out_all and category not in exempt

    def to_json(self) -> dict[str, Any]:
        return {
            "timezone": self.timezone,
            "opt_out": {"all": self.opt_out_all, "categories": sorted(self.opt_out_categories)},
        }


NO_PREFERENCES = Preferences()


def parse_preferences(obj: Any, current: Preferences = NO_PREFERENCES) -> Preferences:
    """Validate `{"timezone": ..., "opt_out": {"all": bool, "categories": [...]}}`; absent fields keep
    `current`. Raises `MessageInvalid` naming every field at fault."""
    errors: list[FieldError] = []
    if not isinstance(obj, dict):
        raise MessageInvalid([FieldError("$", "preferences must be a JSON object")])
    unknown = set(obj) - {"timezone", "opt_out"}
    if unknown:
        errors.append(FieldError("$", f"unknown field(s) {sorted(unknown)}; expected timezone and opt_out"))
    tz = current.timezone
    if "timezone" in obj:
        tz = obj["timezone"]
        if tz is not None:
            if not isinstance(tz, str) or len(tz) > 64:
                errors.append(FieldError("timezone", "must be an IANA time zone name such as Europe/Paris, or null"))
                tz = None
            else:
                try:
                    zone(tz)
                except WindowError as e:
                    errors.append(FieldError("timezone", str(e)))
    all_out, cats = current.opt_out_all, set(current.opt_out_categories)
    if "opt_out" in obj:
        oo = obj["opt_out"]
        if not isinstance(oo, dict) or set(oo) - {"all", "categories"}:
            errors.append(FieldError("opt_out", "must be an object with all (true/false) and/or categories (list)"))
        else:
            if "all" in oo:
                if not isinstance(oo["all"], bool):
                    errors.append(FieldError("opt_out.all", "must be true or false"))
                else:
                    all_out = oo["all"]
            if "categories" in oo:
                c = oo["categories"]
                if not isinstance(c, list) or len(c) > MAX_OPT_OUT_CATEGORIES:
                    errors.append(FieldError("opt_out.categories", f"must be a list of at most {MAX_OPT_OUT_CATEGORIES}"))
                else:
                    bad = [x for x in c if not isinstance(x, str) or not _CATEGORY_RE.match(x)]
                    if bad:
                        errors.append(FieldError("opt_out.categories", f"not categories: {bad[:5]} (lowercase, digits, _)"))
                    else:
                        cats = set(c)
    if errors:
        raise MessageInvalid(errors)
    return Preferences(tz, all_out, frozenset(cats))


def preferences_of(users: Sequence[str], replies: Sequence[Any]) -> dict[str, Preferences]:
    """The users' preferences from one `HMGET <user hash> tz opt_out` reply each; users with none stored are left out."""
    return {u: _decode(r) for u, r in zip(users, replies, strict=True) if r and any(v is not None for v in r)}


def _decode(fields: Mapping[Any, Any] | list[Any]) -> Preferences:
    tz_raw, out_raw = fields if isinstance(fields, list) else (fields.get(b"tz"), fields.get(b"opt_out"))
    tz = tz_raw.decode() if isinstance(tz_raw, bytes) else tz_raw
    all_out, cats = False, frozenset[str]()
    if out_raw:
        try:
            data = orjson.loads(out_raw)
            all_out, cats = bool(data.get("all")), frozenset(data.get("categories") or ())
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            # Written by this module only; a damaged value must not lose messages, nor send them
            # against a wish we can no longer read: treat it as opted out of everything.
            all_out = True
    return Preferences(tz or None, all_out, cats)


T = TypeVar("T")


async def update_hash(redis: aioredis.Redis, key: str, fields: list[str], change: Callable[[list[Any], Any], T]) -> T:
    """Read `fields` of the user hash `key`, let `change` validate and queue its writes on the pipeline, and
    commit, all under WATCH: two concurrent partial updates of one learner (a time zone from one app, an
    opt-out or attributes from another) both land. `change` raising (invalid input) writes nothing."""

    async def attempt(pipe: Any) -> T:
        stored = await pipe.hmget(key, fields)
        pipe.multi()
        return change(stored, pipe)

    result: T = await redis.transaction(attempt, key, value_from_callable=True)  # retries on WatchError
    return result


class Profiles:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._prefs_many = redis.register_script(_PREFS_MANY)

    async def get(self, user: str) -> Preferences:
        return (await self.get_many([parse_user(user)])).get(user, NO_PREFERENCES)

    async def get_many(self, users: Iterable[str]) -> dict[str, Preferences]:
        """Preferences of many users in one round trip; users with none stored are left out."""
        users = list(users)
        if not users:
            return {}
        replies = await self._prefs_many(keys=[self.keys.user(u) for u in users])
        return preferences_of(users, replies)

    async def update(self, user: str, obj: Any, *, merge: bool = True) -> Preferences:
        """Store validated preferences: merged into what is stored (absent fields kept), or replacing it."""
        key = self.keys.user(parse_user(user))

        def change(stored: list[Any], pipe: Any) -> Preferences:
            prefs = parse_preferences(obj, _decode(stored) if merge else NO_PREFERENCES)
            if prefs.timezone:
                pipe.hset(key, "tz", prefs.timezone)
            else:
                pipe.hdel(key, "tz")
            pipe.hset(key, "opt_out", orjson.dumps({"all": prefs.opt_out_all, "categories": sorted(prefs.opt_out_categories)}))
            return prefs

        return await update_hash(self.redis, key, ["tz", "opt_out"], change)
