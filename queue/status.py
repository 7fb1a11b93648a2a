"""Per-message status and the outcome event stream: what is written, and how a status is read back.

Status. Each message has one hash, `Keys.status(id)`, written by the intake when the message is accepted
(field `meta`, and the first timeline step: queued or scheduled) and by the worker in its commit
transaction (queue/streams.py `StreamQueue.commit`: one EVAL of `_WRITE` inside it, no round trip of its
own). Every timeline step is one field `<at_ms>|<state>|<device>` whose value is a JSON object of the
step's details (attempt, until, rule, error, provider id...). Each write sets the hash's TTL to
`status.retention_s` again, so a status lives that long after its last change. An in_flight step is
written only for a job still under way when its commit goes out. A learner's recent message ids are in
`Keys.user_messages(user)`, a sorted set by enqueue time cut to the newest `status.user_messages`.

Events. Every final outcome of a delivery (delivered, token_invalid, dead_lettered, expired) and every
policy drop is an event in the stream `Keys.outcome_events`. One stream entry holds the events of one
worker commit (1 to 512: one XADD per commit, not per event, docs/decisions.md), in its field `events`, a
JSON array; the stream is trimmed with MAXLEN ~ `status.events_maxlen` entries. Each event is an object
(absent keys had no value):

| key | what |
|---|---|
| `id` | 20 hex digits (BLAKE2b) over message, device, type and attempt: an outcome written twice has one id |
| `type` | delivered, token_invalid, dead_lettered, expired, dropped |
| `message` | the message id |
| `at` | unix milliseconds of the outcome |
| `client` | the API client that enqueued the message (absent for the CLI, the Python client, campaigns) |
| `user` | the learner |
| `device` | the device (registry key, shortened to 40 characters); absent for message-wide outcomes |
| `provider` | apns, fcm, webpush |
| `attempt` | the attempt that ended so (a number) |
| `reason` | why (dead letter reason, invalid-token reason, policy rule) |
| `provider_id` | delivered: apns-id, the FCM message name, the Web Push Location |
| `campaign`, `variant` | the campaign labels of the message |
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from hashlib import blake2b
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
    devices: Collection[Device]
    job: Pending


class Outcome(NamedTuple):
    """A final outcome of one delivery (or, `device` empty, of the whole message): its event and its status
    step are both made from this one record."""

    type: str  # delivered, token_invalid, dead_lettered, expired, dropped
    message: Message
    at_ms: int
    device: str = ""
    provider: str = ""
    attempt: int = 0
    reason: str = ""
    provider_id: str = ""

    def event(self) -> dict[str, Any]:
        """The event (module docstring); its id is the same for the same outcome written twice."""
        m, device, kind, attempt = self.message, self.device, self.type, self.attempt
        out: dict[str, Any] = {"id": blake2b(f"{m.id}|{device}|{kind}|{attempt}".encode(), digest_size=10).hexdigest(),
                               "type": kind, "message": m.id, "at": self.at_ms}
        if m.client:
            out["client"] = m.client
        if m.user:
            out["user"] = m.user
        if device:
            out["device"] = device
        if self.provider:
            out["provider"] = self.provider
        if attempt:
            out["attempt"] = attempt
        if self.reason:
            out["reason"] = self.reason
        if self.provider_id:
            out["provider_id"] = self.provider_id
        if m.campaign:
            out["campaign"] = m.campaign
        if m.variant:
            out["variant"] = m.variant
        return out

    def step_details(self) -> bytes:
        d: dict[str, Any] = {}
        if self.provider:
            d["provider"] = self.provider
        if self.attempt:
            d["attempt"] = self.attempt
        if self.reason:
            d["rule" if self.type == "dropped" else "reason"] = self.reason
        if self.provider_id:
            d["provider_id"] = self.provider_id
        return orjson.dumps(d) if d else b""


# KEYS: the event stream, then the status keys of this commit.
# ARGV: retention_s, events MAXLEN, the commit's events as one JSON array ('' when none), then per status field
# 3 values: the index of its status key in KEYS, the field, its value.
_WRITE = """
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'events', ARGV[3])
end
local touched = {}
for i = 4, #ARGV, 3 do
  local k = tonumber(ARGV[i])
  redis.call('HSET', KEYS[k], ARGV[i + 1], ARGV[i + 2])
  touched[k] = true
end
for k in pairs(touched) do
  redis.call('EXPIRE', KEYS[k], ARGV[1])
end
return 0
"""


def write(pipe: Any, keys: Keys, steps: Sequence[Step], started: Sequence[InFlight], outcomes: Sequence[Outcome], *,
          retention_s: int, events_maxlen: int) -> None:
    """Queue the commit's status fields (`retention_s` 0: none) and its events (`events_maxlen` 0: none) on `pipe`,
    the caller's transaction: one EVAL, or one XADD when there is no status to write."""
    events = orjson.dumps([o.event() for o in outcomes]) if events_maxlen and outcomes else b""
    index: dict[str, int] = {}  # message id -> its status key's index in KEYS
    status_keys: list[str] = []
    fields: list[Any] = []
    if retention_s:
        for mid, field, value in _status_fields(steps, started, outcomes):
            k = index.get(mid, 0)
            if not k:
                status_keys.append(keys.status(mid))
                k = index[mid] = len(status_keys) + 1
            fields += (k, field, value)
    if status_keys:
        pipe.eval(_WRITE, 1 + len(status_keys), keys.outcome_events, *status_keys, retention_s, events_maxlen, events,
                  *fields)
    elif events:
        pipe.xadd(keys.outcome_events, {"events": events}, maxlen=events_maxlen, approximate=True)


def _status_fields(steps: Sequence[Step], started: Sequence[InFlight],
                   outcomes: Sequence[Outcome]) -> Iterator[tuple[str, str, bytes]]:
    """(message id, field, value) of each status step of a commit."""
    for o in outcomes:
        yield o.message.id, f"{o.at_ms}|{o.type}|{o.device}", o.step_details()
    for s in steps:
        yield s.message, f"{s.at_ms}|{s.state}|{s.device}", orjson.dumps(s.details) if s.details else b""
    for f in started:
        if f.job.pending > 0:
            details = {"attempt": f.attempt, "devices": [device_ref(d) for d in f.devices]}
            yield f.message, f"{f.at_ms}|in_flight|", orjson.dumps(details)


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
