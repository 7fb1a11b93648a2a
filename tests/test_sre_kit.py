"""The SRE kit stays true to the code: alert rules and dashboard use metrics that exist, and promtool agrees."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pushgw.core import metrics

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: scripts/setup.sh installs Debian's prometheus package, which has it"
    return path


def _metric_names() -> set[str]:
    names = set()
    for value in vars(metrics).values():
        describe = getattr(value, "_name", None)
        if isinstance(describe, str) and describe.startswith("pushgw_"):
            kind = getattr(value, "_type", "")
            names.add(describe + ("_total" if kind == "counter" else ""))
            if kind == "histogram":
                names |= {describe + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_alert_rules_are_valid(promtool: str) -> None:
    out = subprocess.run([promtool, "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_unit_tests_pass(promtool: str) -> None:
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_exposed_metrics_pass_promtool_check_metrics(promtool: str) -> None:
    registry = CollectorRegistry()
    for value in vars(metrics).values():
        if hasattr(value, "_name") and str(getattr(value, "_name", "")).startswith("pushgw_"):
            registry.register(value)
    text = generate_latest(registry)
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()


def test_rules_and_dashboard_only_name_metrics_that_exist() -> None:
    known = _metric_names() | {"up"}
    used = set(re.findall(r"\b(pushgw_[a-z_]+|up)\b", (PROM / "alerts.yml").read_text()))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "pushgw.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bpushgw_[a-z_]+\b", target["expr"]))
    assert used, "no metric found in the rules or the dashboard"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    alerts = re.findall(r"alert: (\w+)", (PROM / "alerts.yml").read_text())
    assert alerts
    for name in alerts:
        assert f"## {name}" in runbook, name
