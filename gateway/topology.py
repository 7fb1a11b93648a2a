"""Redis topologies on loopback, started from the local redis-server binary: a Sentinel setup and a Redis Cluster.

The tests (and labs) start these themselves, on free private ports in a folder of their own; nothing here ever
connects to a server it did not start, and port 6379 is never used.

- `SentinelSetup`: one master, one or more replicas and three sentinels (`redis-server <conf> --sentinel`, what Debian's
  `redis-sentinel` runs) monitoring it under `master_name`; `failover()` runs SENTINEL FAILOVER and waits until
  the sentinels name the promoted replica (https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/).
- `LocalCluster`: N masters with the 16384 hash slots split into N even ranges (CLUSTER ADDSLOTSRANGE), joined by
  CLUSTER MEET, each with its own config epoch, ready once every node reports `cluster_state:ok`; optionally
  replicas per master (CLUSTER REPLICATE), `kill_master` to SIGKILL one and wait for its replica's promotion, and
  `move_slot` to reshard a slot while clients use it (MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE)
  (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/).
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ..queue.shards import key_slot
from .embedded import EmbeddedRedisError, find_redis_server, stop_process

HOST = "127.0.0.1"
SLOTS = 16384
_RESERVED = {6379, 16379, 26379}  # the machine's own Redis (and its cluster bus / sentinel ports) are never ours


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False, taken: set[int] | None = None) -> int:
    """A free loopback port (and port + 10000 free too when the node runs a cluster bus), never 6379."""
    taken = taken if taken is not None else set()
    for _ in range(1000):
        port = random.randint(20000, 55000)
        bus = port + 10000
        if port in _RESERVED or port in taken or (cluster_bus and (bus in _RESERVED or bus in taken)):
            continue
        if _free(port) and (not cluster_bus or _free(bus)):
            taken.update({port, bus} if cluster_bus else {port})
            return port
    raise EmbeddedRedisError("no free loopback port for a test Redis")


@dataclass
class Process:
    """One redis-server (or sentinel) process on a loopback port."""

    port: int
    folder: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(  # noqa: S603 - our own binary and arguments
            [find_redis_server(), *self.args], cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                           decode_responses=True)

    def wait_up(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log = self.folder / "redis.log"
                tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
                raise EmbeddedRedisError(f"redis-server on port {self.port} exited at start: {tail}")
            with contextlib.suppress(redis.RedisError), self.client(0.5) as c:
                if c.ping():
                    return
            time.sleep(0.05)
        raise EmbeddedRedisError(f"redis-server on port {self.port} did not answer within {timeout_s}s")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _server_args(port: int, *extra: str) -> list[str]:
    return ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--logfile", "redis.log",
            "--daemonize", "no", "--repl-diskless-sync-delay", "0", *extra]


def _wait(check: object, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise EmbeddedRedisError(f"{what} within {timeout_s}s")


@dataclass
class SentinelSetup:
    """A master, `replicas` replicas and three sentinels; `sentinel_addresses` and `master_name` go to
    `[redis.sentinel]`."""

    folder: Path
    master_name: str = "pushgw-test"
    replicas: int = 1
    down_after_ms: int = 1000
    nodes: list[Process] = field(default_factory=list)
    sentinels: list[Process] = field(default_factory=list)

    @property
    def sentinel_addresses(self) -> tuple[str, ...]:
        return tuple(f"{HOST}:{s.port}" for s in self.sentinels)

    def start(self, timeout_s: float = 20.0) -> SentinelSetup:
        taken: set[int] = set()
        master_port = free_port(taken=taken)
        self.nodes = [Process(master_port, self.folder / "master", _server_args(master_port))]
        for i in range(self.replicas):
            port = free_port(taken=taken)
            self.nodes.append(Process(port, self.folder / f"replica{i}",
                                      _server_args(port, "--replicaof", HOST, str(master_port))))
        try:
            self._start(master_port, taken, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, master_port: int, taken: set[int], timeout_s: float) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_up()
        for i in range(3):
            port = free_port(taken=taken)
            folder = self.folder / f"sentinel{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"  # a sentinel rewrites its config file: one writable file each
            conf.write_text(
                f"port {port}\nbind {HOST}\ndir {folder}\nlogfile redis.log\n"
                f"sentinel monitor {self.master_name} {HOST} {master_port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} 10000\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            self.sentinels.append(Process(port, folder, [str(conf), "--sentinel"]))
        for s in self.sentinels:
            s.start()
        for s in self.sentinels:
            s.wait_up()
        _wait(self._ready, "the sentinels did not see the replica and each other", timeout_s)

    def _ready(self) -> bool:
        for s in self.sentinels:
            with s.client() as c:
                replicas = c.execute_command("SENTINEL", "REPLICAS", self.master_name)
                peers = c.execute_command("SENTINEL", "SENTINELS", self.master_name)
                if len(replicas) < self.replicas or len(peers) < 2:
                    return False
                if any("disconnected" in _pairs(r).get("flags", "") for r in replicas):
                    return False
        return _replicas_acknowledge(self.nodes[0], self.replicas)

    def master_port(self) -> int:
        with self.sentinels[0].client() as c:
            _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)

    def failover(self, timeout_s: float = 30.0) -> int:
        """SENTINEL FAILOVER; returns once every sentinel names the promoted replica and it answers as master."""
        old = self.master_port()
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", self.master_name)

        def promoted() -> bool:
            ports = set()
            for s in self.sentinels:
                with s.client() as sc:
                    ports.add(int(sc.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)[1]))
            if len(ports) != 1 or old in ports:
                return False
            node = next(n for n in self.nodes if n.port in ports)
            with node.client() as nc:
                return bool(nc.info("replication")["role"] == "master")

        _wait(promoted, "the sentinels did not promote the replica", timeout_s)
        return self.master_port()

    def stop(self) -> None:
        for p in [*self.sentinels, *self.nodes]:
            p.stop()


def _replicas_acknowledge(master: Process, replicas: int, key: str = "topology:ready") -> bool:
    """Every replica has finished its first sync and streams writes: a write, then WAIT counts it. (A replica's
    INFO state is `online` as soon as a diskless transfer ends, while the master holds its writes back until the
    replica's first REPLCONF ACK: a master killed in that window takes every later write with it. WAIT without
    a write before it counts such a replica too.)"""
    with master.client() as c:
        c.set(key, "1")
        return int(c.execute_command("WAIT", replicas, 200)) >= replicas


def _key_in(slots: tuple[int, int]) -> str:
    """A key a master serves (a write elsewhere would be MOVED)."""
    return next(k for k in (f"topology:ready:{j}" for j in range(100_000)) if slots[0] <= key_slot(k) <= slots[1])


def _replicate(replica: Process, master_id: str) -> bool:
    with replica.client() as c:
        c.execute_command("CLUSTER", "REPLICATE", master_id)
    return True


def _pairs(reply: object) -> dict[str, str]:
    """SENTINEL REPLICAS answers flat [name, value, ...] lists (RESP2) or maps (RESP3)."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply) if isinstance(reply, list | tuple) else []
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


@dataclass
class LocalCluster:
    """`masters` cluster nodes owning even slot ranges; `seeds` go to `redis.cluster_nodes`."""

    folder: Path
    masters: int = 3
    replicas: int = 0  # per master
    nodes: list[Process] = field(default_factory=list)  # the masters first, then master i's replicas in turn

    @property
    def seeds(self) -> tuple[str, ...]:
        return tuple(f"{HOST}:{n.port}" for n in self.nodes[:self.masters])

    def replicas_of(self, master: int) -> list[Process]:
        start = self.masters + master * self.replicas
        return self.nodes[start:start + self.replicas]

    def slot_ranges(self) -> list[tuple[int, int]]:
        """Node i owns [start, end] (inclusive): the split `redis-cli --cluster create` makes."""
        bounds = [round(i * SLOTS / self.masters) for i in range(self.masters + 1)]
        return [(bounds[i], bounds[i + 1] - 1) for i in range(self.masters)]

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        if self.masters < 1:
            raise ValueError("a cluster needs at least one master")
        taken: set[int] = set()
        for i in range(self.masters * (1 + self.replicas)):
            port = free_port(cluster_bus=True, taken=taken)
            self.nodes.append(Process(port, self.folder / f"node{i}", _server_args(
                port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000")))
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            n.wait_up()
        for i, n in enumerate(self.nodes):
            with n.client() as c:
                if i < self.masters:
                    start, end = self.slot_ranges()[i]
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        with self.nodes[0].client() as c:
            for n in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", HOST, n.port)
        _wait(self._ready, "the cluster did not reach cluster_state:ok", timeout_s)
        for i in range(self.masters):
            with self.nodes[i].client() as c:
                master_id = c.execute_command("CLUSTER", "MYID")
            for r in self.replicas_of(i):
                # A replica must know its master before it can follow it: retry while gossip spreads.
                _wait(lambda r=r, m=master_id: _replicate(r, m), "a replica could not follow its master", timeout_s)
        _wait(self._replicas_online, "the replicas did not finish their first sync", timeout_s)

    def _ready(self) -> bool:
        for n in self.nodes:
            with n.client() as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info if isinstance(info, str) else str(info)
                if "cluster_state:ok" not in text or f"cluster_known_nodes:{len(self.nodes)}" not in text:
                    return False
        return True

    def _replicas_online(self) -> bool:
        return all(_replicas_acknowledge(self.nodes[i], self.replicas, _key_in(self.slot_ranges()[i]))
                   for i in range(self.masters))

    def owner_of(self, slot: int) -> int:
        """Index of the master serving `slot` now (as node 0 sees the cluster)."""
        ports = {n.port: i for i, n in enumerate(self.nodes)}
        with self.nodes[0].client() as c:
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return ports[int(master[1])]
        raise LookupError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, to: int, batch: int = 100) -> int:
        """Reshard one slot to master `to` while clients use it, as `redis-cli --cluster reshard` does: mark it
        importing/migrating, MIGRATE its keys in batches, then assign it on every master. Returns the keys moved."""
        source, target = self.nodes[self.owner_of(slot)], self.nodes[to]
        with source.client() as src, target.client() as dst:
            src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                src.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
            for n in self.nodes[:self.masters]:
                if n.proc is not None:
                    with n.client() as c:
                        c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def kill_master(self, master: int, timeout_s: float = 30.0) -> Process:
        """SIGKILL a master; returns once one of its replicas has taken its slots and the cluster is ok again."""
        replicas = self.replicas_of(master)
        if not replicas:
            raise ValueError("a master without replicas cannot fail over")
        self.nodes[master].kill()

        def promoted() -> Process | None:
            for r in replicas:
                with r.client() as c:
                    info = str(c.execute_command("CLUSTER", "INFO"))
                    if c.info("replication")["role"] == "master" and "cluster_state:ok" in info:
                        return r
            return None

        _wait(promoted, "no replica took over the killed master's slots", timeout_s)
        taken_over = promoted()
        assert taken_over is not None
        return taken_over

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
