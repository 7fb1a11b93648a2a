"""Who a campaign reaches: user attributes, topic subscriptions, and audiences as filters over them.

Attributes live in the user's preferences hash (`pushgw:user:{user}`, field `attrs`, JSON; the time
zone stays in its `tz` field, where the send-window policy already reads it), so one read gives the
fan-out both a learner's locale and first name. Each filterable value also has an index set
(`pushgw:aud:cohort:intermediate`, ...): an audience is then a SINTER of SUNIONs computed inside
Redis, which stays one command for 100k+ learners instead of a scan of every profile.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import redis.asyncio as aioredis

from ..core.schema import FieldError, MessageInvalid, parse_user
from ..core.windows import WindowError, zone
from ..queue.keys import Keys
from ..queue.shards import ShardMap
from ..users.profiles import update_hash

VALUE_RE = re.compile(r"^[a-z0-9_-]{1,48}\Z")
LOCALE_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}\Z")
VAR_RE = re.compile(r"^[a-z_][a-z0-9_]{0,31}\Z")
MAX_LIST = 64
MAX_VARS = 16
MAX_VAR_LEN = 256
# attribute name in the API -> index name (lists index each element under the singular name)
INDEXED = {"cohort": "cohort", "track": "track", "skills": "skill", "locale": "locale", "topics": "topic"}
FILTERS = ("cohort", "track", "skill", "locale", "topic")
_FIELDS = ("first_name", "cohort", "track", "skills", "locale", "timezone", "topics", "vars")


@dataclass(frozen=True, slots=True)
class Attributes:
    """What the gateway knows about a learner for targeting and personalization."""

    first_name: str | None = None
    cohort: str | None = None  # e.g. beginner, intermediate, advanced
    track: str | None = None  # e.g. data-science
    skills: tuple[str, ...] = ()
    locale: str | None = None  # BCP 47, e.g. fr or pt-BR: picks the template's locale variant
    timezone: str | None = None  # IANA; the send-window policy uses it too
    topics: tuple[str, ...] = ()  # subscriptions, e.g. module-news
    vars: Mapping[str, str] = field(default_factory=dict)  # per-learner template variables, e.g. score

    def to_json(self) -> dict[str, Any]:
        return {"first_name": self.first_name, "cohort": self.cohort, "track": self.track, "skills": list(self.skills),
                "locale": self.locale, "timezone": self.timezone, "topics": list(self.topics), "vars": dict(self.vars)}

    def stored(self) -> bytes:
        """The `attrs` field (the time zone is stored apart, in `tz`)."""
        out = {k: v for k, v in self.to_json().items() if k != "timezone" and v not in (None, [], {})}
        return orjson.dumps(out)

    def index_entries(self) -> set[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        for name, index in INDEXED.items():
            value = getattr(self, name)
            for v in (value if isinstance(value, tuple) else (value,)):
                if v:
                    out.add((index, v))
        return out

    def template_vars(self) -> dict[str, str]:
        """Variables a template may use for this learner: first_name and the learner's own `vars`."""
        out = dict(self.vars)
        if self.first_name:
            out["first_name"] = self.first_name
        return out


NO_ATTRIBUTES = Attributes()


def _value(obj: Mapping[str, Any], name: str, errors: list[FieldError], pattern: re.Pattern[str], hint: str) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or not pattern.match(v):
        errors.append(FieldError(name, f"must be {hint}"))
        return None
    return v


def _values(obj: Mapping[str, Any], name: str, errors: list[FieldError]) -> tuple[str, ...]:
    v = obj.get(name)
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > MAX_LIST:
        errors.append(FieldError(name, f"must be a list of at most {MAX_LIST} values"))
        return ()
    bad = [x for x in v if not isinstance(x, str) or not VALUE_RE.match(x)]
    if bad:
        errors.append(FieldError(name, f"not values: {bad[:5]} (lowercase letters, digits, _ and -, at most 48)"))
        return ()
    return tuple(sorted(set(v)))


def parse_attributes(obj: Any, current: Attributes = NO_ATTRIBUTES) -> Attributes:
    """Validate an attributes object; absent fields keep `current`, null clears. `MessageInvalid` names every field."""
    if not isinstance(obj, dict):
        raise MessageInvalid([FieldError("$", "attributes must be a JSON object")])
    errors: list[FieldError] = []
    unknown = set(obj) - set(_FIELDS)
    if unknown:
        errors.append(FieldError("$", f"unknown field(s) {sorted(unknown)}; expected some of {list(_FIELDS)}"))
    out: dict[str, Any] = {name: getattr(current, name) for name in _FIELDS}
    for name in obj:
        if name not in _FIELDS:
            continue
        if name == "first_name":
            v = obj[name]
            if v is not None and (not isinstance(v, str) or not 1 <= len(v) <= 64 or any(c in v for c in "{}\n")):
                errors.append(FieldError(name, "must be 1-64 characters without braces or newlines"))
            else:
                out[name] = v
        elif name in ("cohort", "track"):
            out[name] = _value(obj, name, errors, VALUE_RE, "lowercase letters, digits, _ and - (at most 48)")
        elif name == "locale":
            out[name] = _value(obj, name, errors, LOCALE_RE, "a language tag such as fr or pt-BR")
        elif name == "timezone":
            v = obj[name]
            if v is not None:
                try:
                    if not isinstance(v, str) or len(v) > 64:
                        raise WindowError("must be an IANA time zone name such as Europe/Paris")
                    zone(v)
                except WindowError as e:
                    errors.append(FieldError(name, str(e)))
                    continue
            out[name] = v
        elif name in ("skills", "topics"):
            out[name] = _values(obj, name, errors)
        else:  # vars
            v = obj[name]
            if v is None:
                out[name] = {}
            elif not isinstance(v, dict) or len(v) > MAX_VARS:
                errors.append(FieldError("vars", f"must be an object of at most {MAX_VARS} string values"))
            else:
                for k, x in v.items():
                    if not VAR_RE.match(k):
                        errors.append(FieldError(f"vars.{k}", "a variable name is lowercase letters, digits and _"))
                    elif not isinstance(x, str) or len(x) > MAX_VAR_LEN:
                        errors.append(FieldError(f"vars.{k}", f"must be a string of at most {MAX_VAR_LEN} characters"))
                out[name] = dict(v)
    if errors:
        raise MessageInvalid(errors)
    return Attributes(**out)


def decode_attributes(raw: Any, tz: Any = None) -> Attributes:
    """From the stored `attrs` and `tz` fields; a damaged value reads as no attributes (it only targets, never sends)."""
    tz_s = tz.decode() if isinstance(tz, bytes) else tz
    if not raw:
        return Attributes(timezone=tz_s or None)
    try:
        d = orjson.loads(raw)
        return Attributes(first_name=d.get("first_name"), cohort=d.get("cohort"), track=d.get("track"),
                          skills=tuple(d.get("skills") or ()), locale=d.get("locale"), timezone=tz_s or None,
                          topics=tuple(d.get("topics") or ()), vars=dict(d.get("vars") or {}))
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return Attributes(timezone=tz_s or None)


_READ = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, 'attrs', 'tz') end
return out
"""


class UserAttributes:
    """Stores attributes and keeps the index sets in step (in the same MULTI/EXEC)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._read = redis.register_script(_READ)

    async def get(self, user: str) -> Attributes:
        return (await self.get_many([parse_user(user)]))[user]

    def user_key(self, user: str) -> str:
        """The hash holding the learner's attributes and preferences."""
        return self.keys.user(user)

    async def get_many(self, users: Sequence[str]) -> dict[str, Attributes]:
        """Attributes of many users in one round trip (users with none get empty attributes). One Lua call, not a
        pipeline of HMGETs: for a fan-out chunk of 1000 learners it halves the client's CPU (one reply to parse)."""
        if not users:
            return {}
        replies = await self._read(keys=[self.keys.user(u) for u in users])
        return {u: decode_attributes(r[0], r[1]) for u, r in zip(users, replies, strict=True)}

    def _write(self, pipe: Any, user: str, old: Attributes, new: Attributes, tz_given: bool) -> None:
        """`tz` is shared with the preferences (PATCH /preferences sets it too): touched only when `timezone` was given."""
        before, after = old.index_entries(), new.index_entries()
        for index, value in before - after:
            pipe.srem(self.keys.audience_index(index, value), user)
        for index, value in after - before:
            pipe.sadd(self.keys.audience_index(index, value), user)
        key = self.keys.user(user)
        pipe.hset(key, "attrs", new.stored())
        if not tz_given:
            return
        if new.timezone:
            pipe.hset(key, "tz", new.timezone)
        elif old.timezone:
            pipe.hdel(key, "tz")

    async def update(self, user: str, obj: Any, *, merge: bool = True) -> Attributes:
        """PATCH (merge=True: fields not named are kept) or PUT (replace) one learner's attributes. The time zone is
        kept unless `timezone` is named (a value, or null to clear it), also by a PUT: it is a preference too."""
        user = parse_user(user)

        def change(stored: list[Any], pipe: Any) -> Attributes:
            old = decode_attributes(*stored)
            new = parse_attributes(obj, old if merge else Attributes(timezone=old.timezone))
            self._write(pipe, user, old, new, isinstance(obj, dict) and "timezone" in obj)
            return new

        return await update_hash(self.redis, self.keys.user(user), ["attrs", "tz"], change)

    async def import_many(self, items: Iterable[tuple[str, Any]], chunk: int = 1000) -> int:
        """Replace the attributes of many learners (an import from the learning platform): validated first,
        then written in pipelined chunks. Not isolated from a concurrent update of the same learner. A learner named
        twice is written once, with the last row; a row without `timezone` keeps the learner's time zone."""
        rows, parsed = parse_import(items)
        await self.write_import(list(parsed.items()), chunk)
        return rows

    async def write_import(self, learners: Sequence[tuple[str, ImportRow]], chunk: int = 1000) -> None:
        """Write validated import rows (`parse_import`), in pipelined chunks."""
        for i in range(0, len(learners), chunk):
            part = learners[i:i + chunk]
            old = await self.get_many([u for u, _ in part])
            async with self.redis.pipeline(transaction=False) as pipe:
                for user, (attrs, tz_given) in part:
                    if not tz_given:
                        attrs = replace(attrs, timezone=old[user].timezone)
                    self._write(pipe, user, old[user], attrs, tz_given)
                await pipe.execute()


ImportRow = tuple[Attributes, bool]  # the attributes, and whether the row named `timezone`


def parse_import(items: Iterable[tuple[str, Any]]) -> tuple[int, dict[str, ImportRow]]:
    """Validate an import's rows: (rows read, learner -> its last row); `MessageInvalid` naming `[i].field` for bad rows."""
    parsed: dict[str, ImportRow] = {}
    rows = 0
    errors: list[FieldError] = []
    for i, (user, obj) in enumerate(items):
        rows += 1
        try:
            u = parse_user(user)
            attrs = parse_attributes(obj)
        except MessageInvalid as e:
            errors += [FieldError(f"[{i}].{err.field}", err.message) for err in e.errors]
            continue
        parsed.pop(u, None)  # last wins (and is written in its own place)
        parsed[u] = (attrs, isinstance(obj, dict) and "timezone" in obj)
    if errors:
        raise MessageInvalid(errors[:50])
    return rows, parsed


class ShardedAttributes:
    """Learners' attributes on each learner's shard (queue/shards.py), beside the preferences in the same hash, with
    the shard's own audience index sets: a learner's write is one transaction on one slot. With one Redis, exactly
    `UserAttributes` under today's keys."""

    def __init__(self, redis: aioredis.Redis, shards: ShardMap) -> None:
        self.shards = shards
        self.parts = [UserAttributes(redis, k) for k in shards.all_keys()]

    def of(self, user: str) -> UserAttributes:
        return self.parts[self.shards.shard_of(user)]

    def user_key(self, user: str) -> str:
        return self.of(user).user_key(user)

    async def get(self, user: str) -> Attributes:
        return await self.of(parse_user(user)).get(user)

    async def update(self, user: str, obj: Any, *, merge: bool = True) -> Attributes:
        return await self.of(parse_user(user)).update(user, obj, merge=merge)

    async def get_many(self, users: Sequence[str]) -> dict[str, Attributes]:
        """One Lua call per shard with learners among `users`, concurrently."""
        if len(self.parts) == 1:
            return await self.parts[0].get_many(users)
        by_shard: dict[int, list[str]] = {}
        for u in users:
            by_shard.setdefault(self.shards.shard_of(u), []).append(u)
        out: dict[str, Attributes] = {}
        for found in await asyncio.gather(*(self.parts[n].get_many(us) for n, us in by_shard.items())):
            out |= found
        return out

    async def import_many(self, items: Iterable[tuple[str, Any]], chunk: int = 1000) -> int:
        """`UserAttributes.import_many` over every shard: the whole import is validated before any shard is written."""
        rows, parsed = parse_import(items)
        by_shard: dict[int, list[tuple[str, ImportRow]]] = {}
        for user, row in parsed.items():
            by_shard.setdefault(self.shards.shard_of(user), []).append((user, row))
        await asyncio.gather(*(self.parts[n].write_import(rows_n, chunk) for n, rows_n in by_shard.items()))
        return rows


# ---------------------------------------------------------------------------- audiences


@dataclass(frozen=True, slots=True)
class Audience:
    """A topic, or a filter: every attribute named must match (AND), any of its listed values (OR)."""

    topic: str | None = None
    filter: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.topic is not None:
            return {"topic": self.topic}
        return {"filter": {k: list(v) for k, v in self.filter}}


def parse_audience(obj: Any, where: str = "audience") -> Audience:
    if not isinstance(obj, dict) or len(obj) != 1 or not ({"topic", "filter"} & set(obj)):
        raise MessageInvalid([FieldError(where, 'must be {"topic": "<name>"} or {"filter": {"cohort": ["intermediate"], ...}}')])
    if "topic" in obj:
        t = obj["topic"]
        if not isinstance(t, str) or not VALUE_RE.match(t):
            raise MessageInvalid([FieldError(f"{where}.topic", "must be a topic name (lowercase letters, digits, _ and -)")])
        return Audience(topic=t)
    f = obj["filter"]
    if not isinstance(f, dict) or not f:
        raise MessageInvalid([FieldError(f"{where}.filter", f"must name at least one of {list(FILTERS)}")])
    errors: list[FieldError] = []
    out: list[tuple[str, tuple[str, ...]]] = []
    for name, values in sorted(f.items()):
        if name not in FILTERS:
            errors.append(FieldError(f"{where}.filter.{name}", f"unknown attribute; filters are {list(FILTERS)}"))
            continue
        vs = [values] if isinstance(values, str) else values
        pattern = LOCALE_RE if name == "locale" else VALUE_RE
        valid = isinstance(vs, list) and 1 <= len(vs) <= MAX_LIST
        if not valid or not all(isinstance(v, str) and pattern.match(v) for v in vs):
            errors.append(FieldError(f"{where}.filter.{name}", f"must be a value or a list of 1-{MAX_LIST} values"))
            continue
        out.append((name, tuple(sorted(set(vs)))))
    if errors:
        raise MessageInvalid(errors)
    return Audience(filter=tuple(out))


async def materialize(redis: aioredis.Redis, keys: Keys, audience: Audience, dest: str, ttl_s: int | None = None) -> int:
    """Compute the audience into the set `dest` inside Redis (one MULTI/EXEC; `ttl_s`: with an expiry); returns its size."""
    if audience.topic is not None:
        sources = [keys.audience_index("topic", audience.topic)]
        temps: list[str] = []
    else:
        sources, temps = [], []
        for name, values in audience.filter:
            if len(values) == 1:
                sources.append(keys.audience_index(name, values[0]))
            else:
                tmp = f"{dest}:tmp:{uuid.uuid4().hex}"
                temps.append(tmp)
                sources.append(tmp)
    async with redis.pipeline(transaction=True) as pipe:
        i = 0
        for name, values in audience.filter:
            if len(values) > 1:
                # by name: redis-py's cluster pipeline refuses its multi-key helpers, though every key here is on
                # `keys`' one slot (a shard's index sets, queue/shards.py)
                pipe.execute_command("SUNIONSTORE", temps[i], *(keys.audience_index(name, v) for v in values))
                i += 1
        pipe.execute_command("SINTERSTORE", dest, *sources)
        if ttl_s is not None:
            pipe.expire(dest, ttl_s)
        if temps:
            pipe.delete(*temps)
        replies = await pipe.execute()
    return int(replies[len(temps)])


async def count_all(redis: aioredis.Redis, shards: ShardMap, audience: Audience) -> int:
    """How many learners the audience has now on every shard: each shard's own index sets, summed (a learner's
    attributes and index entries live on one shard only)."""
    return sum(await asyncio.gather(*(count(redis, k, audience) for k in shards.all_keys())))


async def count(redis: aioredis.Redis, keys: Keys, audience: Audience) -> int:
    """How many learners the audience has now (a preview before a launch)."""
    tmp = f"{keys.prefix}:aud:count:{uuid.uuid4().hex}"
    try:
        return await materialize(redis, keys, audience, tmp)
    finally:
        await redis.delete(tmp)
