"""Per-message status and the outcome event stream: what is written, and how a status is read back.

Status. Each message has one hash, `Keys.status(id)`, written by the intake when the message is accepted
(field `meta`, and the first timeline step: queued or scheduled) and by the worker in its commit
transaction (queue/streams.py `StreamQueue.commit`, no round trip of its own). Every timeline step is one
field `<at_ms>|<state>|<device>` whose value is a JSON object of the step's details (attempt, until,
rule, error, provider id...). Each write sets the hash's TTL to `status.retention_s` again, so a status
lives that long after its last change. A learner's recent message ids are in `Keys.user_messages(user)`,
a sorted set by enqueue time cut to the newest `status.user_messages`.

Events. Every final outcome of a delivery (delivered, token_invalid, dead_lettered, expired) and every
policy drop is one entry of the stream `Keys.outcome_events`, trimmed with MAXLEN ~ `status.events_maxlen`.
Fields (strings; empty ones are left out):

| field | what |
|---|---|
| `id` | event id: the same delivery outcome read twice (at-least-once) has the same id; receivers dedupe on it |
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

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Step:
    """One timeline step of a message: message-wide (`device` empty) or of one delivery."""

    message: str
    at_ms: int
    state: str
    device: str = ""
    details: dict[str, Any] | None = None

    @property
    def field(self) -> str:
        return f"{self.at_ms}|{self.state}|{self.device}"


@dataclass(frozen=True, slots=True)
class OutcomeEvent:
    """One entry of the outcome event stream (module docstring)."""

    type: str
    message: Message
    at_ms: int
    device: str = ""
    provider: str = ""
    attempt: int = 0
    reason: str = ""
    provider_id: str = ""

    def fields(self) -> dict[str, str]:
        m = self.message
        eid = hashlib.blake2b(f"{m.id}|{self.device}|{self.type}|{self.attempt}".encode(), digest_size=10).hexdigest()
        out = {"id": eid, "type": self.type, "message": m.id, "at": str(self.at_ms)}
        for name, value in (("client", m.client), ("user", m.user), ("device", self.device),
                            ("provider", self.provider), ("reason", self.reason), ("provider_id", self.provider_id),
                            ("campaign", m.campaign), ("variant", m.variant)):
            if value:
                out[name] = value
        if self.attempt:
            out["attempt"] = str(self.attempt)
        return out


def write(pipe: Any, keys: Keys, steps: Sequence[Step], events: Sequence[OutcomeEvent], *,
          retention_s: int, events_maxlen: int) -> None:
    """Queue the status steps and events on `pipe` (the caller's transaction): one HSET and one EXPIRE per
    message, one XADD per event."""
    by_message: dict[str, dict[str, bytes]] = {}
    for s in steps:
        by_message.setdefault(s.message, {})[s.field] = orjson.dumps(s.details) if s.details else b""
    for message_id, mapping in by_message.items():
        key = keys.status(message_id)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, retention_s)
    stream = keys.outcome_events
    for e in events:
        pipe.xadd(stream, e.fields(), maxlen=events_maxlen, approximate=True)


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
            scheduled = m.send_at is not None and m.send_at * 1000 > now_ms
            step = Step(m.id, now_ms, "scheduled", details={"until": m.send_at}) if scheduled else Step(m.id, now_ms, "queued")
            key = keys.status(m.id)
            pipe.hset(key, mapping={"meta": orjson.dumps(meta), step.field: orjson.dumps(step.details) if step.details else b""})
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
