"""Message schema v1: every bad input names its field; valid input round-trips through the queue form."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pushgw.core.schema import Device, Message, MessageInvalid, loads_message, parse_message
from pushgw.providers.base import PayloadTooLarge
from pushgw.providers.payloads import (
    APNS_MAX_PAYLOAD,
    apns_payload,
    check_payload_limits,
    fcm_message,
    webpush_plaintext,
)

P256DH = "B" + "A" * 86  # 87 base64url chars: the length of an uncompressed P-256 point
AUTH = "Q" * 22


def fields_of(exc: pytest.ExceptionInfo[MessageInvalid]) -> set[str]:
    return {e.field for e in exc.value.errors}


def test_full_message_round_trips_through_queue_form() -> None:
    m = parse_message({
        "id": "quiz-42:badge", "user": "learner-9", "app": "campus",
        "devices": [{"apns": "AB" * 32}, {"fcm": "tok"},
                    {"webpush": {"endpoint": "https://fcm.googleapis.com/wp/x", "keys": {"p256dh": P256DH, "auth": AUTH}}}],
        "title": "Badge earned", "body": "Quiz passed with 86%", "data": {"link": "/badges/q42"},
        "category": "reward", "priority": "high", "ttl": 3600, "collapse_key": "badge",
        "campaign": "quiz-rewards", "variant": "b",
    })
    assert m.devices[0] == Device("apns", "ab" * 32)  # tokens are normalised to lower case
    again = loads_message(m.dumps())
    assert again == m


def test_every_error_is_reported_with_its_field() -> None:
    with pytest.raises(MessageInvalid) as e:
        parse_message({
            "title": 3, "priority": "urgent", "ttl": -1, "category": "Bad Category",
            "data": {"n": 5, "aps": "x"}, "devices": [{"apns": "xyz"}, {"sms": "1"}], "extra": 1,
        })
    assert {"title", "priority", "ttl", "category", "data.n", "data.aps", "devices[0].apns", "devices[1]", "$"} <= fields_of(e)


def test_a_message_needs_a_target_and_content() -> None:
    with pytest.raises(MessageInvalid) as e:
        parse_message({})
    assert fields_of(e) == {"user", "body"}


def test_ttl_and_expires_at_are_exclusive_and_expiry_must_be_future() -> None:
    with pytest.raises(MessageInvalid) as e:
        parse_message({"user": "u", "body": "b", "ttl": 10, "expires_at": 2e9}, now=1e9)
    assert fields_of(e) == {"expires_at"}
    with pytest.raises(MessageInvalid) as e:
        parse_message({"user": "u", "body": "b", "expires_at": 5.0}, now=1e9)
    assert "past" in str(e.value)


def test_webpush_endpoint_must_be_https_and_pass_the_policy() -> None:
    sub = {"webpush": {"endpoint": "http://push.example/x", "keys": {"p256dh": P256DH, "auth": AUTH}}}
    with pytest.raises(MessageInvalid) as e:
        parse_message({"body": "b", "devices": [sub]})
    assert fields_of(e) == {"devices[0].webpush.endpoint"}
    sub["webpush"]["endpoint"] = "https://evil.example/x"  # type: ignore[index]
    with pytest.raises(MessageInvalid) as e:
        parse_message({"body": "b", "devices": [sub]}, endpoint_check=lambda url: "host not allowed")
    assert e.value.errors[0].message == "host not allowed"


def test_internal_fields_are_refused_from_upstream() -> None:
    with pytest.raises(MessageInvalid):
        parse_message({"user": "u", "body": "b", "resolved": True})


def test_duplicate_devices_are_sent_once() -> None:
    m = parse_message({"body": "b", "devices": [{"fcm": "t"}, {"fcm": "t"}]})
    assert len(m.devices) == 1


def test_payload_builders_carry_content_and_limits_are_enforced() -> None:
    m = parse_message({"user": "u", "title": "T", "body": "B", "data": {"k": "v"}, "ttl": 60, "collapse_key": "c",
                       "priority": "high"})
    import orjson

    apns = orjson.loads(apns_payload(m))
    assert apns["aps"]["alert"] == {"title": "T", "body": "B"} and apns["k"] == "v"
    fcm = fcm_message(m, "tok")
    assert fcm["token"] == "tok" and fcm["android"] == {"priority": "high", "ttl": "60s", "collapse_key": "c"}
    assert all(isinstance(v, str) for v in fcm["data"].values())
    assert orjson.loads(webpush_plaintext(m))["body"] == "B"
    silent = parse_message({"user": "u", "data": {"sync": "1"}})
    assert orjson.loads(apns_payload(silent))["aps"] == {"content-available": 1}

    big = parse_message({"user": "u", "body": "x" * 4000, "data": {"k": "y" * 500}})
    with pytest.raises(PayloadTooLarge) as e:
        check_payload_limits(big)
    assert e.value.provider == "apns" and e.value.limit == APNS_MAX_PAYLOAD
    check_payload_limits(parse_message({"user": "u", "body": "x" * 3000}))


@settings(max_examples=400, deadline=None)
@given(
    title=st.one_of(st.none(), st.text(max_size=1500)),
    body=st.one_of(st.none(), st.text(max_size=2500)),
    data=st.dictionaries(st.text(alphabet="abcdefghij_", min_size=1, max_size=20), st.text(max_size=400), max_size=6),
    collapse=st.one_of(st.none(), st.text(max_size=64)),
)
def test_the_fast_payload_bound_never_passes_a_message_a_provider_would_refuse(
    title: str | None, body: str | None, data: dict[str, str], collapse: str | None
) -> None:
    from pushgw.providers.payloads import _SMALLEST_LIMIT, _content_bound, apns_payload, fcm_message, webpush_plaintext

    msg = Message(id="m-" + "x" * 120, title=title, body=body or ("b" if title is None else None), data=data,
                  category="c" * 32, collapse_key=collapse, campaign="k" * 64, variant="v" * 64, ttl=2419200)
    sizes = [len(apns_payload(msg)), len(orjson.dumps(fcm_message(msg, ""))), len(webpush_plaintext(msg))]
    assert _content_bound(msg) >= max(sizes)  # the bound is sound: it can only send a message to the full check
    if max(sizes) > _SMALLEST_LIMIT:  # a message near a limit always gets the full check
        assert _content_bound(msg) > _SMALLEST_LIMIT


def test_fcm_token_whitespace_check_is_str_isspace() -> None:
    from pushgw.core.schema import _SPACE_RE

    for i in range(0x110000):
        c = chr(i)
        assert bool(_SPACE_RE.search(c)) == c.isspace(), hex(i)
    for token in ("tok en", "tok\u2003en", "token\n", "\x1ctoken"):
        with pytest.raises(MessageInvalid, match="FCM registration token"):
            parse_message({"body": "b", "devices": [{"fcm": token}]})
    assert parse_message({"body": "b", "devices": [{"fcm": "tok\u200ben"}]}).devices[0].token == "tok\u200ben"
