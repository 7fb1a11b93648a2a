"""The deployment files (Containerfile, deploy/compose, deploy/kubernetes) checked offline, and the image build.

What runs in every test run: the Containerfile's final stage read structurally, the compose file parsed with
every file it mounts present and Prometheus' configuration checked by promtool, the Kubernetes manifests rendered
by kustomize (kubectl's, when the machine has it) and validated against Kubernetes' schemas by kubernetes-validate,
the custom resources that no offline schema covers (KEDA's ScaledObject and TriggerAuthentication, the Prometheus
Operator's ServiceMonitor) checked field by field, the grace periods against the shipped drain deadline, and the
shipped redis.conf's persistence against a real redis-server killed with SIGKILL.

Opt-in (`PUSHGW_TEST_IMAGE=1 pytest -m image tests/test_deploy.py`, minutes, needs root and podman): builds the
image with deploy/build-image.sh and inspects it; kept out of CI's time budget.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis as syncredis
import yaml
from pushgw.core.config import (
    ApiSettings,
    ProviderSettings,
    RedisSettings,
    Settings,
    WebhookSettings,
    WebPushSettings,
    WorkerSettings,
    load_settings,
)
from pushgw.gateway.api.probe_server import create_probe_app
from pushgw.gateway.cli import build_parser
from pushgw.queue.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
KUBE = DEPLOY / "kubernetes"
K8S_VERSION = "1.30"  # the oldest Kubernetes minor the manifests are validated against
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
        ("monitoring.coreos.com/v1", "ServiceMonitor")}
SUPERVISOR_MARGIN_S = 5  # gateway/pool.py: Pool.stop kills a worker drain_deadline_s + 5 s after SIGTERM
COMPILERS = ("gcc", "g++", "cc", "clang", "build-essential", "make", "python3-dev", "libc6-dev", "cargo", "rustc")
# Variables the image and the manifests set that are not PUSHGW_<SECTION>_<KEY> settings.
NOT_SETTINGS = {"PUSHGW_CONFIG", "PUSHGW_API_TOKEN", "PUSHGW_HEALTH_PORT",
                "PUSHGW_WEBHOOK_SECRET"}  # the example subscription's secret_env (a secret, not a setting)
TOKEN_ENV = {"PUSHGW_API_TOKEN": "compose-test-token-0123456789"}


# ---------------------------------------------------------------------------- helpers


def stages(containerfile: str) -> list[list[tuple[str, str]]]:
    """The Containerfile's instructions (continuation lines joined, comments dropped), one list per stage."""
    out: list[list[tuple[str, str]]] = []
    text = re.sub(r"\\\n", " ", "\n".join(line for line in containerfile.splitlines() if not line.lstrip().startswith("#")))
    for line in text.splitlines():
        if not line.strip():
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            out.append([])
        if out:
            out[-1].append((word.upper(), rest.strip()))
    return out


def drain_deadline(toml: Path, env: dict[str, str] | None = None) -> float:
    return load_settings(toml, env=env or {}).worker.drain_deadline_s


def grace_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", value)
    assert m, f"stop_grace_period {value!r}: write it as <n>s or <n>m"
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def settings_env_names() -> set[str]:
    """Every PUSHGW_<SECTION>_<KEY> that core/config.py reads for a scalar setting."""
    sections: dict[str, Any] = {"redis": RedisSettings, "api": ApiSettings, "worker": WorkerSettings,
                                "providers": ProviderSettings, "webpush": WebPushSettings}
    names = {f"PUSHGW_{s.upper()}_{f.name.upper()}" for s, cls in sections.items() for f in fields(cls)}
    return names | {"PUSHGW_LOG_LEVEL"}


def kube_documents() -> list[dict[str, Any]]:
    """The manifests as kustomize renders them (kubectl's kustomize, offline), else the listed files as written."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        built = subprocess.run([kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=120, check=False)
        assert built.returncode == 0, built.stderr
        return [d for d in yaml.safe_load_all(built.stdout) if d]
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    docs = [d for f in kustomization["resources"] for d in yaml.safe_load_all((KUBE / f).read_text()) if d]
    for gen in kustomization.get("configMapGenerator", []):  # what kustomize would generate, without its hash suffix
        data = {Path(f).name: (KUBE / f).read_text() for f in gen["files"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------- Containerfile


def test_containerfile_final_stage_runs_pushgw_unprivileged_with_drain_signal_and_health_check() -> None:
    all_stages = stages((ROOT / "Containerfile").read_text())
    assert len(all_stages) >= 2, "multi-stage: a build stage and a final stage"
    final = all_stages[-1]
    words = [w for w, _ in final]
    args = {w: a for w, a in final}  # the last of each instruction
    user = args["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root USER (runAsNonRoot checks a number)"
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert "HEALTHCHECK" in words and "pushgw.gateway.healthcheck" in args["HEALTHCHECK"]
    assert args["ENTRYPOINT"] == '["pushgw"]'
    assert "PROMETHEUS_MULTIPROC_DIR=" in args["ENV"]
    labels = " ".join(a for w, a in final if w == "LABEL")
    assert "org.opencontainers.image.source=" in labels and "org.opencontainers.image.version=" in labels
    # no compiler and no package installation in the final stage: it copies the build stage's virtualenv
    final_runs = " ".join(a for w, a in final if w == "RUN")
    assert not [c for c in COMPILERS if re.search(rf"(^|[\s/]){re.escape(c)}(\s|$)", final_runs)]
    assert "apt-get" not in final_runs and "pip install" not in final_runs
    assert any(w == "COPY" and a.startswith("--from=build /opt/pushgw") for w, a in final)


def test_containerignore_keeps_the_virtualenv_git_and_tests_out_of_the_build_context() -> None:
    ignored = set((ROOT / ".containerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= ignored
    assert "README.md" not in ignored  # pyproject.toml names it as the package's readme


def test_every_pushgw_variable_the_deployment_sets_is_a_real_setting() -> None:
    text = "\n".join(p.read_text() for p in [ROOT / "Containerfile", COMPOSE / "compose.yaml", *KUBE.glob("*.yaml")])
    used = set(re.findall(r"\bPUSHGW_[A-Z_]+\b", text)) - NOT_SETTINGS - {"PUSHGW_IMAGE", "PUSHGW_API_BIND"}
    assert used and used <= settings_env_names(), sorted(used - settings_env_names())


def test_the_image_health_check_module_is_the_one_the_containerfile_runs() -> None:
    from pushgw.gateway import healthcheck

    assert callable(healthcheck.main) and healthcheck.PATHS == ("/healthz", "/readyz")
    routes = {r.resource.canonical for r in create_probe_app(syncredis_placeholder()).router.routes() if r.resource}
    assert set(healthcheck.PATHS) <= routes


def syncredis_placeholder() -> Any:
    """The probe app only stores its Redis client; a client that never connects is enough to list the routes."""
    import redis.asyncio as aioredis

    return aioredis.from_url("redis://127.0.0.1:1/0")


# ---------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return doc


def test_compose_parses_and_every_mounted_file_exists() -> None:
    services = compose()["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts {source}, which does not exist"
    assert services["api"]["command"] == ["api"] and services["worker"]["command"] == ["worker"]


def test_compose_stop_grace_outlasts_the_drain_and_metrics_live_on_tmpfs() -> None:
    deadline = drain_deadline(COMPOSE / "pushgw.toml")
    for name in ("api", "worker"):
        svc = compose()["services"][name]
        assert svc["stop_signal"] == "SIGTERM"
        assert grace_seconds(svc["stop_grace_period"]) > deadline + SUPERVISOR_MARGIN_S
        assert any(t.startswith("/run/pushgw/metrics:") for t in svc["tmpfs"])
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]


def test_compose_settings_load_with_the_environment_compose_gives() -> None:
    worker = compose()["services"]["worker"]["environment"]
    settings: Settings = load_settings(COMPOSE / "pushgw.toml", env={**worker, **TOKEN_ENV})
    assert settings.worker.metrics_port == int(worker["PUSHGW_HEALTH_PORT"])
    assert settings.redis.url == "redis://redis:6379/0"


def test_compose_redis_keeps_an_append_only_file_and_never_evicts() -> None:
    conf = dict(line.split(None, 1) for line in (COMPOSE / "redis.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["appendonly"].split()[0] == "yes"
    assert conf["appendfsync"].split()[0] in ("everysec", "always")
    assert conf["maxmemory-policy"].split()[0] == "noeviction"


def test_compose_prometheus_config_passes_promtool_with_the_shipped_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/setup.sh installs Debian's prometheus package)")
    svc = compose()["services"]["prometheus"]
    mounts = {v.split(":")[1]: COMPOSE / v.split(":")[0] for v in svc["volumes"] if v.startswith(".")}
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    # the rule files as the container sees them must be mounted, then checked from their place here
    config["rule_files"] = [str(mounts[path].resolve()) for path in config["rule_files"]]
    assert {j["job_name"] for j in config["scrape_configs"]} == {"pushgw"}  # alerts.yml selects job="pushgw"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_grafana_provisions_the_shipped_dashboard_from_the_mounted_folder() -> None:
    svc = compose()["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in svc["volumes"] if v.startswith(".")}
    dashboard_in_container = mounts["../grafana/pushgw.json"]
    provider = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/pushgw.yml").read_text())["providers"][0]
    assert Path(dashboard_in_container).parent == Path(provider["options"]["path"])
    datasource = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"


def test_redis_with_the_shipped_persistence_loses_no_acknowledged_write_when_killed(tmp_path: Path) -> None:
    """appendfsync everysec: each write reaches the AOF file before Redis answers, so SIGKILL of the Redis process
    loses none (a power loss can lose up to the last second: not testable here)."""
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is installed by scripts/setup.sh"
    sock = tmp_path / "redis.sock"
    cmd = [redis_server, str(COMPOSE / "redis.conf"), "--dir", str(tmp_path), "--port", "0",
           "--unixsocket", str(sock), "--bind", "127.0.0.1", "--daemonize", "no", "--protected-mode", "yes"]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if syncredis.Redis(unix_socket_path=str(sock)).ping():
                    return proc
            except (syncredis.ConnectionError, FileNotFoundError):
                time.sleep(0.1)
        proc.kill()
        raise AssertionError("redis-server did not start")

    proc = start()
    try:
        client = syncredis.Redis(unix_socket_path=str(sock))
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        ids = [client.xadd("pushgw:stream", {"n": str(i)}) for i in range(2000)]  # each one acknowledged
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        client.close()
        proc = start()
        client = syncredis.Redis(unix_socket_path=str(sock))
        assert client.xlen("pushgw:stream") == 2000
        assert client.xrange("pushgw:stream", "-", "+", count=1)[0][0] == ids[0]
        client.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas() -> None:
    docs = kube_documents()
    validated = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # no offline schema: checked field by field below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        validated.append(doc["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Namespace"} <= set(validated)
    assert {(d["apiVersion"], d["kind"]) for d in docs} >= CRDS


def test_kubernetes_settings_load_and_grace_periods_outlast_the_drain() -> None:
    docs = kube_documents()
    deployments = by_kind(docs, "Deployment")
    worker = deployments["pushgw-worker"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", "set-by-secret-0123456789") for e in worker["containers"][0]["env"]}
    settings = load_settings(KUBE / "pushgw.toml", env=env)
    assert worker["terminationGracePeriodSeconds"] > settings.worker.drain_deadline_s + SUPERVISOR_MARGIN_S
    assert settings.worker.metrics_port == 9091
    api = deployments["pushgw-api"]["spec"]["template"]["spec"]
    assert api["terminationGracePeriodSeconds"] > 10 + 5  # aiohttp's shutdown_timeout (gateway/api/server.py) + preStop


def test_kubernetes_pods_run_restricted_with_probes_on_served_paths_and_resources() -> None:
    routes = {r.resource.canonical for r in create_probe_app(syncredis_placeholder()).router.routes() if r.resource}
    for name, dep in by_kind(kube_documents(), "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] in routes, f"{name} {probe}"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/run/pushgw/metrics"]]["emptyDir"]["medium"] == "Memory"
        if "/secrets" in mounts:  # provider credentials are files from a Secret, never environment values
            assert "secret" in volumes[mounts["/secrets"]]
        assert all("value" in e or "secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])


def test_kubernetes_services_and_budgets_select_the_pods_they_are_for() -> None:
    docs = kube_documents()
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in by_kind(docs, "Deployment").items()}
    for kind in ("Service", "PodDisruptionBudget"):
        for name, doc in by_kind(docs, kind).items():
            selector = doc["spec"]["selector"] if kind == "Service" else doc["spec"]["selector"]["matchLabels"]
            assert [p for p, labels in pods.items() if matches(selector, labels)] == [name], f"{kind} {name}"


def test_service_monitor_scrapes_both_services_as_job_pushgw() -> None:
    """CRD (monitoring.coreos.com/v1 ServiceMonitor): no offline schema, checked field by field."""
    docs = kube_documents()
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    services = by_kind(docs, "Service")
    selected = [s for s in services.values() if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in selected} == {"pushgw-api", "pushgw-worker"}
    assert {s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in selected} == {"pushgw"}
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == ports
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def test_keda_scaled_object_scales_the_workers_on_the_gateways_own_streams_and_group() -> None:
    """CRDs (keda.sh/v1alpha1 ScaledObject, TriggerAuthentication): no offline schema, checked field by field
    against KEDA's redis-streams scaler's parameters."""
    docs = kube_documents()
    (scaled,) = by_kind(docs, "ScaledObject").values()
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] in by_kind(docs, "Deployment")
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]  # never zero: workers also promote delayed messages
    settings = load_settings(KUBE / "pushgw.toml", env={})
    keys = Keys(settings.redis.prefix)
    auth = by_kind(docs, "TriggerAuthentication")
    known = {"address", "host", "port", "stream", "consumerGroup", "lagCount", "pendingEntriesCount", "streamLength",
             "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex", "usernameFromEnv", "passwordFromEnv"}
    measured = {}
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams" and set(meta) <= known
        assert meta["stream"] in (keys.stream, keys.stream_high) and meta["consumerGroup"] == keys.group
        (metric,) = {"lagCount", "pendingEntriesCount", "streamLength"} & set(meta)  # one measure per trigger
        assert int(meta[metric]) > 0 and re.fullmatch(r"[^:\s]+:\d+", meta["address"])
        assert trigger["authenticationRef"]["name"] in auth
        measured[(meta["stream"], metric)] = int(meta[metric])
    in_flight = settings.worker.processes * settings.worker.max_inflight
    assert measured[(keys.stream, "lagCount")] == in_flight  # keda.yaml: one pod's in-flight room
    assert measured[(keys.stream_high, "lagCount")] < measured[(keys.stream, "lagCount")]
    ceiling = settings.worker.processes * (settings.worker.max_inflight + settings.worker.high_reserve)
    assert measured[(keys.stream, "pendingEntriesCount")] < ceiling
    for ta in auth.values():
        assert [r["parameter"] for r in ta["spec"]["secretTargetRef"]] == ["password"]


# ---------------------------------------------------------------------------- the image (opt-in)


image_test = pytest.mark.skipif(os.environ.get("PUSHGW_TEST_IMAGE") != "1",
                                reason="builds the image with podman (minutes, root): PUSHGW_TEST_IMAGE=1 pytest -m image")
IMAGE = "localhost/pushgw:test"


@pytest.fixture(scope="module")
def built_image() -> str:
    built = subprocess.run(["bash", str(DEPLOY / "build-image.sh")], env=os.environ | {"IMAGE": IMAGE},
                           capture_output=True, text=True, timeout=1800, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return IMAGE


@pytest.mark.image
@image_test
def test_image_builds_with_podman_from_a_debian_base_and_has_what_the_containerfile_says(built_image: str) -> None:
    fmt = "{{.Config.User}}|{{.Config.StopSignal}}|{{json .Config.Entrypoint}}|{{json .Config.Healthcheck.Test}}"
    inspect = subprocess.run(["podman", "image", "inspect", "--format", fmt, built_image], capture_output=True, text=True,
                             timeout=60, check=True).stdout.strip()
    user, stop, entrypoint, health = inspect.split("|")
    assert user == "10001:10001" and stop == "SIGTERM" and entrypoint == '["pushgw"]'
    assert "pushgw.gateway.healthcheck" in health
    labels = subprocess.run(["podman", "image", "inspect", "--format", "{{json .Labels}}", built_image],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"org.opencontainers.image.version":"0.1.0"' in labels.replace(" ", "")
    mount = subprocess.run(["podman", "image", "mount", built_image], capture_output=True, text=True, timeout=60, check=True)
    root = Path(mount.stdout.strip())
    try:
        for compiler in ("gcc", "cc", "g++", "clang", "make"):
            assert not (root / "usr/bin" / compiler).exists(), compiler
        assert not (root / "src").exists() and not (root / "opt/pushgw/bin/pip").exists()
    finally:
        subprocess.run(["podman", "image", "unmount", built_image], capture_output=True, timeout=60, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.image
@image_test
def test_image_files_serve_the_api_and_workers_as_their_user_without_a_container_runtime(
        built_image: str, tmp_path: Path) -> None:
    """No container can run on this machine (README "Deployment"), so the image's own files run in a chroot as
    uid 10001: `podman create` + `podman mount` give the container's writable root without starting it. Network,
    cgroups and namespaces are the host's: what this leaves untested is the runtime's part."""
    ctr = subprocess.run(["podman", "create", built_image], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    root = subprocess.run(["podman", "mount", ctr], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    redis_port, api_port, worker_port = _free_port(), _free_port(), _free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                                   "--save", ""], stdout=subprocess.DEVNULL)
    env = ["env", "-i", "PATH=/opt/pushgw/bin:/usr/bin:/bin", "HOME=/tmp", "PUSHGW_CONFIG=", "PUSHGW_API_HOST=127.0.0.1",
           f"PUSHGW_REDIS_URL=redis://127.0.0.1:{redis_port}/0", "PROMETHEUS_MULTIPROC_DIR=/run/pushgw/metrics"]
    as_user = ["chroot", "--userspec=10001:10001", root, *env]
    procs = [subprocess.Popen([*as_user, "PUSHGW_API_TOKEN=image-test-token-0123456789", f"PUSHGW_API_PORT={api_port}",
                               "pushgw", "api"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([*as_user, f"PUSHGW_WORKER_METRICS_PORT={worker_port}", "pushgw", "worker"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for port in (api_port, worker_port):  # the image's HEALTHCHECK command, from inside the image
            ok = False
            deadline = time.monotonic() + 60
            while not ok and time.monotonic() < deadline:
                ok = subprocess.run([*as_user, f"PUSHGW_HEALTH_PORT={port}", "python", "-m", "pushgw.gateway.healthcheck"],
                                    capture_output=True, timeout=60, check=False).returncode == 0
                time.sleep(0.5)
            assert ok, f"health check on {port}"
        sent = subprocess.run([*as_user, "pushgw", "send", "--user", "nobody", "--title", "t", "--body", "b"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert sent.returncode == 0, sent.stderr
        counted, body = 'pushgw_deliveries_skipped_total{reason="no_device"} 1.0', ""
        deadline = time.monotonic() + 60
        while counted not in body and time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{worker_port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            time.sleep(0.5)
        assert counted in body
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in [*procs, redis_proc]:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["podman", "umount", ctr], capture_output=True, timeout=60, check=False)
        subprocess.run(["podman", "rm", ctr], capture_output=True, timeout=60, check=False)


def test_build_script_names_no_registry_host_and_builds_the_base_from_debian_packages() -> None:
    script = (DEPLOY / "build-image.sh").read_text()
    assert "debootstrap" in script and "podman import" in script and "--isolation chroot" in script
    assert "--format docker" in script  # OCI images drop HEALTHCHECK
    assert not re.search(r"https?://", "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#")))
    assert shlex.split("bash deploy/build-image.sh")  # the README's command


def uncommented_webhooks_example(toml: str) -> str:
    """The shipped pushgw.toml with its commented webhook example turned on."""
    out = []
    for line in toml.splitlines():
        if re.match(r"# (\[webhooks\]|\[\[webhooks\.subscriptions\]\]|allowed_hosts|name|client|url|secret_env) ?", line):
            line = line[2:]
        out.append(line)
    return "\n".join(out) + "\n"


def test_compose_webhooks_dispatcher_is_opt_in_hardened_and_its_example_subscription_loads(tmp_path: Path) -> None:
    svc = compose()["services"]["webhooks"]
    assert svc["profiles"] == ["webhooks"]  # it refuses to start without a subscription: never on by default
    args = build_parser().parse_args(svc["command"])
    assert (args.command, args.action, args.consumer) == ("webhooks", "run", "compose-webhooks")
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert any(t.startswith("/run/pushgw/metrics:") for t in svc["tmpfs"])
    assert str(args.metrics_port) in " ".join(svc["healthcheck"]["test"])
    example = tmp_path / "pushgw.toml"
    example.write_text(uncommented_webhooks_example((COMPOSE / "pushgw.toml").read_text()))
    env = {**svc["environment"], **TOKEN_ENV, "PUSHGW_WEBHOOK_SECRET": "compose-webhook-secret-0123456789"}
    (sub,) = load_settings(example, env=env).webhooks.subscriptions
    assert sub.client == "env" and sub.url.startswith("https://")
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {(n, c["port"]) for c in prometheus["scrape_configs"][0]["dns_sd_configs"] for n in c["names"]}
    assert ("webhooks", args.metrics_port) in targets


def test_kubernetes_webhooks_dispatcher_validates_and_keeps_one_consumer_name_across_pods() -> None:
    (doc,) = [d for d in yaml.safe_load_all((KUBE / "webhooks.yaml").read_text()) if d]
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert "webhooks.yaml" not in kustomization["resources"]  # opt-in: it needs a subscription in pushgw.toml
    spec = doc["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.action, args.consumer) == ("webhooks", "run", "pushgw-webhooks")
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert container["ports"][0]["containerPort"] == args.metrics_port
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["terminationGracePeriodSeconds"] > WebhookSettings().timeout_s
    assert all("secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])
