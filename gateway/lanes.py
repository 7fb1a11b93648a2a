"""Provider lanes: each delivery waits in its provider's lane until one of the lane's senders sends it.

A lane is a `LaneQueue` (gateway/lanequeue.py) that serves high-priority deliveries first, drained
by `providers.concurrency` long-lived sender coroutines, which bound requests in flight per
provider. A sender asks the circuit, then the shared provider rate if configured, then sends, and
hands the outcome to the settler (gateway/settle.py).

Flow control, across lanes:
- at most `max_inflight + high_reserve` deliveries are in flight in the worker (`capacity`);
- a lane too far behind (a slow or hung provider) parks new deliveries in the delay set instead of
  letting them fill the worker, so one provider never stalls the others: over `provider_backlog`,
  a lane parks when it would not drain its backlog within PARK_WAIT_S at its measured rate, when
  nothing finished for STALL_S since it became busy, or at the backlog cap;
- `room` tells the read loop how much a fast lane may still take, so a burst on a healthy
  provider waits in the stream instead of being parked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, ItemsView, Mapping, ValuesView
from dataclasses import dataclass, field
from typing import NamedTuple

import redis.asyncio as aioredis

from ..core import metrics
from ..core.config import Settings
from ..core.schema import Device
from ..providers.base import Delivery, Outcome, Provider, Rejected, Retry
from ..ratelimit.circuit import Circuit
from ..ratelimit.circuit import State as CircuitState
from ..ratelimit.provider_rate import SharedRate
from .lanequeue import LaneQueue
from .settle import Job, Settler
from .worker_metrics import WorkerMetrics

log = logging.getLogger("pushgw.worker")

PARK_DELAY_S = 1.0  # how long a delivery for a saturated provider waits before it is tried again
PARK_WAIT_S = 2.0  # a lane over its backlog parks only if its backlog takes longer than this to drain
DRAIN_WINDOW_S = 0.25  # each lane's drain rate is measured over this much busy time
# A lane over its backlog whose last request finished longer ago than this parks whatever its last
# measured rate: a provider that just hung must not fill the worker before its next rate window.
STALL_S = 0.25


@dataclass(frozen=True, slots=True)
class Route:
    """Where a provider/app's deliveries go through: its circuit and its shared rate (if configured)."""

    app: str
    circuit: Circuit
    rate: SharedRate | None


class Work(NamedTuple):
    """A delivery waiting in its lane."""

    job: Job
    device: Device
    route: Route


@dataclass(slots=True)
class Lane:
    """Per provider: deliveries wait in `waiting` until one of at most `concurrency` senders takes
    them; `queued` counts them from `Lanes.start` until settled (waiting or sending)."""

    provider: Provider
    waiting: LaneQueue[Work]
    concurrency: int
    senders: int = 0  # sender coroutines started (they live until the worker stops)
    idle_senders: list[asyncio.Future[None]] = field(default_factory=list)  # senders waiting for work
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
    routes: dict[str, Route] = field(default_factory=dict)  # app -> route

    def stalled(self, now: float) -> bool:
        """Nothing finished for STALL_S since the lane became busy (a lane idle for a while is not
        hung just because its last answer is old)."""
        return now - max(self.last_finish, self.busy_since) > STALL_S

    def measure(self, interval: float) -> None:
        """Count `interval` (sampled at each flush) towards the drain rate. Only time the lane had work
        counts: a lane idle part of the time must not look slow, and an idle lane keeps its rate."""
        if self.queued:
            self.busy_s += interval
        if self.busy_s >= DRAIN_WINDOW_S:
            self.drain_per_s = self.finished / self.busy_s
            self.finished = 0
            self.busy_s = 0.0


class Lanes:
    """The worker's lanes, by provider name, and the flow control across them."""

    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        settler: Settler,
        worker_metrics: WorkerMetrics,
        *,
        rates: Mapping[str, SharedRate],
        clock: Callable[[], float],
        rng: Callable[[], float],
    ) -> None:
        ws, self._ps = settings.worker, settings.providers
        self.by_provider = {
            name: Lane(p, LaneQueue(ws.high_weight), self._ps.concurrency) for name, p in providers.items()
        }
        self.in_flight = 0  # deliveries, across lanes
        self.limit = ws.max_inflight + ws.high_reserve  # in flight at most (with the high reserve)
        # Whatever its measured rate, one lane never holds more than this: a provider that hangs right
        # after answering is seen only after STALL_S, and the others must keep room meanwhile.
        self.backlog_cap = max(ws.provider_backlog, ws.max_inflight * 3 // 4)
        self._provider_backlog = ws.provider_backlog
        self.capacity = asyncio.Event()  # clear while `limit` deliveries are in flight
        self.capacity.set()
        self.idle = asyncio.Event()  # set while nothing is in flight
        self.idle.set()
        self.tasks: set[asyncio.Task[None]] = set()  # the lanes' senders
        self.stopping = False  # set when the worker stops: a sender that ends is not replaced
        self._rates = rates  # "fcm" or "fcm:<app>" -> shared provider rate
        self._clock = clock
        self._rng = rng
        self._metrics = worker_metrics
        self._measured_at = time.monotonic()
        self._settle = settler.settle
        self._settled = settler.settled
        self._park = settler.park
        self._expired = settler.expired

    def __getitem__(self, provider: str) -> Lane:
        return self.by_provider[provider]

    def items(self) -> ItemsView[str, Lane]:
        return self.by_provider.items()

    def values(self) -> ValuesView[Lane]:
        return self.by_provider.values()

    def room(self) -> int:
        """Deliveries the fullest fast lane may take before its cap. Only a lane that drains its
        backlog within PARK_WAIT_S (or has no rate yet) and is not stalled counts: reading waits
        for it at most that long. A slow or stalled lane is left out: `start` parks its new
        deliveries, so it holds no read back from the providers that answer."""
        now = time.monotonic()
        fullest = 0
        for lane in self.by_provider.values():
            queued = lane.queued
            if queued > fullest and queued <= lane.drain_per_s * PARK_WAIT_S and not lane.stalled(now):
                fullest = queued
        return self.backlog_cap - fullest

    def measure(self) -> None:
        """Each lane's drain rate (a monotonic clock: a wall-clock step must not fake a fast or hung
        lane) and the in-flight gauges from the lanes' own counts; called at each flush."""
        now = time.monotonic()
        interval, self._measured_at = now - self._measured_at, now
        for lane in self.by_provider.values():
            lane.measure(interval)
        show = self._metrics.show_in_flight
        for name, lane in self.by_provider.items():
            show(name, lane.sending)

    async def stop_senders(self) -> None:
        """Cancel the senders and wait for them (at most 1 s): requests still in flight are given up,
        and what they would settle now is not written, so their entries stay pending and are redelivered."""
        senders = list(self.tasks)
        for t in senders:
            t.cancel()
        if senders:
            _, left = await asyncio.wait(senders, timeout=1.0)
            if left:
                log.warning("senders still running after the drain", extra={"senders": len(left)})

    # ------------------------------------------------------------------ into a lane

    def start(self, job: Job, device: Device) -> None:
        """Queue one delivery in its provider's lane, or park it when the lane is not keeping up."""
        lane = self.by_provider.get(device.provider)
        if lane is None:
            self._settle(job, device, Rejected(f"no {device.provider} provider is configured"), "none")
            return
        high = job.high
        app = device.app or job.message.app
        route = lane.routes.get(app)
        if route is None:
            route = self._new_route(lane, app)
        rate = route.rate
        backlog = lane.queued_high if high else lane.queued
        # A lane held back by its configured rate is not hung: its deliveries wait (backpressure on
        # reading, through max_inflight) instead of cycling through the delayed set. Nor is a lane
        # that drains its backlog within PARK_WAIT_S: under a burst on a healthy provider, parking
        # would only send deliveries around the delayed set, each read, decoded and planned twice.
        if (backlog >= self._provider_backlog and not (rate is not None and rate.waiting)
                and (backlog > lane.drain_per_s * PARK_WAIT_S or backlog >= self.backlog_cap
                     or lane.stalled(time.monotonic()))):
            # The provider is not keeping up (slow or hung): park this delivery without spending
            # an attempt, so the worker keeps its capacity for the providers that answer. (High
            # deliveries count only against each other: a bulk backlog never parks a reminder.)
            self._park(job, device, self._clock() + PARK_DELAY_S, "parked")
            return
        if not lane.queued:
            lane.busy_since = time.monotonic()
        lane.queued += 1
        lane.queued_high += high
        self.in_flight += 1
        if self.in_flight == 1:
            self.idle.clear()  # set again when the count is back at 0
        if self.in_flight >= self.limit:
            self.capacity.clear()
        lane.waiting.put(Work(job, device, route), high)
        while lane.idle_senders:  # wake an idle sender (skipping any cancelled while idle)
            wake = lane.idle_senders.pop()
            if not wake.done():
                wake.set_result(None)
                return
        if lane.senders < lane.concurrency:
            self._add_sender(lane)

    def _new_route(self, lane: Lane, app: str) -> Route:
        """The circuit and the shared rate of a provider/app, looked up once, not per delivery."""
        name = lane.provider.name
        circuit = lane.circuits.get(app)
        if circuit is None:
            ps = self._ps
            circuit = Circuit(threshold=ps.circuit_failures, open_s=ps.circuit_open_s, max_open_s=ps.circuit_max_open_s)
            lane.circuits[app] = circuit
            self._metrics.circuit_created(name, app)
        route = lane.routes[app] = Route(app, circuit, self._rates.get(f"{name}:{app}") or self._rates.get(name))
        return route

    # ------------------------------------------------------------------ senders

    def _add_sender(self, lane: Lane) -> None:
        lane.senders += 1  # given back by the done callback, even if cancelled before it ran
        task = asyncio.get_running_loop().create_task(self._sender(lane), name=f"sender-{lane.provider.name}")
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._sender_done, lane))

    def _sender_done(self, lane: Lane, task: asyncio.Task[None]) -> None:
        lane.senders -= 1
        self.tasks.discard(task)
        if not self.stopping and lane.waiting and lane.senders < lane.concurrency:
            # A sender ended while the worker runs (a cancellation not aimed at it escaped): start
            # another, or deliveries waiting in the lane would wait for the next `start`.
            self._add_sender(lane)

    async def _sender(self, lane: Lane) -> None:
        """One of a lane's long-lived senders: takes waiting deliveries in priority order."""
        loop = asyncio.get_running_loop()
        take = lane.waiting.take
        deliver = self._deliver
        while True:
            work = take()
            if work is None:
                wake = loop.create_future()
                lane.idle_senders.append(wake)
                await wake
                continue
            try:
                await deliver(lane, *work)
            except Exception:  # a bug here must not cost the lane a sender
                log.exception("delivery failed", extra={"provider": lane.provider.name})

    async def _deliver(self, lane: Lane, job: Job, device: Device, route: Route) -> None:
        name = lane.provider.name
        circuit = route.circuit
        rate = route.rate
        outcome: Outcome | None = None
        park_until = 0.0
        park_reason: str | None = None
        high = job.high
        expiry = job.expiry
        try:
            # The circuit is asked when a request could go out (not when the delivery was queued),
            # so deliveries queued behind a failing run are parked, not sent; then the shared rate,
            # so high priority (taken first from the lane) holds when the rate is the bottleneck,
            # and a parked delivery spends no rate.
            now = self._clock()
            if not circuit.allow(now):
                park_until, park_reason = circuit.retry_at(now) + self._rng() * PARK_DELAY_S, "circuit_open"
            elif rate is not None and not await self._take_rate(rate):
                park_until, park_reason = self._clock() + PARK_DELAY_S * (1 + self._rng()), "rate_unavailable"
            elif expiry is not None and expiry <= (now if rate is None else self._clock()):  # after a rate wait: now
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
            if park_reason is not None:  # no request went out: come back later, spending no attempt
                self._park(job, device, park_until, park_reason)
            elif outcome is _EXPIRED:
                self._expired(job.message)
                self._settled(job, device)
            elif outcome is not None:
                # A closed circuit with no failures stays as it is on anything but a Retry: skip the report.
                if circuit.failures or circuit.state is not CircuitState.CLOSED or isinstance(outcome, Retry):
                    self._circuit_report(name, route.app, circuit, outcome)
                self._settle(job, device, outcome, name)
        finally:
            lane.queued -= 1
            lane.queued_high -= high
            self.in_flight -= 1
            # `start` clears capacity only at or above the limit, so it needs setting only on the way
            # down through the limit (the run loop waits for it only while at or above it).
            if self.in_flight == self.limit - 1:
                self.capacity.set()
            if self.in_flight == 0:
                self.idle.set()

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

    def _circuit_report(self, provider: str, app: str, circuit: Circuit, outcome: Outcome) -> None:
        before = circuit.state
        if isinstance(outcome, Retry) and (outcome.status is None or outcome.status >= 500):
            if circuit.failure(self._clock()):
                metrics.CIRCUIT_OPENS.labels(provider, app).inc()
                log.warning("circuit opened", extra={"provider": provider, "app": app, "open_s": circuit.current_open_s})
        else:
            circuit.success()  # the provider answered (even a 429 or an error about one token)
            if before is not CircuitState.CLOSED:
                log.info("circuit closed", extra={"provider": provider, "app": app})
        if circuit.state is not before:
            self._metrics.circuit_state(provider, app, int(circuit.state))


_EXPIRED = Rejected("expired while waiting")  # sentinel outcome: settled as expired, never sent


def _cancelling_me() -> bool:
    """Whether the CancelledError being handled is aimed at the current task (the worker stopping
    a sender), not one that escaped from an awaited operation someone else cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
