"""Per-message status and the outcome event stream: what is written, and how a status is read back.

Status. Each message has one Redis string, `Keys.status(id)`: records of one line each (`\n` ends a record),
written by the intake when the message is accepted (its `meta` record and the first timeline step, queued or
scheduled: one EVAL of `_ACCEPT` per batch) and appended to (APPEND) by the worker in its commit transaction
(queue/streams.py `StreamQueue.commit`: one EVAL of `_WRITE` inside it, no round trip of its own). A record is a
JSON object (the meta: who enqueued the message, when), a JSON array `[at_ms, state, device, details]` (a timeline
step; `device` "" for a message-wide step, `details` such as attempt, until, rule, error left out when empty), or
`[at_ms, type, device, provider, attempt, reason, provider_id]` (a final outcome, `Outcome.record`; "" and 0 for
none). A commit written twice (a retried transaction) repeats its records; the reader keeps one of each. The
append that creates the key sets its TTL to `status.retention_s`, so every status key expires; a step that puts
the message off (held until, the next attempt at, scheduled until) sets it to that time plus `status.retention_s`,
so a status outlives its message's last step by at least `status.retention_s`. An in_flight step is written only
for a job still under way `IN_FLIGHT_AFTER_S` after it started (gateway/tracking.py). A learner's message ids are
appended, one a line, to `Keys.user_messages(user, period)`, the list of the retention-long period they were
accepted in (kept two periods from its creation, so it outlives the statuses it names); the reader takes the
newest ids of this period's list and the one before.

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

import math
import time
from collections.abc import Collection, Iterable, Sequence
from hashlib import blake2b
from typing import Any, NamedTuple

import orjson
import redis.asyncio as aioredis

from ..core.schema import MAX_ID_LEN, Device, Message
from .keys import Keys

FINAL_DEVICE_STATES = frozenset({"delivered", "token_invalid", "dead_lettered", "expired"})
FINAL_MESSAGE_STATES = frozenset({"expired", "dropped", "no_device"})
# Steps at the same millisecond sort in the order they can happen.
_ORDER = {s: i for i, s in enumerate(("queued", "scheduled", "held", "in_flight", "retrying", "delivered",
                                      "token_invalid", "dead_lettered", "expired", "dropped", "no_device"))}
DEVICE_REF_LEN = 40
_OUTCOME_DETAILS = ("provider", "attempt", "reason", "provider_id")  # the details of an outcome record, in order
IN_FLIGHT_AFTER_S = 1.0  # an in_flight step is written for a job still under way this long after it started


def device_ref(device: Device) -> str:
    """The device as the status names it: its registry key, shortened to 40 characters (the start and the end
    of the token) so a long FCM token does not make every status record long."""
    key = device.key
    return key if len(key) <= DEVICE_REF_LEN else f"{key[:28]}~{key[-11:]}"


def put_off_s(until: float, now: float) -> int:
    """Whole seconds from `now` to `until` (at least 0): how much longer than `status.retention_s` a status
    put off until then is kept."""
    return max(0, math.ceil(until - now))


class Step(NamedTuple):
    """One timeline step of a message that is neither a final outcome nor in flight: retrying, held,
    no_device; message-wide (`device` empty) or of one delivery. `put_off_s`: the step puts the message off
    that many seconds (held, retrying), so its status is kept that much longer. `shard_key`: what the message's
    shard is computed from on Redis Cluster (its user, else its id: queue/sharded.py), where its status lives."""

    message: str
    at_ms: int
    state: str
    device: str = ""
    details: dict[str, Any] | None = None
    put_off_s: int = 0
    shard_key: str = ""

    def record(self) -> bytes:
        if self.details:
            return orjson.dumps((self.at_ms, self.state, self.device, self.details))
        return orjson.dumps((self.at_ms, self.state, self.device))


class InFlight(NamedTuple):
    """A worker took the message (or a retry of some of its devices) at `at_ms` and its job is still under way
    `IN_FLIGHT_AFTER_S` later (gateway/tracking.py): a step for a delivery settled within a flush or two would
    tell a reader nothing the next record does not."""

    message: str
    at_ms: int
    attempt: int
    devices: Collection[Device]
    shard_key: str  # as `Step.shard_key`

    def record(self) -> bytes:
        details = {"attempt": self.attempt, "devices": [device_ref(d) for d in self.devices]}
        return orjson.dumps((self.at_ms, "in_flight", "", details))


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
        mid = m.id
        out: dict[str, Any] = {"id": blake2b(f"{mid}|{device}|{kind}|{attempt}".encode(), digest_size=10).hexdigest(),
                               "type": kind, "message": mid, "at": self.at_ms}
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

    def record(self) -> bytes:
        """Its status record: `[at_ms, type, device, provider, attempt, reason, provider_id]` ("" and 0: none)."""
        return orjson.dumps((self.at_ms, self.type, self.device, self.provider, self.attempt, self.reason,
                             self.provider_id))


# Appends each status key's records; the append that creates a key sets its TTL to the retention, and a key
# given its own TTL (a step that puts the message off) gets that one.
# KEYS: the event stream, then the status keys of this commit.
# ARGV: retention_s, events MAXLEN, the commit's events as one JSON array ('' when none), then per status key
# 2 values: its records, and its TTL ('' for: the retention if this append created the key).
_WRITE = """
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'events', ARGV[3])
end
for i = 2, #KEYS do
  local records, ttl = ARGV[2 * i], ARGV[2 * i + 1]
  if redis.call('APPEND', KEYS[i], records) == #records and ttl == '' then
    ttl = ARGV[1]
  end
  if ttl ~= '' then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
return 0
"""

# The intake's: the accepted messages' first records, then the learners' lists. A new message's key is created
# with its TTL in one SET; if a worker already wrote the message's first steps (it can, between the enqueue and
# this call), the records are appended to theirs, and the longer of the two TTLs is kept. A learner's list is
# appended to, and gets its TTL when created.
# KEYS: the status keys, then the learners' lists.
# ARGV: retention_s, the number of status keys, then per status key its records and its TTL, then per learner
# list its lines and its TTL.
_ACCEPT = """
local n = tonumber(ARGV[2])
for i = 1, n do
  local records, ttl = ARGV[2 * i + 1], ARGV[2 * i + 2]
  if not redis.call('SET', KEYS[i], records, 'NX', 'EX', ttl) then
    redis.call('APPEND', KEYS[i], records)
    if redis.call('TTL', KEYS[i]) < tonumber(ttl) then  -- never shortens what a worker's held step lengthened
      redis.call('EXPIRE', KEYS[i], ttl)
    end
  end
end
for i = n + 1, #KEYS do
  local lines = ARGV[2 * i + 1]
  if redis.call('APPEND', KEYS[i], lines) == #lines then
    redis.call('EXPIRE', KEYS[i], ARGV[2 * i + 2])
  end
end
return 0
"""


def period(at: float, retention_s: int) -> int:
    """The retention-long period of the learners' lists that `at` (unix seconds) falls in."""
    return int(at // retention_s)


def write(pipe: Any, keys: Keys, steps: Sequence[Step], started: Sequence[InFlight], outcomes: Sequence[Outcome], *,
          retention_s: int, events_maxlen: int) -> None:
    """Queue the commit's status records (`retention_s` 0: none) and its events (`events_maxlen` 0: none) on
    `pipe`, the caller's transaction: one EVAL, or one XADD when there is no status to write. `started`: the
    in-flight records to write (the tracker chose them)."""
    events = orjson.dumps([o.event() for o in outcomes]) if events_maxlen and outcomes else b""
    records: dict[str, list[bytes]] = {}  # message id -> its records in this commit
    put_off: dict[str, int] = {}
    if retention_s:
        for o in outcomes:
            records.setdefault(o.message.id, []).append(o.record())
        for s in steps:
            records.setdefault(s.message, []).append(s.record())
            if s.put_off_s:
                put_off[s.message] = max(put_off.get(s.message, 0), s.put_off_s)
        for f in started:
            records.setdefault(f.message, []).append(f.record())
    if records:
        args: list[Any] = []
        for mid, recs in records.items():
            extra = put_off.get(mid)
            args += (b"\n".join(recs) + b"\n", "" if extra is None else retention_s + extra)
        pipe.eval(_WRITE, 1 + len(records), keys.outcome_events, *[keys.status(m) for m in records], retention_s,
                  events_maxlen, events, *args)
    elif events:
        pipe.xadd(keys.outcome_events, {"events": events}, maxlen=events_maxlen, approximate=True)


async def record_accepted(redis: aioredis.Redis, keys: Keys, messages: Iterable[Message], now_ms: int, *,
                          retention_s: int) -> None:
    """The intake's part: each newly accepted message's `meta` and first step, and the learner's list; one
    EVAL, one round trip, for the batch."""
    status_keys: list[str] = []
    values: list[Any] = []
    users: dict[str, list[bytes]] = {}  # learner -> lines of ids
    now = now_ms / 1000
    queued = b"\n" + orjson.dumps((now_ms, "queued", "")) + b"\n"
    for m in messages:
        meta: dict[str, Any] = {"at": now_ms}
        if m.client is not None:
            meta["client"] = m.client
        if m.user is not None:
            meta["user"] = m.user
            users.setdefault(m.user, []).append(m.id.encode())
        if m.campaign is not None:
            meta["campaign"] = m.campaign
        if m.variant is not None:
            meta["variant"] = m.variant
        if m.category != "general":
            meta["category"] = m.category
        if m.devices:
            meta["devices"] = len(m.devices)
        status_keys.append(keys.status(m.id))
        if m.send_at is not None and m.send_at > now:
            scheduled = orjson.dumps((now_ms, "scheduled", "", {"until": m.send_at}))
            values += (orjson.dumps(meta) + b"\n" + scheduled + b"\n", retention_s + put_off_s(m.send_at, now))
        else:
            values += (orjson.dumps(meta) + queued, retention_s)
    if not status_keys:
        return
    p = period(now, retention_s)
    for ids in users.values():
        values += (b"\n".join(ids) + b"\n", 2 * retention_s)  # lives until the next period's end, at least
    await redis.eval(_ACCEPT, len(status_keys) + len(users), *status_keys,
                     *[keys.user_messages(u, p) for u in users], retention_s, len(status_keys), *values)


def summarize(message_id: str, raw: bytes | str) -> dict[str, Any]:
    """A status string as the API answers it: meta, timeline (oldest first), each device's state, the message's
    state."""
    meta: dict[str, Any] = {}
    timeline: list[dict[str, Any]] = []
    data = raw.encode() if isinstance(raw, str) else raw
    for line in set(data.split(b"\n")):  # a set: a retried commit repeats its records
        if not line:
            continue
        record = orjson.loads(line)
        if isinstance(record, dict):
            meta = record
            continue
        step: dict[str, Any] = {"at": record[0] / 1000, "state": record[1]}
        if record[2]:
            step["device"] = record[2]
        if len(record) == 7:  # a final outcome (`Outcome.record`)
            step.update((k, v) for k, v in zip(_OUTCOME_DETAILS, record[3:], strict=True) if v)
            if "reason" in step and step["state"] == "dropped":
                step["rule"] = step.pop("reason")
        elif len(record) > 3:
            step.update(record[3])
        timeline.append(step)
    timeline.sort(key=lambda s: (s["at"], _ORDER.get(s["state"], 99), s.get("device", "")))
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

    def __init__(self, redis: aioredis.Redis, keys: Keys, retention_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_s = retention_s

    async def message(self, message_id: str) -> dict[str, Any] | None:
        """The message's status, or None when it is unknown or its retention ran out."""
        raw = await self.redis.get(self.keys.status(message_id))
        return summarize(message_id, raw) if raw else None

    async def user(self, user: str, limit: int) -> list[dict[str, Any]]:
        """A learner's `limit` most recent messages still retained, newest first, each with its state (no
        timeline). One round trip reads the ends of this period's list and the one before (room for `limit` ids
        of the longest length in each), then the statuses are read `limit` at a time until `limit` are found."""
        p = period(time.time(), self.retention_s)
        tail = (limit + 1) * (MAX_ID_LEN + 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in (self.keys.user_messages(user, p - 1), self.keys.user_messages(user, p)):
                pipe.getrange(key, -tail, -1)
            ends = await pipe.execute()
        ids: list[str] = []
        seen: set[bytes] = set()
        for end in reversed(ends):  # this period's first
            lines = _b(end).split(b"\n")
            if len(end) >= tail:
                lines = lines[1:]  # the read may have started inside an id
            for line in reversed(lines):
                if line and line not in seen:
                    seen.add(line)
                    ids.append(line.decode())
        out: list[dict[str, Any]] = []
        for i in range(0, len(ids), limit):  # an id whose status expired is passed over
            part = ids[i:i + limit]
            for m, raw in zip(part, await self.redis.mget([self.keys.status(m) for m in part]), strict=True):
                if raw:
                    s = summarize(m, raw)
                    del s["timeline"]
                    out.append(s)
                    if len(out) == limit:
                        return out
        return out


def _b(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v
