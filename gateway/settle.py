"""Settling: each delivery's typed outcome becomes writes, and every few ms the writes go out in one transaction.

An outcome becomes a done mark, a retry with backoff and full jitter (never before the provider's
Retry-After), an invalid-token removal and event, or a dead letter. Those and the acks of finished
entries collect in a `Commit` (queue/streams.py) that the flusher writes in one MULTI/EXEC every
FLUSH_INTERVAL_S, or sooner once FLUSH_MAX_ITEMS are waiting. A failed commit is kept and tried
again: acks and retries are never dropped, and the entries stay pending meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter

from ..core import metrics
from ..core.config import WorkerSettings
from ..core.schema import Device, Message
from ..providers.base import Delivered, Outcome, Rejected, Retry, TokenInvalid
from ..queue.keys import Keys
from ..queue.streams import Commit, DeadLetter, Entry, StreamQueue
from .tracking import Tracker
from .worker_metrics import WorkerMetrics

log = logging.getLogger("pushgw.worker")

FLUSH_INTERVAL_S = 0.005
FLUSH_MAX_ITEMS = 512
KPI_SERIES_CACHED = 4096  # (campaign, variant, stored, outcome) -> KpiSeries, computed once per campaign
POISON_KEEP_BYTES = 16384  # a poison entry is kept in the dead letters up to this size (it could be anything)


def backoff_delay(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))] (AWS architecture blog's best spread)."""
    return rng() * min(cap, base * 2.0 ** (attempt - 1))


@dataclass(slots=True)
class Job:
    """One stream entry in flight: acked when its last delivery settles."""

    entry: Entry
    message: Message
    pending: int
    registry_keys: frozenset[str] = frozenset()  # device keys that came from the user's registry
    expiry: float | None = None  # message.expiry(...) of this entry, computed once
    high: bool = False  # priority "high"
    # Status (gateway/tracking.py): when the worker took it and the devices it sends to, until its in_flight step
    # is written (then 0); 0 when status is off.
    started_ms: int = 0
    devices: Collection[Device] = ()


@dataclass(frozen=True, slots=True)
class KpiSeries:
    """Where a campaign/variant's outcome goes: its figures' name in Redis, its variant, its metric child."""

    figures: str
    variant: str
    counter: Counter


class Settler:
    """Collects what settled since the last flush and writes it; `jobs` holds the entries in flight."""

    def __init__(
        self,
        queue: StreamQueue,
        settings: WorkerSettings,
        worker_metrics: WorkerMetrics,
        *,
        publish: Callable[[], None],
        clock: Callable[[], float],
        rng: Callable[[], float],
        categories: frozenset[str] = frozenset({"general"}),
    ) -> None:
        self.queue = queue
        self._categories = categories  # the metric label values of categories (PolicySettings.labelled_categories)
        self.commit = Commit()
        self.writing: Commit | None = None  # the commit `flush` is writing, until Redis has it
        self.jobs: dict[str, Job] = {}  # entry ref -> job, while any of its deliveries is unsettled
        self._items = 0  # writes in `commit`, towards FLUSH_MAX_ITEMS
        self._wake = asyncio.Event()
        self._stop = False
        self._publish = publish
        self._clock = clock
        self._rng = rng
        self._max_attempts = settings.max_attempts
        self._backoff_base_s = settings.backoff_base_s
        self._backoff_cap_s = settings.backoff_cap_s
        m = worker_metrics
        self._held = m.held
        self._delivered, self._retry, self._invalid, self._rejected = m.delivered, m.retry, m.token_invalid, m.rejected
        self._retries, self._tokens, self._e2e = m.retries, m.tokens_removed, m.end_to_end
        self._kpi_series: dict[tuple[str, str | None, bool, str], KpiSeries] = {}
        self.track: Tracker | None = None  # message status and outcome events (gateway/tracking.py), when on

    # ------------------------------------------------------------------ outcomes

    def settle(self, job: Job, device: Device, outcome: Outcome, provider: str) -> None:
        msg, entry = job.message, job.entry
        track = self.track
        match outcome:
            case Delivered(provider_id=provider_id):
                self._held.inc(self._delivered[provider])
                if track is not None:
                    track.final("delivered", msg, device, provider, entry.attempt, provider_id=provider_id)
                if msg.campaign:  # `kpi` checks it too; asked here, most deliveries skip the call
                    self.kpi(msg, "delivered")
                e2e = self._e2e.get(provider)
                if e2e is not None:
                    self._held.observe(e2e, max(0.0, self._clock() - entry.enqueued_ms / 1000))
                if log.isEnabledFor(logging.DEBUG):  # its fields are not built per delivery when off
                    log.debug("delivered", extra={"msg_id": msg.id, "provider": provider, "outcome": "delivered"})
            case Retry(reason=reason, after=after):
                self._retry[provider].inc()
                if entry.attempt >= self._max_attempts:
                    self._dead_letter(msg, device, f"max_attempts: {reason}", entry, provider)
                else:
                    delay = backoff_delay(entry.attempt, self._backoff_base_s, self._backoff_cap_s, self._rng)
                    if after is not None:
                        delay = max(delay, after)
                    due = self._clock() + delay
                    if job.expiry is not None and due >= job.expiry:
                        self.expired(msg, device, provider, entry.attempt)
                        log.info("expired before retry", extra={"msg_id": msg.id, "provider": provider})
                    else:
                        self._retries[provider].inc()
                        self._schedule_retry(job, device, due, entry.attempt + 1)
                        if track is not None:
                            track.retrying(msg, device, provider, entry.attempt + 1, due, reason)
            case TokenInvalid(reason=reason):
                self._invalid[provider].inc()
                self._tokens[provider].inc()
                user = msg.user if (device.key in job.registry_keys or msg.resolved) else None
                self.commit.invalid_tokens.append((user, device, reason))
                self.kpi(msg, "failed")
                if track is not None:
                    track.final("token_invalid", msg, device, provider, entry.attempt, reason)
                log.info("token invalid", extra={"msg_id": msg.id, "provider": provider, "outcome": "token_invalid"})
            case Rejected(reason=reason):
                self._rejected[provider].inc()
                self._dead_letter(msg, device, f"rejected: {reason}", entry, provider)
        self.settled(job, device)

    def park(self, job: Job, device: Device, until: float, reason: str) -> None:
        """No request went out: the delivery comes back at `until`, spending no attempt."""
        metrics.SKIPPED.labels(reason).inc()
        self._schedule_retry(job, device, until, job.entry.attempt)
        self.settled(job, device)

    def defer(self, entry: Entry, msg: Message, until: float) -> None:
        """The policy put the whole entry off until `until`: it comes back then as it is, and is acked now."""
        self.commit.retries.append((until, msg, entry.attempt, entry.enqueued_ms))
        self.ack(entry)

    def expired(self, msg: Message, device: Device | None = None, provider: str = "", attempt: int = 0) -> None:
        if self.track is not None:
            self.track.final("expired", msg, device, provider, attempt)
        metrics.SKIPPED.labels("expired").inc()
        metrics.POLICY.labels(metrics.category_label(msg.category, self._categories), "expired", "dropped").inc()
        self.kpi(msg, "dropped")

    def kpi(self, msg: Message, outcome: str) -> None:
        """Campaign figures per learner, written with the acks (campaigns/report.py reads them)."""
        campaign = msg.campaign
        if campaign:
            key = (campaign, msg.variant, msg.fanout, outcome)
            figures = self._kpi_series.get(key)
            if figures is None:
                if len(self._kpi_series) >= KPI_SERIES_CACHED:
                    self._kpi_series.clear()
                figures = self._kpi_series[key] = KpiSeries(
                    campaign if msg.fanout else Keys.upstream_campaign(campaign), msg.variant or "default",
                    metrics.campaign_message(campaign, msg.variant, outcome, stored=msg.fanout))
            self.commit.kpi.append((figures.figures, figures.variant, outcome, msg.user or msg.id))
            self._held.inc(figures.counter)

    def dead_letter_raw(self, entry: Entry, reason: str) -> None:
        """An entry that could not be decoded: dead-lettered with the start of its bytes, and acked."""
        metrics.DEAD_LETTERS.labels("invalid_message").inc()
        log.warning("poison entry", extra={"entry_id": entry.entry_id, "reason": reason})
        raw = entry.raw[:POISON_KEEP_BYTES]
        self.commit.dead.append(DeadLetter(_POISON, reason, entry.attempt, None, entry.enqueued_ms, raw=raw))
        self.ack(entry)

    def settled(self, job: Job, device: Device) -> None:
        """One delivery of `job` is accounted for: the entry is acked with its last one; before that,
        a done mark keeps a redelivery of the entry from sending to this device again."""
        job.pending -= 1
        if job.pending:
            self.commit.done.append((job.entry.ref, device.key))
        else:
            self.jobs.pop(job.entry.ref, None)
            self.ack(job.entry)

    def unwritten_acks(self) -> set[str]:
        """Entries finished here whose acks Redis does not have yet: still pending in the group, and
        idle there, but not abandoned (the janitor must not claim them back)."""
        acks = set(self.commit.acks)
        if self.writing is not None:
            acks.update(self.writing.acks)
        return acks

    def ack(self, entry: Entry) -> None:
        self.commit.acks.append(entry.ref)
        self._items += 1  # `_bump`, written out: once per entry
        if self._items >= FLUSH_MAX_ITEMS:
            self._wake.set()

    def _schedule_retry(self, job: Job, device: Device, due: float, attempt: int) -> None:
        self.commit.retries.append((due, job.message.with_devices((device,)), attempt, job.entry.enqueued_ms))
        self._bump()

    def _dead_letter(self, msg: Message, device: Device, reason: str, entry: Entry, provider: str) -> None:
        metrics.DEAD_LETTERS.labels(reason.split(":", 1)[0]).inc()
        self.kpi(msg, "failed")
        if self.track is not None:
            self.track.final("dead_lettered", msg, device, provider, entry.attempt, reason)
        log.warning("dead letter", extra={"msg_id": msg.id, "provider": provider, "reason": reason})
        self.commit.dead.append(
            DeadLetter(msg.with_devices((device,)), reason, entry.attempt, provider, entry.enqueued_ms)
        )
        self._bump()

    def _bump(self) -> None:
        self._items += 1
        if self._items >= FLUSH_MAX_ITEMS:
            self._wake.set()

    # ------------------------------------------------------------------ flushing

    async def flush_until_stopped(self) -> None:
        """Flush every FLUSH_INTERVAL_S (sooner when FLUSH_MAX_ITEMS are waiting) until `stop_flushing`.

        It keeps flushing while the worker drains, so acks of deliveries finishing then are written
        within ms, not at the end. The loop ends on the flag, set before the task is cancelled: on
        Python 3.11 `wait_for` can swallow a cancel that lands as its inner wait completes (gh-86296),
        so the cancel alone could leave this loop running and the drain waiting for it forever."""
        while not self._stop:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_INTERVAL_S):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()

    def stop_flushing(self) -> None:
        self._stop = True

    async def flush(self) -> None:
        """Write everything settled since the last flush in one transaction; keep it on failure.

        Metrics held since the last flush are published first (`publish`), whether Redis answers or
        not: this runs every FLUSH_INTERVAL_S and once more after the drain."""
        self._publish()
        if self.track is not None:
            self.track.due_in_flight(self.commit, self.jobs.values())
        commit = self.commit
        if not commit:
            return
        self.commit = Commit()
        self._items = 0
        if commit.done and commit.acks:
            # An entry acked in this transaction is never read again: its done marks would go unread.
            acked = set(commit.acks)
            commit.done = [d for d in commit.done if d[0] not in acked]
        delay = 0.05
        self.writing = commit
        try:
            while True:
                try:
                    await self.queue.commit(commit)
                    return
                except (ConnectionError, OSError, aioredis.RedisError) as e:
                    # Acks and retries must not be dropped: keep trying (the entries stay pending meanwhile).
                    log.warning("commit failed, retrying", extra={"error": type(e).__name__})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    self._publish()  # deliveries settling meanwhile are still counted
        finally:
            self.writing = None


_POISON = Message(id="poison", body="(entry could not be decoded)")
