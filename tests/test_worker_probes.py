"""The worker host's HTTP listener (worker.metrics_port) and the image's health check, against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from pushgw.core.config import ConfigError, load_settings
from pushgw.gateway.api.probe_server import create_probe_app
from pushgw.gateway.healthcheck import check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_probe_app_answers_health_readiness_and_metrics(redis: aioredis.Redis) -> None:
    async with TestClient(TestServer(create_probe_app(redis))) as c:
        assert (await c.get("/healthz")).status == 200
        ready = await c.get("/readyz")
        assert ready.status == 200 and (await ready.json())["redis"] == "up"
        metrics = await c.get("/metrics")
        assert metrics.status == 200 and "pushgw_stream_lag_entries" in await metrics.text()
        assert (await c.get("/v1/messages")).status == 404  # no API route on a worker


async def test_healthcheck_passes_on_a_ready_server_and_names_the_failing_probe(redis: aioredis.Redis) -> None:
    async with TestClient(TestServer(create_probe_app(redis), host="127.0.0.1", port=free_port())) as c:
        assert await asyncio.to_thread(check, c.port) is None
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    async with TestClient(TestServer(create_probe_app(dead), host="127.0.0.1", port=free_port())) as c:
        failure = await asyncio.to_thread(check, c.port)
        assert failure is not None and "/readyz: HTTP 503" in failure
    await dead.aclose()
    assert "Connection refused" in str(await asyncio.to_thread(check, free_port()))


def test_worker_metrics_port_out_of_range_is_refused_at_start_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"worker\.metrics_port"):
        load_settings(env={"PUSHGW_WORKER_METRICS_PORT": "70000"})
    assert load_settings(env={"PUSHGW_WORKER_METRICS_PORT": "9091"}).worker.metrics_port == 9091


def test_healthcheck_refuses_a_bad_port_setting() -> None:
    env = os.environ | {"PUSHGW_HEALTH_PORT": "eighty"}
    done = subprocess.run([sys.executable, "-m", "pushgw.gateway.healthcheck"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1 and "PUSHGW_HEALTH_PORT must be a port number" in done.stderr


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - an http URL on loopback
        return resp.status, resp.read().decode()


def test_pushgw_send_works_with_a_metrics_folder_not_made_yet(redis_url: str, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "not-yet" / "metrics"
    env = os.environ | {"PUSHGW_REDIS_URL": redis_url, "PUSHGW_REDIS_PREFIX": "probes-send",
                        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    sent = subprocess.run([sys.executable, "-m", "pushgw.gateway.cli", "send", "--user", "nobody", "--title", "t",
                           "--body", "b"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr
    assert metrics_dir.is_dir()


def test_pushgw_worker_serves_probes_and_metrics_then_drains_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = os.environ | {"PUSHGW_REDIS_URL": redis_url, "PUSHGW_WORKER_METRICS_PORT": str(port),
                        "PUSHGW_REDIS_PREFIX": "probes", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    env.pop("PUSHGW_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "pushgw.gateway.cli", "worker", "--processes", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # a message for a user with no device: only a worker process counts it (skipped, no_device)
    sent = subprocess.run([sys.executable, "-m", "pushgw.gateway.cli", "send", "--user", "nobody", "--title", "t",
                           "--body", "b"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr
    counted = 'pushgw_deliveries_skipped_total{reason="no_device"} 1.0'
    try:
        status, body = 0, ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and counted not in body and proc.poll() is None:
            with contextlib.suppress(OSError):
                status, body = _get(f"http://127.0.0.1:{port}/metrics")
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        # /metrics is served by the supervisor and sums what its worker processes wrote
        assert status == 200 and counted in body
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: Any) -> None:
    monkeypatch.delenv("PUSHGW_CONFIG", raising=False)


def test_pushgw_webhooks_run_serves_metrics_then_stops_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    """The dispatcher as deploy/ runs it: a fixed consumer name, /metrics (the Kubernetes liveness path), and a
    clean exit on SIGTERM well inside the 45 s grace the deployment gives it."""
    port = free_port()
    config = tmp_path / "pushgw.toml"
    config.write_text(
        '[webhooks]\nallowed_hosts = ["hooks.example.org"]\n\n'
        '[[webhooks.subscriptions]]\nname = "platform"\nclient = "env"\nurl = "https://hooks.example.org/pushgw"\n'
        'secret_env = "PUSHGW_WEBHOOK_SECRET"\n'
    )
    env = os.environ | {"PUSHGW_REDIS_URL": redis_url, "PUSHGW_REDIS_PREFIX": "whrun", "PUSHGW_CONFIG": str(config),
                        "PUSHGW_API_TOKEN": "webhooks-run-token-0123456789",
                        "PUSHGW_WEBHOOK_SECRET": "webhooks-run-secret-0123456789",
                        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    proc = subprocess.Popen([sys.executable, "-m", "pushgw.gateway.cli", "webhooks", "run", "--consumer",
                             "pushgw-webhooks", "--metrics-port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        status = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and status != 200 and proc.poll() is None:
            with contextlib.suppress(OSError):
                status = _get(f"http://127.0.0.1:{port}/metrics")[0]
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=45) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
