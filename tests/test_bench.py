"""Smoke test of the benchmark tool (no timing assertions): it runs, reconciles, writes JSON and plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

FIELDS = {"messages", "delivered", "lost", "duplicates", "throughput_per_s", "baseline_per_s", "ratio", "latency_ms",
          "cpu_s_per_1k", "peak_rss_mb", "workers"}


def _bench(tmp_path: Path, *args: str, messages: int = 400) -> dict[str, Any]:
    pushgw = Path(sys.executable).with_name("pushgw")
    (tmp_path / "metrics").mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    out = tmp_path / "result.json"
    proc = subprocess.run([str(pushgw), "bench", "--messages", str(messages), "--users", "150", "--json", str(out),
                           "--plots", str(tmp_path / "plots"), *args], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "lost 0, duplicates 0" in proc.stdout
    result: dict[str, Any] = json.loads(out.read_text())
    assert set(result) >= FIELDS
    assert result["messages"] == messages and result["lost"] == 0 and result["duplicates"] == 0
    assert result["delivered"] == result["deliveries_expected"]
    assert (tmp_path / "plots" / "throughput.png").stat().st_size > 0
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 0
    split = result["cpu_us_per_delivery"]
    assert isinstance(split, dict) and {"workers", "redis", "load generator"} <= set(split) and split["workers"] > 0
    baseline_split = result["baseline_cpu_us_per_delivery"]
    assert isinstance(baseline_split, dict) and baseline_split["clients"] > 0
    _baseline_split_is_consistent(result)
    return result


def _baseline_split_is_consistent(result: dict[str, Any]) -> None:
    """The baseline's CPU per delivery per provider (each over its own deliveries) averages, weighted by
    those deliveries, to its figure over all deliveries; Web Push encryption is a part of Web Push's."""
    split = result["baseline_cpu_us_per_delivery"]
    counts = result["baseline_deliveries_by_provider"]
    assert set(counts) <= set(split) and sum(counts.values()) == result["baseline_deliveries"]
    weighted = sum(split[p] * n for p, n in counts.items()) / result["baseline_deliveries"]
    assert weighted == pytest.approx(split["clients"], abs=0.2 * len(counts))
    if counts.get("webpush"):
        assert 0 < split["webpush_encryption"] <= split["webpush"]
    assert result["cpu_over_baseline"] == pytest.approx(result["cpu_us_per_delivery"]["workers"] / split["clients"], abs=0.01)


def test_bench_strict_mode(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--mode", "strict")
    assert result["mode"] == "strict" and result["baseline_delivered"] == result["baseline_deliveries"]
    assert result["status"] is True  # as deployed: message status and outcome events on


@pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                    reason="fast mode needs nginx (scripts/bench.sh installs it)")
def test_bench_fast_mode_with_nginx_sinks(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--mode", "fast")
    assert result["mode"] == "fast"
    assert "sinks" in result["cpu_us_per_delivery"]  # type: ignore[operator]
    assert isinstance(result["latency_ms"], dict) and result["latency_ms"]["samples"] > 0


def test_bench_rich_sends_a_share_of_rich_messages_through_the_strict_fakes(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--mode", "strict", "--rich", "0.5")
    assert result["rich"] == 0.5 and result["baseline_delivered"] == result["baseline_deliveries"]


def test_bench_on_a_three_master_redis_cluster(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--mode", "strict", "--redis", "cluster:3")
    split = result["cpu_us_per_delivery"]
    assert isinstance(split, dict) and split["redis"] > 0  # the three nodes' CPU is measured
    by_node = result["redis_us_per_delivery_by_node"]
    assert isinstance(by_node, list) and len(by_node) == 3 and sum(by_node) > 0  # each node apart (10 ms ticks)


def test_bench_behind_sentinel(tmp_path: Path) -> None:
    # 2,000 messages: Redis CPU is read in 10 ms clock ticks, which 400 messages' few milliseconds may not reach
    result = _bench(tmp_path, "--mode", "strict", "--redis", "sentinel", messages=2000)
    split = result["cpu_us_per_delivery"]
    assert isinstance(split, dict) and split["redis"] > 0  # the master's and its replica's CPU
    assert result["lost"] == 0


def test_bench_refuses_an_unknown_redis_topology(tmp_path: Path) -> None:
    pushgw = Path(sys.executable).with_name("pushgw")
    proc = subprocess.run([str(pushgw), "bench", "--redis", "cluster:x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--redis must be single, sentinel or cluster:N" in proc.stderr

def test_bench_status_off_turns_message_status_and_outcome_events_off(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--mode", "strict", "--status", "off")
    assert result["status"] is False
