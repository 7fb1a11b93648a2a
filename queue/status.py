"""Per-message status and the outcome event stream: what is written, and how a status is read back.

Status. Each message has one hash, `Keys.status(id)`, written by the intake when the message is accepted
(field `meta`, and the first timeline step: queued or scheduled) and by the worker in its commit
transaction (queue/streams.py `StreamQueue.commit`: one EVAL of `_WRITE` inside it, no round trip of its
own; the worker passes values and Redis builds the fields and entries: docs/benchmarks.md has why).
Every timeline step is one field `<at_ms>|<state>|<device>` whose value is a JSON object of the step's
details (attempt, until, rule, error, provider id...). Each write sets the hash's TTL to
`status.retention_s` again, so a status lives that long after its last change. An in_flight step is
written only for a job still under way when its commit goes out. A learner's recent message ids are in
`Keys.user_messages(user)`, a sorted set by enqueue time cut to the newest `status.user_messages`.

Events. Every final outcome of a delivery (delivered, token_invalid, dead_lettered, expired) and every
policy drop is one entry of the stream `Keys.outcome_events`, trimmed with MAXLEN ~ `status.events_maxlen`.
Fields (strings; empty ones are left out):

| field | what |
|---|---|
| `id` | 20 hex digits of SHA-1 over message, device, type and attempt: an outcome written twice has one id |
| `type` | delivered, token_invalid, dead_lettered, expired, dropped |
| `message` | the message id |
| `at` | unix milliseconds of the outcome |
| `client` | the API client that enqueued the message (absent for the CLI, the Python client, campaigns) |
| `user` | the learner |
| `device` | the device (registry key, shortened to 40 characters); absent for message-wide outcomes |
| `provider` | apns, fcm, webpush |
| `attempt` | the attempt that ended so |
| `reason` | why (dead letter reason, invalid-token reason, policy rule) |
| `provider_id` | delivered: apns-id, the FCM message name, the Web Push Location |
| `campaign`, `variant` | the campaign labels of the message |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import orjson
import redis.asyncio as aioredis

from ..core.schema import Device, Message
from .keys import Keys

FINAL_DEVICE_STATES = frozenset({"delivered", "token_invalid", "dead_lettered", "expired"})
FINAL_MESSAGE_STATES = frozenset({"expired", "dropped", "no_device"})
# Steps at the same millisecond sort in the order they can happen.
_ORDER = {s: i for i, s in enumerate(("queued", "scheduled", "held", "in_flight", "retrying", "delivered",
                                      "token_invalid", "dead_lettered", "expired", "dropped", "no_device"))}
DEVICE_REF_LEN = 40


def device_ref(device: Device) -> str:
    """The device as the status names it: its registry key, shortened to 40 characters (the start and the end
    of the token) so a long FCM token does not make every status field long."""
    key = device.key
    return key if len(key) <= DEVICE_REF_LEN else f"{key[:28]}~{key[-11:]}"


class Step(NamedTuple):
    """One timeline step of a message that is neither a final outcome nor in flight: retrying, held,
    no_device; message-wide (`device` empty) or of one delivery."""

    message: str
    at_ms: int
    state: str
    device: str = ""
    details: dict[str, Any] | None = None


class Pending(Protocol):
    """What an in-flight record asks of the worker's job: how many of its deliveries are not settled yet."""

    pending: int


class InFlight(NamedTuple):
    """A worker took the message (or a retry of some of its devices). Written as an in_flight step only if the
    job still has deliveries pending when the commit is written: a delivery settled within the same flush
    interval makes it a step nobody could have read."""

    message: str
    at_ms: int
    attempt: int
    devices: Sequence[Device]
    job: Pending


class Outcome(NamedTuple):
    """A final outcome of one delivery (or, `device` empty, of the whole message): the event on the stream and
    the status step are both made from this one record, in Redis (`_WRITE`)."""

    type: str  # delivered, token_invalid, dead_lettered, expired, dropped
    message: Message
    at_ms: int
    device: str = ""
    provider: str = ""
    attempt: int = 0
    reason: str = ""
    provider_id: str = ""


# KEYS: the event stream, then the status keys of this commit.
# ARGV: retention_s (0: no status), events MAXLEN (0: no events), the number of outcomes, then per outcome 13
# values: status key index (into KEYS), type, message id, at_ms, device, provider, attempt, reason, provider_id,
# client, user, campaign, variant; then per other step 3 values: status key index, field, value (JSON or '').
# The event id is the first 20 hex digits of SHA-1 over message|device|type|attempt: the same outcome read
# twice (at-least-once) has the same id.
_WRITE = """
local retention, maxlen, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local touched = {}
local i = 4
for _ = 1, n do
  local k, typ, msg, at, dev, prov, att, reason, pid = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]
  if retention > 0 then
    local d = {}
    if prov ~= '' then d.provider = prov end
    if att ~= '0' then d.attempt = tonumber(att) end
    if reason ~= '' then if typ == 'dropped' then d.rule = reason else d.reason = reason end end
    if pid ~= '' then d.provider_id = pid end
    redis.call('HSET', KEYS[k], at .. '|' .. typ .. '|' .. dev, next(d) and cjson.encode(d) or '')
    touched[k] = true
  end
  if maxlen ~= '0' then
    local f = {'id', string.sub(redis.sha1hex(msg .. '|' .. dev .. '|' .. typ .. '|' .. att), 1, 20),
               'type', typ, 'message', msg, 'at', at}
    local opt = {'client', ARGV[i + 9], 'user', ARGV[i + 10], 'device', dev, 'provider', prov, 'reason', reason,
                 'provider_id', pid, 'campaign', ARGV[i + 11], 'variant', ARGV[i + 12]}
    for j = 1, #opt, 2 do
      if opt[j + 1] ~= '' then f[#f + 1] = opt[j]; f[#f + 1] = opt[j + 1] end
    end
    if att ~= '0' then f[#f + 1] = 'attempt'; f[#f + 1] = att end
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(f))
  end
  i = i + 13
end
while i <= #ARGV do
  local k = tonumber(ARGV[i])
  redis.call('HSET', KEYS[k], ARGV[i + 1], ARGV[i + 2])
  touched[k] = true
  i = i + 3
end
for k in pairs(touched) do
  redis.call('EXPIRE', KEYS[k], retention)
end
return 0
"""


def write(pipe: Any, keys: Keys, steps: Sequence[Step], started: Sequence[InFlight], outcomes: Sequence[Outcome], *,
          retention_s: int, events_maxlen: int) -> None:
    """Queue the commit's status steps, in-flight records and outcomes on `pipe` (the caller's transaction) as
    one EVAL: the fields of each message's status and one EXPIRE per message (`retention_s` 0: none), an XADD per
    outcome (`events_maxlen` 0: none). The worker only lists values; Redis builds the entries."""
    index: dict[str, int] = {}  # message id -> its status key's index in KEYS
    status_keys: list[str] = []
    args: list[Any] = [retention_s, events_maxlen, len(outcomes)]
    status = retention_s > 0
    for o in outcomes:
        m = o.message
        k = 0
        if status:
            k = index.get(m.id, 0)
            if not k:
                status_keys.append(keys.status(m.id))
                k = index[m.id] = len(status_keys) + 1
        args += (k, o.type, m.id, o.at_ms, o.device, o.provider, o.attempt, o.reason, o.provider_id,
                 m.client or "", m.user or "", m.campaign or "", m.variant or "")
    if status:
        for s in steps:
            k = index.get(s.message, 0)
            if not k:
                status_keys.append(keys.status(s.message))
                k = index[s.message] = len(status_keys) + 1
            args += (k, f"{s.at_ms}|{s.state}|{s.device}", orjson.dumps(s.details) if s.details else b"")
        for f in started:
            if f.job.pending <= 0:
                continue
            k = index.get(f.message, 0)
            if not k:
                status_keys.append(keys.status(f.message))
                k = index[f.message] = len(status_keys) + 1
            details = {"attempt": f.attempt, "devices": [device_ref(d) for d in f.devices]}
            args += (k, f"{f.at_ms}|in_flight|", orjson.dumps(details))
    if len(args) > 3:
        pipe.eval(_WRITE, 1 + len(status_keys), keys.outcome_events, *status_keys, *args)


async def record_accepted(redis: aioredis.Redis, keys: Keys, messages: Iterable[Message], now_ms: int, *,
                          retention_s: int, user_messages: int) -> None:
    """The intake's part: each newly accepted message's `meta` and first step, and the learner's recent list;
    one pipelined round trip for the batch."""
    async with redis.pipeline(transaction=False) as pipe:
        users: dict[str, dict[str, int]] = {}
        for m in messages:
            meta: dict[str, Any] = {"at": now_ms}
            for name in ("client", "user", "campaign", "variant"):
                value = getattr(m, name)
                if value is not None:
                    meta[name] = value
            if m.category != "general":
                meta["category"] = m.category
            if m.devices:
                meta["devices"] = len(m.devices)
            mapping: dict[str | bytes, bytes] = {"meta": orjson.dumps(meta)}
            if m.send_at is not None and m.send_at * 1000 > now_ms:
                mapping[f"{now_ms}|scheduled|"] = orjson.dumps({"until": m.send_at})
            else:
                mapping[f"{now_ms}|queued|"] = b""
            key = keys.status(m.id)
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.expire(key, retention_s)
            if m.user is not None:
                users.setdefault(m.user, {})[m.id] = now_ms
        for user, ids in users.items():
            key = keys.user_messages(user)
            pipe.zadd(key, ids)
            pipe.zremrangebyrank(key, 0, -user_messages - 1)
            pipe.expire(key, retention_s)
        await pipe.execute()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def summarize(message_id: str, raw: dict[Any, Any]) -> dict[str, Any]:
    """A status hash as the API answers it: meta, timeline (oldest first), each device's state, the message's state."""
    meta: dict[str, Any] = {}
    timeline: list[dict[str, Any]] = []
    for f, v in raw.items():
        name = _s(f)
        if name == "meta":
            meta = orjson.loads(v)
            continue
        at, _, rest = name.partition("|")
        state, _, device = rest.partition("|")
        step: dict[str, Any] = {"at": int(at) / 1000, "state": state}
        if device:
            step["device"] = device
        if v:
            step.update(orjson.loads(v))
        timeline.append(step)
    timeline.sort(key=lambda s: (s["at"], _ORDER.get(s["state"], 99)))
    devices: dict[str, dict[str, Any]] = {}
    state = "queued"
    for step in timeline:
        if "device" in step:
            devices[step["device"]] = {k: v for k, v in step.items() if k != "device"}
        elif step["state"] == "in_flight":
            for d in step.get("devices", ()):
                if d not in devices or devices[d]["state"] in ("retrying", "in_flight"):
                    devices[d] = {"at": step["at"], "state": "in_flight", "attempt": step.get("attempt", 1)}
            state = "in_flight"
        else:
            state = step["state"]
    if state not in FINAL_MESSAGE_STATES and devices:
        finals = [d["state"] for d in devices.values()]
        if all(s in FINAL_DEVICE_STATES for s in finals):
            delivered = finals.count("delivered")
            state = "delivered" if delivered == len(finals) else "partly_delivered" if delivered else "failed"
        elif "retrying" in finals:
            state = "retrying"
        else:
            state = "in_flight"
    out: dict[str, Any] = {"id": message_id, "state": state}
    if "at" in meta:
        out["accepted_at"] = meta.pop("at") / 1000
    out.update(meta)
    out["devices"] = [{"device": k, **v} for k, v in sorted(devices.items())]
    out["timeline"] = timeline
    return out


class StatusReader:
    """Reads statuses back for the API, the CLI and the Python client."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def message(self, message_id: str) -> dict[str, Any] | None:
        """The message's status, or None when it is unknown or its retention ran out."""
        raw = await self.redis.hgetall(self.keys.status(message_id))
        return summarize(message_id, raw) if raw else None

    async def user(self, user: str, limit: int) -> list[dict[str, Any]]:
        """A learner's most recent messages, newest first, each with its state (no timeline); one round trip
        for the ids and one for the statuses."""
        ids = [_s(i) for i in await self.redis.zrevrange(self.keys.user_messages(user), 0, limit - 1)]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hgetall(self.keys.status(i))
            raws = await pipe.execute()
        out = []
        for i, raw in zip(ids, raws, strict=True):
            if raw:
                s = summarize(i, raw)
                del s["timeline"]
                out.append(s)
        return out
