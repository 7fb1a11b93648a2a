"""`pushgw`: the command line. Subcommands: demo, serve, worker, api, send, trace, webhooks, dlq, devices, prefs, users,
templates, campaigns, events, automations, vapid-keygen.

With no Redis configured (`redis.url` / PUSHGW_REDIS_URL empty) every command uses the embedded
Redis in `redis.embedded_dir`: it joins the one a running `pushgw serve` started, or starts it.

Each command imports what it needs inside its function: prometheus-client picks its multiprocess
mode when it is first imported, so `main` sets PROMETHEUS_MULTIPROC_DIR before anything that
imports it (core/metrics.py) is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.config import ConfigError, Settings, load_settings
from ..queue.connection import redis_from_url, redis_url_for
from .embedded import EmbeddedRedis, EmbeddedRedisError


def _multiproc_dir() -> None:
    """Prometheus multiprocess mode must be chosen before prometheus_client is imported (a folder named by
    PROMETHEUS_MULTIPROC_DIR is made in `main`)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pushgw-metrics-")


def redis_target(settings: Settings) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use (`redis+sentinel://`, `redis+cluster://` in those modes), and the embedded server this process started
    (to stop on exit)."""
    configured = redis_url_for(settings.redis)
    if configured:
        return configured, None
    embedded = EmbeddedRedis(
        settings.redis.embedded_dir, aof=settings.redis.embedded_aof, fsync=settings.redis.embedded_fsync
    )
    if embedded.is_live():
        return embedded.url, None
    return embedded.start(), embedded


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return run_demo(learners=args.learners, messages=args.messages, processes=args.processes, seed=args.seed)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from ..bench.run import options_from, run

    if args.messages < 1 or args.users < 1 or args.processes < 1 or args.rate < 0 or args.duration < 0:
        sys.stderr.write("error: --messages, --users and --processes must be at least 1; --rate and --duration >= 0\n")
        return 2
    if args.duration and not args.rate:
        sys.stderr.write("error: --duration needs --rate (a soak runs at a steady rate)\n")
        return 2

    def _terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds like Ctrl-C: workers, nginx and Redis are stopped on the way out

    try:
        options = options_from(args)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    signal.signal(signal.SIGTERM, _terminated)
    return run(options)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """API and worker processes on one host, sharing one metrics folder."""
    _multiproc_dir()
    from .api.app import serve_api
    from .pool import Pool, install_loop

    url, embedded = redis_target(settings)
    processes = args.processes or settings.worker.processes
    pool = Pool(settings, url, processes, args.consumer_prefix)
    pool.start()
    install_loop()
    try:
        asyncio.run(serve_api(settings, url, supervise=pool.supervise_once))
    finally:
        pool.stop()
        if embedded:
            embedded.stop()
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    _multiproc_dir()
    import signal
    import time

    from .pool import Pool

    url, embedded = redis_target(settings)
    pool = Pool(settings, url, args.processes or settings.worker.processes, args.consumer_prefix)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    pool.start()
    try:
        if settings.worker.metrics_port:  # the probes and /metrics over HTTP; supervises until SIGTERM
            from .api.probe_server import serve_probes

            asyncio.run(serve_probes(settings, url, settings.worker.metrics_port, pool.supervise_once))
        else:
            while not stop:
                pool.supervise_once()
                time.sleep(0.5)
    finally:
        pool.stop()
        if embedded:
            embedded.stop()
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from .api.app import serve_api
    from .pool import install_loop

    url, embedded = redis_target(settings)
    install_loop()
    try:
        asyncio.run(serve_api(settings, url))
    finally:
        if embedded:
            embedded.stop()
    return 0


async def _with_client(settings: Settings, fn: Any) -> Any:
    url, embedded = redis_target(settings)
    client = redis_from_url(url)
    try:
        return await fn(client)
    finally:
        await client.aclose()
        if embedded:
            embedded.stop()


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from ..core.schema import MessageInvalid
    from .client import PushClient

    if args.json:
        raw = sys.stdin.read() if args.json == "-" else Path(args.json).read_text()
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            sys.stderr.write(f"error: {args.json} is not valid JSON: {e}\n")
            return 2
    else:
        obj = {k: v for k, v in {
            "user": args.user, "title": args.title, "body": args.body, "category": args.category,
            "priority": args.priority, "ttl": args.ttl, "id": args.id, "send_at": args.send_at,
            "template": args.template, "vars": json.loads(args.vars) if args.vars else None,
        }.items() if v is not None}
    messages = obj if isinstance(obj, list) else [obj]

    async def go(redis: Any) -> list[tuple[str, bool]]:
        result: list[tuple[str, bool]] = await PushClient(redis, settings).send_many(messages)
        return result

    try:
        results = asyncio.run(_with_client(settings, go))
    except MessageInvalid as e:
        sys.stderr.write("error: message rejected:\n" + "".join(f"  {err}\n" for err in e.errors))
        return 2
    _print([{"id": i, "status": "queued" if ok else "duplicate"} for i, ok in results])
    return 0


def _trace_lines(status: dict[str, Any]) -> list[str]:
    """A status as a person reads it: the message, its devices, then the timeline."""
    import datetime as dt

    def when(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"

    head = f"message {status['id']}: {status['state']}"
    who = ", ".join(f"{k} {status[k]}" for k in ("user", "client", "campaign") if k in status)
    lines = [head + (f" ({who})" if who else "")]
    for d in status.get("devices", []):
        extra = {k: v for k, v in d.items() if k not in ("device", "at", "state")}
        lines.append(f"  device {d['device']}: {d['state']} at {when(d['at'])} {json.dumps(extra) if extra else ''}".rstrip())
    for s in status.get("timeline", []):
        extra = {k: v for k, v in s.items() if k not in ("at", "state")}
        lines.append(f"  {when(s['at'])}  {s['state']:<14} {json.dumps(extra) if extra else ''}".rstrip())
    return lines


def cmd_trace(args: argparse.Namespace, settings: Settings) -> int:
    from .client import PushClient

    if bool(args.message_id) == bool(args.user):
        sys.stderr.write("error: give a MESSAGE_ID or --user USER\n")
        return 2
    if args.limit < 1:
        sys.stderr.write("error: --limit must be at least 1\n")
        return 2

    async def go(redis: Any) -> Any:
        client = PushClient(redis, settings)
        if args.user:
            return await client.user_messages(args.user, args.limit)
        return await client.message_status(args.message_id)

    found = asyncio.run(_with_client(settings, go))
    if found is None:
        sys.stderr.write(f"error: no status for message {args.message_id} (unknown, or past status.retention_s)\n")
        return 1
    if args.json:
        _print(found)
        return 0
    for status in found if isinstance(found, list) else [found]:
        sys.stdout.write("\n".join(_trace_lines(status)) + "\n")
    return 0


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "run":
        _multiproc_dir()  # before anything imports core.metrics
        return asyncio.run(_run_webhooks(settings, args.consumer, args.metrics_port))
    from . import webhooks

    if args.action == "replay" and not args.ids and not args.all:
        sys.stderr.write("error: webhooks replay needs dead-letter ids (from `pushgw webhooks list`) or --all\n")
        return 2

    async def go(redis: Any) -> Any:
        if args.action == "list":
            return await webhooks.dead_letters(settings, redis, args.count)
        return await webhooks.replay(settings, redis, None if args.all else args.ids)

    out = asyncio.run(_with_client(settings, go))
    _print(out)
    return 1 if args.action == "replay" and out["failed"] else 0


async def _run_webhooks(settings: Settings, consumer: str, metrics_port: int) -> int:
    """The dispatcher until SIGTERM/SIGINT, with /metrics on `metrics_port` (0: none)."""
    from aiohttp import web

    from ..core import metrics
    from ..queue.connection import redis_from_url
    from .webhooks import WebhookDispatcher

    if not settings.webhooks.subscriptions:
        sys.stderr.write("error: no [[webhooks.subscriptions]] configured\n")
        return 2
    url, embedded = redis_target(settings)
    redis = redis_from_url(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    if metrics_port:
        async def _metrics(request: web.Request) -> web.Response:
            body, content_type = metrics.render()
            return web.Response(body=body, headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_get("/metrics", _metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, settings.api.host, metrics_port).start()
    try:
        await WebhookDispatcher(settings, redis, consumer=consumer).run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await redis.aclose()
        if embedded:
            embedded.stop()
    return 0


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from ..queue.deadletter import ShardedDeadLetters
    from ..queue.sharded import BadShardedId, shard_map

    if args.action in ("replay", "purge") and not args.ids and not args.all:
        sys.stderr.write(f"error: dlq {args.action} needs entry ids (from `pushgw dlq list`) or --all\n")
        return 2

    async def go(redis: Any) -> Any:
        dl = ShardedDeadLetters(redis, shard_map(settings.redis))
        if args.action == "list":
            return [e.to_json() if hasattr(e, "to_json") else e for e in await dl.list(args.count or 50, args.start)]
        if args.action == "count":
            return {"dead_letters": await dl.count()}
        ids = args.ids or None
        if args.action == "replay":
            return {"replayed": await dl.replay(ids, limit=args.count)}
        return {"purged": await dl.purge(ids)}

    try:
        _print(asyncio.run(_with_client(settings, go)))
    except BadShardedId as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


def cmd_devices(args: argparse.Namespace, settings: Settings) -> int:
    from .client import PushClient

    async def go(redis: Any) -> Any:
        client = PushClient(redis, settings)
        if args.action == "add":
            device = json.loads(args.device)
            await client.register_device(args.user, device)
            return {"registered": args.user}
        if args.action == "rm":
            return {"removed": await client.unregister_device(args.user, args.key)}
        return [d.to_json() | {"key": d.key} for d in await client.devices(args.user)]

    _print(asyncio.run(_with_client(settings, go)))
    return 0


def cmd_prefs(args: argparse.Namespace, settings: Settings) -> int:
    from ..core.schema import MessageInvalid
    from .client import UNSET, PushClient

    async def go(redis: Any) -> Any:
        client = PushClient(redis, settings)
        changes = args.timezone is not None or args.clear_timezone or args.opt_out_all is not None \
            or args.opt_out is not None
        if not changes:
            return (await client.preferences(args.user)).to_json()
        timezone: Any = None if args.clear_timezone else (args.timezone if args.timezone is not None else UNSET)
        categories = [c for c in args.opt_out.split(",") if c] if args.opt_out is not None else None
        prefs = await client.set_preferences(args.user, timezone=timezone, opt_out_all=args.opt_out_all,
                                             opt_out_categories=categories)
        return prefs.to_json()

    try:
        _print(asyncio.run(_with_client(settings, go)))
    except MessageInvalid as e:
        sys.stderr.write("error: preferences rejected:\n" + "".join(f"  {err}\n" for err in e.errors))
        return 2
    return 0


def _read_json(path: str) -> Any:
    """A JSON document from a file or stdin (-), or JSON lines when the file ends in .jsonl."""
    raw = sys.stdin.read() if path == "-" else Path(path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in raw.splitlines() if line.strip()]
    return json.loads(raw)


def _campaign_command(settings: Settings, fn: Any) -> int:
    """Run `fn(client, redis)`; validation errors and refusals print to stderr with exit status 2."""
    from ..campaigns.fanout import CampaignError
    from ..campaigns.report import ChartUnavailable
    from ..campaigns.templates import RenderError
    from ..core.schema import MessageInvalid
    from .client import PushClient

    async def go(redis: Any) -> Any:
        return await fn(PushClient(redis, settings), redis)

    try:
        out = asyncio.run(_with_client(settings, go))
    except MessageInvalid as e:
        sys.stderr.write("error: rejected:\n" + "".join(f"  {err}\n" for err in e.errors))
        return 2
    except (CampaignError, RenderError, ChartUnavailable, TimeoutError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except (OSError, json.JSONDecodeError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if isinstance(out, str):
        sys.stdout.write(out)
    elif out is not None:
        _print(out)
    return 0


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    async def go(client: Any, redis: Any) -> Any:
        if args.action == "import":
            rows = _read_json(args.target)
            return {"imported": await client.import_attributes(
                [(r.get("user"), r.get("attributes")) if isinstance(r, dict) else (None, None) for r in rows])}
        if args.action == "set":
            attrs = json.loads(args.attributes or "{}")
            return (await client.set_attributes(args.target, attrs, replace=args.replace)).to_json()
        return (await client.attributes(args.target)).to_json()

    return _campaign_command(settings, go)


def cmd_templates(args: argparse.Namespace, settings: Settings) -> int:
    async def go(client: Any, redis: Any) -> Any:
        from ..campaigns.templates import Templates
        from ..queue.sharded import home_keys, shard_map

        templates = Templates(redis, home_keys(shard_map(settings.redis)))
        if args.action == "list":
            return await templates.names()
        if args.action == "put":
            return (await client.save_template(args.name, _read_json(args.file))).to_json()
        if args.action == "render":
            r = await client.render_template(args.name, json.loads(args.vars or "{}"), args.locale)
            return {"locale": r.locale, "title": r.title, "body": r.body, "data": r.data, **r.rich}
        t = await templates.require(args.name, "name")
        return t.to_json()

    if args.action in ("put", "show", "render") and not args.name:
        sys.stderr.write(f"error: templates {args.action} needs a template name\n")
        return 2
    if args.action == "put" and not args.file:
        sys.stderr.write("error: templates put NAME FILE.json\n")
        return 2
    return _campaign_command(settings, go)


def cmd_campaigns(args: argparse.Namespace, settings: Settings) -> int:
    async def go(client: Any, redis: Any) -> Any:
        from ..campaigns.fanout import CampaignStore, FanoutRunner
        from ..campaigns.report import format_report
        from ..queue.sharded import home_keys, shard_map

        shards = shard_map(settings.redis)
        store = CampaignStore(redis, home_keys(shards), shards)
        if args.action == "list":
            return await store.ids()
        if args.action == "create":
            return (await client.create_campaign(_read_json(args.target))).to_json()
        if args.action == "run":
            return {"finished": await FanoutRunner(redis, settings).run_pending()}
        if args.action == "launch":
            if args.percent is None:
                sys.stderr.write("error: campaigns launch ID --percent P (10: a pilot; 100: everyone)\n")
                return None
            return await client.launch_campaign(args.target, args.percent, json.loads(args.weights) if args.weights else None)
        if args.action == "status":
            if args.wait:
                return await client.wait_for_fanout(args.target, timeout_s=args.timeout)
            return await client.campaign_status(args.target)
        if args.action == "report":
            report = await client.campaign_report(args.target)
            if args.chart:
                from ..campaigns.report import chart_png

                png = chart_png(report)
                await asyncio.to_thread(Path(args.chart).write_bytes, png)
            return report if args.json else format_report(report)
        s = await store.require(args.target)
        return s.campaign.to_json() | {"stage_percent": s.stage_percent}

    if args.action not in ("list", "run") and not args.target:
        sys.stderr.write(f"error: campaigns {args.action} needs {'a file' if args.action == 'create' else 'a campaign id'}\n")
        return 2
    if args.action == "launch" and args.percent is None:
        sys.stderr.write("error: campaigns launch ID --percent P (10: a pilot; 100: everyone)\n")
        return 2
    return _campaign_command(settings, go)


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    async def go(client: Any, redis: Any) -> Any:
        from ..campaigns.events import summary
        from ..core.schema import FieldError, MessageInvalid

        if args.action == "import":
            events = _read_json(args.file)
            if not isinstance(events, list):
                raise MessageInvalid([FieldError(args.file, "must hold a JSON list of events, or JSON lines (one event a line)")])
            results: list[dict[str, Any]] = []
            for i in range(0, len(events), 1000):
                results += await client.report_events(events[i:i + 1000])
            return summary(results)
        event = {k: v for k, v in {"type": args.type, "message_id": args.message_id, "campaign": args.campaign,
                                   "user": args.user}.items() if v is not None}
        return (await client.report_events([event]))[0]

    if args.action == "import" and not args.file:
        sys.stderr.write("error: events import FILE.jsonl\n")
        return 2
    return _campaign_command(settings, go)


def cmd_automations(args: argparse.Namespace, settings: Settings) -> int:
    async def go(client: Any, redis: Any) -> Any:
        from ..automations.report import automation_report, format_automation_report
        from ..automations.rules import rules_from_toml
        from ..automations.store import RuleStore
        from ..queue.keys import Keys

        keys = Keys(settings.redis.prefix)
        store = RuleStore(redis, keys)
        if args.action == "list":
            return [r.to_json() for r in await store.all()]
        if args.action == "load":  # every [[automations]] table of a TOML file, all or nothing
            text = await asyncio.to_thread(Path(args.target).read_text)
            saved = await store.save_many(rules_from_toml(text))
            return [{"id": r.id, "status": "created" if created else "replaced"} for r, created in saved]
        if args.action == "put":
            rule, created = await store.save(args.target, _read_json(args.file))
            return rule.to_json() | {"status": "created" if created else "replaced"}
        if args.action in ("pause", "resume"):
            return (await store.set_paused(args.target, args.action == "pause")).to_json()
        if args.action == "delete":
            return {"deleted": await store.delete(args.target)}
        if args.action == "report":
            report = await automation_report(redis, keys, args.target)
            return report if args.json else format_automation_report(report)
        return (await store.require(args.target)).to_json()

    if args.action != "list" and not args.target:
        sys.stderr.write(f"error: automations {args.action} needs {'a TOML file' if args.action == 'load' else 'a rule id'}\n")
        return 2
    if args.action == "put" and not args.file:
        sys.stderr.write("error: automations put ID FILE.json\n")
        return 2
    from ..automations.store import RuleNotFound, TooManyRules

    try:
        return _campaign_command(settings, go)
    except (RuleNotFound, TooManyRules) as e:
        sys.stderr.write(f"error: {'no automation ' if isinstance(e, RuleNotFound) else ''}{e}\n")
        return 2


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Move a single-Redis deployment (`--from`) onto the Redis Cluster shards the config describes (README, Scaling
    Redis: stop the old workers first; rerunning is safe)."""
    from ..queue.connection import is_cluster_url, redis_from_url
    from .migrate import Migration

    if not settings.redis.cluster:
        sys.stderr.write("error: migrate moves a deployment onto Redis Cluster: the config needs redis.cluster = true "
                         "and redis.cluster_nodes\n")
        return 2
    if is_cluster_url(args.source) or not args.source.startswith(("redis://", "rediss://", "unix://")):
        sys.stderr.write("error: --from takes the old single Redis's URL (redis://, rediss:// or unix://)\n")
        return 2

    async def go(dest: Any) -> Any:
        source = redis_from_url(args.source)
        try:
            return (await Migration(source, dest, settings, source_prefix=args.from_prefix).run()).to_json()
        finally:
            await source.aclose()

    _print(asyncio.run(_with_client(settings, go)))
    return 0


def cmd_vapid_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from ..providers.vapid import application_server_key, load_vapid_key, make_vapid_key

    path = make_vapid_key(args.directory)
    # The public half is what web pages pass to pushManager.subscribe({applicationServerKey}).
    _print({"vapid_private_key_file": str(path), "application_server_key": application_server_key(load_vapid_key(path))})
    return 0


# ---------------------------------------------------------------------------- parser


def _share(text: str) -> float:
    """A share from 0 to 1 (`pushgw bench --rich`)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be from 0 to 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pushgw", description="Push delivery gateway: Redis Streams to APNs, FCM, Web Push")
    p.add_argument("--config", "-c", help="TOML settings file (default: $PUSHGW_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the main job on an embedded Redis with local provider fakes")
    d.add_argument("--learners", type=int, default=400)
    d.add_argument("--messages", type=int, default=3000)
    d.add_argument("--processes", type=int, default=2)
    d.add_argument("--seed", type=int, default=7)
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="load-test the gateway on this machine (private Redis, sinks, workers)")
    b.add_argument("--messages", type=int, default=50_000, help="messages to enqueue (default 50000)")
    b.add_argument("--users", type=int, default=10_000, help="users, each with 1-2 devices (default 10000)")
    b.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    b.add_argument("--mode", choices=("fast", "strict"), default="fast",
                   help="fast: nginx sinks (installed if missing); strict: the protocol-checking fakes")
    b.add_argument("--rate", type=float, default=0.0, help="enqueue at this many messages/s (default: all at once)")
    b.add_argument("--duration", type=float, default=0.0, help="with --rate: run this many seconds (a soak)")
    b.add_argument("--no-baseline", action="store_true", help="skip the direct-to-provider baseline")
    b.add_argument("--json", help="write the result as JSON to this file")
    b.add_argument("--plots", help="write throughput.png and latency_cdf.png to this folder (needs matplotlib)")
    b.add_argument("--policy", choices=("off", "default", "full"), default="default",
                   help="default: as deployed (preferences read per batch); full: every rule on with limits out of "
                        "reach; compare full with off to see the policy's cost")
    b.add_argument("--status", choices=("on", "off"), default="on",
                   help="message status and outcome events written by the workers (on, as deployed); compare with "
                        "off to see their cost")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--profile", metavar="DIR",
                   help="sample the workers with py-spy into DIR and show their CPU per delivery by component")
    b.add_argument("--redis", default="single", metavar="single|sentinel|cluster:N",
                   help="one embedded Redis (default), a master and a replica behind three sentinels, or a "
                        "loopback Redis Cluster of N masters, 16 shards")
    b.add_argument("--rich", type=_share, nargs="?", const=0.5, default=0.0, metavar="SHARE",
                   help="send this share of the messages (0-1; 0.5 when no value is given) with rich fields: "
                        "image, badge, sound, actions, thread, link")
    b.set_defaults(fn=cmd_bench)

    for name, fn, help_ in (
        ("serve", cmd_serve, "HTTP API plus worker processes"),
        ("worker", cmd_worker, "worker processes only"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--processes", type=int, default=0, help="default: worker.processes")
        s.add_argument("--consumer-prefix", default=None, help="consumer names are <prefix>:<index> (default: host name)")
        s.set_defaults(fn=fn)
    sub.add_parser("api", help="HTTP API only").set_defaults(fn=cmd_api)

    s = sub.add_parser("send", help="enqueue a message (validated like the API)")
    s.add_argument("--json", help="file with a message or a list of messages, or - for stdin")
    s.add_argument("--user")
    s.add_argument("--title")
    s.add_argument("--body")
    s.add_argument("--category")
    s.add_argument("--priority", choices=["normal", "high"])
    s.add_argument("--ttl", type=int)
    s.add_argument("--send-at", type=float, dest="send_at", help="unix seconds: hold the message until then")
    s.add_argument("--id")
    s.add_argument("--template", help="a saved template instead of --title/--body, rendered for the user's locale")
    s.add_argument("--vars", help='the template\'s variables as JSON, e.g. \'{"score": "87"}\'')
    s.set_defaults(fn=cmd_send)

    q = sub.add_parser("dlq", help="dead letters: list, count, replay, purge")
    q.add_argument("action", choices=["list", "count", "replay", "purge"])
    q.add_argument("ids", nargs="*")
    q.add_argument("--all", action="store_true")
    q.add_argument("--count", type=int, default=None, help="list: how many (default 50); replay: at most this many")
    q.add_argument("--start", default="-")
    q.set_defaults(fn=cmd_dlq)

    tr = sub.add_parser("trace", help="where is my message: a message's status, or a learner's recent messages")
    tr.add_argument("message_id", nargs="?", help="the message id")
    tr.add_argument("--user", help="list this learner's recent messages with their state instead")
    tr.add_argument("--limit", type=int, default=20, help="with --user: at most this many (newest first)")
    tr.add_argument("--json", action="store_true", help="print the status as JSON (as the API answers it)")
    tr.set_defaults(fn=cmd_trace)

    wh = sub.add_parser("webhooks", help="outcome webhooks: run the dispatcher, list or replay dead-lettered batches")
    wh.add_argument("action", choices=["run", "list", "replay"])
    wh.add_argument("ids", nargs="*", help="replay: dead-letter ids from `webhooks list`")
    wh.add_argument("--all", action="store_true", help="replay: every dead-lettered batch")
    wh.add_argument("--count", type=int, default=100, help="list: at most this many")
    wh.add_argument("--consumer", default=socket.gethostname(),
                    help="run: this dispatcher's name in the consumer groups (a restart under the same name resumes "
                         "its unacknowledged batches); default: the host name")
    wh.add_argument("--metrics-port", type=int, default=9102, help="run: serve /metrics here (0: none)")
    wh.set_defaults(fn=cmd_webhooks)

    v = sub.add_parser("devices", help="device registry: add, list, rm")
    v.add_argument("action", choices=["add", "list", "rm"])
    v.add_argument("user")
    v.add_argument("--device", help='JSON, e.g. \'{"fcm": "<token>"}\'')
    v.add_argument("--key", help="device key (from list) for rm")
    v.set_defaults(fn=cmd_devices)

    f = sub.add_parser("prefs", help="a user's time zone and opt-outs: show, or change the options given")
    f.add_argument("user")
    f.add_argument("--timezone", help="IANA name, e.g. Europe/Paris (send windows are in this zone)")
    f.add_argument("--clear-timezone", action="store_true", help="use the policy's default zone again")
    f.add_argument("--opt-out-all", dest="opt_out_all", action="store_true", default=None, help="no push at all")
    f.add_argument("--opt-in-all", dest="opt_out_all", action="store_false", help="undo --opt-out-all")
    f.add_argument("--opt-out", metavar="CATEGORIES",
                   help="comma-separated categories the user opted out of (replaces the list; '' clears it)")
    f.set_defaults(fn=cmd_prefs)

    u = sub.add_parser("users", help="learner attributes: set USER --attributes JSON, show USER, import FILE.jsonl")
    u.add_argument("action", choices=["set", "show", "import"])
    u.add_argument("target", help="a user id (set, show) or a JSON lines file of {user, attributes} (import)")
    u.add_argument("--attributes", help='JSON, e.g. \'{"cohort": "intermediate", "locale": "fr"}\'')
    u.add_argument("--replace", action="store_true", help="set: replace all attributes (default: change those named)")
    u.set_defaults(fn=cmd_users)

    t = sub.add_parser("templates", help="message templates: put NAME FILE.json, show NAME, list, render NAME")
    t.add_argument("action", choices=["put", "show", "list", "render"])
    t.add_argument("name", nargs="?")
    t.add_argument("file", nargs="?", help="put: the template JSON (or - for stdin)")
    t.add_argument("--vars", help="render: JSON object of variables")
    t.add_argument("--locale", help="render: the learner's locale, e.g. fr")
    t.set_defaults(fn=cmd_templates)

    c = sub.add_parser("campaigns", help="campaigns: create FILE.json, list, show, launch, status, report, run")
    c.add_argument("action", choices=["create", "list", "show", "launch", "status", "report", "run"])
    c.add_argument("target", nargs="?", help="a campaign id (create: the campaign JSON file)")
    c.add_argument("--percent", type=float, help="launch: the stage, e.g. 10 for a pilot, 100 for rollout")
    c.add_argument("--weights", help='launch: this stage\'s weights, e.g. \'{"social": 1}\' to roll out the winner')
    c.add_argument("--wait", action="store_true", help="status: wait until the fan-out is done")
    c.add_argument("--timeout", type=float, default=600.0, help="status --wait: at most this many seconds")
    c.add_argument("--json", action="store_true", help="report: JSON instead of a table")
    c.add_argument("--chart", help="report: also write a PNG chart here (needs matplotlib)")
    c.set_defaults(fn=cmd_campaigns)

    e = sub.add_parser("events", help="app events for campaign reports: send one, or import FILE.jsonl")
    e.add_argument("action", choices=["send", "import"])
    e.add_argument("file", nargs="?", help="import: JSON lines of events")
    e.add_argument("--type", choices=["opened", "clicked", "converted", "dismissed", "opt_out"])
    e.add_argument("--message-id", dest="message_id")
    e.add_argument("--campaign")
    e.add_argument("--user")
    e.set_defaults(fn=cmd_events)

    a = sub.add_parser("automations", help="automation rules: load FILE.toml, put ID FILE.json, list, show, pause, "
                                           "resume, delete, report")
    a.add_argument("action", choices=["load", "put", "list", "show", "pause", "resume", "delete", "report"])
    a.add_argument("target", nargs="?", help="a rule id (load: the TOML file of [[automations]] tables)")
    a.add_argument("file", nargs="?", help="put: the rule JSON (or - for stdin)")
    a.add_argument("--json", action="store_true", help="report: JSON instead of a table")
    a.set_defaults(fn=cmd_automations)

    mg = sub.add_parser("migrate", help="move a single-Redis deployment onto the Redis Cluster of the config "
                                        "(devices, preferences, attributes, templates, queued and scheduled messages)")
    mg.add_argument("--from", dest="source", required=True, metavar="URL", help="the old Redis, e.g. redis://old:6379/0")
    mg.add_argument("--from-prefix", dest="from_prefix", help="the old deployment's redis.prefix (default: the config's)")
    mg.set_defaults(fn=cmd_migrate)

    k = sub.add_parser("vapid-keygen", help="write a new VAPID (P-256) private key")
    k.add_argument("directory")
    k.set_defaults(fn=cmd_vapid_keygen)
    return p


# The commands whose data is sharded on Redis Cluster (queue/shards.py); the others (automations, the demo) still
# use one Redis's keys and exit 2 there, naming the command.
CLUSTER_READY = frozenset({cmd_serve, cmd_worker, cmd_api, cmd_send, cmd_devices, cmd_prefs, cmd_vapid_keygen, cmd_dlq,
                           cmd_users, cmd_templates, cmd_trace, cmd_webhooks, cmd_migrate, cmd_campaigns,
                           cmd_events})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:  # every command may count something: a folder not made yet (by a supervisor) is made here
        os.makedirs(metrics_dir, exist_ok=True)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        sys.stderr.write(f"configuration error: {e}\n")
        return 2
    from ..core.logs import setup_logging

    setup_logging(settings.log_level)
    if settings.redis.cluster and args.fn not in CLUSTER_READY:
        sys.stderr.write(f"error: `pushgw {args.command}` does not work on Redis Cluster yet (redis.cluster = true); "
                         "see README, Scaling Redis\n")
        return 2
    try:
        code: int = args.fn(args, settings)
        return code
    except (EmbeddedRedisError, ConfigError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
