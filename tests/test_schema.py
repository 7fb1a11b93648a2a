"""Message schema v1: every bad input names its field; valid input round-trips through the queue form."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pushgw.core.schema import Action, Device, Message, MessageInvalid, Rich, Sound, loads_message, parse_message
from pushgw.providers.base import PayloadTooLarge
from pushgw.providers.payloads import (
    APNS_MAX_PAYLOAD,
    DECLARATIVE,
    FCM_MAX_PAYLOAD,
    WEBPUSH_MAX_PLAINTEXT,
    apns_payload,
    check_payload_limits,
    fcm_message,
    fcm_payload_size,
    webpush_declarative,
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
    assert fcm["token"] == "tok" and fcm["android"] == {"priority": "high", "ttl": "60s", "collapse_key": "c",
                                                       "notification": {"tag": "c"}}
    assert all(isinstance(v, str) for v in fcm["data"].values())
    assert orjson.loads(webpush_plaintext(m))["body"] == "B"
    silent = parse_message({"user": "u", "data": {"sync": "1"}})
    assert orjson.loads(apns_payload(silent))["aps"] == {"content-available": 1}

    big = parse_message({"user": "u", "body": "x" * 4000, "data": {"k": "y" * 500}})
    with pytest.raises(PayloadTooLarge) as e:
        check_payload_limits(big)
    assert e.value.provider == "apns" and e.value.limit == APNS_MAX_PAYLOAD
    check_payload_limits(parse_message({"user": "u", "body": "x" * 3000}))


DECLARATIVE_NAVIGATE = "https://campus.example/" + "n" * 1000


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
    # The declarative push message adds the configured navigate, which the fast path counts on top.
    declarative = webpush_declarative(msg, DECLARATIVE_NAVIGATE)
    if declarative is not None:
        assert _content_bound(msg) + len(orjson.dumps(DECLARATIVE_NAVIGATE)) >= len(declarative)


_text = st.text(max_size=300)
_name = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
_https = st.builds(lambda path: "https://cdn.example/" + path, st.text(alphabet="abc/%?=&\"<>\u00e9", max_size=900))
_action = st.builds(Action, id=_name, title=st.text(min_size=1, max_size=40), icon=st.one_of(st.none(), _https),
                    destructive=st.booleans(), foreground=st.booleans())
_rich = st.builds(
    Rich, silent=st.just(False), subtitle=st.one_of(st.none(), _text), image=st.one_of(st.none(), _https),
    icon=st.one_of(st.none(), _https, _name), badge=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
    sound=st.one_of(st.none(), st.builds(Sound, name=_name), st.builds(Sound, name=_name, critical=st.just(True),
                                                                         volume=st.floats(0, 1))),
    interruption_level=st.one_of(st.none(), st.sampled_from(["passive", "critical"])),
    relevance_score=st.one_of(st.none(), st.floats(0, 1)), thread=st.one_of(st.none(), st.text(max_size=64)),
    actions=st.lists(_action, max_size=4, unique_by=lambda a: a.id).map(tuple),
    actions_category=st.one_of(st.none(), _name), link=st.one_of(st.none(), _https, st.just("campus://q/42")),
    title_loc_key=st.one_of(st.none(), _name), title_loc_args=st.lists(_text, max_size=3).map(tuple),
    body_loc_key=st.one_of(st.none(), _name), body_loc_args=st.lists(_text, max_size=3).map(tuple),
    lang=st.one_of(st.none(), st.just("pt-BR")), dir=st.one_of(st.none(), st.just("rtl")),
    require_interaction=st.booleans(), renotify=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    title=st.one_of(st.none(), st.text(max_size=1000)),
    body=st.one_of(st.none(), st.text(max_size=1500)),
    data=st.dictionaries(st.text(alphabet="abcdefghij_", min_size=1, max_size=20), st.text(max_size=300), max_size=4),
    collapse=st.one_of(st.none(), st.text(max_size=64)),
    rich=_rich,
    pad=st.integers(0, 3800),
)
def test_payload_limits_with_rich_fields_measure_each_final_payload(
    title: str | None, body: str | None, data: dict[str, str], collapse: str | None, rich: Rich, pad: int
) -> None:
    body = "é" * (pad // 2) + (body or "")  # reaches every side of each limit
    msg = Message(id="m-" + "x" * 120, title=title, body=body or ("b" if title is None else None), data=data,
                  category="c" * 32, collapse_key=collapse, campaign="k" * 64, variant="v" * 64, ttl=2419200, rich=rich)
    final = {"apns": (len(apns_payload(msg)), APNS_MAX_PAYLOAD), "fcm": (fcm_payload_size(msg), FCM_MAX_PAYLOAD),
             "webpush": (len(webpush_plaintext(msg)), WEBPUSH_MAX_PLAINTEXT)}
    assert fcm_payload_size(msg) == len(orjson.dumps(fcm_message(msg, ""))) - len(b'"token":"",')
    for provider, (size, limit) in final.items():
        event(f"{provider} {'over' if size > limit else 'within'} its limit")
        if size > limit:  # refused, naming the provider and the final payload's bytes
            with pytest.raises(PayloadTooLarge) as e:
                check_payload_limits(msg, (provider,))
            assert (e.value.provider, e.value.size, e.value.limit) == (provider, size, limit)
        else:
            check_payload_limits(msg, (provider,))
    declarative = webpush_declarative(msg, DECLARATIVE_NAVIGATE)
    if declarative is not None and len(declarative) > WEBPUSH_MAX_PLAINTEXT and final["webpush"][0] <= WEBPUSH_MAX_PLAINTEXT:
        event("webpush declarative over its limit")
        with pytest.raises(PayloadTooLarge) as e:
            check_payload_limits(msg, ("webpush",), declarative_navigate=DECLARATIVE_NAVIGATE)
        assert (e.value.provider, e.value.size) == (DECLARATIVE, len(declarative))
    elif final["webpush"][0] <= WEBPUSH_MAX_PLAINTEXT:
        check_payload_limits(msg, ("webpush",), declarative_navigate=DECLARATIVE_NAVIGATE)


def test_fcm_token_whitespace_check_is_str_isspace() -> None:
    from pushgw.core.schema import _SPACE_RE

    for i in range(0x110000):
        c = chr(i)
        assert bool(_SPACE_RE.search(c)) == c.isspace(), hex(i)
    for token in ("tok en", "tok\u2003en", "token\n", "\x1ctoken"):
        with pytest.raises(MessageInvalid, match="FCM registration token"):
            parse_message({"body": "b", "devices": [{"fcm": token}]})
    assert parse_message({"body": "b", "devices": [{"fcm": "tok\u200ben"}]}).devices[0].token == "tok\u200ben"
