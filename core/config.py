"""One frozen settings object, loaded from a TOML file and then overridden by environment variables.

Environment variables are `PUSHGW_<SECTION>_<KEY>` for scalar settings (e.g. `PUSHGW_REDIS_URL`,
`PUSHGW_WORKER_PROCESSES`, `PUSHGW_API_PORT`). A bad value stops the process at start with an
error that names the setting; it never silently falls back. Secrets (API tokens, key files) are
never included in `repr()` output, so a logged settings object leaks nothing.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .windows import SendWindows, WindowError, zone

ENV_PREFIX = "PUSHGW_"


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the setting."""


@dataclass(frozen=True, slots=True)
class SentinelSettings:
    """`[redis.sentinel]`: find the master through Redis Sentinel and follow it across failovers."""

    addresses: tuple[str, ...] = ()  # "host:port" of the sentinels; empty: Sentinel mode is off
    master: str = ""  # the name the sentinels monitor (`sentinel monitor <master> ...`)
    password: str = field(default="", repr=False)  # AUTH for the master and replicas
    sentinel_password: str = field(default="", repr=False)  # AUTH for the sentinels themselves
    db: int = 0


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = ""  # empty: start a private embedded redis-server (unless [redis.sentinel] is set)
    prefix: str = "pushgw"
    embedded_dir: str = ".pushgw/redis"
    embedded_aof: bool = True
    embedded_fsync: str = "everysec"  # "always": no acknowledged enqueue lost even if Redis is killed
    # WAIT for this many replicas to confirm an enqueue before it is acknowledged (0: asynchronous replication,
    # a failover may lose the last acknowledged writes); wait_timeout_ms bounds the wait (the API answers 503 past it).
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000
    sentinel: SentinelSettings = SentinelSettings()
    # Redis Cluster: keys spread over `shards` hash tags (queue/shards.py); fixed for a deployment's life.
    cluster: bool = False
    cluster_nodes: tuple[str, ...] = ()  # "host:port" seed nodes; the client discovers the rest
    shards: int = 16


# enqueue: messages; devices: devices, preferences, learner attributes; admin: dead letters, token events;
# campaigns: templates, campaigns, launches, reports; events: app events (opened, converted, ...) only.
SCOPES = ("enqueue", "devices", "admin", "campaigns", "events")


@dataclass(frozen=True, slots=True)
class ApiClient:
    name: str
    token: str = field(repr=False)
    scopes: tuple[str, ...] = ("enqueue",)  # of SCOPES
    rate_per_s: float = 0.0  # messages (or requests) per second this client may send; 0: no limit
    burst: int = 0  # bucket size; 0: one second's worth of rate_per_s


@dataclass(frozen=True, slots=True)
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1 << 20
    max_batch: int = 1000
    # Slow or silent clients cannot hold connections: a request's headers must all arrive within
    # header_timeout_s of its first byte, its body within body_timeout_s once the handler reads it; a
    # connection with no request under way is closed after idle_timeout_s; past max_connections open
    # connections per API process a new one is answered 503 and closed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    max_connections: int = 1024
    clients: tuple[ApiClient, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    processes: int = 2
    batch_size: int = 256
    block_ms: int = 500
    max_inflight: int = 4096  # deliveries in flight per process
    provider_backlog: int = 2048  # queued deliveries per provider before new ones are parked, unless the
    # provider drains its queue within 2 s at its measured rate (a burst on a healthy provider is not
    # parked); never more than 3/4 of max_inflight per provider: while a fast provider (draining
    # within 2 s) is at that cap only the high lane is read, a slow one is parked (gateway/worker.py)
    claim_idle_s: float = 60.0  # a pending entry idle this long belongs to a dead consumer
    janitor_interval_s: float = 5.0
    drain_deadline_s: float = 25.0
    metrics_port: int = 0  # `pushgw worker`: /metrics, /healthz, /readyz on api.host:metrics_port; 0: none
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    idempotency_window_s: int = 86400
    done_ttl_s: int = 86400
    high_weight: int = 4  # provider lanes: high sends in a row before a waiting normal delivery gets a sender
    high_reserve: int = 256  # deliveries in flight beyond max_inflight kept for the high lane


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    timeout_s: float = 10.0
    concurrency: int = 256  # requests in flight per provider per process (the lane's sender coroutines)
    circuit_failures: int = 20  # consecutive 5xx/timeouts that open a provider/app circuit
    circuit_open_s: float = 2.0  # first open period; doubles on each failed probe
    circuit_max_open_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ApnsApp:
    name: str
    topic: str
    team_id: str = ""
    key_id: str = ""
    key_file: str = field(default="", repr=False)  # .p8 ES256 key: token auth
    cert_file: str = field(default="", repr=False)  # PEM with certificate and key: certificate auth
    sandbox: bool = False
    host: str = ""  # default: api.push.apple.com or api.sandbox.push.apple.com
    port: int = 443
    ca_file: str = ""
    connections: int = 2
    push_type: str = "alert"
    # Apple granted this app the critical-alerts entitlement (com.apple.developer.usernotifications.critical-alerts):
    # only then are critical sounds and the critical interruption level accepted at the door.
    critical_alerts: bool = False
    # The topic of the MDM push certificate (com.apple.mgmt.External.<uuid>): apns-push-type mdm goes there.
    mdm_topic: str = ""


@dataclass(frozen=True, slots=True)
class FcmApp:
    name: str
    service_account_file: str = field(default="", repr=False)
    project_id: str = ""  # default: from the service account JSON
    base_url: str = "https://fcm.googleapis.com"
    token_uri: str = ""  # default: from the service account JSON
    ca_file: str = ""


@dataclass(frozen=True, slots=True)
class WebPushSettings:
    vapid_private_key_file: str = field(default="", repr=False)  # PEM, P-256
    vapid_subject: str = "mailto:ops@example.org"
    allowed_hosts: tuple[str, ...] = (
        "fcm.googleapis.com",
        "*.push.services.mozilla.com",
        "*.push.apple.com",
        "*.notify.windows.com",
    )
    allow_private: bool = False  # loopback/private/link-local endpoints only when set (tests, labs)
    allowed_ports: tuple[str, ...] = ()  # ports besides 443 an endpoint may name; allow_private admits any port
    ca_file: str = ""
    # Send every visible message as a declarative push message (W3C Push API), not only to subscriptions
    # flagged `declarative` and to Apple's push service (web.push.apple.com), where it is always used.
    declarative: bool = False
    # The https URL a declarative notification opens (its required `navigate`) when the message has no https link.
    declarative_navigate: str = ""


@dataclass(frozen=True, slots=True)
class CategoryCap:
    """At most `limit` messages of `category` per user in any `period_s` window; `over`: defer or drop."""

    category: str
    limit: int
    period_s: float
    over: str = "defer"


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Delivery policy applied by the workers to messages for a user (ratelimit/policy.py).

    On by default, so a user's opt-out always holds; with no caps or windows configured it costs one
    pipelined read of the batch's users' preferences. `enabled = false` turns every rule off."""

    enabled: bool = True
    user_limit: int = 0  # messages per user across all categories in any user_period_s window; 0: none
    user_period_s: float = 60.0
    caps: tuple[CategoryCap, ...] = ()
    windows: tuple[str, ...] = ()  # default send windows in the user's local time, "07:30-09:00"; empty: any time
    category_windows: tuple[tuple[str, tuple[str, ...]], ...] = ()  # per-category windows; () for a category: any time
    timezone: str = "UTC"  # for users with no time zone stored
    window_jitter_s: float = 900.0  # deferred messages spread over this much of the window start
    high_bypasses_windows: bool = True  # priority "high" (a session starting now) goes out at any hour
    opt_out_exempt: tuple[str, ...] = ()  # categories sent despite a global opt-out (e.g. account security)
    provider_rates: tuple[tuple[str, float], ...] = ()  # ("fcm", 10000.0) or ("apns:app", 500.0): requests/s, all workers
    categories: tuple[str, ...] = ()  # more categories with a metric label of their own; the rest count as "other"

    def labelled_categories(self) -> frozenset[str]:
        """The categories this configuration names (and "general", the default): the metric label values."""
        return frozenset({"general", *self.categories, *self.opt_out_exempt, *(c for c, _ in self.category_windows),
                          *(c.category for c in self.caps)})

    def windows_for(self, category: str) -> tuple[str, ...]:
        for name, windows in self.category_windows:
            if name == category:
                return windows
        return self.windows


@dataclass(frozen=True, slots=True)
class StatusSettings:
    """Per-message status (GET /v1/messages/{id}) and the outcome event stream (queue/status.py).

    Both are written by the intake and in the worker's commit transaction; each message's status expires
    `retention_s` after it was accepted, or after the time a step put it off until, whichever is later."""

    enabled: bool = True
    retention_s: int = 7 * 86400
    user_messages: int = 100  # at most this many of a learner's recent messages listed by GET /v1/users/{user}/messages
    events: bool = True  # final outcomes and policy drops to the stream <prefix>:events:outcomes
    events_maxlen: int = 100_000  # MAXLEN ~ of that stream, in entries (one per worker commit: 1 to 512 events)


WEBHOOK_EVENTS = ("delivered", "token_invalid", "dead_lettered", "expired", "dropped")


@dataclass(frozen=True, slots=True)
class WebhookSubscription:
    """Outcome events of the messages an API client enqueued, posted to `url` (gateway/webhooks.py)."""

    name: str
    client: str  # the [[api.clients]] name whose messages' events go here
    url: str
    secret: str = field(repr=False)
    events: tuple[str, ...] = WEBHOOK_EVENTS


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """The webhook dispatcher (`pushgw webhooks run`): batches, retries, and the URL guard (https, allowed
    hosts, no private address unless allow_private), as for Web Push endpoints."""

    batch_size: int = 100  # events per POST at most
    timeout_s: float = 10.0  # per POST
    max_attempts: int = 8  # then the batch goes to the webhook dead letters (`pushgw webhooks replay`)
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    allowed_ports: tuple[str, ...] = ()
    ca_file: str = ""
    subscriptions: tuple[WebhookSubscription, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    redis: RedisSettings = RedisSettings()
    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    providers: ProviderSettings = ProviderSettings()
    apns: tuple[ApnsApp, ...] = ()
    fcm: tuple[FcmApp, ...] = ()
    webpush: WebPushSettings = WebPushSettings()
    policy: PolicySettings = PolicySettings()
    status: StatusSettings = StatusSettings()
    webhooks: WebhookSettings = WebhookSettings()
    log_level: str = "INFO"

    def apns_app(self, name: str) -> ApnsApp | None:
        return next((a for a in self.apns if a.name == name), None)

    def fcm_app(self, name: str) -> FcmApp | None:
        return next((a for a in self.fcm if a.name == name), None)


def _coerce(section: str, name: str, value: Any, default: Any) -> Any:
    where = f"{section}.{name}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(default, int):
        try:
            out = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a whole number, got {value!r}") from None
        if out < 0:
            raise ConfigError(f"{where} must not be negative")
        return out
    if isinstance(default, float):
        try:
            outf = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if outf < 0:
            raise ConfigError(f"{where} must not be negative")
        return outf
    if isinstance(default, tuple):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where} must be a list of strings")
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return value


def _check_webpush(webpush: WebPushSettings) -> WebPushSettings:
    if webpush.declarative_navigate and not webpush.declarative_navigate.startswith("https://"):
        raise ConfigError("webpush.declarative_navigate: must be an https URL")
    for port in webpush.allowed_ports:
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"webpush.allowed_ports: {port!r} is not a TCP port (1-65535)")
    return webpush


def _check_policy(policy: PolicySettings) -> None:

    try:
        SendWindows.parse(policy.windows)
        zone(policy.timezone)
    except WindowError as e:
        raise ConfigError(f"policy: {e}") from None
    # A category name that can never match a message (e.g. "Reward") would silently do nothing.
    named = [("policy.opt_out_exempt", c) for c in policy.opt_out_exempt]
    named += [("policy.categories", c) for c in policy.categories]
    named += [("policy.category_windows", c) for c, _ in policy.category_windows]
    named += [("policy.caps", c.category) for c in policy.caps]
    for where, category in named:
        if not re.fullmatch(r"[a-z0-9_]{1,32}", category):
            raise ConfigError(f"{where}: {category!r} is not a category (lowercase letters, digits and _, at most 32)")


def _section(cls: Any, section: str, data: Mapping[str, Any], env: Mapping[str, str], **fixed: Any) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{section}]: {sorted(unknown)}")
    values: dict[str, Any] = dict(fixed)
    defaults = cls(**fixed)
    for name in known:
        if name in fixed or name in ("clients", "caps", "category_windows", "provider_rates", "sentinel",
                                     "subscriptions"):  # tables
            continue
        default = getattr(defaults, name)
        raw = data.get(name)
        env_key = f"{ENV_PREFIX}{section.upper().replace('.', '_')}_{name.upper()}"
        if env_key in env:
            raw = env[env_key]
        if raw is not None:
            values[name] = _coerce(section, name, raw, default)
    return cls(**values)


def _check_addresses(where: str, addresses: tuple[str, ...]) -> None:
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{where}: {address!r} is not host:port")


def _redis(data: Mapping[str, Any], env: Mapping[str, str]) -> RedisSettings:
    sentinel_data = data.get("sentinel", {})
    if not isinstance(sentinel_data, dict):
        raise ConfigError("redis.sentinel must be a table ([redis.sentinel] with addresses and master)")
    sentinel = _section(SentinelSettings, "redis.sentinel", sentinel_data, env)
    redis: RedisSettings = replace(_section(RedisSettings, "redis", data, env), sentinel=sentinel)
    if sentinel.addresses:
        if not sentinel.master:
            raise ConfigError("redis.sentinel.master is required: the master name the sentinels monitor")
        if redis.url:
            raise ConfigError("set either redis.url or [redis.sentinel], not both")
        _check_addresses("redis.sentinel.addresses", sentinel.addresses)
    elif sentinel.master:
        raise ConfigError("redis.sentinel.addresses is required with redis.sentinel.master")
    if not 1 <= redis.shards <= 1024:
        raise ConfigError(f"redis.shards must be between 1 and 1024, got {redis.shards}")
    if redis.cluster:
        if not redis.cluster_nodes:
            raise ConfigError("redis.cluster_nodes is required with redis.cluster = true (host:port seed nodes)")
        if redis.url or sentinel.addresses:
            raise ConfigError("redis.cluster = true takes its nodes from redis.cluster_nodes: "
                              "unset redis.url and [redis.sentinel]")
        _check_addresses("redis.cluster_nodes", redis.cluster_nodes)
        if redis.wait_replicas:
            raise ConfigError("redis.wait_replicas is for one Redis or Sentinel: on Redis Cluster WAIT would have to "
                              "follow each shard's node, which the gateway does not do yet")
    if redis.wait_replicas and redis.wait_timeout_ms < 1:
        raise ConfigError("redis.wait_timeout_ms must be at least 1 when redis.wait_replicas is set "
                          "(WAIT with 0 would block forever)")
    return redis
def _secret(table: Mapping[str, Any], name: str, where: str, env: Mapping[str, str]) -> str:
    """A secret given in the table (`name`) or, better, named by `<name>_env`: at least 16 characters."""
    value = table.get(name)
    if f"{name}_env" in table:
        value = env.get(str(table[f"{name}_env"]))
        if not value:
            raise ConfigError(f"{where}.{name}_env: environment variable {table[f'{name}_env']} is not set")
    if not isinstance(value, str) or len(value) < 16:
        raise ConfigError(f"{where}.{name} must be a string of at least 16 characters")
    return value


def _clients(data: Mapping[str, Any], env: Mapping[str, str]) -> tuple[ApiClient, ...]:
    out: list[ApiClient] = []
    for i, c in enumerate(data.get("clients", [])):
        where = f"api.clients[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise ConfigError(f"{where} needs a name")
        token = _secret(c, "token", where, env)
        scopes = c.get("scopes", ["enqueue"])
        bad = set(scopes) - set(SCOPES)
        if bad:
            raise ConfigError(f"{where}.scopes: unknown scope(s) {sorted(bad)}")
        rate, burst = c.get("rate_per_s", 0.0), c.get("burst", 0)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
            raise ConfigError(f"{where}.rate_per_s must be a number >= 0")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            raise ConfigError(f"{where}.burst must be a whole number >= 0")
        out.append(ApiClient(c["name"], token, tuple(scopes), float(rate), burst))
    # A single token from the environment: the simplest deployment.
    env_token = env.get(f"{ENV_PREFIX}API_TOKEN")
    if env_token:
        if len(env_token) < 16:
            raise ConfigError("PUSHGW_API_TOKEN must be at least 16 characters")
        out.append(ApiClient("env", env_token, SCOPES))
    return tuple(out)


def _caps(data: Any) -> tuple[CategoryCap, ...]:
    if not isinstance(data, dict):
        raise ConfigError("[policy.caps] must be a table of categories, e.g. [policy.caps.reminder]")
    out = []
    for category, cap in data.items():
        where = f"policy.caps.{category}"
        if not isinstance(cap, dict) or set(cap) - {"limit", "period_s", "over"}:
            raise ConfigError(f"{where}: expected limit, period_s and optionally over")
        limit, period, over = cap.get("limit"), cap.get("period_s"), cap.get("over", "defer")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"{where}.limit must be a whole number >= 1")
        if isinstance(period, bool) or not isinstance(period, int | float) or period < 0.001:
            raise ConfigError(f"{where}.period_s must be a number of seconds, at least 0.001")
        if over not in ("defer", "drop"):
            raise ConfigError(f"{where}.over must be defer or drop, got {over!r}")
        out.append(CategoryCap(category, limit, float(period), over))
    return tuple(out)


def _category_windows(data: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:

    if not isinstance(data, dict):
        raise ConfigError("[policy.category_windows] must be a table: category = [\"07:30-09:00\", ...]")
    out = []
    for category, windows in data.items():
        if not isinstance(windows, list) or not all(isinstance(w, str) for w in windows):
            raise ConfigError(f"policy.category_windows.{category} must be a list of \"HH:MM-HH:MM\" strings")
        try:
            SendWindows.parse(windows)
        except WindowError as e:
            raise ConfigError(f"policy.category_windows.{category}: {e}") from None
        out.append((str(category), tuple(windows)))
    return tuple(out)


def _provider_rates(data: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(data, dict):
        raise ConfigError("[policy.provider_rates] must be a table: fcm = 10000, \"apns:<app>\" = 500")
    out = []
    for scope, rate in data.items():
        provider = str(scope).split(":", 1)[0]
        if provider not in ("apns", "fcm", "webpush"):
            raise ConfigError(f"policy.provider_rates.{scope}: name a provider (apns, fcm, webpush), optionally :<app>")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0:
            raise ConfigError(f"policy.provider_rates.{scope} must be requests per second > 0")
        out.append((str(scope), float(rate)))
    return tuple(out)


def _subscriptions(data: Any, env: Mapping[str, str], clients: tuple[ApiClient, ...]) -> tuple[WebhookSubscription, ...]:
    if not isinstance(data, list):
        raise ConfigError("[[webhooks.subscriptions]] must be an array of tables")
    names = {c.name for c in clients}
    out: list[WebhookSubscription] = []
    for i, sub in enumerate(data):
        where = f"webhooks.subscriptions[{i}]"
        if not isinstance(sub, dict) or set(sub) - {"name", "client", "url", "secret", "secret_env", "events"}:
            raise ConfigError(f"{where}: expected name, client, url, secret or secret_env, and optionally events")
        name, client, url = sub.get("name", f"sub{i}"), sub.get("client"), sub.get("url")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) or name in {s.name for s in out}:
            raise ConfigError(f"{where}.name must be unique: letters, digits, _ and -, at most 64")
        if not isinstance(client, str) or client not in names:
            raise ConfigError(f"{where}.client must name one of [[api.clients]] ({sorted(names)})")
        if not isinstance(url, str) or not url.startswith("https://"):
            raise ConfigError(f"{where}.url must be an https URL")
        secret = _secret(sub, "secret", where, env)
        events = sub.get("events", list(WEBHOOK_EVENTS))
        if not isinstance(events, list) or not events or set(events) - set(WEBHOOK_EVENTS):
            raise ConfigError(f"{where}.events must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}")
        out.append(WebhookSubscription(name, client, url, secret, tuple(events)))
    return tuple(out)


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read `path` (or `$PUSHGW_CONFIG`, or nothing) and apply `PUSHGW_*` environment overrides."""
    env = os.environ if env is None else env
    path = path or env.get(f"{ENV_PREFIX}CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    unknown = set(data) - {"redis", "api", "worker", "providers", "apns", "fcm", "webpush", "policy", "status", "webhooks", "log"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}")
    api = _section(ApiSettings, "api", data.get("api", {}), env)
    api = replace(api, clients=_clients(data.get("api", {}), env))
    apns = tuple(
        _section(ApnsApp, f"apns.{name}", app, env, name=name, topic=str(app.get("topic", "")))
        for name, app in data.get("apns", {}).items()
    )
    for a in apns:
        if not a.topic:
            raise ConfigError(f"apns.{a.name}.topic is required (the app's bundle id)")
        if not a.key_file and not a.cert_file:
            raise ConfigError(f"apns.{a.name}: set key_file (+ key_id, team_id) or cert_file")
        if a.key_file and not (a.key_id and a.team_id):
            raise ConfigError(f"apns.{a.name}: token auth needs key_id and team_id")
    fcm = tuple(_section(FcmApp, f"fcm.{name}", app, env, name=name) for name, app in data.get("fcm", {}).items())
    for f in fcm:
        if not f.service_account_file:
            raise ConfigError(f"fcm.{f.name}.service_account_file is required")
    log = data.get("log", {})
    level = str(env.get(f"{ENV_PREFIX}LOG_LEVEL", log.get("level", "INFO"))).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log.level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    policy_data = dict(data.get("policy", {}))
    caps_data = policy_data.pop("caps", {})
    category_windows = _category_windows(policy_data.pop("category_windows", {}))
    provider_rates = _provider_rates(policy_data.pop("provider_rates", {}))
    policy = _section(PolicySettings, "policy", policy_data, env)
    policy = replace(policy, caps=_caps(caps_data), category_windows=category_windows, provider_rates=provider_rates)
    _check_policy(policy)
    settings = Settings(
        policy=policy,
        redis=_redis(data.get("redis", {}), env),
        api=api,
        worker=_section(WorkerSettings, "worker", data.get("worker", {}), env),
        providers=_section(ProviderSettings, "providers", data.get("providers", {}), env),
        apns=apns,
        fcm=fcm,
        webpush=_check_webpush(_section(WebPushSettings, "webpush", data.get("webpush", {}), env)),
        status=_section(StatusSettings, "status", data.get("status", {}), env),
        webhooks=replace(_section(WebhookSettings, "webhooks", data.get("webhooks", {}), env),
                         subscriptions=_subscriptions(data.get("webhooks", {}).get("subscriptions", []), env, api.clients)),
        log_level=level,
    )
    if settings.status.retention_s < 1 or settings.status.user_messages < 1 or settings.status.events_maxlen < 1:
        raise ConfigError("status.retention_s, status.user_messages and status.events_maxlen must be at least 1")
    if settings.webhooks.batch_size < 1 or settings.webhooks.max_attempts < 1 or settings.webhooks.timeout_s <= 0:
        raise ConfigError("webhooks.batch_size and webhooks.max_attempts must be at least 1, webhooks.timeout_s > 0")
    if min(api.header_timeout_s, api.body_timeout_s, api.idle_timeout_s) <= 0 or api.max_connections < 1:
        raise ConfigError("api.header_timeout_s, api.body_timeout_s and api.idle_timeout_s must be > 0, "
                          "api.max_connections at least 1")
    if settings.worker.processes < 1 or settings.worker.batch_size < 1 or settings.worker.max_attempts < 1:
        raise ConfigError("worker.processes, worker.batch_size and worker.max_attempts must be at least 1")
    if not 0 <= settings.worker.metrics_port < 65536:
        raise ConfigError(f"worker.metrics_port must be a TCP port (0: none), got {settings.worker.metrics_port}")
    if settings.worker.high_weight < 1 or settings.providers.concurrency < 1:
        raise ConfigError("worker.high_weight and providers.concurrency must be at least 1")
    if settings.policy.user_limit and settings.policy.user_period_s < 0.001:
        raise ConfigError("policy.user_period_s must be at least 0.001 s when policy.user_limit is set")
    if settings.redis.embedded_fsync not in ("always", "everysec", "no"):
        raise ConfigError(f"redis.embedded_fsync must be always, everysec or no, got {settings.redis.embedded_fsync!r}")
    return settings
