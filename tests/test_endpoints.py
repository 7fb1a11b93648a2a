"""The Web Push SSRF guard: only https endpoints of allowed push services, never private addresses."""

from __future__ import annotations

import pytest
from pushgw.core.config import WebPushSettings
from pushgw.providers.endpoints import EndpointPolicy

DEFAULT = EndpointPolicy(WebPushSettings())


@pytest.mark.parametrize(
    "url",
    [
        "https://fcm.googleapis.com/fcm/send/abc:def",
        "https://updates.push.services.mozilla.com/wpush/v2/gAAAA",
        "https://web.push.apple.com/QGuQ",
        "https://wns2-par02p.notify.windows.com/w/?token=BQYAAA",
        "https://FCM.googleapis.com./fcm/send/x",  # case and a trailing dot do not matter
    ],
)
def test_known_push_services_are_allowed(url: str) -> None:
    assert DEFAULT.check(url) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://fcm.googleapis.com/fcm/send/x", "https"),
        ("https://evil.example/fcm/send/x", "not an allowed push service"),
        ("https://googleapis.com.evil.example/x", "not an allowed push service"),
        ("https://push.services.mozilla.com/x", "not an allowed push service"),  # "*." means subdomains only
        ("https://user:pw@fcm.googleapis.com/x", "credentials"),
        ("https://fcm.googleapis.com:99999/x", "not a valid URL"),
        ("https:///nohost", "no host"),
        ("https://fcm.googleapis.com/" + "x" * 3000, "longer than"),
    ],
)
def test_bad_endpoints_are_refused_with_a_reason(url: str, reason: str) -> None:
    refusal = DEFAULT.check(url)
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "::1", "fe80::1", "fc00::5",
     "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1"],  # noqa: S104
)
def test_private_loopback_and_link_local_addresses_are_refused(address: str) -> None:
    refusal = DEFAULT.check_address(address)
    assert refusal is not None and "private" in refusal


def test_literal_private_ip_endpoint_is_refused_even_when_allowlisted() -> None:
    policy = EndpointPolicy(WebPushSettings(allowed_hosts=("127.0.0.1", "10.0.0.8")))
    assert "private" in (policy.check("https://127.0.0.1:8443/push/1") or "")
    assert "private" in (policy.check("https://10.0.0.8/push/1") or "")


def test_public_addresses_pass_and_allow_private_opens_the_lab() -> None:
    assert DEFAULT.check_address("142.250.74.106") is None
    assert DEFAULT.check_address("2a00:1450:4001:80b::200a") is None
    lab = EndpointPolicy(WebPushSettings(allowed_hosts=("localhost", "127.0.0.1"), allow_private=True))
    assert lab.check("https://127.0.0.1:8443/push/1") is None
    assert lab.check_address("127.0.0.1") is None
    assert lab.check("https://localhost:8443/push/1") is None
