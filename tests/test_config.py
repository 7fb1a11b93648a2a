"""Settings: TOML plus environment, frozen, and every bad value named at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pushgw.core.config import ConfigError, load_settings


def write(tmp: Path, text: str) -> Path:
    p = tmp / "pushgw.toml"
    p.write_text(text)
    return p


def test_toml_then_environment_overrides(tmp: Path) -> None:
    path = write(tmp, """
[redis]
url = "redis://127.0.0.1:6390/0"
[worker]
processes = 4
max_attempts = 5
[apns.campus]
topic = "org.example.campus"
key_file = "/keys/apns.p8"
key_id = "ABC123DEFG"
team_id = "TEAM123456"
[fcm.campus]
service_account_file = "/keys/sa.json"
[[api.clients]]
name = "course-service"
token = "0123456789abcdef0123"
scopes = ["enqueue", "devices"]
""")
    s = load_settings(path, env={"PUSHGW_WORKER_PROCESSES": "8", "PUSHGW_APNS_CAMPUS_SANDBOX": "true"})
    assert s.redis.url == "redis://127.0.0.1:6390/0"
    assert s.worker.processes == 8 and s.worker.max_attempts == 5
    assert s.apns_app("campus") is not None and s.apns_app("campus").sandbox is True  # type: ignore[union-attr]
    assert s.fcm_app("campus") is not None
    assert s.api.clients[0].scopes == ("enqueue", "devices")
    with pytest.raises(AttributeError):
        s.worker.processes = 1  # type: ignore[misc]


def test_secrets_stay_out_of_repr(tmp: Path) -> None:
    s = load_settings(None, env={"PUSHGW_API_TOKEN": "super-secret-token-value"})
    assert "super-secret-token-value" not in repr(s)
    assert s.api.clients[0].token == "super-secret-token-value"


@pytest.mark.parametrize(
    ("text", "env", "named"),
    [
        ("[worker]\nprocesses = 'many'", {}, "worker.processes"),
        ("[worker]\nbatch_sise = 3", {}, "batch_sise"),
        ("[apns.x]\nkey_file = 'k'", {}, "apns.x.topic"),
        ("[apns.x]\ntopic = 't'\nkey_file = 'k'", {}, "key_id and team_id"),
        ("[fcm.y]\nproject_id = 'p'", {}, "fcm.y.service_account_file"),
        ("[[api.clients]]\nname = 'a'\ntoken = 'short'", {}, "api.clients[0].token"),
        ("", {"PUSHGW_WORKER_BLOCK_MS": "-5"}, "worker.block_ms"),
        ("", {"PUSHGW_LOG_LEVEL": "LOUD"}, "log.level"),
        ("[nope]\nx = 1", {}, "nope"),
        ("[redis]\ncluster = true", {}, "redis.cluster_nodes is required"),
        ("[redis]\ncluster = true\ncluster_nodes = ['h:1']\nurl = 'redis://h:2'", {}, "unset redis.url"),
        ("[redis]\ncluster = true\ncluster_nodes = ['h']", {}, "redis.cluster_nodes: 'h' is not host:port"),
        ("[redis]\ncluster = true\ncluster_nodes = ['h:1']\nwait_replicas = 1", {}, "redis.wait_replicas"),
        ("[redis]\nshards = 0", {}, "redis.shards"),
        ("", {"PUSHGW_REDIS_SHARDS": "2000"}, "redis.shards"),
        ("[redis]\nwait_replicas = 1\nwait_timeout_ms = 0", {}, "redis.wait_timeout_ms"),
        ("[redis.sentinel]\nmaster = 'm'", {}, "redis.sentinel.addresses is required"),
    ],
)
def test_bad_settings_name_the_setting(tmp: Path, text: str, env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp, text), env=env)
    assert named in str(e.value)


def test_status_and_events_keep_their_settings_on_a_cluster(tmp: Path) -> None:
    s = load_settings(write(tmp, "[redis]\ncluster = true\ncluster_nodes = ['h:1']"), env={})
    assert (s.status.enabled, s.status.events) == (True, True)  # per shard (queue/sharded.py ShardedStatus)
    s = load_settings(write(tmp, "[redis]\ncluster = true\ncluster_nodes = ['h:1']\n[status]\nevents = false"), env={})
    assert (s.status.enabled, s.status.events) == (True, False)


def test_missing_file_is_a_clear_error(tmp: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp / "absent.toml", env={})


def test_the_documented_example_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "pushgw.example.toml"
    s = load_settings(example, env={"PUSHGW_TOKEN_COURSE": "course-token-0123456789", "PUSHGW_TOKEN_OPS": "ops-token-0123456789"})
    assert [c.name for c in s.api.clients] == ["course-service", "ops"]
    assert s.apns_app("campus") is not None and s.fcm_app("campus") is not None


def test_example_config_in_docs_loads() -> None:
    example = Path(__file__).parent.parent / "docs" / "pushgw.example.toml"
    env = {"PUSHGW_TOKEN_COURSE": "course-token-0123456789", "PUSHGW_TOKEN_OPS": "ops-token-0123456789ab"}
    s = load_settings(example, env=env)
    course = next(c for c in s.api.clients if c.name == "course-service")
    assert course.rate_per_s == 2000 and course.burst == 5000 and course.scopes == ("enqueue", "devices")
    with pytest.raises(ConfigError, match="PUSHGW_TOKEN_OPS"):
        load_settings(example, env={"PUSHGW_TOKEN_COURSE": "course-token-0123456789"})


def test_mdm_topic_and_declarative_web_push_settings_load_and_navigate_must_be_https(tmp: Path) -> None:
    text = ('[apns.campus]\ntopic = "org.example.campus"\ncert_file = "/x.pem"\nmdm_topic = "com.apple.mgmt.External.x"\n'
            '[webpush]\ndeclarative = true\ndeclarative_navigate = "https://campus.example/"\n')
    s = load_settings(write(tmp, text), env={})
    assert (s.apns[0].mdm_topic, s.webpush.declarative, s.webpush.declarative_navigate) == (
        "com.apple.mgmt.External.x", True, "https://campus.example/")
    with pytest.raises(ConfigError, match="declarative_navigate"):
        load_settings(write(tmp, text.replace("https://campus", "http://campus")), env={})
