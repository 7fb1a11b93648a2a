"""The one interface every provider implements, and the typed outcomes it returns.

The worker only ever sees `Provider.send(delivery) -> Outcome`; everything about HTTP/2, OAuth2,
VAPID or payload formats stays inside the provider module. That is what lets the worker treat a
slow APNs, a throttling FCM project and a dead Web Push subscription with the same few rules.
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..core.records import record
from ..core.schema import Device, Message


@record  # built for every delivery: frozen for the type checker only (core/records.py)
class Delivery:
    """One message to one device: the unit that is sent, retried and accounted for."""

    message: Message
    device: Device
    attempt: int = 1  # 1 on the first try
    # Absolute unix time after which the push is useless (from ttl counted from when the message was
    # accepted, or expires_at); None: no expiry. Providers turn it into apns-expiration or a Web Push TTL.
    expires_at: float | None = None


@record  # the outcome of nearly every delivery (the rarer outcomes stay frozen dataclasses)
class Delivered:
    """The provider accepted the push (APNs 200, FCM 200, Web Push 201)."""

    provider_id: str = ""  # apns-id, FCM message name, Location header; for logs only


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure: try again, not before `after` seconds if the provider named a time."""

    reason: str
    after: float | None = None  # from Retry-After; None lets the worker pick backoff with jitter
    status: int | None = None


@dataclass(frozen=True, slots=True)
class TokenInvalid:
    """The device token or subscription is gone for good: remove it from the registry."""

    reason: str
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """The provider refused this push for a reason a retry cannot fix (bad payload, bad credentials)."""

    reason: str
    status: int | None = None


Outcome = Delivered | Retry | TokenInvalid | Rejected


MAX_RETRY_AFTER_S = 3600.0


def retry_after_seconds(value: str | bytes | None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) as seconds from now, capped at an hour;
    None if absent, unreadable or not finite ("inf" parses as a float and would park a delivery forever)."""
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(text).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S) if math.isfinite(seconds) else None


class PayloadTooLarge(ValueError):
    """Raised by `Provider.check_payload` when a message would exceed the provider's limit."""

    def __init__(self, provider: str, size: int, limit: int) -> None:
        super().__init__(f"{provider} payload is {size} bytes, limit is {limit}")
        self.provider = provider
        self.size = size
        self.limit = limit


@runtime_checkable
class Provider(Protocol):
    """Sends one delivery and says what happened; never raises for a provider-side failure."""

    name: str  # "apns", "fcm" or "webpush": the value of Device.provider it serves

    async def send(self, delivery: Delivery) -> Outcome:
        """Deliver one push. Network errors and timeouts come back as `Retry`, not as exceptions."""
        ...

    async def close(self) -> None:
        """Close connections; called once when the worker stops."""
        ...
