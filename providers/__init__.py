"""Provider clients behind one interface (`providers.base.Provider`): one module per provider.

`build_providers` imports the provider modules inside the function, only those configured: the API
and campaign processes import this package (for `providers.base`) and never send a push, and a
provider module loads `cryptography`, jh2's HPACK and the HTTP/2 client with it.
"""

from __future__ import annotations

from ..core.config import Settings
from .base import Provider


def build_providers(settings: Settings) -> dict[str, Provider]:
    """The providers this deployment has credentials for, keyed by `Device.provider`.

    A device whose provider is not configured is dead-lettered with that reason rather than
    retried forever. Construct inside a running event loop; connections open on first use.
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
