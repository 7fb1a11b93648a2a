"""`pushgw demo`: the main job, end to end, on one machine with nothing configured.

A private Redis, three provider fakes that speak the real protocols over TLS, a few hundred learners
with a device mix, and a realistic batch for a learning platform: live-session reminders (high
priority, short TTL, time-sensitive so Focus modes let them through), new-module alerts for a track
(with buttons and a link, shown as Web Push actions), quiz badges (an app badge and an image for a
score over 80%), and a live class countdown on a few lock screens (an APNs Live Activity started,
then updated). The rich fields are printed as the fakes received them. Some fakes are programmed to
fail the way the real services do (503 then success, 429 with Retry-After, dead tokens, a sender
mismatch), so the run shows retries, token removal and dead letters. At the end every delivery is
reconciled against what the fakes received: lost and duplicated must both be 0.

The parts of the gateway are imported inside `run_demo`, after it sets PROMETHEUS_MULTIPROC_DIR:
prometheus-client picks its multiprocess mode when it is first imported.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from ..core.config import (
    ApnsApp,
    FcmApp,
    ProviderSettings,
    RedisSettings,
    Settings,
    WebPushSettings,
    WorkerSettings,
)

TOPIC = "org.example.campus"
TRACKS = ("data-science", "web-dev", "ux-design")


@dataclass(slots=True)
class Learner:
    user: str
    track: str
    devices: list[dict[str, Any]]


_last_line = 0.0


def _progress(done: int, total: int, started: float, extra: str = "", *, force: bool = False) -> None:
    """A bar redrawn in place on a terminal; a plain line every 5 s when the output is a file or a pipe."""
    global _last_line
    width = 30
    filled = int(width * done / total) if total else width
    rate = done / max(1e-6, time.monotonic() - started)
    text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} delivered  {rate:,.0f}/s {extra}"
    if sys.stderr.isatty():
        sys.stderr.write(f"\r  {text}   ")
    elif force or time.monotonic() - _last_line >= 5.0:
        _last_line = time.monotonic()
        sys.stderr.write(f"  {text}\n")
    sys.stderr.flush()


def run_demo(*, learners: int = 400, messages: int = 3000, processes: int = 2, seed: int = 7) -> int:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pushgw-demo-metrics-")
    from .pool import install_loop

    install_loop()
    with tempfile.TemporaryDirectory(prefix="pushgw-demo-") as tmp:
        return asyncio.run(_demo(Path(tmp), learners, messages, processes, seed))


async def _demo(tmp: Path, n_learners: int, n_messages: int, processes: int, seed: int) -> int:
    import redis.asyncio as aioredis

    from ..providers.fakes.apns import FakeApns, make_apns_key
    from ..providers.fakes.fcm import FakeFcm, make_service_account
    from ..providers.fakes.tls import make_local_ca
    from ..providers.fakes.webpush import FakePushService
    from ..providers.vapid import make_vapid_key
    from ..queue.keys import Keys
    from ..queue.streams import StreamQueue
    from .client import PushClient
    from .embedded import EmbeddedRedis
    from .pool import Pool

    rng = random.Random(seed)
    out = sys.stdout
    out.write("pushgw demo: embedded Redis, local APNs / FCM / Web Push fakes over TLS\n")
    ca = make_local_ca(tmp / "tls")
    apns_key = make_apns_key(tmp / "apns")
    vapid_file = make_vapid_key(tmp / "vapid")
    redis_server = EmbeddedRedis(tmp / "redis")
    url = redis_server.start()
    out.write(f"  redis    {url}\n")

    async with (
        FakeApns(ca, keys=[apns_key], topics=[TOPIC]) as apns,
        FakeFcm(ca) as fcm,
        FakePushService(ca) as webpush,
    ):
        sa_file = make_service_account(tmp / "fcm", fcm.token_uri, project_id="campus-demo")
        fcm.trust(sa_file)
        out.write(f"  apns     https://127.0.0.1:{apns.port}  (HTTP/2, ES256 JWT)\n")
        out.write(f"  fcm      {fcm.base_url}  (HTTP v1, OAuth2 token endpoint {fcm.token_uri})\n")
        out.write(f"  webpush  https://127.0.0.1:{webpush.port}  (VAPID, aes128gcm)\n")

        settings = Settings(
            redis=RedisSettings(url=url),
            worker=WorkerSettings(
                processes=processes, backoff_base_s=0.2, backoff_cap_s=2.0, max_attempts=5,
                claim_idle_s=10, janitor_interval_s=1.0, drain_deadline_s=10,
            ),
            providers=ProviderSettings(timeout_s=5.0, concurrency=128),
            # Each worker decision is a JSON log line at INFO; the demo shows only errors unless asked.
            log_level=os.environ.get("PUSHGW_LOG_LEVEL", "ERROR").upper(),
            apns=(ApnsApp("default", TOPIC, team_id=apns_key.team_id, key_id=apns_key.key_id,
                          key_file=str(apns_key.key_file), host="127.0.0.1", port=apns.port,
                          ca_file=str(ca.ca_file), connections=2),),
            fcm=(FcmApp("default", service_account_file=str(sa_file), base_url=fcm.base_url,
                        ca_file=str(ca.ca_file)),),
            webpush=WebPushSettings(vapid_private_key_file=str(vapid_file), vapid_subject="mailto:ops@campus.example",
                                    allowed_hosts=("127.0.0.1",), allow_private=True, ca_file=str(ca.ca_file)),
        )

        # Learners and their devices: 60% FCM, 30% APNs, 10% Web Push; some have two devices.
        learners: list[Learner] = []
        for i in range(n_learners):
            devices: list[dict[str, Any]] = []
            for _ in range(1 if rng.random() < 0.7 else 2):
                r = rng.random()
                if r < 0.6:
                    devices.append({"fcm": f"fcm-{i}-{len(devices)}-{rng.getrandbits(48):012x}"})
                elif r < 0.9:
                    devices.append({"apns": f"{rng.getrandbits(256):064x}"})
                else:
                    devices.append({"webpush": webpush.new_subscription()})
            learners.append(Learner(f"learner-{i}", TRACKS[i % 3], devices))

        # The fakes fail the way real services do, for a few devices.
        programmed = Counter[str]()
        for lr in learners:
            for d in lr.devices:
                r = rng.random()
                if "apns" in d:
                    if r < 0.03:
                        apns.program(d["apns"], [(410, "Unregistered", None)] * 50)
                        programmed["apns dead token (410 Unregistered)"] += 1
                    elif r < 0.08:
                        apns.program(d["apns"], [(503, "ServiceUnavailable", None)])
                        programmed["apns 503 once"] += 1
                elif "fcm" in d:
                    if r < 0.03:
                        fcm.program(d["fcm"], [(404, "UNREGISTERED", None)] * 50)
                        programmed["fcm dead token (UNREGISTERED)"] += 1
                    elif r < 0.06:
                        fcm.program(d["fcm"], [(429, "QUOTA_EXCEEDED", 1)])
                        programmed["fcm 429 Retry-After 1s"] += 1
                    elif r < 0.065:
                        fcm.program(d["fcm"], [(403, "SENDER_ID_MISMATCH", None)] * 50)
                        programmed["fcm sender mismatch (rejected)"] += 1
                elif r < 0.1:
                    webpush.program(_sub_id(d), [(410, None)] * 50)
                    programmed["webpush subscription gone (410)"] += 1

        redis = aioredis.from_url(url)
        client = PushClient(redis, settings)
        for lr in learners:
            for d in lr.devices:
                await client.register_device(lr.user, d)
        out.write(f"  {len(learners)} learners with {sum(len(lr.devices) for lr in learners)} devices registered\n")

        batch = _notifications(learners, n_messages, rng)
        batch += _live_activities(learners, rng)
        kinds = Counter(m["category"] for m in batch)
        started = time.monotonic()
        results = []
        for i in range(0, len(batch), 500):
            results += await client.send_many(batch[i:i + 500])
        queued = sum(1 for _, ok in results if ok)
        out.write(f"  enqueued {queued} messages ({', '.join(f'{v} {k}' for k, v in kinds.items())}) "
                  f"in {time.monotonic() - started:.2f}s\n")
        by_user = {lr.user: lr for lr in learners}
        expected = sum(len(_targets(m, by_user)) for m in batch)

        pool = Pool(replace(settings), url, processes, consumer_prefix="demo")
        pool.start()
        q = StreamQueue(redis, Keys())
        started = time.monotonic()
        try:
            deadline = started + 120
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                stats = await q.stats()
                received = len(apns.received) + len(fcm.received) + len(webpush.received)
                _progress(min(received, expected), expected, started,
                          f"pending {stats.pending} retries waiting {stats.delayed}")
                if stats.lag == 0 and stats.pending == 0 and stats.delayed == 0 and stats.length > 0:
                    break
            else:
                sys.stderr.write("\n  gave up waiting after 120 s\n")
        finally:
            await asyncio.to_thread(pool.stop)
        received = len(apns.received) + len(fcm.received) + len(webpush.received)
        _progress(received, expected, started, "(the rest: dead tokens and dead letters, below)", force=True)
        elapsed = time.monotonic() - started
        sys.stderr.write("\n")

        report = await _report(redis, settings, batch, by_user, apns, fcm, webpush, elapsed, programmed)
        await client.aclose()
        await redis.aclose()
    redis_server.stop()
    return 0 if report else 1


def _sub_id(device: dict[str, Any]) -> str:
    endpoint: str = device["webpush"]["endpoint"]
    return endpoint.rsplit("/", 1)[-1]


BADGE_IMAGE = "https://cdn.campus.example/badges/quiz-master.png"
MODULE_ACTIONS = [{"id": "open", "title": "Open module", "foreground": True}, {"id": "later", "title": "Later"}]
LIVE_CLASS_ACTIVITIES = 3  # lock screens showing the live class countdown


def _notifications(learners: list[Learner], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """A realistic mix: 50% session reminders, 35% new-module alerts, 15% quiz badges."""
    out: list[dict[str, Any]] = []
    now = int(time.time())
    for i in range(n):
        lr = learners[rng.randrange(len(learners))]
        r = rng.random()
        if r < 0.5:
            out.append({"id": f"reminder-{i}", "user": lr.user, "category": "reminder", "priority": "high",
                        "title": "Live session in 15 minutes", "body": f"{lr.track}: Q&A with your mentor",
                        "ttl": 900, "collapse_key": f"session-{i % 40}", "data": {"link": f"/live/{i % 40}"},
                        "interruption_level": "time-sensitive", "thread": f"live-{lr.track}"})
        elif r < 0.85:
            module = i % 12 + 1
            out.append({"id": f"module-{i}", "user": lr.user, "category": "new_content",
                        "title": "New module available", "body": f"Module {module} of {lr.track} is out",
                        "expires_at": now + 7 * 86400, "data": {"track": lr.track, "module": str(module)},
                        "campaign": "module-launch", "variant": "a" if i % 2 else "b",
                        "actions": MODULE_ACTIONS, "actions_category": "MODULE",
                        "link": f"https://campus.example/{lr.track}/modules/{module}"})
        else:
            score = 81 + rng.randrange(20)  # passed over 80%: a badge on the app icon and the badge's picture
            out.append({"id": f"badge-{i}", "user": lr.user, "category": "reward",
                        "title": "Badge earned", "body": f"You scored {score}% on the quiz",
                        "data": {"badge": "quiz-master", "score": str(score)}, "badge": 1, "image": BADGE_IMAGE})
    return out


def _live_activities(learners: list[Learner], rng: random.Random) -> list[dict[str, Any]]:
    """A live class countdown on a few lock screens: an APNs Live Activity started, then updated.

    A Live Activity has a push token of its own (ActivityKit), so these messages name their device."""
    now = int(time.time())
    out: list[dict[str, Any]] = []
    for k in range(min(LIVE_CLASS_ACTIVITIES, len(learners))):
        device = {"apns": f"{rng.getrandbits(256):064x}"}
        common = {"category": "reminder", "priority": "high", "devices": [device], "ttl": 900}
        out.append({**common, "id": f"live-class-{k}-start", "live_activity": {
            "event": "start", "timestamp": now, "attributes_type": "LiveClassAttributes",
            "attributes": {"course": learners[k].track}, "content_state": {"minutes_left": 15},
            "stale_date": now + 900}})
        out.append({**common, "id": f"live-class-{k}-update", "title": "Live class in 10 minutes",
                    "body": "Your mentor is getting ready", "live_activity": {
                        "event": "update", "timestamp": now + 1, "content_state": {"minutes_left": 10}}})
    return out


def _targets(message: dict[str, Any], by_user: dict[str, Learner]) -> list[dict[str, Any]]:
    """The devices a demo message goes to: its user's, or the ones it names (a Live Activity's token)."""
    devices: list[dict[str, Any]] = message["devices"] if "user" not in message else by_user[message["user"]].devices
    return devices


async def _report(redis: Any, settings: Settings, batch: list[dict[str, Any]], by_user: dict[str, Learner],
                  apns: Any, fcm: Any, webpush: Any, elapsed: float, programmed: Counter[str]) -> bool:
    from ..queue.deadletter import DeadLetters
    from ..queue.keys import Keys
    from ..users.registry import DeviceRegistry

    out = sys.stdout
    key_by_sub = {_sub_id(d): _dev_key(d) for lr in by_user.values() for d in lr.devices if "webpush" in d}
    got: Counter[tuple[str, str]] = Counter()
    for r in apns.received:
        got[(r.payload["pushgw"]["id"], f"apns:{r.token}")] += 1
    for r in fcm.received:
        got[(r.message["data"]["pushgw_id"], f"fcm:{r.message['token']}")] += 1
    for r in webpush.received:
        got[(orjson.loads(r.plaintext)["id"], key_by_sub[r.subscription_id])] += 1

    dead = await DeadLetters(redis, Keys()).list(count=10_000)
    events = await DeviceRegistry(redis, Keys()).invalid_token_events(count=10_000)
    dead_keys = {(e.message["id"], _dev_key(e.message["devices"][0])) for e in dead if e.message}
    dead_tokens = {ev["key"] for ev in events}

    lost = 0
    delivered = 0
    for m in batch:
        for d in _targets(m, by_user):
            key = (m["id"], _dev_key(d))
            if got[key]:
                delivered += 1
            elif key not in dead_keys and key[1] not in dead_tokens:
                lost += 1
    duplicates = sum(c - 1 for c in got.values() if c > 1)

    out.write(f"\nresult after {elapsed:.1f}s with {settings.worker.processes} worker processes\n")
    out.write(f"  {'provider':<10}{'delivered':>10}\n")
    for name, fake in (("apns", apns), ("fcm", fcm), ("webpush", webpush)):
        out.write(f"  {name:<10}{len(fake.received):>10}\n")
    out.write(f"  programmed provider failures: {dict(programmed)}\n")
    out.write(f"  retried and then delivered:   {sum(1 for r in _retried(apns, fcm, webpush))}\n")
    out.write(f"  dead tokens removed:          {len(dead_tokens)} devices, {len(events)} events "
              "(stream pushgw:events:invalid_tokens)\n")
    reasons = Counter(e.reason for e in dead)
    out.write(f"  dead-lettered:                {len(dead)} {dict(reasons)}\n")
    rich_ok = _rich_report(out, batch, apns, fcm, webpush)
    out.write(f"  reconciliation: {delivered} delivered, lost {lost}, duplicates {duplicates}\n")
    ok = lost == 0 and duplicates == 0 and rich_ok
    out.write("  OK: every delivery is accounted for\n" if ok else "  FAILED: see lost/duplicates above\n")
    return ok


def _rich_report(out: Any, batch: list[dict[str, Any]], apns: Any, fcm: Any, webpush: Any) -> bool:
    """Print each kind of rich delivery as the fakes received it (its count and one example's fields).

    False when a delivery of a rich message arrived without its fields, or a kind the batch holds
    arrived at no fake."""
    sent = {kind: sum(1 for m in batch if m["id"].startswith(prefix)) for kind, prefix in _RICH_KINDS}
    lines: dict[str, tuple[int, str]] = {}
    missing: Counter[str] = Counter()

    def seen(kind: str, fields_ok: bool, example: str) -> None:
        if not fields_ok:
            missing[kind] += 1
            return
        n, first = lines.get(kind, (0, example))
        lines[kind] = (n + 1, first)

    for r in apns.received:
        aps, mid = r.payload["aps"], r.payload["pushgw"]["id"]
        if mid.startswith("reminder-"):
            seen("time-sensitive reminder", aps.get("interruption-level") == "time-sensitive",
                 f"apns aps.interruption-level={aps.get('interruption-level')} thread-id={aps.get('thread-id')}")
        elif mid.startswith("badge-"):
            seen("quiz badge with image", aps.get("badge") == 1 and r.payload["pushgw"].get("image") == BADGE_IMAGE,
                 f"apns aps.badge={aps.get('badge')} mutable-content={aps.get('mutable-content')} "
                 f"pushgw.image={r.payload['pushgw'].get('image')}")
        elif mid.startswith("live-class-"):
            event = aps.get("event", "?")
            seen(f"live activity {event}", r.headers.get("apns-push-type") == "liveactivity"
                 and "content-state" in aps, f"apns apns-topic={r.topic} aps.event={event} "
                 f"content-state={orjson.dumps(aps.get('content-state')).decode()}")
    for r in fcm.received:
        m = r.message
        if m["data"]["pushgw_id"].startswith("badge-"):
            image = m.get("notification", {}).get("image")
            count = m["android"]["notification"].get("notification_count")
            seen("quiz badge with image", image == BADGE_IMAGE and count == 1,
                 f"fcm notification.image={image} android.notification.notification_count={count}")
    for r in webpush.received:
        shown = orjson.loads(r.plaintext)
        if shown["id"].startswith("module-"):
            actions = shown.get("actions", [])
            seen("web push with actions", [a["action"] for a in actions] == ["open", "later"],
                 f"webpush actions={[a['title'] for a in actions]} navigate={shown.get('navigate')}")
    out.write("  rich notifications, as the fakes received them (count, then one example):\n")
    ok = not missing
    for kind, _prefix in _RICH_KINDS:
        n, example = lines.get(kind, (0, "none arrived"))
        out.write(f"    {kind:<26}{n:>6}  {example}\n")
        ok = ok and (n > 0 or sent[kind] == 0)
    if missing:
        out.write(f"    FAILED: deliveries without their rich fields: {dict(missing)}\n")
    return ok


# What the demo's rich messages are (label, id prefix), in the order they are printed.
_RICH_KINDS = (
    ("time-sensitive reminder", "reminder-"), ("quiz badge with image", "badge-"),
    ("live activity start", "live-class-"), ("live activity update", "live-class-"),
    ("web push with actions", "module-"),
)


def _retried(*fakes: Any) -> list[Any]:
    return [r for f in fakes for r in getattr(f, "failed_then_ok", [])]


def _dev_key(d: dict[str, Any]) -> str:
    """The registry's key of a device given as API JSON (what events and dead letters carry)."""
    from ..core.schema import FieldError, parse_device

    errors: list[FieldError] = []
    device = parse_device(d, "device", errors, None)
    if device is None:
        raise ValueError(f"demo device is invalid: {errors}")
    return device.key
