"""Campaign storage, launches, and the fan-out that turns an audience into queued messages in the background.

A launch (`CampaignStore.launch`) only writes a job record and returns: the API never blocks on
100k learners. The job is run by a `FanoutRunner`, one in every worker process (gateway/pool.py):

- **one runner per job**: a lease (`SET NX PX`) names the runner; it is renewed with every chunk;
- **chunks**: `SSCAN` of the campaign's member set (frozen at the first launch), 1000 learners at a
  time: assignment (experiments.py), attributes (locale, first name, time zone: one pipelined
  read), rendering (templates.py), validation and payload limits (the same as the API), then one
  enqueue per 500 messages (on each learner's shard on Redis Cluster), so the worker's policy applies;
- **crash safety**: the cursor and the progress counters advance in one Lua call that first checks
  the lease, after the chunk's messages are queued. A runner that dies mid-chunk leaves the cursor
  before that chunk; when its lease expires another runner redoes the chunk, and the message ids
  (`cmp:{campaign}:{user}`) make the queue's idempotency window accept each message once. Counters
  count every learner exactly once: a chunk is counted only by the runner that committed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
import redis.asyncio as aioredis

from ..core import metrics
from ..core.config import Settings
from ..core.schema import FieldError, Message, MessageInvalid, parse_message
from ..core.windows import zone
from ..providers.base import PayloadTooLarge
from ..providers.payloads import check_payload_limits
from ..queue.keys import Keys
from ..queue.sharded import ShardedQueue, home_keys, shard_map
from ..queue.shards import ShardMap
from .audiences import VALUE_RE, Audience, ShardedAttributes, materialize
from .besttime import BestTimes
from .experiments import CONTROL, Campaign, Stage, load_campaign, message_id, parse_campaign, share
from .templates import Rendered, RenderError, Template, Templates

log = logging.getLogger("pushgw.campaigns")

CHUNK = 1000
ENQUEUE_CHUNK = 500
LEASE_MS = 30_000
POLL_S = 0.5
MAX_ERRORS_KEPT = 10
PROVIDERS = ("apns", "fcm", "webpush")

# KEYS: job hash, lease, kpi hash, jobs set   ARGV: token, cursor, lease_ms, now, done(0|1), n_job, job pairs..., kpi pairs...
# The chunk is counted only if this runner still holds the lease: exactly one runner counts each chunk.
_COMMIT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'cursor', ARGV[2], 'updated_at', ARGV[4])
local n = tonumber(ARGV[6])
local i = 7
for _ = 1, n do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished_at', ARGV[4])
  redis.call('SREM', KEYS[4], redis.call('HGET', KEYS[1], 'campaign'))
  redis.call('DEL', KEYS[2])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
"""


async def _chunks(items: AsyncIterator[Any], size: int) -> AsyncIterator[list[Any]]:
    batch: list[Any] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def message_json(c: Campaign, variant: str, user: str, r: Rendered) -> dict[str, Any]:
    """The message a learner of `variant` is sent (without its id and send_at)."""
    obj: dict[str, Any] = {"user": user, "category": c.category, "priority": c.priority, "campaign": c.id,
                           "variant": variant}
    for name, value in (("title", r.title), ("body", r.body), ("ttl", c.ttl), ("app", c.app),
                        ("collapse_key", c.collapse_key)):
        if value is not None:
            obj[name] = value
    if r.data:
        obj["data"] = r.data
    obj.update(r.rich)
    return obj


class CampaignError(Exception):
    """A launch that cannot happen now (409) or a campaign that does not exist (404)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True, slots=True)
class Stored:
    campaign: Campaign
    stages: tuple[Stage, ...]  # launches so far, smallest first
    created_at: float

    @property
    def stage_percent(self) -> float:
        """The largest stage launched (0: a draft)."""
        return max((s.percent for s in self.stages), default=0.0)

    def arm(self, user: str) -> str | None:
        return self.campaign.arm(user, self.stages)


class CampaignStore:
    """Campaign definitions, their frozen audiences and fan-out jobs, under `keys`: with one Redis today's keys; on
    Redis Cluster the home of global records (queue/sharded.py `home_keys`), one slot, so a launch stays one
    transaction. `shards`: where the learners' audience index sets are (each learner's shard); None: `keys`."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, shards: ShardMap | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = shards if shards is not None and shards.clustered else None
        self.templates = Templates(redis, keys)

    async def _audience(self, audience: Audience, dest: str) -> int:
        """Compute the audience into the set `dest` (under `keys`, expiring in an hour); its size. On Redis Cluster
        each shard computes its learners from its own index sets, which are then copied into `dest`."""
        if self.shards is None:
            return await materialize(self.redis, self.keys, audience, dest, ttl_s=3600)
        for k in self.shards.all_keys():
            part = f"{k.prefix}:aud:launch:{uuid.uuid4().hex}"
            try:
                if await materialize(self.redis, k, audience, part, ttl_s=3600):
                    async for chunk in _chunks(self.redis.sscan_iter(part, count=CHUNK), CHUNK):
                        await self.redis.sadd(dest, *chunk)
                        await self.redis.expire(dest, 3600)
            finally:
                await self.redis.delete(part)
        return int(await self.redis.scard(dest))

    async def create(self, obj: Any, now: float | None = None, *, declarative_navigate: str | None = None) -> Campaign:
        """Validate (templates must exist and render with the campaign's vars) and store; 409 if the id exists.

        `declarative_navigate`: the `[webpush]` setting, so the declarative Web Push form is measured too."""
        now = time.time() if now is None else now
        c = parse_campaign(obj, now)
        errors: list[FieldError] = []
        for i, v in enumerate(c.variants):
            name = v.template or c.template or ""
            t = await self.templates.get(name)
            where = f"variants[{i}].template" if v.template else "template"
            if t is None:
                errors.append(FieldError(where, f"no template named {name!r}"))
                continue
            # Every locale must render with the campaign's variables alone: a variable a learner may lack (first_name,
            # their own vars) needs a fallback in the template, so no learner can get a text with a gap.
            for loc in t.locales:
                try:
                    r = t.render({**c.vars, **v.vars}, loc)
                    check_payload_limits(parse_message(message_json(c, v.name, "probe", r), now=now), PROVIDERS,
                                         declarative_navigate=declarative_navigate)
                except RenderError as e:
                    errors.append(FieldError(where, str(e)))
                except MessageInvalid as e:  # the rendered message itself: no learner could ever be sent it
                    errors += [FieldError(where, f"{loc}: {err}") for err in e.errors]
                except PayloadTooLarge as e:
                    errors.append(FieldError(where, f"{loc}: {e}"))
        if errors:
            raise MessageInvalid(errors)
        definition = orjson.dumps(c.to_json())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self.keys.campaign(c.id), "def", definition)
            pipe.hsetnx(self.keys.campaign(c.id), "created_at", str(now))
            pipe.hsetnx(self.keys.campaign(c.id), "stages", "[]")
            created, _, _ = await pipe.execute()
        if not created:
            raise CampaignError(409, "exists", f"campaign {c.id} exists; campaigns are immutable once created")
        await self.redis.sadd(self.keys.campaigns, c.id)
        return c

    async def put_running(self, c: Campaign, now: float) -> None:
        """Store (or replace) a campaign that is always running at 100% and has no fan-out: the campaign view of an
        automation rule (automations/rules.py), whose learners join its member set as they trigger it, so events
        and the report treat them as any campaign's. It stays out of the campaign list."""
        key = self.keys.campaign(c.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"def": orjson.dumps(c.to_json()), "stages": orjson.dumps([Stage(100.0).to_json()])})
            pipe.hsetnx(key, "created_at", str(now))
            await pipe.execute()

    async def get(self, cid: str) -> Stored | None:
        # Only a whole campaign id: `foo:members` or `foo:fanout` would name another key of campaign `foo` (WRONGTYPE).
        raw = await self.redis.hgetall(self.keys.campaign(cid)) if isinstance(cid, str) and VALUE_RE.match(cid) else None
        if not raw or b"def" not in raw:
            return None
        stages = tuple(Stage(float(s["percent"]), s.get("weights")) for s in orjson.loads(raw.get(b"stages", b"[]")))
        return Stored(load_campaign(orjson.loads(raw[b"def"])), stages, float(raw.get(b"created_at", b"0")))

    async def require(self, cid: str) -> Stored:
        s = await self.get(cid)
        if s is None:
            raise CampaignError(404, "not_found", f"no campaign {cid!r}")
        return s

    async def ids(self) -> list[str]:
        return sorted(_s(x) for x in await self.redis.smembers(self.keys.campaigns))

    async def launch(self, cid: str, percent: float, weights: Any = None, now: float | None = None) -> dict[str, Any]:
        """Start the fan-out of a stage: `percent` of the non-control learners (10 for a pilot, 100 for all).

        The first launch freezes the audience into the member set. A larger percent later (the rollout)
        reaches only the learners earlier stages did not; its `weights` (e.g. {"social": 1}) may roll out only the
        winning variant to them, while the pilot's learners keep theirs. Refused while a fan-out is running."""
        if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent <= 100:
            raise MessageInvalid([FieldError("percent", "must be a number in (0, 100]")])
        now = time.time() if now is None else now
        stored = await self.require(cid)
        stage_weights = stored.campaign.parse_weights(weights)
        k = self.keys
        job_key = k.fanout(cid)
        # The audience is computed before anything is committed, into a temporary key that the launch's transaction
        # renames to the member set: a crash in between leaves no job without members (which no runner would take
        # and which would refuse every later launch), only a temporary key that expires.
        tmp: str | None = None
        members = 0
        if not orjson.loads(await self.redis.hget(k.campaign(cid), "stages") or b"[]"):
            tmp = f"{k.campaign_members(cid)}:tmp:{uuid.uuid4().hex}"
            members = await self._audience(stored.campaign.audience, tmp)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(job_key, k.campaign(cid), k.campaign_members(cid))
                    state = _s(await pipe.hget(job_key, "state") or b"")
                    stages = orjson.loads(await pipe.hget(k.campaign(cid), "stages") or b"[]")
                    stage = max((float(st["percent"]) for st in stages), default=0.0)
                    if state in ("queued", "running"):
                        raise CampaignError(409, "fanout_running", f"campaign {cid}: a fan-out is running; wait for it")
                    if percent <= stage:
                        raise CampaignError(409, "stage_launched", f"campaign {cid}: {stage:g}% already launched; "
                                                                   "a launch must reach more learners")
                    if stage == 0 and tmp is None:
                        raise CampaignError(409, "fanout_running", f"campaign {cid}: launched concurrently")
                    if stage > 0:
                        members = int(await pipe.scard(k.campaign_members(cid)))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if stage == 0 and tmp is not None:
                        if members:
                            # by name: redis-py's cluster pipeline refuses its rename helper (both keys are on
                            # one slot: the campaign's, queue/shards.py)
                            pipe.execute_command("RENAME", tmp, k.campaign_members(cid))
                            pipe.persist(k.campaign_members(cid))
                        else:
                            pipe.delete(k.campaign_members(cid))
                    pipe.delete(job_key)
                    pipe.hset(job_key, mapping={
                        "campaign": cid, "state": "queued", "from": str(stage), "to": str(percent), "cursor": "0",
                        "queued_at": str(now), "scanned": "0", "weights": orjson.dumps(stage_weights),
                        "members": str(members)})
                    stages.append(Stage(float(percent), stage_weights).to_json())
                    pipe.hset(k.campaign(cid), "stages", orjson.dumps(stages))
                    pipe.sadd(k.fanout_jobs, cid)
                    await pipe.execute()
                except aioredis.WatchError:
                    raise CampaignError(409, "fanout_running", f"campaign {cid}: launched concurrently") from None
        finally:
            if tmp is not None:
                await self.redis.delete(tmp)  # renamed away on success
        return await self.status(cid)

    async def status(self, cid: str) -> dict[str, Any]:
        """The campaign's stage and its current (or last) fan-out: progress and where every learner went."""
        stored = await self.require(cid)
        raw = {_s(a): _s(b) for a, b in (await self.redis.hgetall(self.keys.fanout(cid))).items()}
        ints = ("members", "scanned", "sent", "queued", "duplicates", "control", "outside", "failed", "messages")
        job: dict[str, Any] = {k: int(raw.get(k, 0)) for k in ints}
        job["state"] = raw.get("state", "none")
        job["stage"] = {"from": float(raw.get("from", 0)), "to": float(raw.get("to", 0))}
        done = 1.0 if job["state"] == "done" else 0.0
        job["progress"] = min(1.0, round(job["scanned"] / job["members"], 4)) if job["members"] else done
        for t in ("queued_at", "started_at", "finished_at", "updated_at"):
            if t in raw:
                job[t] = float(raw[t])
        if "started_at" in raw and "finished_at" in raw:
            job["seconds"] = round(float(raw["finished_at"]) - float(raw["started_at"]), 3)
        job["errors"] = orjson.loads(raw["errors"]) if "errors" in raw else []
        return {"campaign": cid, "stage_percent": stored.stage_percent, "stages": [s.to_json() for s in stored.stages],
                "fanout": job}


class FanoutRunner:
    """Runs fan-out jobs; any number of runners may run (one lease per job). On Redis Cluster the jobs live with the
    campaigns in the home of global records, and each chunk's messages are queued on their learners' shards."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, *, chunk: int = CHUNK, lease_ms: int = LEASE_MS,
                 clock: Any = time.time) -> None:
        self.redis = redis
        self.settings = settings
        shards = shard_map(settings.redis)
        self.keys = home_keys(shards)
        self.queue = ShardedQueue(redis, shards, idempotency_window_s=settings.worker.idempotency_window_s,
                                  done_ttl_s=settings.worker.done_ttl_s)
        self.store = CampaignStore(redis, self.keys, shards)
        self.attrs = ShardedAttributes(redis, shards)
        self.best = BestTimes(redis, self.keys, settings.policy, self.attrs)
        self.chunk = chunk
        self.lease_ms = lease_ms
        self.clock = clock
        self.token = uuid.uuid4().hex
        self._commit = redis.register_script(_COMMIT)
        self._default_zone = zone(settings.policy.timezone)
        self._enqueued = metrics.ENQUEUED.labels("campaign")
        self.crash_after_enqueue = False  # tests: die between a chunk's enqueue and its commit

    async def run(self, stop: asyncio.Event, poll_s: float = POLL_S) -> None:
        """Until `stop`: look for jobs, run the ones whose lease is free. Errors are logged and retried."""
        await self.queue.ensure_group()
        while not stop.is_set():
            try:
                await self.run_pending(stop)
            except (ConnectionError, OSError, aioredis.RedisError) as e:
                log.warning("fan-out round failed", extra={"error": type(e).__name__})
            except Exception:  # a bug must not end fan-outs in this process; the lease lets another runner retry
                log.exception("fan-out round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)

    async def run_pending(self, stop: asyncio.Event | None = None) -> int:
        """Run every job whose lease is free, to its end; returns how many this runner finished."""
        finished = 0
        for cid in sorted(_s(x) for x in await self.redis.smembers(self.keys.fanout_jobs)):
            if stop is not None and stop.is_set():
                break
            if await self.redis.set(self.keys.fanout_lease(cid), self.token, nx=True, px=self.lease_ms):
                finished += await self._run_job(cid, stop)
        return finished

    async def _run_job(self, cid: str, stop: asyncio.Event | None) -> int:
        k = self.keys
        stored = await self.store.get(cid)
        job = {_s(a): _s(b) for a, b in (await self.redis.hgetall(k.fanout(cid))).items()}
        if stored is None or job.get("state") not in ("queued", "running"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.srem(k.fanout_jobs, cid)
                pipe.delete(k.fanout_lease(cid))
                await pipe.execute()
            return 0
        if "members" not in job:  # the launch is still materializing the audience
            await self.redis.delete(k.fanout_lease(cid))
            return 0
        c = stored.campaign
        lo, hi = share(float(job["from"])), share(float(job["to"]))
        first_stage = float(job["from"]) == 0
        weights = orjson.loads(job.get("weights", "null"))
        templates: dict[str, Template] = {}
        for name in c.templates():
            t = await self.store.templates.get(name)
            if t is not None:
                templates[name] = t
        await self.redis.hset(k.fanout(cid), mapping={"state": "running", **({} if "started_at" in job else
                                                                              {"started_at": str(self.clock())})})
        cursor = int(job.get("cursor", "0"))
        errors: list[str] = orjson.loads(job["errors"]) if "errors" in job else []
        started = True
        while started or cursor != 0:
            started = False
            if stop is not None and stop.is_set():
                await self._release(cid)
                return 0
            cursor, raw_users = await self.redis.sscan(k.campaign_members(cid), cursor, count=self.chunk)
            users = [_s(u) for u in raw_users]
            job_counts, kpi_counts, chunk_errors = await self._chunk(c, users, lo, hi, first_stage, templates, weights)
            if chunk_errors and len(errors) < MAX_ERRORS_KEPT:
                errors += chunk_errors[:MAX_ERRORS_KEPT - len(errors)]
                await self.redis.hset(k.fanout(cid), "errors", orjson.dumps(errors))
            if self.crash_after_enqueue:
                raise RuntimeError("simulated crash after enqueue")
            args: list[Any] = [self.token, cursor, self.lease_ms, self.clock(), int(cursor == 0), len(job_counts)]
            for f, n in job_counts.items():
                args += [f, n]
            for f, n in kpi_counts.items():
                args += [f, n]
            ok = await self._commit(keys=[k.fanout(cid), k.fanout_lease(cid), k.kpi(cid), k.fanout_jobs], args=args)
            if not ok:
                log.warning("fan-out lease lost; another runner continues", extra={"campaign": cid})
                return 0
        log.info("fan-out finished", extra={"campaign": cid})
        return 1

    async def _release(self, cid: str) -> None:
        """Give the job back (drain): the next runner resumes from the committed cursor."""
        if await self.redis.get(self.keys.fanout_lease(cid)) == self.token.encode():
            await self.redis.delete(self.keys.fanout_lease(cid))

    async def _chunk(self, c: Campaign, users: list[str], lo: int, hi: int, first_stage: bool,
                     templates: Mapping[str, Template], weights: Mapping[str, float] | None,
                     ) -> tuple[dict[str, int], dict[str, int], list[str]]:
        job: dict[str, int] = {"scanned": len(users)}
        kpi: dict[str, int] = {}
        errors: list[str] = []

        def bump(d: dict[str, int], key: str, n: int = 1) -> None:
            d[key] = d.get(key, 0) + n

        targets: list[tuple[str, str]] = []  # (user, variant)
        for u in users:
            if c.is_control(u):
                bump(job, "control")
                if first_stage:
                    bump(kpi, f"{CONTROL}:assigned")
                continue
            s = c.stage_unit(u)
            if not lo <= s < hi:
                bump(job, "outside")  # an earlier stage reached them, or a later one will
                continue
            targets.append((u, c.variant_of(u, weights).name))
        attrs = await self.attrs.get_many([u for u, _ in targets]) if targets else {}
        now = self.clock()
        variants = {v.name: v for v in c.variants}
        best_of = [(u, message_id(c.id, u)) for u, vname in targets if variants[vname].send_time == "best"]
        best = {u: bt.at for (u, _), bt in zip(best_of, await self.best.send_times(
            [(u, c.category, mid) for u, mid in best_of], now, attrs), strict=True)}
        messages: list[tuple[Message, str, str]] = []  # (message, user, variant)
        for u, vname in targets:
            bump(kpi, f"{vname}:assigned")
            v = variants[vname]
            a = attrs[u]
            tname = v.template or c.template or ""
            try:
                t = templates.get(tname)
                if t is None:
                    raise RenderError("template", f"template {tname!r} no longer exists")
                r = t.render({**a.template_vars(), **c.vars, **v.vars}, a.locale)
                tz = self._default_zone
                if a.timezone:
                    with contextlib.suppress(Exception):
                        tz = zone(a.timezone)
                out: list[Message] = []
                times = [best[u] if best[u] > now else None] if u in best else c.send_times(v, now, tz)
                for i, when in enumerate(times):
                    obj = message_json(c, vname, u, r) | {"id": message_id(c.id, u, i)}
                    if when is not None:
                        obj["send_at"] = when
                    m = replace(parse_message(obj, now=now), fanout=True)
                    check_payload_limits(m, PROVIDERS, declarative_navigate=self.settings.webpush.declarative_navigate)
                    out.append(m)
            except (RenderError, MessageInvalid, PayloadTooLarge) as e:
                bump(job, "failed")
                bump(kpi, f"{vname}:render_failed")
                errors.append(f"{u}: {e}"[:300])
                continue
            messages += [(m, u, vname) for m in out]
        sent_users: set[str] = set()
        for i in range(0, len(messages), ENQUEUE_CHUNK):
            part = messages[i:i + ENQUEUE_CHUNK]
            flags = await self.queue.enqueue([m for m, _, _ in part])
            for (_m, u, vname), queued in zip(part, flags, strict=True):
                bump(job, "queued" if queued else "duplicates")
                bump(job, "messages")
                bump(kpi, f"{vname}:messages")
                if u not in sent_users:
                    sent_users.add(u)
                    bump(kpi, f"{vname}:sent")
                    bump(job, "sent")
            self._enqueued.inc(sum(flags))
        return job, kpi, errors
