"""Prometheus metrics, valid across several worker processes.

prometheus-client reads PROMETHEUS_MULTIPROC_DIR when it is imported, so the CLI sets it (to a
fresh folder per gateway run) before this module is imported anywhere. In that mode every process
writes its samples to files and /metrics aggregates them. Label children are cached by callers on
the hot path: `.labels()` costs a dict lookup and a lock each time.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

ENQUEUED = Counter("pushgw_enqueued_total", "Messages accepted into the queue", ["source"])
DUPLICATES = Counter("pushgw_enqueue_duplicates_total", "Enqueues ignored because the message id was seen")
DELIVERIES = Counter(
    "pushgw_deliveries_total",
    "Delivery attempts by provider and outcome (delivered, retry, token_invalid, rejected)",
    ["provider", "outcome"],
)
PROVIDER_LATENCY = Histogram(
    "pushgw_provider_request_seconds", "Time of one provider request", ["provider"], buckets=_LATENCY_BUCKETS
)
END_TO_END = Histogram(
    "pushgw_enqueue_to_delivered_seconds",
    "Time from enqueue to the provider accepting the push",
    ["provider"],
    buckets=_E2E_BUCKETS,
)
RETRIES = Counter("pushgw_retries_scheduled_total", "Deliveries scheduled for another attempt", ["provider"])
DEAD_LETTERS = Counter("pushgw_dead_letters_total", "Deliveries moved to the dead-letter stream", ["reason"])
INVALID_TOKENS = Counter("pushgw_invalid_tokens_total", "Device tokens found gone and removed", ["provider"])
SKIPPED = Counter(
    "pushgw_deliveries_skipped_total",
    "Deliveries not sent: already done before a redelivery, expired, or no device",
    ["reason"],
)
IN_FLIGHT = Gauge(
    "pushgw_deliveries_in_flight", "Deliveries being sent now", ["provider"], multiprocess_mode="livesum"
)
STREAM_LAG = Gauge(
    "pushgw_stream_lag_entries", "Entries in the stream not yet read by the group", multiprocess_mode="max"
)
STREAM_LAG_HIGH = Gauge(
    "pushgw_stream_lag_high_entries", "Entries in the high lane not yet read by the group", multiprocess_mode="max"
)
STREAM_PENDING = Gauge(
    "pushgw_stream_pending_entries", "Entries read but not yet acknowledged", multiprocess_mode="max"
)
DELAYED = Gauge(
    "pushgw_delayed_entries", "Scheduled, deferred and retried messages waiting for their time", multiprocess_mode="max"
)
DLQ_LENGTH = Gauge("pushgw_dead_letter_entries", "Entries in the dead-letter stream", multiprocess_mode="max")
CIRCUIT_STATE = Gauge(
    "pushgw_circuit_state",
    "Circuit per provider and app: 0 closed, 1 half-open (probing), 2 open (deliveries parked)",
    ["provider", "app"],
    multiprocess_mode="max",
)
CIRCUIT_OPENS = Counter("pushgw_circuit_opens_total", "Times a provider circuit opened", ["provider", "app"])
POLICY = Counter(
    "pushgw_policy_decisions_total",
    "Messages held back by delivery policy, by category, rule (cap, burst, window, opt_out, expired) "
    "and action (deferred, dropped)",
    ["category", "rule", "action"],
)
PROVIDER_RATE_WAITS = Counter(
    "pushgw_provider_rate_waits_total",
    "Times a worker waited for the shared provider rate ([policy.provider_rates]), by scope",
    ["scope"],
)
SCHEDULED = Counter("pushgw_scheduled_total", "Messages accepted with a send_at in the future", ["source"])

def category_label(category: str, configured: frozenset[str]) -> str:
    """Categories come from upstream input: a label value only for a category the configuration names
    (`PolicySettings.labelled_categories`), every other as "other", so callers can neither blow up the series count
    nor take the label values of the configured categories."""
    return category if category in configured else "other"
CAMPAIGN_MESSAGES = Counter(
    "pushgw_campaign_messages_total",
    "Campaign messages settled by the workers, by campaign, variant and outcome (delivered, failed, dropped); "
    "stored campaigns' fan-out messages by campaign and variant, upstream-labelled ones as \"other\"",
    ["campaign", "variant", "outcome"],
)
CAMPAIGN_EVENTS = Counter(
    "pushgw_campaign_events_total",
    "App events counted for campaigns (opened, converted, dismissed, opt_out), same label bounds",
    ["campaign", "variant", "type"],
)
AUTOMATIONS = Counter(
    "pushgw_automation_events_total",
    "Automation rule outcomes: triggered (fired for a learner and entity), control (held out), repeated (already "
    "fired for that entity), failed (could not render), queued (messages), withdrawn and rescheduled (session "
    "reminders); `rule` is a stored rule's id (at most automations.rules.MAX_RULES of them)",
    ["rule", "outcome"],
)


def campaign_labels(campaign: str, variant: str | None, *, stored: bool) -> tuple[str, str]:
    """Label values only for a stored campaign and its variants (a fan-out message, or an event checked against
    the stored campaign); a label from upstream input is ("other", "other"), so a stream of one-off names can
    neither blow up the series count nor take a stored campaign's values (the exact figures are in Redis)."""
    if not stored:
        return "other", "other"
    return campaign, variant or "default"


_campaign_children: dict[tuple[str, str, str], Counter] = {}


def campaign_message(campaign: str, variant: str | None, outcome: str, *, stored: bool) -> Counter:
    """The cached `CAMPAIGN_MESSAGES` child (the worker counts every campaign delivery: no `.labels()` each time)."""
    key = (*campaign_labels(campaign, variant, stored=stored), outcome)
    child = _campaign_children.get(key)
    if child is None:
        child = _campaign_children[key] = CAMPAIGN_MESSAGES.labels(*key)
    return child


API_REQUESTS = Counter("pushgw_api_requests_total", "HTTP API requests by route and status", ["route", "status"])
API_REJECTED = Counter(
    "pushgw_api_rejected_total",
    "HTTP requests and connections refused before any route: malformed HTTP, read timeouts, connection cap",
    ["reason"],  # one of gateway/api/server.py's REASONS
)
RECLAIMED = Counter("pushgw_reclaimed_entries_total", "Pending entries taken over from a dead consumer")
WEBHOOK_POSTS = Counter(
    "pushgw_webhook_posts_total",
    "Webhook POSTs by subscription and outcome: ok, retry (5xx, 429, 408, timeout, connection error), "
    "refused (other 4xx, a refused address), dead_letter (a batch given up after webhooks.max_attempts)",
    ["subscription", "outcome"],
)
WEBHOOK_EVENTS = Counter("pushgw_webhook_events_total", "Outcome events delivered to a webhook (2xx)", ["subscription"])
WEBHOOK_LATENCY = Histogram(
    "pushgw_webhook_request_seconds", "Time of one webhook POST", ["subscription"], buckets=_LATENCY_BUCKETS
)
WEBHOOK_FAILING_SINCE = Gauge(
    "pushgw_webhook_failing_since_seconds",
    "Unix time of the first failed POST of a subscription's current failing run; 0 while its POSTs succeed",
    ["subscription"],
    multiprocess_mode="max",
)
WEBHOOK_LAG = Gauge(
    "pushgw_webhook_lag_entries",
    "Outcome event stream entries (one per worker commit) a subscription has not read or acknowledged yet",
    ["subscription"],
    multiprocess_mode="max",
)
OUTCOME_EVENTS_LENGTH = Gauge(
    "pushgw_outcome_events_entries", "Entries in the outcome event stream (MAXLEN ~ status.events_maxlen)",
    multiprocess_mode="max",
)


class Deferred:
    """Counter increments and histogram observations held until `apply` (the worker's flush, every few ms).

    In multiprocess mode every `inc` takes a lock, checks the pid and writes an mmap (an observation
    does it twice): per delivery that was several percent of a worker's CPU. Held here, each series
    costs one write per flush instead. Pass label children (`.labels(...)`), not parent metrics."""

    __slots__ = ("_counts", "_hists")

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        # histogram child -> (its upper bounds, a count per bucket then the sum as the last item)
        self._hists: dict[Any, tuple[list[float], list[float]]] = {}

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        self._counts[counter] = self._counts.get(counter, 0.0) + amount

    def observe(self, histogram: Any, value: float) -> None:
        held = self._hists.get(histogram)
        if held is None:
            bounds = getattr(histogram, "_upper_bounds", None)
            if bounds is None or not hasattr(histogram, "_buckets") or not hasattr(histogram, "_sum"):
                histogram.observe(value)  # a prometheus_client whose internals differ: not deferred
                return
            held = self._hists[histogram] = (bounds, [0.0] * (len(bounds) + 1))
        bounds, acc = held
        i = bisect_left(bounds, value)  # the first bucket with value <= bound, as `Histogram.observe` picks it
        if i < len(bounds):
            acc[i] += 1
        acc[-1] += value

    def apply(self) -> None:
        """Write what was held to the metrics; a no-op when nothing was."""
        if self._counts:
            counts, self._counts = self._counts, {}
            for counter, amount in counts.items():
                counter.inc(amount)
        if self._hists:
            hists, self._hists = self._hists, {}
            for histogram, (_, acc) in hists.items():
                histogram._sum.inc(acc[-1])
                buckets = histogram._buckets
                for i in range(len(acc) - 1):
                    if acc[i]:
                        buckets[i].inc(acc[i])


HOLD_S = 0.005  # how long `HELD` keeps what it holds


class AutoDeferred(Deferred):
    """A `Deferred` that writes itself HOLD_S after the first value it holds, on the running event
    loop: for code with no flush of its own (the providers' request latency), so that many observations
    share one multiprocess file write (docs/decisions.md). Outside an event loop it writes at once."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        super().__init__()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a write is scheduled on

    def observe(self, histogram: Any, value: float) -> None:
        super().observe(histogram, value)
        scheduled = self._loop
        if scheduled is not None and scheduled.is_running():
            return  # a write is due on the running loop (asking for the running loop costs a getpid())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.apply()
            return
        if self._loop is not loop:  # none scheduled, or on a loop that has ended since (tests)
            self._loop = loop
            loop.call_later(HOLD_S, self._write, loop)

    def _write(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            self._loop = None
        self.apply()


HELD = AutoDeferred()  # the providers' request latency; `run_worker` writes what is left at exit


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics (aggregated over processes in multiprocess mode)."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (in-flight) from the aggregate."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
