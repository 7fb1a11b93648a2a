"""Provider clients behind one interface (`providers.base.Provider`): one module per provider."""

from __future__ import annotations

from ..core.config import Settings
from .base import Provider


def build_providers(settings: Settings) -> dict[str, Provider]:
    """The providers this deployment has credentials for, keyed by `Device.provider`.

    A device whose provider is not configured is dead-lettered with that reason rather than
    retried forever. Construct inside a running event loop; connections open on first use.

    The provider modules are imported here, for the providers configured, rather than at the top:
    importing one loads its HTTP client, cryptography and HPACK libraries, and the API and campaign
    processes import this package (for `providers.base`) without ever sending a push.
    """
    out: dict[str, Provider] = {}
    if settings.apns:
        from .apns import ApnsProvider

        out["apns"] = ApnsProvider(settings.apns, settings.providers)
    if settings.fcm:
        from .fcm import FcmProvider

        out["fcm"] = FcmProvider(settings.fcm, settings.providers)
    if settings.webpush.vapid_private_key_file:
        from .webpush import WebPushProvider

        out["webpush"] = WebPushProvider(settings.webpush, settings.providers)
    return out
