"""The worker's metric series, looked up once per provider instead of once per delivery.

`.labels()` is a dict lookup plus a lock, so the label children a delivery touches are cached here
per provider ("none" for a delivery whose provider is not configured). Per-delivery counters and
histograms are held in `held` and written at each flush (core/metrics.py `Deferred`).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from ..core import metrics


class WorkerMetrics:
    def __init__(self, providers: Iterable[str]) -> None:
        configured = tuple(providers)
        labelled = (*configured, "none")
        self.delivered: dict[str, Counter] = {p: metrics.DELIVERIES.labels(p, "delivered") for p in labelled}
        self.retry: dict[str, Counter] = {p: metrics.DELIVERIES.labels(p, "retry") for p in labelled}
        self.token_invalid: dict[str, Counter] = {p: metrics.DELIVERIES.labels(p, "token_invalid") for p in labelled}
        self.rejected: dict[str, Counter] = {p: metrics.DELIVERIES.labels(p, "rejected") for p in labelled}
        self.retries: dict[str, Counter] = {p: metrics.RETRIES.labels(p) for p in labelled}
        self.tokens_removed: dict[str, Counter] = {p: metrics.INVALID_TOKENS.labels(p) for p in labelled}
        self.end_to_end: dict[str, Histogram] = {p: metrics.END_TO_END.labels(p) for p in configured}
        self.held = metrics.Deferred()
        self._in_flight: dict[str, Gauge] = {p: metrics.IN_FLIGHT.labels(p) for p in configured}
        self._in_flight_shown = dict.fromkeys(configured, -1)  # -1: set at the first flush whatever it shows
        self._circuit: dict[tuple[str, str], Gauge] = {}

    def show_in_flight(self, provider: str, sending: int) -> None:
        """The in-flight gauge of a provider, written only when it changed."""
        if sending != self._in_flight_shown[provider]:
            self._in_flight[provider].set(sending)
            self._in_flight_shown[provider] = sending

    def circuit_created(self, provider: str, app: str) -> None:
        gauge = self._circuit[(provider, app)] = metrics.CIRCUIT_STATE.labels(provider, app)
        gauge.set(0)

    def circuit_state(self, provider: str, app: str, state: int) -> None:
        self._circuit[(provider, app)].set(state)
