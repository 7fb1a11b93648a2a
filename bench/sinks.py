"""Provider sinks for the benchmark.

Fast mode: one nginx (C, from Debian's packages) serving the three providers' wire formats over
TLS: APNs on HTTP/2 with ALPN h2 echoing apns-id, FCM v1 (its token endpoint and messages:send)
on HTTP/2 and HTTP/1.1 by ALPN as Google serves it (the provider sends over HTTP/2, the OAuth2
token request comes over HTTP/1.1), and Web Push on HTTP/2 and HTTP/1.1 by ALPN (the provider
sends over HTTP/2 and falls back per origin to HTTP/1.1). nginx is never the bottleneck (its
own ceiling is measured with h2load and printed beside the result). Its access logs are the
receipt records: the APNs log keeps apns-id (one per message and device), the FCM log keeps the
request body (message id and token), the Web Push log keeps the subscription path, each with the
receipt time.

Strict mode uses the protocol-checking fakes (providers/fakes) instead: slower, but every request
is verified (JWTs, OAuth2, VAPID, decryption) under load.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..providers.fakes.tls import LocalCA

# The sink's fixed OAuth2 answer: a benchmark value, not a credential of anything.
FCM_TOKEN_BODY = '{"access_token":"bench-access-token","expires_in":3600,"token_type":"Bearer"}'  # noqa: S105


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_nginx() -> str:
    """The nginx binary; installs Debian's nginx-light when missing (root or sudo)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    return "/usr/sbin/nginx"


@dataclass(frozen=True, slots=True)
class Receipt:
    at: float  # unix time the sink received the request (ms resolution in fast mode)
    key: str  # "apns:<apns-id>", "fcm:<msg id>/<token>", "webpush:<subscription id>"


class NginxSinks:
    """`start()` writes the config and runs nginx in the foreground of a child process; `stop()` ends it."""

    def __init__(self, directory: Path, ca: LocalCA) -> None:
        self.dir = directory
        self.ca = ca
        self.apns_port = free_port()
        self.fcm_port = free_port()
        self.webpush_port = free_port()
        self.backend_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        d = self.dir
        tls = f"ssl_certificate {self.ca.cert_file}; ssl_certificate_key {self.ca.key_file}; ssl_session_cache shared:S:1m;"
        return f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 1000000; keepalive_timeout 300s;
  http2_max_requests 1000000; http2_max_concurrent_streams 1000;
  client_body_buffer_size 16k; client_max_body_size 16k; client_body_in_single_buffer on;
  log_format apns '$msec $status $http_apns_id';
  log_format fcm escape=json '$msec $status $request_body';
  log_format webpush '$msec $status $uri';
  # FCM's body is logged ($request_body needs a proxied request): enough idle upstream connections
  # for every request in flight, or nginx opens and closes one per request beyond them (measured:
  # 1,200 connect() per second with `keepalive 64` during `pushgw bench`).
  upstream ok {{ server 127.0.0.1:{self.backend_port}; keepalive 1024; keepalive_requests 1000000; }}
  # nginx 1.22 (Debian 12) takes HTTP/2 as a listen parameter; "http2 on;" needs nginx >= 1.25.1.
  server {{
    listen 127.0.0.1:{self.apns_port} ssl http2; {tls}
    location /3/device/ {{
      access_log {d}/apns.log apns buffer=256k flush=200ms;
      add_header apns-id $http_apns_id always;
      return 200;
    }}
  }}
  server {{
    listen 127.0.0.1:{self.fcm_port} ssl http2; {tls}
    location = /token {{ default_type application/json; return 200 '{FCM_TOKEN_BODY}'; }}
    location /v1/projects/ {{
      access_log {d}/fcm.log fcm buffer=256k flush=200ms;
      proxy_http_version 1.1; proxy_set_header Connection ""; proxy_pass http://ok;
    }}
  }}
  server {{
    listen 127.0.0.1:{self.webpush_port} ssl http2; {tls}
    location /push/ {{
      access_log {d}/webpush.log webpush buffer=256k flush=200ms;
      add_header Location /m always;
      return 201;
    }}
  }}
  server {{
    listen 127.0.0.1:{self.backend_port};
    location / {{ default_type application/json; return 200 '{{"name":"projects/bench/messages/1"}}'; }}
  }}
}}
"""

    def start(self) -> NginxSinks:
        nginx = ensure_nginx()
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.dir), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        for port in (self.apns_port, self.fcm_port, self.webpush_port, self.backend_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                        raise RuntimeError(f"nginx did not start: {err.strip()}") from None
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: flushes the access log buffers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def flush(self) -> None:
        """Make nginx write its buffered access logs now (reopening the logs flushes them)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.3)

    def counts(self) -> int:
        """Requests logged so far (approximate while the buffers are not flushed): for progress."""
        total = 0
        for name in ("apns", "fcm", "webpush"):
            path = self.dir / f"{name}.log"
            if path.exists():
                total += path.stat().st_size
        return total

    def receipts(self) -> list[Receipt]:
        out: list[Receipt] = []
        for name in ("apns", "fcm", "webpush"):
            path = self.dir / f"{name}.log"
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                at, status, rest = line.split(" ", 2)
                if not status.startswith("2"):
                    continue
                if name == "apns":
                    out.append(Receipt(float(at), f"apns:{rest}"))
                elif name == "fcm":
                    # escape=json writes the body as the inside of a JSON string
                    body = orjson.loads(f'"{rest}"')
                    if not body:
                        continue  # h2load's ceiling run or an empty body
                    msg = orjson.loads(body)["message"]
                    out.append(Receipt(float(at), f"fcm:{msg['data']['pushgw_id']}/{msg['token']}"))
                else:
                    out.append(Receipt(float(at), f"webpush:{rest.rsplit('/', 1)[-1]}"))
        return out


def sink_ceiling(sinks: NginxSinks, seconds: float = 3.0) -> dict[str, float]:
    """Requests/s nginx serves with h2load (C) as the client: APNs and FCM over HTTP/2, as the providers send."""
    h2load = shutil.which("h2load")
    if h2load is None:
        return {}
    out: dict[str, float] = {}
    body = sinks.dir / "body.json"
    body.write_text('{"message":{"token":"t","data":{"pushgw_id":"ceiling"}}}')
    runs = {
        "apns": [h2load, "-D", str(max(1, int(seconds))), "-c", "4", "-m", "100",
                 "-H", "apns-id: 00000000-0000-0000-0000-000000000000", "-d", str(body),
                 f"https://127.0.0.1:{sinks.apns_port}/3/device/{'0' * 64}"],
        "fcm": [h2load, "-D", str(max(1, int(seconds))), "-c", "4", "-m", "100",
                "-H", "content-type: application/json; charset=UTF-8", "-d", str(body),
                f"https://127.0.0.1:{sinks.fcm_port}/v1/projects/bench/messages:send"],
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
        for line in proc.stdout.splitlines():
            if line.startswith("finished in"):
                # "finished in 3.00s, 25311.67 req/s, 2.36MB/s"
                out[name] = float(line.split(",")[1].split()[0])
    return out
