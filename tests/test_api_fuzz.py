"""Fuzz the HTTP API from its own OpenAPI document (schemathesis): no 5xx, no response the document does not describe.

The app runs on a real loopback port in a background thread with its own event loop and a Redis
client on this run's private Redis. The schema is the packaged openapi.yaml, the very file the app
serves at /openapi.yaml (checked below); it is loaded at import time because schemathesis builds
one test per operation at collection. For every operation schemathesis sends the coverage cases
the document defines (valid and invalid values at the edges, missing auth, wrong methods) and a
bounded, derandomized number of generated requests, authenticated as a client holding every scope;
each answer must not be a 5xx, must have a documented status and must match the documented body.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pytest
import redis.asyncio as aioredis
import requests
import schemathesis
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, settings
from pushgw.core.config import ApiClient, ApiSettings, FcmApp, RedisSettings, Settings
from pushgw.gateway.api.app import create_app
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

TOKEN = "fuzz-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]


def fuzz_settings() -> Settings:
    client = ApiClient("fuzzer", TOKEN, ("enqueue", "devices", "admin", "campaigns", "events"))
    return Settings(redis=RedisSettings(prefix="fuzztest"), api=ApiSettings(clients=(client,)), fcm=(FcmApp("main"),))


@dataclass
class Server:
    """The API served from a thread of its own: `url` once started, `stop()` to shut it down."""

    redis_url: str
    url: str = ""
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="api-fuzz-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10.0):
            raise RuntimeError("the API did not start within 10 s")
        if self.error is not None:
            raise RuntimeError("the API failed to start") from self.error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15.0)
        assert not self._thread.is_alive(), "the API thread did not stop"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:
            self.error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        redis = aioredis.from_url(self.redis_url)
        try:
            await redis.flushall()  # the run's private server: start empty
            runner = web.AppRunner(create_app(fuzz_settings(), redis), access_log=None, handle_signals=False,
                                    shutdown_timeout=5.0)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                host, port = runner.addresses[0][:2]
                self.url = f"http://{host}:{port}"
                self._ready.set()
                await self._stop.wait()
            finally:
                await runner.cleanup()
        finally:
            await redis.aclose()


@pytest.fixture(scope="module")
def api_url(redis_url: str) -> Iterator[str]:
    server = Server(redis_url)
    server.start()
    yield server.url
    server.stop()


# The document the app serves at /openapi.yaml (test_the_served_document_is_the_one_fuzzed checks it is the same).
DOCUMENT = resources.files("pushgw.gateway").joinpath("openapi.yaml")
schema = schemathesis.openapi.from_file(DOCUMENT.read_text())


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_accepted_requests_conform(api_url: str) -> None:
    """Generated bodies are almost never accepted (the server validates more than the document can say), so the
    success answers (201, 202, 204, non-empty lists) are checked here with requests the API takes."""
    p256dh = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    webpush = {"endpoint": "https://fcm.googleapis.com/fcm/send/fuzz-1",
               "keys": {"p256dh": _b64url(p256dh), "auth": _b64url(bytes(range(16)))}}
    message = {"id": "fuzz-1", "user": "fuzz-user", "title": "Hello", "body": "from the fuzz test", "data": {"k": "v"},
               "category": "reminder", "priority": "high", "ttl": 60}
    user = {"user": "fuzz-user"}
    steps: list[tuple[str, str, dict[str, Any], int]] = [
        ("PUT", "/v1/users/{user}/devices", {"path_parameters": user, "body": {"fcm": "fcm-token-1", "app": "main"}}, 201),
        ("PUT", "/v1/users/{user}/devices", {"path_parameters": user, "body": {"apns": "ab" * 32}}, 201),
        ("PUT", "/v1/users/{user}/devices", {"path_parameters": user, "body": {"webpush": webpush}}, 201),
        ("GET", "/v1/users/{user}/devices", {"path_parameters": user}, 200),
        ("DELETE", "/v1/users/{user}/devices/{key}", {"path_parameters": user | {"key": "fcm:fcm-token-1"}}, 204),
        ("DELETE", "/v1/users/{user}/devices/{key}", {"path_parameters": user | {"key": "fcm:fcm-token-1"}}, 404),
        ("POST", "/v1/messages", {"body": message}, 202),
        ("POST", "/v1/messages", {"body": message}, 202),  # the duplicate
        ("POST", "/v1/messages/batch", {"body": {"messages": [message | {"id": "fuzz-2"}, message | {"id": "fuzz-3"}]}}, 202),
        ("GET", "/v1/deadletters", {"query": {"count": 10, "start": "-"}}, 200),
        ("POST", "/v1/deadletters/replay", {"body": {"all": True}}, 200),
        ("POST", "/v1/deadletters/replay", {"body": {"ids": ["1700000000000-0"]}}, 200),
        ("GET", "/v1/events/invalid-tokens", {"query": {"count": 10}}, 200),
        # campaigns: learners, a template, a campaign, a pilot, events, the report
        ("PUT", "/v1/users/{user}/attributes", {"path_parameters": user, "body": {
            "first_name": "Ana", "cohort": "intermediate", "skills": ["python"], "locale": "fr", "timezone": "Europe/Paris",
            "topics": ["module-news"], "vars": {"score": "87"}}}, 200),
        ("PATCH", "/v1/users/{user}/attributes", {"path_parameters": user, "body": {"track": "data"}}, 200),
        ("GET", "/v1/users/{user}/attributes", {"path_parameters": user}, 200),
        ("POST", "/v1/attributes/batch",
         {"body": {"users": [{"user": "fuzz-2", "attributes": {"cohort": "intermediate"}}]}}, 200),
        ("POST", "/v1/audiences/count", {"body": {"audience": {"filter": {"cohort": "intermediate"}}}}, 200),
        ("PUT", "/v1/templates/{name}", {"path_parameters": {"name": "fuzz-tpl"}, "body": {
            "default_locale": "en", "variables": {"first_name": "there", "module_title": None},
            "locales": {"en": {"title": "New: {module_title}", "body": "Hi {first_name}"},
                        "fr": {"title": "Nouveau : {module_title}", "body": "Bonjour {first_name}"}}}}, 200),
        ("GET", "/v1/templates/{name}", {"path_parameters": {"name": "fuzz-tpl"}}, 200),
        ("GET", "/v1/templates", {}, 200),
        ("POST", "/v1/templates/{name}/render", {"path_parameters": {"name": "fuzz-tpl"},
                                                  "body": {"vars": {"module_title": "Stats"}, "locale": "fr"}}, 200),
        ("POST", "/v1/messages", {"body": {"id": "fuzz-tpl-1", "user": "fuzz-user", "template": "fuzz-tpl",
                                           "vars": {"module_title": "Stats"}}}, 202),
        ("POST", "/v1/campaigns", {"body": {"id": "fuzz-cmp", "template": "fuzz-tpl", "vars": {"module_title": "Stats"},
                                            "audience": {"filter": {"cohort": "intermediate"}}, "control_percent": 10,
                                            "variants": [{"name": "a"}, {"name": "b", "weight": 2}]}}, 201),
        ("POST", "/v1/campaigns", {"body": {"id": "fuzz-cmp", "template": "fuzz-tpl", "vars": {"module_title": "Stats"},
                                            "audience": {"topic": "module-news"}}}, 409),
        ("GET", "/v1/campaigns", {}, 200),
        ("GET", "/v1/campaigns/{id}", {"path_parameters": {"id": "fuzz-cmp"}}, 200),
        ("POST", "/v1/campaigns/{id}/launch", {"path_parameters": {"id": "fuzz-cmp"}, "body": {"percent": 10}}, 202),
        ("POST", "/v1/campaigns/{id}/launch", {"path_parameters": {"id": "fuzz-cmp"}, "body": {"percent": 50}}, 409),
        ("GET", "/v1/campaigns/{id}/status", {"path_parameters": {"id": "fuzz-cmp"}}, 200),
        ("POST", "/v1/events", {"body": {"events": [{"type": "converted", "campaign": "fuzz-cmp", "user": "fuzz-user"},
                                                    {"type": "opened", "message_id": "cmp:fuzz-cmp:fuzz-2"}]}}, 202),
        ("GET", "/v1/campaigns/{id}/report", {"path_parameters": {"id": "fuzz-cmp"}}, 200),
        ("GET", "/v1/campaigns/{id}/report.png", {"path_parameters": {"id": "fuzz-cmp"}}, 200),
        ("GET", "/v1/campaigns/{id}/report", {"path_parameters": {"id": "nope"}}, 404),
    ]
    for method, path, kwargs, status in steps:
        case = schema[path][method].Case(**kwargs)
        response = case.call_and_validate(base_url=api_url, headers=HEADERS, checks=CHECKS, timeout=10)
        assert response.status_code == status, (method, path, response.status_code, response.text)


def test_the_served_document_is_the_one_fuzzed(api_url: str) -> None:
    resp = requests.get(f"{api_url}/openapi.yaml", timeout=10)
    assert resp.status_code == 200 and resp.text == DOCUMENT.read_text()


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case[Any], api_url: str) -> None:
    case.call_and_validate(base_url=api_url, headers=HEADERS, checks=CHECKS, timeout=10)
