"""The webhook dispatcher: outcome events (queue/status.py) posted, signed, to each subscription's URL.

It runs as its own process, `pushgw webhooks run` (any number, on any host): the workers only append
events to the stream in their commit transaction, so a slow, hung or failing receiver can never slow
a delivery. Each subscription is one consumer group on the event stream, created at the stream's end
the first time a dispatcher runs with it, and one task here: it reads a few entries, keeps the events
of its API client and event types, POSTs them in bodies of at most `webhooks.batch_size` events and
acknowledges the entries once the receiver answered 2xx to each body, or once a body went to the
webhook dead letters. A subscription that fails holds back only its own group; events wait in the
stream meanwhile (MAXLEN ~ `status.events_maxlen` bounds it: a receiver down for longer than the stream
holds loses the oldest, and `pushgw_webhook_lag_entries` shows it coming).

The request: `POST <url>` with `Content-Type: application/json`, body `{"subscription": name,
"events": [event, ...]}` (each event as the stream has it, with its `id` for deduplication: a batch
can arrive twice, after a timeout or a dispatcher restart), and

- `Pushgw-Timestamp`: unix seconds when this attempt was signed;
- `Pushgw-Signature`: `v1=` + hex HMAC-SHA256 of `<timestamp>.<body>` with the subscription's secret.

Receivers recompute the signature over the raw body, compare in constant time, and refuse a timestamp
more than 5 minutes old (README "Webhooks" has the snippet). Answers: 2xx done; 408, 429 and 5xx,
timeouts and connection errors are retried with full-jitter backoff (never before a Retry-After),
up to `webhooks.max_attempts`; any other status, or a URL whose host resolves to a refused address,
dead-letters the batch at once. `pushgw webhooks replay` posts dead-lettered batches again.

URLs are guarded like Web Push endpoints (providers/endpoints.py): https, a host in
`webhooks.allowed_hosts`, port 443 unless allowed, and no private, loopback or link-local address,
checked on the URL at start and on every resolved address at connect time, unless
`webhooks.allow_private`. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ..core import metrics
from ..core.config import ConfigError, Settings, WebhookSubscription
from ..providers.base import retry_after_seconds
from ..providers.endpoints import CheckedResolver, EndpointPolicy
from ..providers.transport import AddressRefused, tls_contexts
from ..queue.keys import Keys
from ..queue.sharded import shard_map
from .settle import backoff_delay

log = logging.getLogger("pushgw.webhooks")

TIMESTAMP_HEADER = "Pushgw-Timestamp"
SIGNATURE_HEADER = "Pushgw-Signature"
WEBHOOK_DEAD_MAXLEN = 100_000
ANSWER_KEEP_BYTES = 200  # of a refusing receiver's answer, in the dead letter's reason
READ_ENTRIES = 8  # stream entries per read; each holds one worker commit's events (1 to 512)


class WebhookRefused(AddressRefused):
    """Every address of a webhook URL's host is private/loopback while that is not allowed."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `Pushgw-Signature` value: `v1=` + hex HMAC-SHA256 over `<timestamp>.<body>`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


@dataclass(frozen=True, slots=True)
class PostResult:
    ok: bool
    retry: bool  # a transient failure: try the batch again
    reason: str = ""
    after: float | None = None  # Retry-After, seconds


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class WebhookSender:
    """POSTs signed batches (one aiohttp session, the endpoint guard in its resolver)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        ws = settings.webhooks
        self.policy = EndpointPolicy(ws, section="webhooks", kind="webhook host")
        for sub in ws.subscriptions:
            problem = self.policy.check(sub.url)
            if problem is not None:
                raise ConfigError(f"webhook subscription {sub.name}: {problem.replace('endpoint', 'url', 1)}")
        self._ssl: ssl.SSLContext | None = tls_contexts(ws.ca_file, "webhooks.ca_file").http1 if ws.ca_file else None
        self._timeout_s = ws.timeout_s
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=64, ssl=self._ssl if self._ssl is not None else True,
                                             resolver=CheckedResolver(self.policy, WebhookRefused))
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def post(self, sub: WebhookSubscription, body: bytes) -> PostResult:
        ts = int(self._clock())
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(sub.secret, ts, body),
                   "User-Agent": "pushgw-webhooks"}
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client().post(sub.url, data=body, headers=headers, allow_redirects=False) as r:
                    answer = await r.content.read(ANSWER_KEEP_BYTES)
                    status, retry_after = r.status, r.headers.get("Retry-After")
        except TimeoutError:
            return PostResult(False, True, f"timeout after {self._timeout_s:g} s")
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, AddressRefused):
                return PostResult(False, False, f"refused: {e.os_error}")
            return PostResult(False, True, f"connection error: {type(e).__name__}")
        except (aiohttp.ClientError, OSError) as e:
            if isinstance(e, AddressRefused):
                return PostResult(False, False, f"refused: {e}")
            return PostResult(False, True, f"connection error: {type(e).__name__}")
        finally:
            metrics.WEBHOOK_LATENCY.labels(sub.name).observe(time.perf_counter() - started)
        if 200 <= status < 300:
            return PostResult(True, False)
        text = answer.decode("utf-8", "replace").strip()
        reason = f"HTTP {status}" + (f": {text}" if text else "")
        if status in (408, 429) or status >= 500:
            return PostResult(False, True, reason, retry_after_seconds(retry_after))
        return PostResult(False, False, reason)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Stopping(Exception):
    """The dispatcher stops while a batch waits for its next attempt: the batch stays pending."""


class WebhookDispatcher:
    """Every subscription's task; `consumer` names this process in the groups (a restarted dispatcher with
    the same name first posts the batches it had read and not acknowledged)."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, *, consumer: str,
                 clock: Callable[[], float] = time.time, rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.ws = settings.webhooks
        self.redis = redis
        self.keys = Keys(settings.redis.prefix)
        # Each shard's workers append to their shard's event stream (queue/shards.py): one stream with one Redis.
        self.streams = [k.outcome_events for k in shard_map(settings.redis).all_keys()]
        self.consumer = consumer
        self.sender = WebhookSender(settings, clock)
        self._clock = clock
        self._rng = rng
        self._failing_since: dict[str, float] = {}  # subscription -> first failure of its current failing run

    async def ensure_groups(self) -> None:
        """Each subscription's group, at the stream's end when new: it gets the events from then on."""
        for sub in self.ws.subscriptions:
            for stream in self.streams:
                try:
                    await self.redis.xgroup_create(stream, self.keys.webhook_group(sub.name), id="$", mkstream=True)
                except ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_groups()
        tasks = [asyncio.create_task(self._subscription(sub, stream, stop), name=f"webhook-{sub.name}-{n}")
                 for sub in self.ws.subscriptions for n, stream in enumerate(self.streams)]
        tasks.append(asyncio.create_task(self._gauges(stop), name="webhook-gauges"))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.sender.close()

    async def _gauges(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(ConnectionError, OSError, aioredis.RedisError):
                length, lag = 0, dict.fromkeys((sub.name for sub in self.ws.subscriptions), 0)
                for stream in self.streams:  # summed over the shards' streams
                    length += await self.redis.xlen(stream)
                    groups = {_s(g["name"]): g for g in await self.redis.xinfo_groups(stream)}
                    for sub in self.ws.subscriptions:
                        g = groups.get(self.keys.webhook_group(sub.name))
                        if g is not None:
                            lag[sub.name] += int(g.get("lag") or 0) + int(g.get("pending") or 0)
                metrics.OUTCOME_EVENTS_LENGTH.set(length)
                for name, behind in lag.items():
                    metrics.WEBHOOK_LAG.labels(name).set(behind)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)

    async def _subscription(self, sub: WebhookSubscription, stream: str, stop: asyncio.Event) -> None:
        cursor = "0"  # first the entries this consumer read before a restart, then new ones
        failing = metrics.WEBHOOK_FAILING_SINCE.labels(sub.name)
        failing.set(0)
        while not stop.is_set():
            try:
                cursor = await self._round(sub, stream, cursor, stop, failing)
            except Stopping:
                return
            except Exception as e:  # Redis down, or a bug: the task must go on while the process runs
                if isinstance(e, ResponseError) and "NOGROUP" in str(e):
                    log.warning("webhook group missing, creating it", extra={"subscription": sub.name})
                    with contextlib.suppress(ConnectionError, OSError, aioredis.RedisError):
                        await self.ensure_groups()  # the stream was deleted, or Redis lost its data
                elif isinstance(e, ConnectionError | OSError | aioredis.RedisError):
                    log.warning("webhook round failed, retrying", extra={"error": type(e).__name__,
                                                                         "subscription": sub.name})
                else:
                    log.exception("webhook round failed", extra={"subscription": sub.name})
                cursor = "0"  # entries read but not acknowledged are read again first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _round(self, sub: WebhookSubscription, stream: str, cursor: str, stop: asyncio.Event, failing: Any) -> str:
        """Read a few entries of one shard's stream (this consumer's unacknowledged ones while `cursor` is "0"), post
        the subscription's events, acknowledge the entries; the cursor for the next round."""
        group = self.keys.webhook_group(sub.name)
        reply: Any = await self.redis.xreadgroup(group, self.consumer, {stream: cursor}, count=READ_ENTRIES,
                                                 block=None if cursor == "0" else 1000)
        entries: list[Any] = reply[0][1] if reply else []
        if not entries:
            return ">"
        events = [e for _, f in entries if f for e in orjson.loads(f.get(b"events") or b"[]")
                  if e.get("client") == sub.client and e.get("type") in sub.events]
        size = self.ws.batch_size
        for i in range(0, len(events), size):
            await self._deliver(sub, events[i:i + size], stop, failing)
        await self.redis.xack(stream, group, *[i for i, _ in entries])
        return cursor

    async def _deliver(self, sub: WebhookSubscription, events: Sequence[dict[str, Any]], stop: asyncio.Event,
                       failing: Any) -> None:
        """POST the batch until the receiver takes it or it is dead-lettered; raises `Stopping` if the
        dispatcher stops while waiting for another attempt (the batch then stays pending)."""
        body = orjson.dumps({"subscription": sub.name, "events": list(events)})
        attempt = 1
        while True:
            result = await self.sender.post(sub, body)
            if result.ok:
                metrics.WEBHOOK_POSTS.labels(sub.name, "ok").inc()
                metrics.WEBHOOK_EVENTS.labels(sub.name).inc(len(events))
                self._failing_since[sub.name] = 0.0
                failing.set(0)
                return
            if not self._failing_since.get(sub.name):  # the start of this failing run
                self._failing_since[sub.name] = self._clock()
                failing.set(self._failing_since[sub.name])
            if not result.retry or attempt >= self.ws.max_attempts:
                metrics.WEBHOOK_POSTS.labels(sub.name, "refused" if not result.retry else "retry").inc()
                metrics.WEBHOOK_POSTS.labels(sub.name, "dead_letter").inc()
                log.warning("webhook batch dead-lettered", extra={"subscription": sub.name, "reason": result.reason,
                                                                  "count": len(events)})
                await self.redis.xadd(self.keys.webhook_dead, {
                    "subscription": sub.name, "body": body, "reason": result.reason[:500], "attempts": attempt,
                    "at": int(self._clock() * 1000)}, maxlen=WEBHOOK_DEAD_MAXLEN, approximate=True)
                return
            metrics.WEBHOOK_POSTS.labels(sub.name, "retry").inc()
            delay = backoff_delay(attempt, self.ws.backoff_base_s, self.ws.backoff_cap_s, self._rng)
            if result.after is not None:
                delay = max(delay, result.after)
            log.info("webhook post failed, retrying", extra={"subscription": sub.name, "reason": result.reason,
                                                             "attempt": attempt})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                raise Stopping
            attempt += 1


async def replay(settings: Settings, redis: aioredis.Redis, ids: Sequence[str] | None) -> dict[str, int]:
    """POST dead-lettered batches again (signed anew), once each; those the receiver takes are deleted.
    `ids` None: all of them."""
    keys = Keys(settings.redis.prefix)
    subs = {s.name: s for s in settings.webhooks.subscriptions}
    entries: list[Any]
    if ids is None:
        entries = await redis.xrange(keys.webhook_dead)  # type: ignore[assignment]
    else:
        entries = [e for i in ids for e in await redis.xrange(keys.webhook_dead, i, i) or []]
    sender = WebhookSender(settings)
    done = failed = 0
    try:
        for entry_id, fields in entries:
            f = {_s(k): v for k, v in fields.items()}
            sub = subs.get(_s(f.get("subscription", b"")))
            result = await sender.post(sub, f["body"]) if sub is not None else PostResult(False, False, "no such subscription")
            if result.ok:
                await redis.xdel(keys.webhook_dead, entry_id)
                done += 1
            else:
                failed += 1
    finally:
        await sender.close()
    return {"replayed": done, "failed": failed}


async def dead_letters(settings: Settings, redis: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    """The oldest `count` dead-lettered batches: id, subscription, reason, attempts, at, the number of events."""
    out = []
    found: Any = await redis.xrange(Keys(settings.redis.prefix).webhook_dead, count=count)
    for entry_id, fields in found:
        f = {_s(k): v for k, v in fields.items()}
        out.append({"id": _s(entry_id), "subscription": _s(f["subscription"]), "reason": _s(f["reason"]),
                    "attempts": int(f["attempts"]), "at": int(f["at"]) / 1000,
                    "events": len(orjson.loads(f["body"])["events"])})
    return out
