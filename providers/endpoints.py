"""Which Web Push endpoints the gateway will talk to (an SSRF guard).

A Web Push endpoint is a URL that a browser hands to an untrusted web page, which hands it to an
upstream service, which hands it to us: anyone can register `https://10.0.0.5/admin` as a
"subscription". So an endpoint must be https, its host must match an allowlist of push services,
and it must not point at a private, loopback or link-local address, checked twice: on the literal
URL when the device is registered or the message enqueued (`check`), and on every address the
host name resolves to when the connection is made (`check_address`), so a DNS name that later
resolves to 127.0.0.1 (rebinding) is still refused.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from ..core.config import WebPushSettings

MAX_ENDPOINT_LEN = 2048


class EndpointPolicy:
    """Allowlist plus address checks, built once from `WebPushSettings`."""

    def __init__(self, settings: WebPushSettings) -> None:
        self.allow_private = settings.allow_private
        exact: set[str] = set()
        suffixes: list[str] = []
        for pattern in settings.allowed_hosts:
            p = pattern.strip().lower().rstrip(".")
            if p.startswith("*."):
                suffixes.append(p[1:])  # "*.example.com" -> ".example.com": subdomains only
            elif p:
                exact.add(p)
        self._exact = frozenset(exact)
        self._suffixes = tuple(suffixes)

    def host_allowed(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return h in self._exact or h.endswith(self._suffixes)

    def check(self, url: str) -> str | None:
        """None when `url` may be used as a Web Push endpoint, else the reason it is refused."""
        if len(url) > MAX_ENDPOINT_LEN:
            return f"endpoint is longer than {MAX_ENDPOINT_LEN} characters"
        try:
            parts = urlsplit(url)
            host = parts.hostname
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError:
            return "endpoint is not a valid URL"
        if parts.scheme != "https":
            return "endpoint must be an https URL"
        if not host:
            return "endpoint has no host"
        if parts.username is not None or parts.password is not None:
            return "endpoint must not carry credentials"
        if not self.host_allowed(host):
            return f"endpoint host {host!r} is not an allowed push service (webpush.allowed_hosts)"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None  # a name: its addresses are checked when the connection is made
        return self.check_address(str(ip))

    def check_address(self, address: str) -> str | None:
        """None when a resolved address may be connected to, else the reason it is refused."""
        if self.allow_private:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            return "endpoint resolves to a private, loopback or link-local address (webpush.allow_private is off)"
        return None
