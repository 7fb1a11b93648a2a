"""Rule evaluation cost: learning events/s through `POST /v1/events` with N automation rules stored.

    python -m pushgw.bench.automations [--rules 50] [--events 100000] [--batch 500] [--clients 4] [--learners 20000]

Starts a private Redis and one API process, stores the learners' attributes (cohorts), the templates and
`--rules` rules (a mix: quiz rewards with score and cohort conditions, session reminders 24 h and 15 min
before, module and deadline rules, inactivity rules), then posts batches of learning events (quiz results,
sessions scheduled, modules completed, deadlines, activity) from `--clients` connections in this process.
Prints events/s, messages queued, and the API's and Redis's CPU seconds per 100k events as JSON. Run it with
`--rules 0` for the cost of the events alone (validation, idempotency, activity).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from ..core.config import ApiClient, ApiSettings, RedisSettings, Settings
from ..gateway.api.app import create_app
from ..gateway.api.server import start_api
from ..gateway.embedded import EmbeddedRedis
from ..gateway.pool import install_loop, make_redis
from .run import proc_stat
from .sinks import free_port

TOKEN = "bench-automations-token-0123"  # noqa: S105 - a throwaway token of this local benchmark
PREFIX = "autobench"
COHORTS = [f"2026-{c}" for c in "abcdefgh"]
TEMPLATES = {
    "badge": {"default_locale": "en", "variables": {"first_name": "there", "quiz": None, "score": None},
              "locales": {"en": {"title": "Well done {first_name}", "body": "{score}% on {quiz}"}}},
    "session": {"default_locale": "en", "variables": {"session": None, "starts_at": None},
                "locales": {"en": {"title": "Live session {session}", "body": "Starts at {starts_at}"}}},
    "module": {"default_locale": "en", "variables": {"module": None},
               "locales": {"en": {"title": "Module {module}", "body": "Keep going"}}},
    "deadline": {"default_locale": "en", "variables": {"assignment": None, "due_at": None},
                 "locales": {"en": {"title": "{assignment}", "body": "Due {due_at}"}}},
    "nudge": {"default_locale": "en", "locales": {"en": {"title": "We miss you", "body": "Your course is waiting"}}},
}


def rules(n: int) -> list[dict[str, Any]]:
    """n rules in the proportions of the docstring's mix (2/5 quiz, 1/5 sessions, 1/5 modules, 1/10 each else)."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 10
        cohorts = [COHORTS[i % len(COHORTS)], COHORTS[(i + 3) % len(COHORTS)]]
        if kind < 4:
            out.append({"id": f"quiz-{i}", "trigger": "quiz_completed", "template": "badge",
                        "conditions": [{"field": "event.score", "op": ">=", "value": 70 + i % 30},
                                       {"field": "learner.cohort", "op": "in", "value": cohorts}]})
        elif kind < 6:
            out.append({"id": f"session-{i}", "trigger": "session_scheduled", "template": "session",
                        "conditions": [{"field": "learner.cohort", "op": "in", "value": cohorts}],
                        "timing": {"relative_to": "starts_at", "offsets_s": [-86400, -900]}})
        elif kind < 8:
            out.append({"id": f"module-{i}", "trigger": "module_completed", "template": "module",
                        "conditions": [{"field": "learner.cohort", "op": "==", "value": cohorts[0]}]})
        elif kind == 8:
            out.append({"id": f"deadline-{i}", "trigger": "deadline_set", "template": "deadline",
                        "timing": {"relative_to": "due_at", "offsets_s": [-172800]}})
        else:
            out.append({"id": f"idle-{i}", "trigger": "inactivity", "inactive_days": 7, "template": "nudge"})
    return out


def events(n: int, learners: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    now = time.time()
    out: list[dict[str, Any]] = []
    for i in range(n):
        user = f"l{rng.randrange(learners)}"
        kind = rng.random()
        if kind < 0.4:
            e = {"type": "quiz_completed", "quiz": f"q{rng.randrange(200)}", "score": rng.randrange(101)}
        elif kind < 0.55:
            e = {"type": "session_scheduled", "session": f"s{rng.randrange(500)}",
                 "starts_at": now + rng.randrange(2, 14) * 86400}
        elif kind < 0.75:
            e = {"type": "module_completed", "module": f"m{rng.randrange(100)}"}
        elif kind < 0.8:
            e = {"type": "deadline_set", "assignment": f"a{rng.randrange(100)}", "due_at": now + 7 * 86400}
        else:
            e = {"type": "activity"}
        out.append(e | {"id": f"e{i}", "user": user})
    return out


def _serve(redis_url: str, port: int) -> None:
    install_loop()
    settings = Settings(redis=RedisSettings(url=redis_url, prefix=PREFIX),
                        api=ApiSettings(clients=(ApiClient("bench", TOKEN, ("events", "devices", "campaigns")),),
                                        max_body_bytes=8 << 20))

    async def main() -> None:
        redis = make_redis(redis_url)
        await start_api(create_app(settings, redis), settings.api, "127.0.0.1", port, reuse_port=True)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _setup(base: str, n_rules: int, learners: int) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(150):  # the API process is starting
            try:
                async with http.get(f"{base}/v1/automations") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        for name, t in TEMPLATES.items():
            async with http.put(f"{base}/v1/templates/{name}", json=t) as r:
                assert r.status == 200, await r.text()
        for start in range(0, learners, 1000):
            users = [{"user": f"l{i}", "attributes": {"cohort": COHORTS[i % len(COHORTS)], "first_name": f"L{i}"}}
                     for i in range(start, min(learners, start + 1000))]
            async with http.post(f"{base}/v1/attributes/batch", json={"users": users}) as r:
                assert r.status == 200, await r.text()
        for rule in rules(n_rules):
            async with http.put(f"{base}/v1/automations/{rule['id']}", json=rule) as r:
                assert r.status == 201, await r.text()


async def _post(base: str, bodies: list[bytes], clients: int) -> tuple[int, float]:
    handled = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        async def worker() -> None:
            nonlocal handled
            while bodies:
                async with http.post(f"{base}/v1/events", data=bodies.pop(), headers=headers) as r:
                    doc = await r.json()
                    if r.status != 202:
                        raise RuntimeError(f"API answered {r.status}: {doc}")
                    handled += doc["handled"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return handled, time.perf_counter() - t0


async def _queued(redis_url: str) -> int:
    redis = make_redis(redis_url)
    try:
        return int(await redis.xlen(f"{PREFIX}:stream")) + int(await redis.zcard(f"{PREFIX}:delayed"))
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", type=int, default=50)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--learners", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args(argv)
    evs = events(args.events, args.learners, args.seed)
    bodies = [orjson.dumps({"events": evs[i:i + args.batch]}) for i in range(0, len(evs), args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", aof=False)
        url = redis.start()
        port = free_port()
        proc = mp.get_context("spawn").Process(target=_serve, args=(url, port), daemon=True)
        proc.start()
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(_setup(base, args.rules, args.learners))
            api_pid, redis_pid = proc.pid or 0, redis.proc.pid if redis.proc else 0
            cpu0, rcpu0 = proc_stat(api_pid)[0], proc_stat(redis_pid)[0]
            handled, seconds = asyncio.run(_post(base, bodies, args.clients))
            cpu, rcpu = proc_stat(api_pid)[0] - cpu0, proc_stat(redis_pid)[0] - rcpu0
            queued = asyncio.run(_queued(url))
        finally:
            proc.terminate()
            proc.join(5)
            redis.stop()
    result = {"rules": args.rules, "events": handled, "seconds": round(seconds, 3),
              "events_per_s": round(handled / seconds), "messages_queued": queued, "batch": args.batch,
              "clients": args.clients, "learners": args.learners,
              "api_cpu_s_per_100k": round(cpu / handled * 1e5, 2), "redis_cpu_s_per_100k": round(rcpu / handled * 1e5, 2)}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
