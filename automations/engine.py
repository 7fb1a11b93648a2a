"""The automation engine: learning events in, messages out, each rule at most once per (learner, entity).

`Engine.handle` runs in the API request that posts the events (so its cost is measured with the API's,
`python -m pushgw.bench.automations`); `AutomationRunner` runs in every worker process (gateway/pool.py)
and sends the inactivity rules' nudges. A batch of events costs a fixed number of round trips, whatever
the number of rules: the rules come from memory (one GET of a version counter), then one Lua call marks the
event ids (SET NX: a repeated event is a no-op) and records activity, one Lua call reads the learners'
attributes, one Lua call fires the matching (rule, learner, entity) triples (SET NX of the once key plus the
campaign figures, atomically), one for the best send times if a rule asks for them, and one enqueue.

Session events move a session_scheduled rule's reminders: each reminder carries the session as its `ref`
under the owner `~auto:<rule>:<learner>`, so `session_cancelled` withdraws the ones still waiting
(queue/streams.py `cancel_ref`, atomic against the scheduler) and `session_rescheduled` withdraws them and
plans the offsets again from the new `starts_at`.

Inactivity: every learning event puts the learner's last activity in one sorted set (`Keys.activity`, ZADD
GT). Each inactivity rule keeps a cursor, a time: a sweep range-queries the learners whose last activity lies
between the cursor and now minus the rule's days and moves the cursor past them, in one Lua call, so a tick
costs what it sends, not the number of learners, and a learner is nudged once per spell of inactivity: their
next activity moves them ahead of the cursor, to be reached again once that is old enough. (An event
reported with an `at` already behind the cursor does not start a new spell.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from ..campaigns.audiences import NO_ATTRIBUTES, Attributes, UserAttributes
from ..campaigns.besttime import BestTimes
from ..campaigns.experiments import CONTROL
from ..campaigns.fanout import message_json
from ..campaigns.templates import RenderError, Template, Templates
from ..core import metrics
from ..core.config import Settings
from ..core.schema import Message, MessageInvalid, parse_message
from ..core.windows import WindowError, zone
from ..providers.base import PayloadTooLarge
from ..providers.payloads import check_payload_limits
from ..queue.keys import Keys
from ..queue.streams import KPI_TTL_S, StreamQueue
from .events import TIME_FIELDS, LearningEvent
from .rules import INACTIVITY, Rule, arm_of
from .store import RuleStore

log = logging.getLogger("pushgw.automations")

EVENT_ID_TTL_S = 35 * 86400  # longer than the oldest `at` accepted (30 days): a replay is always recognised
ONCE_TTL_S = 400 * 86400
SWEEP_BATCH = 500
SWEEP_S = 1.0
PROVIDERS = ("apns", "fcm", "webpush")
SOURCE = "automation"

# KEYS per candidate: once key, campaign members set, campaign kpi hash, the arm's queued-learners set
# ARGV: once ttl, kpi ttl, then per candidate: user, arm, sends (1|0)   -> {1|0, ...} (1: fired now)
# Once per (rule, learner, entity): the once key decides, and the figures move only when it was set:
# triggers, assigned (learners, once each: the member set), sent (learners with a message queued).
_FIRE = """
local out = {}
for i = 1, #KEYS, 4 do
  local j = 3 + (i - 1) / 4 * 3
  local user, arm, sends = ARGV[j], ARGV[j + 1], ARGV[j + 2]
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('HINCRBY', KEYS[i + 2], arm .. ':triggered', 1)
    if redis.call('SADD', KEYS[i + 1], user) == 1 then
      redis.call('HINCRBY', KEYS[i + 2], arm .. ':assigned', 1)
      redis.call('EXPIRE', KEYS[i + 1], ARGV[2])
    end
    if sends == '1' and redis.call('SADD', KEYS[i + 3], user) == 1 then
      redis.call('HINCRBY', KEYS[i + 2], arm .. ':sent', 1)
      redis.call('EXPIRE', KEYS[i + 3], ARGV[2])
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: the activity set, then one event id key per event   ARGV: event id ttl, then per event: user, at
# -> {1|0, ...} (1: a new event). A new event marks its id and is the learner's latest activity (ZADD GT: an
# older event never moves it back); a repeated one does nothing. One call per batch.
_RECORD = """
local out = {}
for i = 2, #KEYS do
  local j = 2 + (i - 2) * 2
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('ZADD', KEYS[1], 'GT', ARGV[j + 1], ARGV[j])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: the activity set, the rule's cursor   ARGV: cutoff (unix s), limit
# -> {user, last activity, ...}: the learners whose last activity is after the cursor and at or before the
# cutoff, and the cursor moves past them. A full batch ends at its last score with every learner of that score
# (several share the `at` of one request), so the next call, which starts after it, skips nobody.
_POP_IDLE = """
local cursor = redis.call('GET', KEYS[2])
local low = cursor and ('(' .. cursor) or '-inf'
local limit = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], low, ARGV[1], 'WITHSCORES', 'LIMIT', 0, limit)
local new = ARGV[1]
if #due >= 2 * limit then
  new = due[#due]
  local seen = {}
  for i = 1, #due, 2 do seen[due[i]] = true end
  local ties = redis.call('ZRANGEBYSCORE', KEYS[1], new, new, 'WITHSCORES')
  for i = 1, #ties, 2 do
    if not seen[ties[i]] then
      due[#due + 1] = ties[i]
      due[#due + 1] = ties[i + 1]
    end
  end
end
redis.call('SET', KEYS[2], new)
return due
"""


@dataclass(slots=True)
class Candidate:
    """A rule that matched for a learner and entity, with the messages it would send (none for the control group)."""

    rule: Rule
    user: str
    entity: str
    arm: str
    messages: list[Message] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a batch of learning events did: per event `handled` or `duplicate`, and the rules' effects."""

    statuses: list[str]
    fired: dict[str, int]  # rule -> (rule, learner, entity) triples fired
    queued: int  # messages queued
    withdrawn: int  # reminders withdrawn (session cancelled or rescheduled)


def _digest(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()


def _event_vars(e: LearningEvent | None, tz: Any) -> dict[str, str]:
    if e is None:
        return {}
    out: dict[str, str] = {}
    for name, value in e.fields.items():
        if name in TIME_FIELDS.get(e.type, ()):
            out[name] = datetime.fromtimestamp(float(value), tz).strftime("%Y-%m-%d %H:%M")
        elif isinstance(value, float):
            out[name] = f"{value:g}"
        else:
            out[name] = str(value)
    return out


class Engine:
    def __init__(self, redis: aioredis.Redis, settings: Settings, *, clock: Any = time.time) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.redis.prefix)
        self.store = RuleStore(redis, self.keys)
        self.queue = StreamQueue(redis, self.keys, idempotency_window_s=settings.worker.idempotency_window_s,
                                 done_ttl_s=settings.worker.done_ttl_s)
        self.attrs = UserAttributes(redis, self.keys)
        self.best = BestTimes(redis, self.keys, settings.policy)
        self.templates = Templates(redis, self.keys)
        self.clock = clock
        self._fire = redis.register_script(_FIRE)
        self._record = redis.register_script(_RECORD)
        self._pop_idle = redis.register_script(_POP_IDLE)
        self._enqueued = metrics.ENQUEUED.labels(SOURCE)
        self._group_ready = False

    # ------------------------------------------------------------------ events

    async def handle(self, events: Sequence[LearningEvent], client: str) -> Outcome:
        now = self.clock()
        k = self.keys
        rules = [r for r in await self.store.all() if not r.paused]
        keys = [k.activity, *(k.learning_event(client, e.id) for e in events)]
        args: list[Any] = [EVENT_ID_TTL_S]
        for e in events:
            args += [e.user, e.at]
        flags = await self._record(keys=keys, args=args) if events else []
        new = [e for e, ok in zip(events, flags, strict=True) if ok]
        statuses = ["handled" if ok else "duplicate" for ok in flags]
        by_trigger: dict[str, list[Rule]] = {}
        for r in rules:
            by_trigger.setdefault(r.trigger, []).append(r)
        movers = [r for r in rules if r.moves_with_sessions]
        interested = [e for e in new if e.type in by_trigger or (movers and e.type in ("session_cancelled",
                                                                                          "session_rescheduled"))]
        if not interested:
            return Outcome(statuses, {}, 0, 0)
        learners = await self.attrs.get_many(sorted({e.user for e in interested}))
        withdrawn = queued = 0
        fired: dict[str, int] = {}
        candidates: list[tuple[Candidate, LearningEvent | None]] = []
        for e in interested:
            a = learners.get(e.user, NO_ATTRIBUTES)
            if e.type in ("session_cancelled", "session_rescheduled") and movers:
                if candidates:  # what came before in the batch is queued first, so the move sees it
                    queued += await self._flush(candidates, learners, client, now, fired)
                    candidates = []
                gone, moved = await self._move_session(e, a, movers, learners, client, now)
                withdrawn += gone
                queued += moved
            for r in by_trigger.get(e.type, ()):
                if r.matches(e, a):
                    arm = arm_of(r, self.store.campaign_of(r), e.user)
                    candidates.append((Candidate(r, e.user, str(e.entity or e.id), arm), e))
        if candidates:
            queued += await self._flush(candidates, learners, client, now, fired)
        return Outcome(statuses, fired, queued, withdrawn)

    async def _flush(self, candidates: list[tuple[Candidate, LearningEvent | None]],
                     learners: Mapping[str, Attributes], client: str, now: float, fired: dict[str, int]) -> int:
        done, queued = await self._run(candidates, learners, client, now)
        for rule_id, n in done.items():
            fired[rule_id] = fired.get(rule_id, 0) + n
        return queued

    async def _move_session(self, e: LearningEvent, a: Attributes, movers: Sequence[Rule],
                            learners: Mapping[str, Attributes], client: str, now: float) -> tuple[int, int]:
        """A session cancelled or moved: withdraw the movers' reminders still waiting for it (by ref); when it
        moved and the rule had fired for it, plan them again from the new start (the once key stays: the
        learner was counted when the session was scheduled). (withdrawn, queued)."""
        withdrawn = 0
        moved: list[tuple[Candidate, LearningEvent | None]] = []
        for r in movers:
            gone = await self.queue.cancel_ref(str(e.entity), self._owner(r, e.user))
            withdrawn += len(gone)
            metrics.AUTOMATIONS.labels(r.id, "withdrawn").inc(len(gone))
            if e.type == "session_rescheduled" and r.matches(e, a) and await self.redis.exists(
                    self.keys.automation_once(r.id, e.user, str(e.entity))):
                moved.append((Candidate(r, e.user, str(e.entity), arm_of(r, self.store.campaign_of(r), e.user)), e))
                metrics.AUTOMATIONS.labels(r.id, "rescheduled").inc()
        if not moved:
            return withdrawn, 0
        await self._plan(moved, learners, client, now)
        return withdrawn, await self._enqueue([c for c, _ in moved if c.arm != CONTROL])

    @staticmethod
    def _owner(rule: Rule, user: str) -> str:
        """The owner of a rule's messages to a learner: their `ref` sets are apart from every API client's."""
        return f"~auto:{rule.id}:{user}"

    async def _run(self, candidates: list[tuple[Candidate, LearningEvent | None]], learners: Mapping[str, Attributes],
                   client: str, now: float) -> tuple[dict[str, int], int]:
        """Plan the messages, fire once per (rule, learner, entity) in one Lua call, queue the fired ones."""
        await self._plan(candidates, learners, client, now)
        k = self.keys
        keys: list[str] = []
        args: list[Any] = [ONCE_TTL_S, KPI_TTL_S]
        for c, _ in candidates:
            cid = c.rule.campaign_id
            keys += [k.automation_once(c.rule.id, c.user, c.entity), k.campaign_members(cid), k.kpi(cid),
                     k.kpi_users(cid, c.arm, "queued")]
            args += [c.user, c.arm, 1 if c.messages else 0]
        flags = await self._fire(keys=keys, args=args)
        fired: dict[str, int] = {}
        to_send: list[Candidate] = []
        for (c, _), flag in zip(candidates, flags, strict=True):
            if not flag:
                metrics.AUTOMATIONS.labels(c.rule.id, "repeated").inc()
                continue
            fired[c.rule.id] = fired.get(c.rule.id, 0) + 1
            outcome = "control" if c.arm == CONTROL else "failed" if c.error else "triggered"
            metrics.AUTOMATIONS.labels(c.rule.id, outcome).inc()
            if c.error:
                log.warning("automation could not render", extra={"rule": c.rule.id, "error": c.error})
            to_send.append(c)
        return fired, await self._enqueue(to_send)

    async def _plan(self, candidates: Sequence[tuple[Candidate, LearningEvent | None]],
                    learners: Mapping[str, Attributes], client: str, now: float) -> None:
        """Render each candidate's template and compute its send times (best times in one batch)."""
        templates: dict[str, Template | None] = {}
        best_wanted: list[tuple[str, str, str]] = []
        best_of: list[tuple[Candidate, dict[str, Any]]] = []
        for c, e in candidates:
            if c.arm == CONTROL:
                continue
            rule, campaign = c.rule, self.store.campaign_of(c.rule)
            variant = next(v for v in campaign.variants if v.name == c.arm)
            a = learners.get(c.user, NO_ATTRIBUTES)
            tz = self._zone(a)
            name = variant.template or rule.template or ""
            if name not in templates:
                templates[name] = await self.templates.get(name)
            t = templates[name]
            try:
                if t is None:
                    raise RenderError("template", f"template {name!r} no longer exists")
                r = t.render({**a.template_vars(), **_event_vars(e, tz), **campaign.vars, **variant.vars}, a.locale)
                base = message_json(campaign, c.arm, c.user, r)
                if e is not None and e.entity is not None:
                    base["ref"] = e.entity
                seed = _digest(client, e.id if e is not None else c.entity, c.user)
                for i, when in enumerate(self._times(rule, e, now)):
                    obj = base | {"id": f"a:{rule.id}:{seed}:{i}"}
                    if when is not None:
                        obj["send_at"] = when
                    elif rule.timing.best:
                        best_wanted.append((c.user, campaign.category, obj["id"]))
                        best_of.append((c, obj))
                        continue
                    c.messages.append(self._message(obj, c))
            except (RenderError, MessageInvalid, PayloadTooLarge) as err:
                c.error = str(err)[:300]
                c.messages.clear()
        if best_wanted:
            times = await self.best.send_times(best_wanted, now, learners)
            for (c, obj), bt in zip(best_of, times, strict=True):
                try:
                    c.messages.append(self._message(obj | {"send_at": bt.at} if bt.at > now else obj, c))
                except (MessageInvalid, PayloadTooLarge) as err:
                    c.error = str(err)[:300]

    def _message(self, obj: dict[str, Any], c: Candidate) -> Message:
        m = replace(parse_message(obj, now=self.clock()), fanout=True)
        check_payload_limits(m, PROVIDERS)
        return m

    def _zone(self, a: Attributes) -> Any:
        try:
            return zone(a.timezone or self.settings.policy.timezone)
        except WindowError:
            return zone(self.settings.policy.timezone)

    @staticmethod
    def _times(rule: Rule, e: LearningEvent | None, now: float) -> list[float | None]:
        """When each message of a firing goes (None: now, or the best time); past reminders are skipped."""
        timing = rule.timing
        if timing.relative_to and e is not None:
            base = float(e.fields[timing.relative_to])
            return [base + off for off in timing.offsets_s if base + off > now]
        if timing.delay_s:
            return [now + timing.delay_s]
        return [None]

    async def _enqueue(self, candidates: Sequence[Candidate]) -> int:
        messages = [m for c in candidates for m in c.messages]
        if not messages:
            return 0
        if not self._group_ready:
            await self.queue.ensure_group()
            self._group_ready = True
        owners = [self._owner(c.rule, c.user) for c in candidates for _ in c.messages]
        flags = await self.queue.enqueue(messages, owner=owners)
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in candidates:
                if c.messages:
                    pipe.hincrby(self.keys.kpi(c.rule.campaign_id), f"{c.arm}:messages", len(c.messages))
                    metrics.AUTOMATIONS.labels(c.rule.id, "queued").inc(len(c.messages))
            await pipe.execute()
        self._enqueued.inc(sum(flags))
        return sum(flags)

    # ------------------------------------------------------------------ inactivity

    async def sweep(self, limit: int = SWEEP_BATCH) -> int:
        """Nudge the learners idle for each inactivity rule's days; returns the (rule, learner) pairs fired."""
        now = self.clock()
        total = 0
        for rule in await self.store.all():
            if rule.trigger != INACTIVITY or rule.paused or rule.inactive_days is None:
                continue
            due = await self._pop_idle(keys=[self.keys.activity, self.keys.idle(rule.id)],
                                       args=[now - rule.inactive_days * 86400, limit])
            pairs = [(due[i].decode() if isinstance(due[i], bytes) else str(due[i]), float(due[i + 1]))
                     for i in range(0, len(due), 2)]
            if not pairs:
                continue
            learners = await self.attrs.get_many([u for u, _ in pairs])
            campaign = self.store.campaign_of(rule)
            candidates: list[tuple[Candidate, LearningEvent | None]] = [
                (Candidate(rule, u, f"idle-{int(last)}", arm_of(rule, campaign, u)), None)
                for u, last in pairs if rule.matches(None, learners.get(u, NO_ATTRIBUTES))]
            if candidates:
                fired, _ = await self._run(candidates, learners, "~sweep", now)
                total += fired.get(rule.id, 0)
        return total


class AutomationRunner:
    """The inactivity sweep in every worker process: atomic pops, so any number of runners may run."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, *, clock: Any = time.time) -> None:
        self.engine = Engine(redis, settings, clock=clock)

    async def run(self, stop: asyncio.Event, every_s: float = SWEEP_S) -> None:
        while not stop.is_set():
            try:
                while await self.engine.sweep() and not stop.is_set():
                    pass  # a full batch: more may be due
            except (ConnectionError, OSError, aioredis.RedisError) as e:
                log.warning("automation sweep failed", extra={"error": type(e).__name__})
            except Exception:  # a bug must not end the sweeps of this process
                log.exception("automation sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


