"""Which Web Push endpoints the gateway will talk to (an SSRF guard).

A Web Push endpoint is a URL that a browser hands to an untrusted web page, which hands it to an
upstream service, which hands it to us: anyone can register `https://10.0.0.5/admin` as a
"subscription". So an endpoint must be https, its host must match an allowlist of push services,
and it must not point at a private, loopback or link-local address, checked twice: on the literal
URL when the device is registered or the message enqueued (`check`), and on every address the
host name resolves to when the connection is made (`check_address`), so a DNS name that later
resolves to 127.0.0.1 (rebinding) is still refused.

An IPv6 address that embeds an IPv4 address is judged by the embedded address's class: IPv4-mapped
`::ffff:a.b.c.d` (RFC 4291 section 2.5.5.2), IPv4-compatible `::a.b.c.d` (RFC 4291 section 2.5.5.1),
6to4 `2002:AABB:CCDD::/16` (RFC 3056 section 2) and the NAT64 well-known prefix `64:ff9b::/96`
(RFC 6052 section 2.1), so `64:ff9b::7f00:1` is loopback. The port must be 443 (the default of
https) unless `webpush.allowed_ports` names it (`webpush.allow_private`, for labs and tests, admits
any port). A host that is no valid IDNA name (RFC 5891), such as one holding a zero-width space, is
malformed: `malformed` says so, and such an endpoint can never be sent to.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Protocol
from urllib.parse import urlsplit

import idna
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

MAX_ENDPOINT_LEN = 2048
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 in the low 32 bits
# RFC 8215 local-use NAT64: each network chooses its prefix length within it, so where the IPv4 sits is
# unknowable here; a push service has no reason to be there, so the whole prefix is refused.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT (RFC 2765 section 2.1), low 32 bits
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, translated, compatible, 6to4, NAT64), else None.
    Teredo (2001::/32) is left to its own class: not global, so refused."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _IPV4_TRANSLATED or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are IPv6's own
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def malformed(url: str) -> str | None:
    """None when `url` is a well-formed https URL with a host; else why it can never be sent to."""
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
    if not host.isascii():
        try:
            idna.encode(host)  # IDNA2008 (RFC 5891): refuses code points such as U+200B that the 2003 rules drop
            host.encode("idna")  # what the HTTP/2 path sends as :authority
        except (idna.IDNAError, UnicodeError):
            return "endpoint host is not a valid internationalised domain name (IDNA, RFC 5891)"
    return None


class EndpointRules(Protocol):
    """The settings a policy is built from: `WebPushSettings`, and `WebhookSettings` for webhook URLs."""

    @property
    def allowed_hosts(self) -> tuple[str, ...]: ...
    @property
    def allow_private(self) -> bool: ...
    @property
    def allowed_ports(self) -> tuple[str, ...]: ...


class EndpointPolicy:
    """Allowlist plus address checks, built once from the settings of `section` (named in refusals)."""

    def __init__(self, settings: EndpointRules, section: str = "webpush", kind: str = "push service") -> None:
        self.section = section
        self.kind = kind
        self.allow_private = settings.allow_private
        self.allowed_ports = frozenset({443, *(int(p) for p in settings.allowed_ports)})
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
        problem = malformed(url)
        if problem is not None:
            return problem
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.username is not None or parts.password is not None:
            return "endpoint must not carry credentials"
        if not self.host_allowed(host):
            return f"endpoint host {host!r} is not an allowed {self.kind} ({self.section}.allowed_hosts)"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None  # a name: its addresses are checked when the connection is made
        refusal = None if ip is None else self.check_address(str(ip))
        if refusal is None and not self.allow_private and (parts.port or 443) not in self.allowed_ports:
            return f"endpoint port {parts.port} is not allowed (443, or one of {self.section}.allowed_ports)"
        return refusal

    def check_address(self, address: str) -> str | None:
        """None when a resolved address may be connected to, else the reason it is refused."""
        if self.allow_private:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address):
            if ip in _NAT64_LOCAL:
                return f"endpoint resolves to a local-use NAT64 address (RFC 8215; {self.section}.allow_private is off)"
            embedded = embedded_ipv4(ip)
            if embedded is not None:
                ip = embedded
        if not ip.is_global or ip.is_multicast:
            return f"endpoint resolves to a private, loopback or link-local address ({self.section}.allow_private is off)"
        return None


class CheckedResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver, then drops addresses the policy refuses; `refused` (an
    OSError) is raised when none is left, so the transport maps it to a refusal, not a retry."""

    def __init__(self, policy: EndpointPolicy, refused: type[OSError]) -> None:
        self._policy = policy
        self._refused = refused
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.check_address(r["host"]) is None]
        if not allowed:
            raise self._refused(f"{host}: every address is private, loopback or link-local")
        return allowed

    async def addresses(self, host: str, port: int) -> list[str]:
        """The allowed addresses of `host`, for `H2Pool` to connect to (any address family)."""
        return list(dict.fromkeys(r["host"] for r in await self.resolve(host, port, socket.AF_UNSPEC)))

    async def close(self) -> None:
        await self._inner.close()
