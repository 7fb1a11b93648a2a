"""A private redis-server the gateway starts itself when no Redis URL is configured.

It listens only on a unix socket (no TCP port, so it can never collide with, or be mistaken for,
another Redis on the machine), keeps its data in a local folder with AOF on, and is stopped when
its owner exits. The test suite uses the same class, so every test run has a Redis of its own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

MIN_VERSION = (6, 2)  # XAUTOCLAIM and XADD ... MINID


class EmbeddedRedisError(RuntimeError):
    """redis-server is missing, too old, or did not start."""


def find_redis_server() -> str:
    """Path of a redis-server binary: $PUSHGW_REDIS_SERVER, else the one on PATH."""
    candidate = os.environ.get("PUSHGW_REDIS_SERVER") or shutil.which("redis-server")
    if not candidate:
        raise EmbeddedRedisError(
            "redis-server was not found on PATH. Install it (Debian/Ubuntu: apt-get install redis-server; "
            "the README's setup commands do this) or set redis.url / PUSHGW_REDIS_URL to an existing Redis."
        )
    out = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False).stdout  # noqa: S603
    try:
        version = out.split("v=", 1)[1].split()[0]
        major, minor = (int(x) for x in version.split(".")[:2])
    except (IndexError, ValueError):
        raise EmbeddedRedisError(f"could not read the version of {candidate}: {out.strip()!r}") from None
    if (major, minor) < MIN_VERSION:
        raise EmbeddedRedisError(f"{candidate} is Redis {version}; the gateway needs 6.2 or newer")
    return candidate


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a redis-server (it exits cleanly), SIGKILL it if it has not exited within 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


class EmbeddedRedis:
    """Start with `with EmbeddedRedis(dir) as r: r.url`, or `start()` / `stop()`."""

    def __init__(self, data_dir: str | Path, *, aof: bool = True, fsync: str = "everysec") -> None:
        if fsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {fsync!r}")
        self.data_dir = Path(data_dir).resolve()
        self.aof = aof
        # everysec: a crash of the machine (or SIGKILL of Redis) may lose the last second of writes;
        # always: no acknowledged write is lost, at the cost of an fsync per event-loop round.
        self.fsync = fsync
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        # unix socket paths are limited to ~107 bytes, so the socket lives in the temp dir.
        self.socket_path = Path(tempfile.gettempdir()) / f"pushgw-{digest}.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> str:
        binary = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self._refuse_if_live()
            self.socket_path.unlink()
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", self.fsync,
            "--save", "",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.data_dir / "redis.log"
                tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
                raise EmbeddedRedisError(f"redis-server exited at start: {err or tail}")
            if self._ping():
                return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on {self.socket_path} within {timeout}s")

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(self.socket_path))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def is_live(self) -> bool:
        """True when a server (e.g. one `pushgw serve` started) already answers on this folder's socket."""
        return self.socket_path.exists() and self._ping()

    def _refuse_if_live(self) -> None:
        if self._ping():
            raise EmbeddedRedisError(
                f"another embedded Redis already serves {self.data_dir} (socket {self.socket_path}); "
                "stop it or use a different redis.embedded_dir"
            )

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc)
        self.proc = None
        self.socket_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would; data written to the AOF survives a `start()` after it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
