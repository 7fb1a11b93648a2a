"""The worker: stream entries in, provider requests out, every outcome written back in one transaction.

Where a message goes, in order:

1. Read: `read_new` takes a batch from the consumer group, from both lanes' streams in one call,
   the high lane first (after the worker first re-read its own pending entries, and while a
   janitor claims the entries of dead consumers). With its normal capacity full, or a fast
   provider lane at its cap (its burst then waits in the stream, see `Lanes.room`), the worker
   still polls the high lane into a reserve, so a campaign backlog never keeps a reminder out.
2. Plan (`_plan`): decode each entry (poison -> dead letter), drop expired ones, ask the policy
   about first reads (opt-out, send window, caps: ratelimit/policy.py; one batch, one answer),
   resolve the user's devices from the registry (one round trip per batch) and skip devices a
   redelivered entry already completed (done marks).
3. Lanes (gateway/lanes.py): each delivery goes to its provider's lane, where a bounded number of
   senders send it in priority order; a lane too far behind parks new deliveries in the delay set,
   so one provider never stalls the others.
4. Settle (gateway/settle.py): the typed outcome becomes writes (done mark, retry, invalid-token
   removal, dead letter), which the flusher writes with the acks of finished entries in one
   MULTI/EXEC every few ms, after publishing the metrics held since the last flush
   (gateway/worker_metrics.py).

Retries are per delivery: a retry entry names only the device that failed, so devices that
succeeded are never sent to again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import overload

import redis.asyncio as aioredis

from ..core import metrics
from ..core.config import Settings
from ..core.queued import loads_queued
from ..core.schema import Device, Message, MessageInvalid
from ..providers.base import Provider
from ..queue.keys import Keys
from ..queue.streams import LANES, Entry, StreamQueue
from ..ratelimit.base import ADMIT, Defer, Drop, Limiter, Unlimited
from ..ratelimit.policy import DeliveryPolicy
from ..ratelimit.provider_rate import SharedRate
from ..users.profiles import Preferences
from ..users.registry import DeviceRegistry
from .lanes import Lanes
from .settle import Job, Settler
from .tracking import Tracker
from .worker_metrics import WorkerMetrics

log = logging.getLogger("pushgw.worker")

Planned = tuple[Entry, Message, float | None]  # a decoded entry with its message's expiry, while `_plan` runs

_NONE: frozenset[str] = frozenset()
HIGH_POLL_MS = 10  # with normal capacity full, the high lane alone is read with this short block


class Worker:
    """One consumer in the group. Run several per host (processes) and on any number of hosts."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        providers: Mapping[str, Provider],
        *,
        consumer: str,
        limiter: Limiter | None = None,
        rates: Mapping[str, SharedRate] | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        keys: Keys | None = None,
        queue: StreamQueue | None = None,
        registry: DeviceRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.ws = settings.worker
        self.redis = redis
        self.keys = keys or Keys(settings.redis.prefix)  # a shard's keys on Redis Cluster (queue/shards.py)
        # On Redis Cluster, `queue` and `registry` span the owned shards (gateway/multishard.py).
        self.queue = queue or StreamQueue(
            redis, self.keys, idempotency_window_s=self.ws.idempotency_window_s, done_ttl_s=self.ws.done_ttl_s,
            status_retention_s=settings.status.retention_s if settings.status.enabled else 0,
            events_maxlen=settings.status.events_maxlen if settings.status.events else 0,
        )
        self.registry = registry or DeviceRegistry(redis, self.keys)
        self.consumer = consumer
        self.limiter: Limiter = limiter or Unlimited()
        # The policy whose preference reads go with the registry's (one round trip per batch): the delivery
        # policy on this worker's keys. Any other limiter reads what it needs itself.
        self._policy = limiter if isinstance(limiter, DeliveryPolicy) and limiter.keys == self.keys else None
        self.clock = clock
        self.metrics = WorkerMetrics(providers)
        self.settler = Settler(self.queue, self.ws, self.metrics, publish=self._publish, clock=clock, rng=rng,
                               categories=settings.policy.labelled_categories())
        if settings.status.enabled or settings.status.events:
            self.settler.track = Tracker(settings.status, lambda: self.settler.commit, clock)
        self.track = self.settler.track
        self.jobs: dict[str, Job] = self.settler.jobs  # entry ref -> job, while any of its deliveries is unsettled
        self.lanes = Lanes(settings, providers, self.settler, self.metrics, rates=dict(rates or {}), clock=clock, rng=rng)

    # ------------------------------------------------------------------ run loop

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then drain: stop reading, finish in flight, flush, return."""
        await self.queue.ensure_group()
        flusher = asyncio.create_task(self.settler.flush_until_stopped(), name="flusher")
        mover = asyncio.create_task(self._mover(stop), name="mover")
        janitor = asyncio.create_task(self._janitor(stop), name="janitor")
        try:
            await self._recover_own_pending(stop)
            while not stop.is_set():
                # A read also leaves room in every healthy lane below its cap: a burst on one provider
                # then waits in the stream (it drains at that provider's pace) instead of being parked.
                # (Halved: XREADGROUP's COUNT applies to each of the two lanes' streams.)
                room = min(self.ws.max_inflight - self.lanes.in_flight, self.lanes.room() // len(LANES))
                reserve = self.ws.max_inflight + self.ws.high_reserve - self.lanes.in_flight
                try:
                    if room > 0:  # both lanes, blocking until either has entries
                        entries = await self.queue.read_new(self.consumer, min(self.ws.batch_size, room), self.ws.block_ms)
                    elif reserve > 0:  # normal capacity full: only the high lane, with a short block
                        entries = await self.queue.read_new(
                            self.consumer, min(self.ws.batch_size, reserve), HIGH_POLL_MS, lanes=("high",)
                        )
                    else:
                        await _wait_either(self.lanes.capacity, stop)
                        continue
                except (ConnectionError, OSError, aioredis.RedisError) as e:
                    log.warning("redis read failed, retrying", extra={"error": type(e).__name__})
                    await _sleep_or(stop, 0.5)
                    continue
                if entries:
                    await self._plan(entries)
        finally:
            self.lanes.stopping = True
            mover.cancel()
            janitor.cancel()
            await self.drain(self.ws.drain_deadline_s)
            # The senders stop before the last flush, so nothing settles after it: idle after a
            # drain; past its deadline, requests still in flight are given up and nothing new
            # goes out (their entries stay pending, so they are redelivered).
            await self.lanes.stop_senders()
            self.settler.stop_flushing()
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            for t in (mover, janitor):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settler.flush(), max(1.0, self.ws.drain_deadline_s))

    async def drain(self, deadline_s: float) -> bool:
        """Wait for in-flight deliveries, at most `deadline_s`; True when all finished.

        Entries still unfinished at the deadline stay pending in Redis: after a restart this
        consumer re-reads them, or the janitor of another worker claims them. Nothing is lost.
        """
        try:
            await asyncio.wait_for(self.lanes.idle.wait(), deadline_s)
            return True
        except TimeoutError:
            log.warning("drain deadline reached", extra={"in_flight": self.lanes.in_flight})
            return False

    async def _recover_own_pending(self, stop: asyncio.Event) -> None:
        """Entries this consumer read before a crash or restart come first (at-least-once)."""
        for lane in LANES:
            after = "0"
            while not stop.is_set():
                entries = await self.queue.read_own_pending(self.consumer, self.ws.batch_size, lane, after)
                if not entries:
                    break
                after = entries[-1].entry_id
                await self._plan(entries)

    async def _mover(self, stop: asyncio.Event) -> None:
        """Moves due retries back to the stream; atomic in Lua, so any number of workers may run it."""
        while not stop.is_set():
            try:
                moved = await self.queue.move_due(self.clock(), 1000)
            except (ConnectionError, OSError, aioredis.RedisError):
                moved = 0
                await _sleep_or(stop, 1.0)
            if moved < 1000:
                await _sleep_or(stop, 0.05)

    async def _janitor(self, stop: asyncio.Event) -> None:
        """Reclaims entries of dead consumers, trims acked history, publishes queue gauges."""
        idle_ms = int(self.ws.claim_idle_s * 1000)
        rounds = 0
        while not stop.is_set():
            await _sleep_or(stop, self.ws.janitor_interval_s)
            if stop.is_set():
                return
            try:
                # Heartbeat: entries still in flight here (a slow provider), or finished here with their
                # acks not written yet (a failing commit), must not look abandoned to other workers.
                held = [*self.jobs, *self.settler.unwritten_acks()]
                if held:
                    await self.queue.touch(self.consumer, held)
                for lane in LANES:
                    while self.lanes.in_flight < self.ws.max_inflight // 2:
                        claimed = await self.queue.claim_stale(self.consumer, idle_ms, self.ws.batch_size, lane)
                        if claimed:  # neither in flight here nor finished here with its ack unwritten
                            finished = self.settler.unwritten_acks()
                            claimed = [e for e in claimed if e.ref not in self.jobs and e.ref not in finished]
                        if not claimed:
                            break
                        metrics.RECLAIMED.inc(len(claimed))
                        log.info("reclaimed entries of a dead consumer", extra={"count": len(claimed)})
                        await self._plan(claimed)
                rounds += 1
                if rounds % 6 == 0:
                    await self.queue.trim()
                    await self.queue.delete_idle_consumers(idle_ms * 10)
                stats = await self.queue.stats()
                metrics.STREAM_LAG.set(stats.lag)
                metrics.STREAM_LAG_HIGH.set(stats.lag_high)
                metrics.STREAM_PENDING.set(stats.pending)
                metrics.DELAYED.set(stats.delayed)
                metrics.DLQ_LENGTH.set(stats.dead_letters)
            except (ConnectionError, OSError, aioredis.RedisError) as e:
                log.warning("janitor round failed", extra={"error": type(e).__name__})

    # ------------------------------------------------------------------ planning

    async def _plan(self, entries: Sequence[Entry]) -> None:
        """Turn a batch into deliveries in their lanes (one round trip for the users' devices and preferences,
        one for the done marks of redelivered entries)."""
        now = self.clock()
        decoded: list[Planned] = []
        for entry in entries:
            try:
                msg = loads_queued(entry.raw)
            except (MessageInvalid, ValueError) as e:
                self.settler.dead_letter_raw(entry, f"invalid_message: {e}"[:500])
                continue
            expiry = msg.expiry(entry.enqueued_ms / 1000)
            if expiry is not None and expiry <= now:
                self.settler.expired(msg)
                self.settler.ack(entry)
                continue
            decoded.append((entry, msg, expiry))
        if not decoded:
            return
        # One round trip for the batch's users: their devices, and their preferences when the policy reads any
        # (the devices of every user of the batch, before the policy: a dropped or deferred message's too).
        policy = self._policy
        if policy is not None:
            users = sorted({m.user for _, m, _ in decoded if m.user and not m.resolved})
            batch = await self.registry.devices_and_preferences(users, policy.users([m for _, m, _ in decoded]))
            decoded = await self._decide(decoded, now, batch.preferences)
            registry = batch.devices
        else:
            decoded = await self._decide(decoded, now, None)
            users = sorted({m.user for _, m, _ in decoded if m.user and not m.resolved})
            registry = await self.registry.devices_many(users) if users else {}
        redelivered = [e.ref for e, _, _ in decoded if e.redelivered]
        done = await self.queue.done_marks(redelivered) if redelivered else {}

        start = self.lanes.start
        jobs = self.jobs
        for entry, msg, expiry in decoded:
            from_registry: frozenset[str] = _NONE
            if msg.fcm_target is not None:  # one request to FCM, which fans it out to the subscribers
                target = msg.fcm_target.device
                devices: dict[str, Device] = {target.key: target}
            elif not msg.devices:  # most messages: the user's devices alone (keys are unique in the registry)
                reg = registry.get(msg.user) if msg.user and not msg.resolved else None
                devices = {d.key: d for d in reg} if reg else {}
                if devices:
                    from_registry = frozenset(devices)
            else:
                devices = {d.key: d for d in msg.devices}
                if msg.user and not msg.resolved:
                    reg = registry.get(msg.user)
                    if reg:
                        added: list[str] = []
                        for d in reg:
                            k = d.key
                            if k not in devices:
                                devices[k] = d
                                added.append(k)
                        from_registry = frozenset(added)
            ref = entry.ref
            if entry.redelivered:
                finished = done.get(ref, set())
                if finished:
                    metrics.SKIPPED.labels("already_done").inc(len(finished & devices.keys()))
                for k in finished:
                    devices.pop(k, None)
            if not devices:
                metrics.SKIPPED.labels("no_device").inc()
                if not done.get(ref):
                    self.settler.kpi(msg, "failed")  # a learner with no device: not reached
                    if self.track is not None:
                        self.track.no_device(msg)
                self.settler.ack(entry)
                continue
            if ref in jobs:
                continue  # already in flight here (claimed back while a provider was slow)
            job = Job(entry, msg, len(devices), from_registry, expiry, msg.priority == "high")
            jobs[ref] = job
            if self.track is not None:
                self.track.in_flight(job, devices.values())  # not changed after this
            for device in devices.values():
                start(job, device)

    async def _decide(self, decoded: list[Planned], now: float, prefs: Mapping[str, Preferences] | None) -> list[Planned]:
        """The policy's answer for a batch: the admitted messages; the others are deferred or dropped here.

        The policy sees every message with a user. Caps and windows decide a message once, on its first read:
        an entry read again after a crash or taken over from a dead worker was decided then, and may be partly
        delivered. Opt-outs are checked on every read (retries and replays too): a learner who opted out
        meanwhile gets nothing more. `prefs`: the users' preferences when read with their devices."""
        messages = [m for _, m, _ in decoded]
        members = _Members(decoded)
        first_read = [not e.redelivered for e, _, _ in decoded]
        if prefs is not None and self._policy is not None:
            decisions = await self._policy.decide(messages, now, members=members, first_read=first_read, prefs=prefs)
        else:
            decisions = await self.limiter.decide(messages, now, members=members, first_read=first_read)
        admitted: list[Planned] = []
        for item, decision in zip(decoded, decisions, strict=True):
            if decision is ADMIT:
                admitted.append(item)
                continue
            entry, msg, expiry = item
            match decision:
                case Defer(until=until):
                    if expiry is not None and until >= expiry:
                        self.settler.expired(msg)  # it could only go out too late
                        self.settler.ack(entry)
                    else:
                        metrics.SKIPPED.labels("deferred").inc()
                        self.settler.defer(entry, msg, until)
                        if self.track is not None:
                            self.track.held(msg, decision.reason, until)
                case Drop(reason=reason):
                    metrics.SKIPPED.labels("dropped").inc()
                    self.settler.kpi(msg, "dropped")
                    if self.track is not None:
                        self.track.final("dropped", msg, None, reason=reason)
                    log.info("dropped by policy", extra={"msg_id": msg.id, "reason": reason})
                    self.settler.ack(entry)
                case _:
                    admitted.append(item)
        return admitted

    def _publish(self) -> None:
        """At each flush: the counters and histograms held since the last one, then the lanes' drain
        rates and in-flight gauges."""
        self.metrics.held.apply()
        self.lanes.measure()


class _Members(Sequence[str]):
    """The policy's name for each message's acceptance, `<id>:<enqueued_ms>`, built when the policy asks for it
    (a window deferral or a cap), not for every message of every batch."""

    __slots__ = ("_decoded",)

    def __init__(self, decoded: Sequence[Planned]) -> None:
        self._decoded = decoded

    def __len__(self) -> int:
        return len(self._decoded)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...

    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return [f"{m.id}:{e.enqueued_ms}" for e, m, _ in self._decoded[i]]
        entry, msg, _ = self._decoded[i]
        return f"{msg.id}:{entry.enqueued_ms}"


async def _sleep_or(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _wait_either(a: asyncio.Event, b: asyncio.Event) -> None:
    ta = asyncio.ensure_future(a.wait())
    tb = asyncio.ensure_future(b.wait())
    _, pending = await asyncio.wait({ta, tb}, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
