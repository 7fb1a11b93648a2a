"""Templates and campaigns with rich fields per locale, through the HTTP API to the providers' fakes.

A template's locale variants carry image, actions, link, thread, subtitle, sound, badge and
interruption_level; they are checked when the template is saved by the rules of a message's own
fields (a 422 naming `locales.<loc>.<field>`), rendered per learner with variables in the texts, and
the rendered message is validated like an API message. What each provider receives is pinned here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from pushgw.campaigns.fanout import FanoutRunner
from pushgw.campaigns.templates import RenderError, parse_template
from pushgw.core.config import ApiClient, ApiSettings, RedisSettings, Settings, WorkerSettings
from pushgw.core.schema import Device, MessageInvalid
from pushgw.gateway.cli import main
from pushgw.gateway.worker import Worker
from pushgw.providers.apns import ApnsProvider
from pushgw.providers.fakes.apns import FakeApns
from pushgw.providers.fakes.fcm import FakeFcm
from pushgw.providers.fakes.webpush import FakePushService
from pushgw.providers.fcm import FcmProvider
from pushgw.providers.webpush import WebPushProvider
from pushgw.queue.keys import Keys
from pushgw.users.registry import DeviceRegistry

PREFIX = "tplrich"
TOKEN = "template-rich-token-0123456789"
SETTINGS = Settings(
    redis=RedisSettings(prefix=PREFIX),
    worker=WorkerSettings(block_ms=20, janitor_interval_s=0.05, backoff_base_s=0.01, backoff_cap_s=0.05),
    api=ApiSettings(clients=(ApiClient("marketing", TOKEN, ("enqueue", "devices", "campaigns")),)),
)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APNS_TOKEN = "cd" * 32

QUIZ_TEMPLATE: dict[str, Any] = {
    "default_locale": "en",
    "variables": {"first_name": "there", "score": None, "quiz": None},
    "locales": {
        "en": {"title": "Quiz passed, {first_name}!", "subtitle": "Score {score}%", "body": "Your badge is ready",
               "image": "https://cdn.campus.example/badges/en/gold.png", "thread": "quiz-results",
               "actions": [{"id": "open", "title": "See {quiz}", "foreground": True},
                           {"id": "later", "title": "Later"}],
               "actions_category": "BADGE", "link": "https://campus.example/quiz/{quiz}/badge",
               "badge": 1, "sound": "chime.caf", "interruption_level": "active"},
        "fr": {"title": "Quiz réussi, {first_name} !", "subtitle": "Score {score} %", "body": "Votre badge est prêt",
               "image": "https://cdn.campus.example/badges/fr/or.png", "thread": "resultats-quiz",
               "actions": [{"id": "open", "title": "Voir {quiz}", "foreground": True},
                           {"id": "later", "title": "Plus tard"}],
               "actions_category": "BADGE", "link": "https://campus.example/quiz/{quiz}/badge",
               "badge": 1, "sound": "chime.caf", "interruption_level": "active"},
    },
}


def test_a_variant_renders_its_rich_fields_with_the_learners_variables() -> None:
    t = parse_template("quiz", QUIZ_TEMPLATE)
    r = t.render({"first_name": "Léa", "score": "86", "quiz": "stats 1/2"}, "fr-CA")
    assert (r.locale, r.title, r.body) == ("fr", "Quiz réussi, Léa !", "Votre badge est prêt")
    assert r.rich == {
        "subtitle": "Score 86 %", "image": "https://cdn.campus.example/badges/fr/or.png", "thread": "resultats-quiz",
        "actions": [{"id": "open", "title": "Voir stats 1/2", "foreground": True}, {"id": "later", "title": "Plus tard"}],
        "actions_category": "BADGE", "link": "https://campus.example/quiz/stats%201%2F2/badge",  # percent-encoded
        "badge": 1, "sound": "chime.caf", "interruption_level": "active",
    }
    with pytest.raises(RenderError) as e:
        t.render({"score": "86"}, "en")
    assert e.value.field == "vars.quiz"  # used only by an action title and the link: still required


@pytest.mark.parametrize(("change", "field"), [
    ({"image": "http://cdn.campus.example/x.png"}, "locales.fr.image"),
    ({"actions": [{"id": "open", "title": "See {quizz}"}]}, "locales.fr.actions[0].title"),
    ({"actions": [{"id": "open", "title": "See"}], "actions_category": None}, "locales.fr.actions_category"),
    ({"actions": [{"id": "bad id!", "title": "See"}]}, "locales.fr.actions[0].id"),
    ({"actions": "open"}, "locales.fr.actions"),
    ({"link": "{quiz}"}, "locales.fr.link"),  # a variable is one component, never the whole link
    ({"link": "javascript:alert(1)"}, "locales.fr.link"),
    ({"thread": ""}, "locales.fr.thread"),
    ({"badge": -1}, "locales.fr.badge"),
    ({"interruption_level": "urgent"}, "locales.fr.interruption_level"),
    ({"sound": {"name": "a.caf", "volume": 0.5}}, "locales.fr.sound.volume"),
    ({"subtitle": "x" * 1025}, "locales.fr.subtitle"),
    ({"subtitle": 3}, "locales.fr.subtitle"),
    ({"silent": True}, "locales.fr"),
])
def test_a_variants_rich_fields_are_refused_at_save_by_a_messages_rules(change: dict[str, Any], field: str) -> None:
    fr = {k: v for k, v in {**QUIZ_TEMPLATE["locales"]["fr"], **change}.items() if v is not None}
    with pytest.raises(MessageInvalid) as e:
        parse_template("quiz", {**QUIZ_TEMPLATE, "locales": {**QUIZ_TEMPLATE["locales"], "fr": fr}})
    assert [x.field for x in e.value.errors] == [field], e.value.errors


def test_a_subtitle_without_a_title_is_refused_in_a_variant_as_in_a_message() -> None:
    en = {"body": "b", "subtitle": "s"}
    with pytest.raises(MessageInvalid) as e:
        parse_template("t", {"default_locale": "en", "locales": {"en": en}})
    assert [x.field for x in e.value.errors] == ["locales.en.subtitle"]


async def _run_worker(redis: aioredis.Redis, providers: dict[str, Any], done: Callable[[], bool]) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(SETTINGS, redis, providers, consumer="tplrich").run(stop))
    try:
        deadline = time.monotonic() + 30
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_localized_campaign_and_a_templated_message_reach_each_provider_with_their_rich_fields(
    redis: aioredis.Redis, make_client: Callable[..., Any], apns: tuple[FakeApns, ApnsProvider],
    fcm: tuple[FakeFcm, FcmProvider], web: tuple[FakePushService, WebPushProvider, Device],
) -> None:
    api = await make_client(SETTINGS)
    resp = await api.put("/v1/templates/quiz-badge", headers=AUTH, json=QUIZ_TEMPLATE)
    assert resp.status == 200, await resp.text()
    bad = {**QUIZ_TEMPLATE, "locales": {"en": {**QUIZ_TEMPLATE["locales"]["en"], "image": "http://x.example/a.png"}}}
    resp = await api.put("/v1/templates/quiz-bad", headers=AUTH, json=bad)
    assert resp.status == 422 and [f["field"] for f in (await resp.json())["error"]["fields"]] == ["locales.en.image"]
    resp = await api.post("/v1/templates/quiz-badge/render", headers=AUTH,
                          json={"vars": {"score": "91", "quiz": "q7"}, "locale": "fr"})
    preview = await resp.json()
    assert (preview["subtitle"], preview["link"], preview["thread"]) == (
        "Score 91 %", "https://campus.example/quiz/q7/badge", "resultats-quiz")

    (fake_apns, apns_p), (fake_fcm, fcm_p), (svc, web_p, web_device) = apns, fcm, web
    registry = DeviceRegistry(redis, Keys(PREFIX))
    await registry.register("learner-fr", Device("apns", APNS_TOKEN))
    await registry.register("learner-fr", Device("fcm", "fcm-learner-fr"))
    await registry.register("learner-fr", web_device)
    for user, locale in (("learner-fr", "fr-FR"), ("learner-en", "en")):
        resp = await api.put(f"/v1/users/{user}/attributes", headers=AUTH,
                             json={"first_name": "Léa" if locale != "en" else "Sam", "cohort": "quiz7", "locale": locale})
        assert resp.status == 200, await resp.text()
    campaign = {"id": "quiz7-badges", "template": "quiz-badge", "audience": {"filter": {"cohort": "quiz7"}},
                "vars": {"score": "91", "quiz": "q7"}, "category": "reward"}
    resp = await api.post("/v1/campaigns", headers=AUTH, json=campaign)
    assert resp.status == 201, await resp.text()
    resp = await api.post("/v1/campaigns/quiz7-badges/launch", headers=AUTH, json={"percent": 100})
    assert resp.status == 202, await resp.text()
    assert await FanoutRunner(redis, SETTINGS).run_pending() == 1
    await _run_worker(redis, {"apns": apns_p, "fcm": fcm_p, "webpush": web_p},
                      lambda: bool(fake_apns.received and fake_fcm.received and svc.received))

    msg_id = "cmp:quiz7-badges:learner-fr"
    [a] = fake_apns.received
    assert a.payload["aps"] == {
        "alert": {"title": "Quiz réussi, Léa !", "subtitle": "Score 91 %", "body": "Votre badge est prêt"},
        "badge": 1, "sound": "chime.caf", "thread-id": "resultats-quiz", "category": "BADGE", "mutable-content": 1,
        "interruption-level": "active",
    }
    assert a.payload["pushgw"]["image"] == "https://cdn.campus.example/badges/fr/or.png"
    assert a.payload["pushgw"]["link"] == "https://campus.example/quiz/q7/badge"
    assert [x["title"] for x in a.payload["pushgw"]["actions"]] == ["Voir q7", "Plus tard"]
    assert a.payload["pushgw"]["id"] == msg_id
    [f] = fake_fcm.received
    assert f.message["notification"] == {"title": "Quiz réussi, Léa !", "body": "Votre badge est prêt",
                                          "image": "https://cdn.campus.example/badges/fr/or.png"}
    assert f.message["android"]["notification"]["click_action"] == "BADGE"
    assert f.message["data"]["pushgw_thread"] == "resultats-quiz"
    assert f.message["data"]["pushgw_link"] == "https://campus.example/quiz/q7/badge"
    assert orjson.loads(f.message["data"]["pushgw_actions"])[0] == {"id": "open", "title": "Voir q7", "foreground": True}
    assert f.message["webpush"]["fcm_options"]["link"] == "https://campus.example/quiz/q7/badge"
    [w] = svc.received
    shown = orjson.loads(w.plaintext)
    assert (shown["title"], shown["image"], shown["thread"], shown["navigate"]) == (
        "Quiz réussi, Léa !", "https://cdn.campus.example/badges/fr/or.png", "resultats-quiz",
        "https://campus.example/quiz/q7/badge")
    assert shown["actions"] == [{"action": "open", "title": "Voir q7"}, {"action": "later", "title": "Plus tard"}]

    # The same template named by one API message: the learner's stored locale picks the variant, and the
    # message's own fields win over the template's.
    resp = await api.post("/v1/messages", headers=AUTH, json={
        "id": "quiz8-fr", "user": "learner-fr", "template": "quiz-badge", "vars": {"score": "77", "quiz": "q8"},
        "thread": "quiz-8", "devices": [{"apns": APNS_TOKEN}]})
    assert resp.status in (200, 202), await resp.text()
    await _run_worker(redis, {"apns": apns_p, "fcm": fcm_p, "webpush": web_p},
                      lambda: len(fake_apns.received) >= 2)
    second = fake_apns.received[-1].payload
    assert second["aps"]["alert"]["subtitle"] == "Score 77 %" and second["aps"]["thread-id"] == "quiz-8"
    assert second["pushgw"]["link"] == "https://campus.example/quiz/q8/badge"


def test_the_cli_saves_and_previews_a_rich_template(redis_url: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}cli"\n')
    (tmp_path / "t.json").write_text(json.dumps(QUIZ_TEMPLATE))
    assert main(["--config", str(cfg), "templates", "put", "quiz", str(tmp_path / "t.json")]) == 0
    capsys.readouterr()
    assert main(["--config", str(cfg), "templates", "render", "quiz", "--locale", "fr",
                 "--vars", '{"score": "90", "quiz": "q1"}']) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["subtitle"], shown["image"], shown["actions"][0]["title"]) == (
        "Score 90 %", "https://cdn.campus.example/badges/fr/or.png", "Voir q1")


async def test_a_campaign_whose_declarative_web_push_form_cannot_fit_is_refused_when_created(
        redis: aioredis.Redis, make_client: Callable[..., Any]) -> None:
    """The declarative push message repeats the link in each button's navigate: four buttons and a 900-byte
    link fit the service-worker JSON, APNs and FCM, not one Web Push record in the declarative form."""
    api = await make_client(SETTINGS)
    long_link = "https://campus.example/live/" + "a" * 900
    en = {"title": "Live class", "body": "Starts soon", "link": long_link, "actions_category": "LIVE",
          "actions": [{"id": f"a{i}", "title": f"Action {i}"} for i in range(4)]}
    resp = await api.put("/v1/templates/live-long", headers=AUTH, json={"default_locale": "en", "locales": {"en": en}})
    assert resp.status == 200, await resp.text()
    resp = await api.post("/v1/campaigns", headers=AUTH, json={"id": "live-long", "template": "live-long",
                                                               "audience": {"filter": {"cohort": "quiz7"}}})
    doc = await resp.json()
    assert resp.status == 422, doc
    [err] = doc["error"]["fields"]
    assert err["field"] == "template" and "webpush declarative payload is" in err["message"]
