"""Where a worker's CPU goes, by component: py-spy samples of the worker processes, classified.

`pushgw bench --profile DIR` attaches `py-spy record` (sampling from outside the process, non-blocking,
idle samples left out) to every worker process for the gateway run and writes their raw stacks to DIR.
Each sample is billed to the component of the innermost frame a rule below names (walking from the leaf
towards the root: a helper shared by several components, such as the message schema, is billed to its
caller), and a component's share of the samples times the workers' measured CPU per delivery
(`/proc` counters, bench/run.py `CpuMeter`) is its µs per delivery. Sampling percentages survive a
noisy machine better than wall-clock timings: the share is measured within the workers' own CPU time.

    python -m pushgw.bench.profile DIR/worker-*.txt --us-per-delivery 80 [--root /other/tree/]   # classify again

py-spy sees Python frames only: time inside C code (uvloop's event loop, TLS, socket calls, hiredis,
orjson) is billed to the Python frame that called it, and time with no Python frame of ours on the
stack (the event loop between callbacks) to "event loop (native)".

py-spy leaves out a thread that sleeps (in epoll), but counts one that is runnable and waits for a core.
On a shared machine that waiting is most of the samples (`sampled_over_cpu` in the bench's JSON: sampled
time ÷ measured CPU; 1.0 on an idle machine). A worker preempted anywhere waits in proportion to the CPU
it spends there, so shares hold; a worker woken from epoll waits with only the event loop on its stack,
so on a busy machine "event loop (native)" is an upper bound and the other rows lower bounds.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE = 250  # samples per second and process

# (path fragment, function names or None for any, component). Project paths are relative to the package.
# The first frame from the leaf that a rule matches decides; frames no rule matches are skipped.
PROJECT_RULES: tuple[tuple[str, frozenset[str] | None, str], ...] = (
    ("providers/webpush.py", frozenset({"encrypt", "subscription_key"}), "Web Push encryption (RFC 8291)"),
    ("providers/webpush.py", frozenset({"_origin", "_origin_key", "_request_target", "_authority",
                                        "uses_declarative"}), "Web Push endpoint checks"),
    ("providers/endpoints.py", None, "Web Push endpoint checks"),
    ("providers/payloads.py", None, "payload building"),
    ("providers/jose.py", None, "payload building"),
    ("providers/vapid.py", None, "payload building"),
    ("providers/oauth2.py", None, "payload building"),
    ("providers/apns.py", frozenset({"_headers", "_headers_overridden", "_typed_headers", "apns_id"}),
     "payload building"),
    ("providers/fcm.py", frozenset({"h2_headers", "body", "_body"}), "payload building"),
    ("providers/webpush.py", frozenset({"_plaintext", "_h2_headers", "_headers", "topic_for", "authorization"}),
     "payload building"),
    ("providers/apns.py", frozenset({"_failure"}), "response handling"),
    ("providers/fcm.py", frozenset({"_failure", "_message_name", "_error_code"}), "response handling"),
    ("providers/h2/connection.py", frozenset({"data_received", "_frame", "_on_headers", "_on_continuation",
                                              "_on_block", "_on_data", "_on_rst_stream", "_on_settings",
                                              "_on_window_update", "_complete", "_end", "_wake_slot"}),
     "response handling"),
    ("providers/h2/stream.py", None, "response handling"),
    ("providers/h2/frames.py", frozenset({"header_block_fragment", "unpadded_data", "rst_stream_code",
                                          "settings_entries", "check_settings_ack", "window_increment",
                                          "check_ping", "goaway"}), "response handling"),
    ("providers/h2/", None, "provider send (HTTP/2)"),
    ("providers/transport.py", None, "provider send (HTTP/2)"),
    ("providers/apns.py", None, "provider send (HTTP/2)"),
    ("providers/fcm.py", None, "provider send (HTTP/2)"),
    ("providers/webpush.py", None, "provider send (HTTP/2)"),
    ("core/metrics.py", None, "metrics"),
    ("gateway/worker_metrics.py", None, "metrics"),
    ("core/logs.py", None, "logs"),
    ("ratelimit/circuit.py", None, "lanes and senders"),
    ("ratelimit/", None, "policy"),
    ("users/", None, "registry"),
    ("gateway/lanes.py", None, "lanes and senders"),
    ("gateway/lanequeue.py", None, "lanes and senders"),
    ("gateway/settle.py", None, "settle and flush"),
    ("queue/streams.py", frozenset({"commit", "_commit"}), "settle and flush"),
    ("queue/streams.py", frozenset({"move_due", "stats", "touch", "trim", "claim_stale", "delete_idle_consumers"}),
     "janitor and mover"),
    ("queue/connection.py", None, "Redis client"),  # the hiredis packing of every command
    ("queue/", None, "read and decode"),
    ("core/schema.py", frozenset({"loads_message"}), "read and decode"),
    ("core/queued.py", None, "read and decode"),
    ("gateway/worker.py", frozenset({"_plan", "_decide", "__getitem__"}), "planning (devices, jobs)"),
    ("gateway/worker.py", frozenset({"_mover", "_janitor"}), "janitor and mover"),
    ("gateway/worker.py", None, "read and decode"),
    ("campaigns/", None, "campaign fan-out runner"),
)
# Libraries, matched on the absolute path (site-packages or the standard library).
LIBRARY_RULES: tuple[tuple[str, str], ...] = (
    ("/redis/", "Redis client"),
    ("hiredis", "Redis client"),
    ("prometheus_client", "metrics"),
    ("/cryptography/", "Web Push encryption (RFC 8291)"),
    ("/idna/", "Web Push endpoint checks"),
    ("urllib/parse.py", "Web Push endpoint checks"),
    ("/logging/", "logs"),
    ("/uvloop/", "event loop (native)"),
    ("/asyncio/", "event loop (native)"),
)
# A comprehension runs in a frame of its own, named after its kind, not after the function it is written in.
COMPREHENSIONS = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"})
# A worker process's start-up, should a sample land in it (bench waits for the workers to join first).
STARTUP_FUNCTIONS = frozenset({"build_providers", "_find_and_load"})
COMPONENT_ORDER = (
    "read and decode", "policy", "registry", "planning (devices, jobs)", "lanes and senders", "payload building",
    "Web Push endpoint checks", "Web Push encryption (RFC 8291)", "provider send (HTTP/2)", "response handling",
    "settle and flush", "metrics", "Redis client", "logs", "janitor and mover", "campaign fan-out runner",
    "start-up (imports, providers)", "event loop (native)", "other",
)


@dataclass(frozen=True)
class Frame:
    function: str
    path: str


def parse_frame(text: str) -> Frame:
    """One py-spy raw frame: `Class.function (path:line)` (paths in full: `--full-filenames`)."""
    name, _, rest = text.partition(" (")
    path = rest.rsplit(":", 1)[0] if rest else ""
    return Frame(name.rsplit(".", 1)[-1], path)


def component(stack: Sequence[Frame], root: str) -> str:
    """The component a sample is billed to; `stack` runs from the root to the leaf."""
    for f in stack:
        if f.function in STARTUP_FUNCTIONS or "importlib" in f.path:
            return "start-up (imports, providers)"
    for f in reversed(stack):
        if f.path.startswith(root) and "site-packages" not in f.path:
            if f.function in COMPREHENSIONS:
                continue  # billed with the function it runs in (the next frame out)
            rel = f.path[len(root):]
            for fragment, functions, name in PROJECT_RULES:
                if rel.startswith(fragment) and (functions is None or f.function in functions):
                    return name
            continue
        for fragment, name in LIBRARY_RULES:
            if fragment in f.path:
                return name
    return "other"


def classify(lines: Iterable[str], root: str) -> Counter[str]:
    """Samples per component from py-spy raw lines (`frame;frame;...;leaf count`)."""
    out: Counter[str] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack_text, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        stack = [parse_frame(t) for t in stack_text.split(";")]
        out[component(stack, root)] += n
    return out


def package_root() -> str:
    return str(Path(__file__).resolve().parent.parent) + "/"


def table(samples: Counter[str], us_per_delivery: float) -> list[dict[str, float | str]]:
    """Rows of component, share of samples and µs per delivery (share × the measured CPU per delivery)."""
    total = sum(samples.values())
    rows: list[dict[str, float | str]] = []
    if not total:
        return rows
    for name in COMPONENT_ORDER:
        n = samples.get(name, 0)
        if n:
            rows.append({"component": name, "share": round(n / total, 4),
                         "us_per_delivery": round(n / total * us_per_delivery, 1), "samples": n})
    return rows


def render(rows: Sequence[dict[str, float | str]]) -> str:
    width = max((len(str(r["component"])) for r in rows), default=10)
    lines = [f"  {'component':<{width}}  {'µs/delivery':>11}  {'share':>6}"]
    for r in rows:
        lines.append(f"  {r['component']!s:<{width}}  {r['us_per_delivery']:>11}  {float(r['share']):>6.1%}")
    return "\n".join(lines)


class Recorder:
    """py-spy attached to running processes until they exit (or `stop`)."""

    def __init__(self, directory: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise SystemExit("--profile needs py-spy (pip install py-spy; it is in the `test` extra)")
        self.exe = exe
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Path] = []

    def attach(self, pids: Sequence[int]) -> None:
        for pid in pids:
            out = self.directory / f"worker-{pid}.txt"
            self.files.append(out)
            self.procs.append(subprocess.Popen(
                [self.exe, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--nonblocking",
                 "--full-filenames", "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def finish(self, timeout_s: float = 30.0) -> Counter[str]:
        """Wait for py-spy to write its files (it stops when its process exits), then classify them."""
        for p in self.procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
                p.wait(timeout_s)
        return self.read()

    def read(self) -> Counter[str]:
        root = package_root()
        total: Counter[str] = Counter()
        for f in self.files:
            if f.exists():
                with f.open() as fh:
                    total.update(classify(fh, root))
        return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="classify py-spy raw stacks of pushgw workers by component")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--us-per-delivery", type=float, default=100.0,
                    help="the workers' measured CPU µs per delivery (bench JSON cpu_us_per_delivery.workers)")
    ap.add_argument("--root", default=package_root(),
                    help="the profiled tree's package folder, with a trailing slash (default: this one's)")
    args = ap.parse_args(argv)
    root = args.root
    samples: Counter[str] = Counter()
    for name in args.files:
        with open(name) as fh:
            samples.update(classify(fh, root))
    sys.stdout.write(render(table(samples, args.us_per_delivery)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
