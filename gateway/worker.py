"""The worker: stream entries in, provider requests out, every outcome written back in one transaction.

Where a message goes, in order:

1. `read_new` takes a batch from the consumer group, from both lanes' streams in one call, the
   high lane first (after the worker first re-read its own pending entries, and while a janitor
   claims the entries of dead consumers). With its normal capacity full, or a fast provider lane
   at its cap (its burst then waits in the stream, see `_lane_room`), the worker still polls the
   high lane into a reserve, so a campaign backlog never keeps a reminder out.
2. `_dispatch` decodes each entry (poison → dead letter), drops expired ones, asks the policy
   about first reads (opt-out, send window, caps: ratelimit/policy.py; one batch, one answer),
   resolves the user's devices from the registry (one round trip per batch) and skips
   devices a redelivered entry already completed (done marks).
3. Each delivery goes to its provider's lane: a queue (`LaneQueue`, gateway/lanequeue.py) that
   serves high-priority deliveries first, drained by `providers.concurrency` long-lived sender
   coroutines, which bound requests in flight per provider. A sender asks the circuit, then the
   shared provider rate if configured, then sends. A lane too far behind (a hung provider) parks
   new deliveries in the delay set instead of letting them fill the worker, so one provider never
   stalls the others.
4. `_settle` turns the typed outcome into writes: done mark, retry with backoff and full jitter
   (never before the provider's Retry-After), invalid-token removal and event, or dead letter.
5. The flusher writes those and the acks of finished entries in one MULTI/EXEC every few ms, and
   publishes the per-delivery metrics held since the last flush (one mmap write per series).

Retries are per delivery: a retry entry names only the device that failed, so devices that
succeeded are never sent to again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from prometheus_client import Gauge

from ..core import metrics
from ..core.config import Settings
from ..core.schema import Device, Message, MessageInvalid, loads_message
from ..providers.base import Delivered, Delivery, Outcome, Provider, Rejected, Retry, TokenInvalid
from ..queue.keys import Keys
from ..queue.streams import LANES, Commit, DeadLetter, Entry, StreamQueue
from ..ratelimit.base import ADMIT, Defer, Drop, Limiter, Unlimited
from ..ratelimit.circuit import Circuit
from ..ratelimit.circuit import State as CircuitState
from ..ratelimit.provider_rate import SharedRate
from ..users.registry import DeviceRegistry
from .lanequeue import LaneQueue

log = logging.getLogger("pushgw.worker")

PARK_DELAY_S = 1.0  # how long a delivery for a saturated provider waits before it is tried again
PARK_WAIT_S = 2.0  # a lane over its backlog parks only if its backlog takes longer than this to drain
DRAIN_WINDOW_S = 0.25  # each lane's drain rate is measured over this much busy time
# A lane over its backlog whose last request finished longer ago than this parks whatever its last
# measured rate: a provider that just hung must not fill the worker before its next rate window.
STALL_S = 0.25
HIGH_POLL_MS = 10  # with normal capacity full, the high lane alone is read with this short block
FLUSH_INTERVAL_S = 0.005
FLUSH_MAX_ITEMS = 512
POISON_KEEP_BYTES = 16384  # a poison entry is kept in the dead letters up to this size (it could be anything)


def backoff_delay(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))] (AWS architecture blog's best spread)."""
    return rng() * min(cap, base * 2.0 ** (attempt - 1))


@dataclass(slots=True)
class _Job:
    """One stream entry in flight: acked when its last delivery settles."""

    entry: Entry
    message: Message
    pending: int
    registry_keys: frozenset[str] = frozenset()  # device keys that came from the user's registry
    expiry: float | None = None  # message.expiry(...) of this entry, computed once
    high: bool = False  # priority "high"


# A delivery waiting in its lane: the job, the device, and the provider/app's circuit and rate.
_Work = tuple[_Job, Device, Circuit, str, SharedRate | None]


@dataclass(slots=True)
class _Lane:
    """Per provider: deliveries wait in `waiting` until one of at most `concurrency` senders takes
    them; `queued` counts them from `_start` until settled (waiting or sending)."""

    provider: Provider
    waiting: LaneQueue[_Work]
    concurrency: int
    senders: int = 0  # sender coroutines started (they live until the worker stops)
    idle: list[asyncio.Future[None]] = field(default_factory=list)  # senders waiting for work
    queued: int = 0
    queued_high: int = 0
    sending: int = 0  # inside provider.send now: the in-flight gauge, set at each flush
    finished: int = 0  # provider requests finished (answered or failed) since the last rate
    busy_s: float = 0.0  # time with deliveries queued since the last rate
    last_finish: float = 0.0  # monotonic time of the last finished request
    busy_since: float = 0.0  # monotonic time the lane last went from idle to queued work
    # Deliveries leaving the lane per second of busy time. Unmeasured (inf) until its first window:
    # a burst on a lane that has not answered yet is parked only by the stall check and the cap.
    drain_per_s: float = float("inf")
    circuits: dict[str, Circuit] = field(default_factory=dict)  # app -> circuit
    routes: dict[str, tuple[Circuit, SharedRate | None]] = field(default_factory=dict)  # app -> circuit, rate

    def stalled(self, now: float) -> bool:
        """Nothing finished for STALL_S since the lane became busy (a lane idle for a while is not
        hung just because its last answer is old)."""
        return now - max(self.last_finish, self.busy_since) > STALL_S


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
    ) -> None:
        self.settings = settings
        self.ws = settings.worker
        self.redis = redis
        self.keys = Keys(settings.redis.prefix)
        self.queue = StreamQueue(
            redis, self.keys, idempotency_window_s=self.ws.idempotency_window_s, done_ttl_s=self.ws.done_ttl_s
        )
        self.registry = DeviceRegistry(redis, self.keys)
        self.consumer = consumer
        self.limiter: Limiter = limiter or Unlimited()
        self.rates = dict(rates or {})  # "fcm" or "fcm:<app>" -> shared provider rate
        self.clock = clock
        self.rng = rng
        self.lanes = {
            name: _Lane(p, LaneQueue(self.ws.high_weight), settings.providers.concurrency)
            for name, p in providers.items()
        }
        self._commit = Commit([], [], [], [], [])
        self._commit_items = 0
        self._flush_wake = asyncio.Event()
        self._in_flight = 0  # deliveries, across lanes
        self._limit = self.ws.max_inflight + self.ws.high_reserve  # in flight at most (with the high reserve)
        # Whatever its measured rate, one lane never holds more than this: a provider that hangs right
        # after answering is seen only after STALL_S, and the others must keep room meanwhile.
        self._backlog_cap = max(self.ws.provider_backlog, self.ws.max_inflight * 3 // 4)
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()  # the lanes' senders
        self._jobs: dict[str, _Job] = {}  # entry id -> job, while any of its deliveries is unsettled
        self.stopping = False
        self._flusher_stop = False
        # Cached label children: `.labels()` is a dict lookup plus a lock; not per delivery.
        self._m_delivered = {p: metrics.DELIVERIES.labels(p, "delivered") for p in (*providers, "none")}
        self._m_retry = {p: metrics.DELIVERIES.labels(p, "retry") for p in (*providers, "none")}
        self._m_invalid = {p: metrics.DELIVERIES.labels(p, "token_invalid") for p in (*providers, "none")}
        self._m_rejected = {p: metrics.DELIVERIES.labels(p, "rejected") for p in (*providers, "none")}
        self._m_e2e = {p: metrics.END_TO_END.labels(p) for p in providers}
        self._m_inflight = {p: metrics.IN_FLIGHT.labels(p) for p in providers}
        self._m_inflight_shown = dict.fromkeys(providers, -1)  # -1: set at the first flush whatever it shows
        # Per-delivery counters and histograms are held here and written at each flush (see `_flush`).
        self._m_held = metrics.Deferred()
        self._published_at = time.monotonic()
        self._m_retries = {p: metrics.RETRIES.labels(p) for p in (*providers, "none")}
        self._m_tokens = {p: metrics.INVALID_TOKENS.labels(p) for p in (*providers, "none")}
        self._m_circuit: dict[tuple[str, str], Gauge] = {}

    # ------------------------------------------------------------------ run loop

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then drain: stop reading, finish in flight, flush, return."""
        await self.queue.ensure_group()
        flusher = asyncio.create_task(self._flusher(), name="flusher")
        mover = asyncio.create_task(self._mover(stop), name="mover")
        janitor = asyncio.create_task(self._janitor(stop), name="janitor")
        try:
            await self._recover_own_pending(stop)
            while not stop.is_set():
                # A read also leaves room in every healthy lane below its cap: a burst on one provider
                # then waits in the stream (it drains at that provider's pace) instead of being parked.
                # (Halved: XREADGROUP's COUNT applies to each of the two lanes' streams.)
                room = min(self.ws.max_inflight - self._in_flight, self._lane_room() // len(LANES))
                reserve = self.ws.max_inflight + self.ws.high_reserve - self._in_flight
                try:
                    if room > 0:  # both lanes, blocking until either has entries
                        entries = await self.queue.read_new(self.consumer, min(self.ws.batch_size, room), self.ws.block_ms)
                    elif reserve > 0:  # normal capacity full: only the high lane, with a short block
                        entries = await self.queue.read_new(
                            self.consumer, min(self.ws.batch_size, reserve), HIGH_POLL_MS, lanes=("high",)
                        )
                    else:
                        await _wait_either(self._capacity, stop)
                        continue
                except (ConnectionError, OSError, aioredis.RedisError) as e:
                    log.warning("redis read failed, retrying", extra={"error": type(e).__name__})
                    await _sleep_or(stop, 0.5)
                    continue
                if entries:
                    await self._dispatch(entries)
        finally:
            self.stopping = True
            mover.cancel()
            janitor.cancel()
            await self.drain(self.ws.drain_deadline_s)
            # The senders stop before the last flush, so nothing settles after it: idle after a
            # drain; past its deadline, requests still in flight are given up and nothing new
            # goes out (their entries stay pending, so they are redelivered).
            senders = list(self._tasks)
            for t in senders:
                t.cancel()
            if senders:
                _, left = await asyncio.wait(senders, timeout=1.0)
                if left:  # what they settle now is not written: their entries are redelivered
                    log.warning("senders still running after the drain", extra={"senders": len(left)})
            self._flusher_stop = True
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            for t in (mover, janitor):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush(), max(1.0, self.ws.drain_deadline_s))

    async def drain(self, deadline_s: float) -> bool:
        """Wait for in-flight deliveries, at most `deadline_s`; True when all finished.

        Entries still unfinished at the deadline stay pending in Redis: after a restart this
        consumer re-reads them, or the janitor of another worker claims them. Nothing is lost.
        """
        try:
            await asyncio.wait_for(self._idle.wait(), deadline_s)
            return True
        except TimeoutError:
            log.warning("drain deadline reached", extra={"in_flight": self._in_flight})
            return False

    def _lane_room(self) -> int:
        """Deliveries the fullest fast lane may take before its cap. Only a lane that drains its
        backlog within PARK_WAIT_S (or has no rate yet) and is not stalled counts: reading waits
        for it at most that long. A slow or stalled lane is left out: `_start` parks its new
        deliveries, so it holds no read back from the providers that answer."""
        now = time.monotonic()
        fullest = 0
        for lane in self.lanes.values():
            queued = lane.queued
            if queued > fullest and queued <= lane.drain_per_s * PARK_WAIT_S and not lane.stalled(now):
                fullest = queued
        return self._backlog_cap - fullest

    async def _recover_own_pending(self, stop: asyncio.Event) -> None:
        """Entries this consumer read before a crash or restart come first (at-least-once)."""
        for lane in LANES:
            after = "0"
            while not stop.is_set():
                entries = await self.queue.read_own_pending(self.consumer, self.ws.batch_size, lane, after)
                if not entries:
                    break
                after = entries[-1].entry_id
                await self._dispatch(entries)

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
                # Heartbeat: entries still in flight here (a slow provider) must not look abandoned.
                if self._jobs:
                    await self.queue.touch(self.consumer, list(self._jobs))
                for lane in LANES:
                    while self._in_flight < self.ws.max_inflight // 2:
                        claimed = await self.queue.claim_stale(self.consumer, idle_ms, self.ws.batch_size, lane)
                        claimed = [e for e in claimed if e.ref not in self._jobs]
                        if not claimed:
                            break
                        metrics.RECLAIMED.inc(len(claimed))
                        log.info("reclaimed entries of a dead consumer", extra={"count": len(claimed)})
                        await self._dispatch(claimed)
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

    async def _dispatch(self, entries: Sequence[Entry]) -> None:
        """Turn a batch into deliveries (one registry round trip, one done-mark round trip)."""
        now = self.clock()
        decoded: list[tuple[Entry, Message, float | None]] = []  # with each entry's expiry
        for entry in entries:
            try:
                msg = loads_message(entry.raw)
            except (MessageInvalid, ValueError) as e:
                self._dead_letter_raw(entry, f"invalid_message: {e}"[:500])
                continue
            expiry = msg.expiry(entry.enqueued_ms / 1000)
            if expiry is not None and expiry <= now:
                self._expired(msg)
                self._ack(entry)
                continue
            decoded.append((entry, msg, expiry))
        # The policy sees every message with a user. Caps and windows decide a message once, on its
        # first read: an entry read again after a crash or taken over from a dead worker was decided
        # then, and may be partly delivered. Opt-outs are checked on every read (retries and replays
        # too): a learner who opted out meanwhile gets nothing more.
        if decoded:
            decisions = await self.limiter.decide(
                [m for _, m, _ in decoded], now, members=[f"{m.id}:{e.enqueued_ms}" for e, m, _ in decoded],
                first_read=[not e.redelivered for e, _, _ in decoded],
            )
            admitted: list[tuple[Entry, Message, float | None]] = []
            for item, decision in zip(decoded, decisions, strict=True):
                if decision is ADMIT:
                    admitted.append(item)
                    continue
                entry, msg, expiry = item
                match decision:
                    case Defer(until=until):
                        if expiry is not None and until >= expiry:
                            self._expired(msg)  # it could only go out too late
                        else:
                            metrics.SKIPPED.labels("deferred").inc()
                            self._commit.retries.append((until, msg, entry.attempt, entry.enqueued_ms))
                        self._ack(entry)
                    case Drop(reason=reason):
                        metrics.SKIPPED.labels("dropped").inc()
                        self._kpi(msg, "dropped")
                        log.info("dropped by policy", extra={"msg_id": msg.id, "reason": reason})
                        self._ack(entry)
                    case _:
                        admitted.append(item)
            decoded = admitted
        users = sorted({m.user for _, m, _ in decoded if m.user and not m.resolved})
        registry = await self.registry.devices_many(users) if users else {}
        redelivered = [e.ref for e, _, _ in decoded if e.redelivered]
        done = await self.queue.done_marks(redelivered) if redelivered else {}

        for entry, msg, expiry in decoded:
            devices: dict[str, Device] = {d.key: d for d in msg.devices}
            from_registry: frozenset[str] = frozenset()
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
                    self._kpi(msg, "failed")  # a learner with no device: not reached
                self._ack(entry)
                continue
            if ref in self._jobs:
                continue  # already in flight here (claimed back while a provider was slow)
            job = _Job(entry, msg, len(devices), from_registry, expiry, msg.priority == "high")
            self._jobs[ref] = job
            for device in devices.values():
                self._start(job, device)

    def _start(self, job: _Job, device: Device) -> None:
        lane = self.lanes.get(device.provider)
        if lane is None:
            self._settle(job, device, Rejected(f"no {device.provider} provider is configured"), "none")
            return
        high = job.high
        app = device.app or job.message.app
        route = lane.routes.get(app)
        if route is None:
            route = self._new_route(lane, app)
        rate = route[1]
        backlog = lane.queued_high if high else lane.queued
        # A lane held back by its configured rate is not hung: its deliveries wait (backpressure on
        # reading, through max_inflight) instead of cycling through the delayed set. Nor is a lane
        # that drains its backlog within PARK_WAIT_S: under a burst on a healthy provider, parking
        # would only send deliveries around the delayed set (measured: up to 12k parked during a
        # 120k-message `pushgw bench`, each read, decoded and planned twice).
        if (backlog >= self.ws.provider_backlog and not (rate is not None and rate.waiting)
                and (backlog > lane.drain_per_s * PARK_WAIT_S or backlog >= self._backlog_cap
                     or lane.stalled(time.monotonic()))):
            # The provider is not keeping up (slow or hung): park this delivery without spending
            # an attempt, so the worker keeps its capacity for the providers that answer. (High
            # deliveries count only against each other: a bulk backlog never parks a reminder.)
            self._park(job, device, self.clock() + PARK_DELAY_S, "parked")
            return
        if not lane.queued:
            lane.busy_since = time.monotonic()
        lane.queued += 1
        lane.queued_high += high
        self._in_flight += 1
        if self._in_flight == 1:
            self._idle.clear()  # set again when the count is back at 0
        if self._in_flight >= self._limit:
            self._capacity.clear()
        lane.waiting.put((job, device, route[0], app, rate), high)
        while lane.idle:  # wake an idle sender (skipping any cancelled while idle)
            wake = lane.idle.pop()
            if not wake.done():
                wake.set_result(None)
                return
        if lane.senders < lane.concurrency:
            self._add_sender(lane)

    def _add_sender(self, lane: _Lane) -> None:
        lane.senders += 1  # given back by the done callback, even if cancelled before it ran
        task = asyncio.get_running_loop().create_task(self._sender(lane), name=f"sender-{lane.provider.name}")
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._sender_done, lane))

    def _sender_done(self, lane: _Lane, task: asyncio.Task[None]) -> None:
        lane.senders -= 1
        self._tasks.discard(task)
        if not self.stopping and lane.waiting and lane.senders < lane.concurrency:
            # A sender ended while the worker runs (a cancellation not aimed at it escaped): start
            # another, or deliveries waiting in the lane would wait for the next `_start`.
            self._add_sender(lane)

    async def _sender(self, lane: _Lane) -> None:
        """One of a lane's long-lived senders: takes waiting deliveries in priority order."""
        loop = asyncio.get_running_loop()
        while True:
            work = lane.waiting.take()
            if work is None:
                wake = loop.create_future()
                lane.idle.append(wake)
                await wake
                continue
            try:
                await self._deliver(lane, *work)
            except Exception:  # a bug here must not cost the lane a sender
                log.exception("delivery failed", extra={"provider": lane.provider.name})

    def _new_route(self, lane: _Lane, app: str) -> tuple[Circuit, SharedRate | None]:
        """The circuit and the shared rate of a provider/app, looked up once, not per delivery."""
        name = lane.provider.name
        circuit = lane.circuits.get(app)
        if circuit is None:
            circuit = lane.circuits[app] = self._new_circuit(name, app)
        route = lane.routes[app] = (circuit, self.rates.get(f"{name}:{app}") or self.rates.get(name))
        return route

    def _park(self, job: _Job, device: Device, until: float, reason: str) -> None:
        metrics.SKIPPED.labels(reason).inc()
        self._schedule_retry(job, device, until, job.entry.attempt, device.provider)
        self._settled(job, device)

    def _new_circuit(self, provider: str, app: str) -> Circuit:
        ps = self.settings.providers
        circuit = Circuit(threshold=ps.circuit_failures, open_s=ps.circuit_open_s, max_open_s=ps.circuit_max_open_s)
        self._m_circuit[(provider, app)] = metrics.CIRCUIT_STATE.labels(provider, app)
        self._m_circuit[(provider, app)].set(0)
        return circuit

    def _circuit_report(self, provider: str, app: str, circuit: Circuit, outcome: Outcome) -> None:
        before = circuit.state
        if isinstance(outcome, Retry) and (outcome.status is None or outcome.status >= 500):
            if circuit.failure(self.clock()):
                metrics.CIRCUIT_OPENS.labels(provider, app).inc()
                log.warning("circuit opened", extra={"provider": provider, "app": app, "open_s": circuit.current_open_s})
        else:
            circuit.success()  # the provider answered (even a 429 or an error about one token)
            if before is not CircuitState.CLOSED:
                log.info("circuit closed", extra={"provider": provider, "app": app})
        if circuit.state is not before:
            self._m_circuit[(provider, app)].set(int(circuit.state))

    async def _deliver(
        self, lane: _Lane, job: _Job, device: Device, circuit: Circuit, app: str, rate: SharedRate | None
    ) -> None:
        name = lane.provider.name
        outcome: Outcome | None = None
        park: tuple[float, str] | None = None
        high = job.high
        expiry = job.expiry
        try:
            # The circuit is asked when a request could go out (not when the delivery was queued),
            # so deliveries queued behind a failing run are parked, not sent; then the shared rate,
            # so high priority (taken first from the lane) holds when the rate is the bottleneck,
            # and a parked delivery spends no rate.
            if not circuit.allow(self.clock()):
                park = (circuit.retry_at(self.clock()) + self.rng() * PARK_DELAY_S, "circuit_open")
            elif rate is not None and not await self._take_rate(rate):
                park = (self.clock() + PARK_DELAY_S * (1 + self.rng()), "rate_unavailable")
            elif expiry is not None and expiry <= self.clock():
                outcome = _EXPIRED  # it waited past its expiry: never sent late
            else:
                lane.sending += 1
                try:
                    outcome = await lane.provider.send(Delivery(job.message, device, job.entry.attempt, expiry))
                except asyncio.CancelledError:
                    if _cancelling_me():
                        raise  # the worker is stopping this sender
                    # A cancellation from inside the provider (a shared connect it waited on was
                    # cancelled): the request's fate is unknown, so it is retried like a timeout.
                    log.warning("provider request cancelled", extra={"provider": name, "msg_id": job.message.id})
                    outcome = Retry("provider request cancelled")
                except Exception as e:  # a provider bug must not lose the message: retry it
                    log.exception("provider raised", extra={"provider": name, "msg_id": job.message.id})
                    outcome = Retry(f"provider error: {type(e).__name__}")
                finally:
                    lane.sending -= 1
                    lane.finished += 1  # only requests count towards the lane's drain rate
                    lane.last_finish = time.monotonic()
            if park is not None:  # no request went out: come back later, spending no attempt
                self._park(job, device, park[0], park[1])
            elif outcome is _EXPIRED:
                self._expired(job.message)
                self._settled(job, device)
            elif outcome is not None:
                # A closed circuit with no failures stays as it is on anything but a Retry: skip the report.
                if circuit.failures or circuit.state is not CircuitState.CLOSED or isinstance(outcome, Retry):
                    self._circuit_report(name, app, circuit, outcome)
                self._settle(job, device, outcome, name)
        finally:
            lane.queued -= 1
            lane.queued_high -= high
            self._in_flight -= 1
            # `_start` clears capacity only at or above the limit, so it needs setting only on the way
            # down through the limit (the run loop waits for it only while at or above it).
            if self._in_flight == self._limit - 1:
                self._capacity.set()
            if self._in_flight == 0:
                self._idle.set()

    async def _take_rate(self, rate: SharedRate) -> bool:
        """Wait for the shared provider rate; False when Redis cannot say (the delivery is parked)."""
        try:
            await rate.acquire()
            return True
        except asyncio.CancelledError:
            if _cancelling_me():
                raise  # the worker is stopping this sender
            log.warning("provider rate wait cancelled", extra={"provider": rate.scope})
            return False
        except (ConnectionError, OSError, aioredis.RedisError) as e:
            log.warning("provider rate unavailable", extra={"error": type(e).__name__, "provider": rate.scope})
            return False

    # ------------------------------------------------------------------ outcomes

    def _settle(self, job: _Job, device: Device, outcome: Outcome, provider: str) -> None:
        msg, entry = job.message, job.entry
        match outcome:
            case Delivered():
                self._m_held.inc(self._m_delivered[provider])
                self._kpi(msg, "delivered")
                e2e = self._m_e2e.get(provider)
                if e2e is not None:
                    self._m_held.observe(e2e, max(0.0, self.clock() - entry.enqueued_ms / 1000))
                log.debug("delivered", extra={"msg_id": msg.id, "provider": provider, "outcome": "delivered"})
            case Retry(reason=reason, after=after):
                self._m_retry[provider].inc()
                if entry.attempt >= self.ws.max_attempts:
                    self._dead_letter(msg, device, f"max_attempts: {reason}", entry, provider)
                else:
                    delay = backoff_delay(entry.attempt, self.ws.backoff_base_s, self.ws.backoff_cap_s, self.rng)
                    if after is not None:
                        delay = max(delay, after)
                    due = self.clock() + delay
                    if job.expiry is not None and due >= job.expiry:
                        self._expired(msg)
                        log.info("expired before retry", extra={"msg_id": msg.id, "provider": provider})
                    else:
                        self._m_retries[provider].inc()
                        self._schedule_retry(job, device, due, entry.attempt + 1, provider)
            case TokenInvalid(reason=reason):
                self._m_invalid[provider].inc()
                self._m_tokens[provider].inc()
                user = msg.user if (device.key in job.registry_keys or msg.resolved) else None
                self._commit.invalid_tokens.append((user, device, reason))
                self._kpi(msg, "failed")
                log.info("token invalid", extra={"msg_id": msg.id, "provider": provider, "outcome": "token_invalid"})
            case Rejected(reason=reason):
                self._m_rejected[provider].inc()
                self._dead_letter(msg, device, f"rejected: {reason}", entry, provider)
        self._settled(job, device)

    def _schedule_retry(self, job: _Job, device: Device, due: float, attempt: int, provider: str) -> None:
        self._commit.retries.append((due, job.message.with_devices((device,)), attempt, job.entry.enqueued_ms))
        self._bump()

    def _expired(self, msg: Message) -> None:
        metrics.SKIPPED.labels("expired").inc()
        metrics.POLICY.labels(metrics.category_label(msg.category), "expired", "dropped").inc()
        self._kpi(msg, "dropped")

    def _kpi(self, msg: Message, outcome: str) -> None:
        """Campaign figures per learner, written with the acks (campaigns/report.py reads them)."""
        if msg.campaign:
            self._commit.kpi.append((msg.campaign, msg.variant or "default", outcome, msg.user or msg.id))
            self._m_held.inc(metrics.campaign_message(msg.campaign, msg.variant, outcome))

    def _dead_letter(self, msg: Message, device: Device, reason: str, entry: Entry, provider: str) -> None:
        metrics.DEAD_LETTERS.labels(reason.split(":", 1)[0]).inc()
        self._kpi(msg, "failed")
        log.warning("dead letter", extra={"msg_id": msg.id, "provider": provider, "reason": reason})
        self._commit.dead.append(
            DeadLetter(msg.with_devices((device,)), reason, entry.attempt, provider, entry.enqueued_ms)
        )
        self._bump()

    def _dead_letter_raw(self, entry: Entry, reason: str) -> None:
        metrics.DEAD_LETTERS.labels("invalid_message").inc()
        log.warning("poison entry", extra={"entry_id": entry.entry_id, "reason": reason})
        raw = entry.raw[:POISON_KEEP_BYTES]
        self._commit.dead.append(DeadLetter(_POISON, reason, entry.attempt, None, entry.enqueued_ms, raw=raw))
        self._ack(entry)

    def _settled(self, job: _Job, device: Device) -> None:
        """One delivery of `job` is accounted for: the entry is acked with its last one; before that,
        a done mark keeps a redelivery of the entry from sending to this device again."""
        job.pending -= 1
        if job.pending:
            self._commit.done.append((job.entry.ref, device.key))
        else:
            self._jobs.pop(job.entry.ref, None)
            self._ack(job.entry)

    def _ack(self, entry: Entry) -> None:
        self._commit.acks.append(entry.ref)
        self._bump()

    def _bump(self) -> None:
        self._commit_items += 1
        if self._commit_items >= FLUSH_MAX_ITEMS:
            self._flush_wake.set()

    # ------------------------------------------------------------------ flushing

    async def _flusher(self) -> None:
        # Keeps flushing while the worker drains (acks of deliveries finishing then are written within
        # ms, not at the end). It stops on `_flusher_stop`, set before the cancel: on Python 3.11
        # `wait_for` can swallow a cancel that lands as its inner wait completes (gh-86296), so the
        # cancel alone could leave this loop running and the drain waiting for it forever.
        while not self._flusher_stop:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_INTERVAL_S):
                    await self._flush_wake.wait()
            self._flush_wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        """Write everything settled since the last flush in one transaction; keep it on failure.

        Metrics held since the last flush are published first, whether Redis answers or not (this
        runs every FLUSH_INTERVAL_S and once more after the drain)."""
        self._publish_metrics()
        commit = self._commit
        if not (commit.acks or commit.done or commit.retries or commit.dead or commit.invalid_tokens or commit.kpi):
            return
        self._commit = Commit([], [], [], [], [])
        self._commit_items = 0
        if commit.done and commit.acks:
            # An entry acked in this transaction is never read again: its done marks would go unread.
            acked = set(commit.acks)
            commit.done = [d for d in commit.done if d[0] not in acked]
        delay = 0.05
        while True:
            try:
                await self.queue.commit(commit)
                return
            except (ConnectionError, OSError, aioredis.RedisError) as e:
                # Acks and retries must not be dropped: keep trying (the entries stay pending meanwhile).
                log.warning("commit failed, retrying", extra={"error": type(e).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                self._publish_metrics()  # deliveries settling meanwhile are still counted

    def _publish_metrics(self) -> None:
        """Held counters and histograms, the in-flight gauge from the lanes' own counts, and each
        lane's drain rate (a monotonic clock: a wall-clock step must not fake a fast or hung lane)."""
        self._m_held.apply()
        now = time.monotonic()
        interval, self._published_at = now - self._published_at, now
        for lane in self.lanes.values():
            # The rate counts only time the lane had work (sampled at each flush): a lane that is
            # idle part of the time must not look slow, and an idle lane keeps the rate it showed.
            if lane.queued:
                lane.busy_s += interval
            if lane.busy_s >= DRAIN_WINDOW_S:
                lane.drain_per_s = lane.finished / lane.busy_s
                lane.finished = 0
                lane.busy_s = 0.0
        for name, lane in self.lanes.items():
            if lane.sending != self._m_inflight_shown[name]:
                self._m_inflight[name].set(lane.sending)
                self._m_inflight_shown[name] = lane.sending


_POISON = Message(id="poison", body="(entry could not be decoded)")
_EXPIRED = Rejected("expired while waiting")  # sentinel outcome: settled as expired, never sent


def _cancelling_me() -> bool:
    """Whether the CancelledError being handled is aimed at the current task (the worker stopping
    a sender), not one that escaped from an awaited operation someone else cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def _sleep_or(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _wait_either(a: asyncio.Event, b: asyncio.Event) -> None:
    ta = asyncio.ensure_future(a.wait())
    tb = asyncio.ensure_future(b.wait())
    _, pending = await asyncio.wait({ta, tb}, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
