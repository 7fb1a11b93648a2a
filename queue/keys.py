"""Every Redis key the gateway uses, in one place, under one prefix (several gateways can share a Redis)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "pushgw"

    @property
    def stream(self) -> str:
        """The work stream of the normal lane: one entry per message (or per retried delivery)."""
        return f"{self.prefix}:stream"

    @property
    def stream_high(self) -> str:
        """The work stream of the high lane (priority "high"): workers serve it first."""
        return f"{self.prefix}:stream:high"

    def lane_stream(self, lane: str) -> str:
        return self.stream_high if lane == "high" else self.stream

    @property
    def group(self) -> str:
        """The consumer group every worker on every host joins."""
        return "workers"

    @property
    def delayed(self) -> str:
        """Sorted set of scheduled, deferred and retried messages by due time.

        Members are `attempt:enqueued_ms:lane:uid` (lane `h` or `n`: the stream they return to)."""
        return f"{self.prefix}:delayed"

    @property
    def delayed_data(self) -> str:
        """Hash member -> message JSON for the delayed set (kept apart so the set stays small)."""
        return f"{self.prefix}:delayed:data"

    @property
    def dead(self) -> str:
        """Dead-letter stream: message, reason, attempts, provider."""
        return f"{self.prefix}:dead"

    @property
    def invalid_tokens(self) -> str:
        """Stream of invalid-token events that upstream services may read (and clean their own data)."""
        return f"{self.prefix}:events:invalid_tokens"

    def idem(self, message_id: str) -> str:
        """Marks a message id as accepted, for the idempotency window."""
        return f"{self.prefix}:idem:{message_id}"

    def done(self, ref: str) -> str:
        """Device keys of a stream entry (`Entry.ref`) whose delivery has settled (skipped if it is redelivered)."""
        return f"{self.prefix}:done:{ref}"

    def user(self, user: str) -> str:
        """Hash of a user's stored preferences: time zone, opt-outs (gateway/profiles.py)."""
        return f"{self.prefix}:user:{user}"

    def provider_rate(self, scope: str) -> str:
        """GCRA state (theoretical arrival time) of a provider-wide rate limit (ratelimit/provider_rate.py)."""
        return f"{self.prefix}:rate:{scope}"

    def devices(self, user: str) -> str:
        """Hash device key -> device JSON: the user's registered devices."""
        return f"{self.prefix}:devices:{user}"

    def cap(self, user: str, category: str) -> str:
        """Sorted set of message ids a category cap admitted for a user, scored by time (ratelimit/caps.py)."""
        return f"{self.prefix}:cap:{category}:{user}"

    def burst(self, user: str) -> str:
        """Sorted set of message ids the per-user burst limit admitted, scored by time."""
        return f"{self.prefix}:burst:{user}"
