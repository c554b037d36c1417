"""Relay throughput: Postfix's smtp-source into smtp-sink directly, through a naive relay and through sendguard.

Every target is measured in the same run with the same load, side by side, on 127.0.0.1:

* ``direct``: smtp-source straight into smtp-sink, the ceiling of this machine;
* ``naive``: through bench/naive_relay.py (aiosmtpd in, aiosmtplib out, pooled, no policies);
* ``sendguard``: through ``sendguard serve`` started as a real process with the shipped config
  (policies, classes, audit log, metrics), ``upstream.tls: none``, logging at warning;
* ``sendguard-noaudit``: the same with ``audit.path: null``, to show what the audit log costs;
* ``sendguard-w2``: the same as ``sendguard`` with ``workers: 2`` (a supervising parent and two
  worker processes) and so the shared state in Redis (``SENDGUARD_BENCH_REDIS``, default
  redis://127.0.0.1:6379/0, a key prefix of its own per run); its CPU and RSS are the whole
  process tree's. ``sendguard-redis`` (only when named in ``--targets``) is ``workers: 1`` on
  the same Redis, to tell the cost of Redis from the gain of the second worker.
  ``sendguard-asyncio`` and ``sendguard-uvloop`` (likewise only when named) are ``sendguard``
  with ``event_loop`` set; the others use ``auto`` (uvloop when installed: see ``versions``).
* ``postfix`` (only when named in ``--targets``; needs root): a private Postfix instance
  (tests/postfix_config.py, the tests' own) relaying everything to the same smtp-sink. Its
  figure is the rate it *accepted* at (into its queue); the sink must still count every
  message before the run counts, and its CPU is the whole process tree's (master, smtpd,
  cleanup, qmgr, smtp).

For each scenario (concurrent sessions, message size, recipients per message) and target, a fresh
smtp-sink and a fresh relay process are started, warmed up, then smtp-source sends a fixed number
of messages and its wall clock is timed. smtp-sink's own message counter confirms that every
message arrived. The relay's CPU seconds (utime + stime from /proc/PID/stat) and peak RSS
(VmHWM from /proc/PID/status) are read around the timed part, and so is the CPU the rest of the
machine used meanwhile (/proc/stat), which marks a figure as disturbed. sendguard runs from a
copy of proxy/, policies/ and config/ taken when the run starts.

    .venv/bin/python bench/relay_throughput.py            # the full run (a few minutes)
    .venv/bin/python bench/relay_throughput.py --quick    # a short run (well under a minute)

The table goes to stdout, the figures to bench/results/relay_throughput.json (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "config" / "sendguard.yaml"
CODE_DIR = "code"  # the run directory's copy of the sources sendguard runs from
NAIVE_RELAY = ROOT / "bench" / "naive_relay.py"
RESULTS = ROOT / "bench" / "results"
TARGETS = ("direct", "naive", "sendguard", "sendguard-noaudit", "sendguard-w2")
# Chosen by name with --targets only (not in the default run); a private Postfix needs root.
EXTRA_TARGETS = ("sendguard-redis", "sendguard-asyncio", "sendguard-uvloop", "postfix")
#: sendguard targets: (audit log on, worker processes, shared state in Redis, event_loop).
SENDGUARD_TARGETS = {
    "sendguard": (True, 1, False, "auto"),
    "sendguard-noaudit": (False, 1, False, "auto"),
    "sendguard-w2": (True, 2, True, "auto"),
    "sendguard-redis": (True, 1, True, "auto"),
    "sendguard-asyncio": (True, 1, False, "asyncio"),
    "sendguard-uvloop": (True, 1, False, "uvloop"),
}
REDIS_URL = os.environ.get("SENDGUARD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
POSTFIX_SETTLE_TIMEOUT = 120.0  # Postfix answers at its queue; it delivers the backlog after smtp-source ends
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HELO, SENDER, RECIPIENT = "bench.example", "sender@bench.example", "rcpt@bench.example"
START_TIMEOUT = 30.0  # seconds for a relay to be ready
SINK_SETTLE_TIMEOUT = 10.0  # seconds for smtp-sink's counter to show every message
QUIET_WINDOW, QUIET_CORES = 0.5, 0.15  # "quiet": under 0.15 of a core busy over half a second


class BenchError(Exception):
    """A run could not be made (a program missing, a process that died, a port never ready)."""


@dataclass(frozen=True)
class Scenario:
    sessions: int
    size: int
    recipients: int
    reuse_sessions: bool = False  # smtp-source -d: many messages per SMTP session instead of one

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """``SESSIONS:SIZE:RECIPIENTS[:d]``, e.g. ``10:2000:1`` or ``10:2000:1:d`` (smtp-source -d)."""
        parts = text.split(":")
        reuse = len(parts) == 4 and parts[3] == "d"
        numbers = parts[:3] if reuse else parts
        if len(numbers) != 3 or not all(p.isdigit() and int(p) > 0 for p in numbers):
            raise argparse.ArgumentTypeError(f"expected SESSIONS:SIZE:RECIPIENTS[:d] (positive integers), got {text!r}")
        return cls(int(numbers[0]), int(numbers[1]), int(numbers[2]), reuse)

    @property
    def label(self) -> str:
        return f"s={self.sessions} l={self.size} r={self.recipients}{' -d' if self.reuse_sessions else ''}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "size": self.size,
            "recipients": self.recipients,
            "reuse_sessions": self.reuse_sessions,
        }


# One dimension varied at a time around s=10 l=2000 r=1, so each ratio says what that dimension does.
FULL_SCENARIOS = (
    Scenario(1, 2000, 1),
    Scenario(10, 2000, 1),
    Scenario(50, 2000, 1),
    Scenario(10, 50000, 1),
    Scenario(10, 2000, 5),
    Scenario(10, 2000, 1, reuse_sessions=True),
)
QUICK_SCENARIOS = (Scenario(1, 2000, 1), Scenario(10, 2000, 1), Scenario(10, 50000, 5))
FULL_MESSAGES, QUICK_MESSAGES = 2000, 300


# ---- processes and /proc ----------------------------------------------------------------------


def find_program(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if path is None:
        raise BenchError(f"{name} is not installed (run scripts/install-test-tools, or apt-get install postfix)")
    return path


def sendguard_command() -> list[str]:
    """The installed ``sendguard`` script of this interpreter's venv, else ``python -m proxy``."""
    script = Path(sys.executable).parent / "sendguard"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds: fields 14 and 15 of /proc/PID/stat (proc(5))."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces; skip past it
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a sendguard with workers: the parent and its workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            parent = int(text[text.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) summed over the process tree of ``pid``."""
    user = system = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            u, s = cpu_times(member)
            user, system = user + u, system + s
    return user, system


def machine_busy_seconds() -> float:
    """CPU seconds spent by the whole machine, all CPUs: the first line of /proc/stat minus idle and iowait."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    # guest time is already counted in user time (proc(5)), so only the first eight fields add up.
    return (sum(ticks[:8]) - idle) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, its live descendants and the children each of them reaped
    (cutime + cstime, fields 16 and 17 of /proc/PID/stat): Postfix's master and its daemons."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                text = (entry / "stat").read_text()
                parents[int(entry.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0.0
    for member in tree:
        with contextlib.suppress(OSError, IndexError):
            text = Path(f"/proc/{member}/stat").read_text()
            fields = text[text.rindex(")") + 2 :].split()
            total += sum(int(x) for x in fields[11:15]) / CLOCK_TICKS
    return total


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of /proc/PID/status: the resident set's high-water mark (summed over the process
    tree: with workers, each process's peak; an upper bound of the tree's peak)."""
    total = None
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total = (total or 0.0) + int(line.split()[1]) / 1024
    return None if total is None else round(total, 1)


def wait_until_quiet(limit: float) -> float:
    """Wait (up to ``limit`` seconds) until the machine is idle apart from us; returns the time waited.

    The relays and the sink are idle between runs, so whatever keeps the CPUs busy now is someone
    else's work, which would steal cycles from the timed run and lower its figure.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = machine_busy_seconds()
        time.sleep(QUIET_WINDOW)
        if machine_busy_seconds() - before < QUIET_CORES * QUIET_WINDOW:
            break
    return round(time.monotonic() - started, 1)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_greeting(port: int, process: subprocess.Popen[bytes], what: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode} while starting; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
                if connection.recv(512).startswith(b"220"):
                    connection.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{what} did not greet on 127.0.0.1:{port} within {START_TIMEOUT:.0f}s; see {log_path}")


def wait_for_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"sendguard exited with {process.returncode} while starting; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise BenchError(f"sendguard was not ready at {url} within {START_TIMEOUT:.0f}s; see {log_path}")


# ---- the sink and the relays ------------------------------------------------------------------


class Sink:
    """smtp-sink on an ephemeral port, counting messages (-c) into a file we read back."""

    _COUNTER = re.compile(rb"mesg=(\d+)")

    def __init__(self, program: str, workdir: Path) -> None:
        self.port = free_port()
        self.output_path = workdir / f"smtp-sink-{self.port}.out"
        # As root smtp-sink insists on dropping privileges (-u); the counter needs no files.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                [program, *user, "-c", f"127.0.0.1:{self.port}", "1024"], stdout=output, stderr=subprocess.STDOUT
            )
        wait_for_greeting(self.port, self.process, "smtp-sink", self.output_path)

    def delivered(self) -> int:
        """Messages received so far: the last ``mesg=N`` of smtp-sink's running counter."""
        counts = self._COUNTER.findall(self.output_path.read_bytes())
        return int(counts[-1]) if counts else 0

    def wait_delivered(self, expected: int, timeout: float = SINK_SETTLE_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        count = self.delivered()
        while count < expected and time.monotonic() < deadline:
            time.sleep(0.02)
            count = self.delivered()
        return count

    def stop(self) -> None:
        stop_process(self.process, timeout=5)


@dataclass
class Relay:
    """A relay process between smtp-source and smtp-sink (``start_relay`` gives None for ``direct``)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    #: Stops it (default: SIGTERM to ``process``); Postfix is stopped with ``postfix stop``.
    stop: Callable[[], None] | None = None
    #: Its CPU is the whole process tree's (Postfix), not the one process's.
    tree: bool = False

    def close(self) -> None:
        if self.stop is not None:
            self.stop()
        else:
            stop_process(self.process)

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []


def serve_command(
    config: Path, port: int, upstream_port: int, http_port: int, *, program: Sequence[str] = ()
) -> list[str]:
    """``sendguard serve`` on 127.0.0.1 with this config, listener, upstream and HTTP port;
    ``program`` starts it (default: ``sendguard_command()``)."""
    return [
        *(program or sendguard_command()),
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--http",
        f"127.0.0.1:{http_port}",
    ]


def run_errors(completed: subprocess.CompletedProcess[bytes], counted: int, expected: int, unit: str) -> list[str]:
    """What went wrong in a timed run: smtp-source failed, or smtp-sink counted too few."""
    errors = []
    if completed.returncode != 0:
        errors.append(f"smtp-source exited {completed.returncode}: {completed.stderr.decode(errors='replace')}")
    if counted != expected:
        errors.append(f"smtp-sink counted {counted} of {expected} {unit}")
    return errors


def snapshot_code(workdir: Path) -> Path:
    """Copy proxy/, policies/ and config/ into the run directory; every sendguard of the run imports this copy.

    The figures then belong to one version of the code, the one the run started with, even when
    the working tree changes while the benchmark runs.
    """
    code = workdir / CODE_DIR
    for package in ("proxy", "policies", "config"):
        shutil.copytree(ROOT / package, code / package)  # copy2 keeps mtimes, so the .pyc files stay valid
    return code


def bench_config(
    workdir: Path, *, audit: bool, max_sessions: int, workers: int = 1, redis: bool = False, event_loop: str = "auto"
) -> tuple[Path, list[str]]:
    """The shipped config/sendguard.yaml with only what a benchmark must change; returns the changes too."""
    snapshot = workdir / CODE_DIR / "config" / "sendguard.yaml"
    config: dict[str, Any] = yaml.safe_load((snapshot if snapshot.exists() else SHIPPED_CONFIG).read_text())
    changes: list[str] = []
    listener = config["listeners"][0]
    config["listeners"] = [listener]
    # smtp-source reconnects as soon as it reads the 221; the proxy sees the old connection close a
    # moment later, so the per-IP count can briefly exceed the load's session count (and get 421).
    per_ip = max(int(listener.get("max_sessions_per_ip", 50)), 2 * max_sessions)
    if per_ip != listener.get("max_sessions_per_ip"):
        listener["max_sessions_per_ip"] = per_ip
        changes.append(f"listeners[0].max_sessions_per_ip: {per_ip} (the load comes from one IP)")
    config["users_file"] = str(workdir / "users")
    config["upstream"]["tls"] = "none"
    changes.append("upstream.tls: none (smtp-sink has no TLS)")
    config["audit"]["path"] = str(workdir / "audit.jsonl") if audit else None
    changes.append(f"audit.path: {'a file in the run directory' if audit else 'null (audit log off)'}")
    config["logging"]["level"] = "warning"
    changes.append("logging.level: warning (stdout to a file)")
    if redis:
        config["stores"]["state"] = {"backend": "redis", "url": REDIS_URL, "key_prefix": f"sgbench:{workdir.name}:"}
        changes.append("stores.state: redis")
    if workers > 1:
        config["workers"] = workers
        changes.append(f"workers: {workers}")
    if event_loop != "auto":
        config["event_loop"] = event_loop
        changes.append(f"event_loop: {event_loop}")
    name = f"{'' if audit else '-noaudit'}{'-redis' if redis else ''}-w{workers}-{event_loop}"
    path = workdir / f"sendguard-bench{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, changes


def start_postfix(sink: Sink) -> Relay:
    """A private Postfix (the tests' own, tests/postfix_config.py) relaying all to the sink."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import postfix_config

    if os.geteuid() != 0:
        raise BenchError("the postfix target needs root (Postfix's master runs as root, its daemons as postfix)")
    program = find_program("postfix")
    files = postfix_config.prepare(relayhost=f"[127.0.0.1]:{sink.port}")
    process = postfix_config.start(program, files)
    relay = Relay(
        process, files.port, files.log_path, stop=lambda: postfix_config.stop(program, files, process), tree=True
    )
    try:
        wait_for_greeting(files.port, process, "Postfix", files.log_path)
    except BenchError:
        relay.close()
        raise
    return relay


def start_relay(target: str, sink: Sink, workdir: Path, max_sessions: int) -> Relay | None:
    if target == "direct":
        return None
    if target == "postfix":
        return start_postfix(sink)
    port = free_port()
    log_path = workdir / f"{target}-{port}.log"
    with open(log_path, "wb") as log:
        if target == "naive":
            command = [
                sys.executable,
                str(NAIVE_RELAY),
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                f"127.0.0.1:{sink.port}",
            ]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
            relay = Relay(process, port, log_path)
            try:
                wait_for_greeting(port, process, "the naive relay", log_path)
            except BenchError:
                stop_process(process)
                raise
            return relay
        audit, workers, redis, event_loop = SENDGUARD_TARGETS[target]
        config_path, _ = bench_config(
            workdir, audit=audit, max_sessions=max_sessions, workers=workers, redis=redis, event_loop=event_loop
        )
        http_port = free_port()
        command = serve_command(config_path, port, sink.port, http_port)
        environment = dict(os.environ)
        code = workdir / CODE_DIR
        if code.exists():
            # Ahead of the editable install on sys.path: sendguard runs the snapshot, not the live tree.
            environment["PYTHONPATH"] = str(code)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=environment)
    relay = Relay(process, port, log_path)
    try:
        wait_for_ready(f"http://127.0.0.1:{http_port}/readyz", process, log_path)
    except BenchError:
        stop_process(process)
        raise
    return relay


# ---- one measured run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    source: str
    sink: str
    messages: int
    warmup: int
    quiet_wait: float = 0.0  # seconds to wait at most for an idle machine before each timed run

    def command(self, scenario: Scenario, port: int, messages: int) -> list[str]:
        return [
            self.source,
            *(["-d"] if scenario.reuse_sessions else []),
            "-s",
            str(scenario.sessions),
            "-m",
            str(messages),
            "-r",
            str(scenario.recipients),
            "-l",
            str(scenario.size),
            "-M",
            HELO,
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            f"127.0.0.1:{port}",
        ]

    def warmup_count(self, scenario: Scenario) -> int:
        # Enough messages for every session to have opened its upstream connection once.
        return self.warmup if self.warmup >= 0 else max(20, 2 * scenario.sessions)


def send(load: Load, scenario: Scenario, port: int, messages: int) -> subprocess.CompletedProcess[bytes]:
    timeout = 60 + messages * scenario.recipients * 0.5  # a stalled relay must not hang the benchmark
    return subprocess.run(load.command(scenario, port, messages), capture_output=True, timeout=timeout, check=False)


def run_once(load: Load, scenario: Scenario, target: str, workdir: Path, max_sessions: int) -> dict[str, Any]:
    result: dict[str, Any] = {"scenario": scenario.as_dict(), "target": target, "messages": load.messages}
    sink = Sink(load.sink, workdir)
    relay: Relay | None = None
    try:
        relay = start_relay(target, sink, workdir, max_sessions)
        port = relay.port if relay else sink.port
        warmup = load.warmup_count(scenario)
        if warmup:
            warm = send(load, scenario, port, warmup)
            settle = POSTFIX_SETTLE_TIMEOUT if relay is not None and relay.tree else SINK_SETTLE_TIMEOUT
            if warm.returncode != 0 or sink.wait_delivered(warmup, settle) != warmup:
                raise BenchError(f"warm-up failed: exit {warm.returncode}: {warm.stderr.decode(errors='replace')}")
        pid = relay.process.pid if relay else None
        tree = relay is not None and relay.tree
        if load.quiet_wait > 0:
            result["waited_for_quiet_s"] = wait_until_quiet(load.quiet_wait)
        result["load_average_before"] = round(os.getloadavg()[0], 2)
        relay_user, relay_system = tree_cpu_times(pid) if pid else (0.0, 0.0)
        if tree and pid is not None:  # user and system not told apart: all of it counts as user
            relay_user, relay_system = tree_cpu_seconds(pid), 0.0
        sink_cpu, load_cpu, machine_cpu = cpu_seconds(sink.process.pid), children_cpu_seconds(), machine_busy_seconds()
        started = time.perf_counter()
        completed = send(load, scenario, port, load.messages)
        elapsed = time.perf_counter() - started
        machine_cpu = machine_busy_seconds() - machine_cpu
        load_cpu = children_cpu_seconds() - load_cpu
        sink_cpu = cpu_seconds(sink.process.pid) - sink_cpu
        relay_cpu = 0.0
        if pid is not None:
            user, system = (tree_cpu_seconds(pid), 0.0) if tree else tree_cpu_times(pid)
            relay_user, relay_system = user - relay_user, system - relay_system
            relay_cpu = relay_user + relay_system
        settle = POSTFIX_SETTLE_TIMEOUT if tree else SINK_SETTLE_TIMEOUT
        delivered = sink.wait_delivered(warmup + load.messages, settle) - warmup
        if tree:  # Postfix: when its queue had delivered it all, counted from the timed run's start
            result["delivered_after_s"] = round(time.perf_counter() - started, 3)
        result.update(
            seconds=round(elapsed, 3),
            messages_per_s=round(load.messages / elapsed, 1),
            delivered=delivered,
            load_generator_cpu_s=round(load_cpu, 2),
            sink_cpu_s=round(sink_cpu, 2),
            # CPU the rest of the machine used meanwhile: other work competing for the same cores.
            background_cpu_s=round(max(0.0, machine_cpu - load_cpu - sink_cpu - relay_cpu), 2),
        )
        # Other work took more than a quarter of a core: this figure is likely lower than it should be.
        result["noisy"] = result["background_cpu_s"] > 0.25 * elapsed
        if pid is not None:
            result["relay"] = {
                "cpu_s": round(relay_cpu, 2),
                "cpu_user_s": round(relay_user, 2),
                "cpu_system_s": round(relay_system, 2),
                "cpu_ms_per_message": round(1000 * relay_cpu / load.messages, 3),
                "cpu_utilisation": round(relay_cpu / elapsed, 2),
                "peak_rss_mib": None if tree else peak_rss_mib(pid),
            }
        errors = run_errors(completed, delivered, load.messages, "messages")
        result["ok"] = not errors
        if errors:
            result["error"] = "; ".join(errors)
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        result.update(ok=False, error=str(exc))
    finally:
        if relay is not None:
            relay.close()
            lines = relay.log_lines()
            if "relay" in result:
                result["relay"]["log_lines"] = len(lines)
            if not result.get("ok") and lines:
                result["relay_log_tail"] = lines[-5:]
        sink.stop()
    return result


# ---- the whole benchmark ----------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _output_of(command: Sequence[str]) -> str | None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def versions() -> dict[str, Any]:
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    # --no-optional-locks: reading the tree's state must never write git's index.
    dirty = _output_of(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])
    return {
        "sendguard": _version("sendguard"),
        "aiosmtpd": _version("aiosmtpd"),
        "aiosmtplib": _version("aiosmtplib"),
        "uvloop": _version("uvloop"),  # event_loop: auto runs on it when installed
        "python": platform.python_version(),
        "postfix_tools": _output_of([postconf, "-dh", "mail_version"]),
        "git_commit": _output_of(["git", "rev-parse", "HEAD"]),
        "git_tree_modified": bool(dirty) if dirty is not None else None,
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "note": "smtp-source, the relay and smtp-sink all run on these CPUs",
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_mib"] = int(line.split()[1]) // 1024
    with contextlib.suppress(OSError):
        quota = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota and quota[0] != "max":
            info["cgroup_cpu_quota"] = round(int(quota[0]) / int(quota[1]), 2)
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def summarise(
    runs: list[dict[str, Any]], scenarios: Sequence[Scenario], targets: Sequence[str]
) -> list[dict[str, Any]]:
    """Median messages/s per scenario and target, and the ratios between targets."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    summary = []
    for scenario in scenarios:
        rates: dict[str, float | None] = {}
        noisy_only: dict[str, bool] = {}
        for target in targets:
            ok = [r for r in runs if r["target"] == target and r["scenario"] == scenario.as_dict() and r.get("ok")]
            # A run the rest of the machine competed with says less; use the quiet ones where there are any.
            quiet = [r for r in ok if not r.get("noisy")]
            samples = [r["messages_per_s"] for r in (quiet or ok)]
            rates[target] = round(statistics.median(samples), 1) if samples else None
            noisy_only[target] = bool(ok) and not quiet
        summary.append(
            {
                "scenario": scenario.as_dict(),
                "messages_per_s": rates,
                "sendguard_vs_direct": ratio(rates.get("sendguard"), rates.get("direct")),
                "sendguard_vs_naive": ratio(rates.get("sendguard"), rates.get("naive")),
                "naive_vs_direct": ratio(rates.get("naive"), rates.get("direct")),
                "sendguard_audit_on_vs_off": ratio(rates.get("sendguard"), rates.get("sendguard-noaudit")),
                "sendguard_w2_vs_w1": ratio(rates.get("sendguard-w2"), rates.get("sendguard")),
                "sendguard_w2_vs_naive": ratio(rates.get("sendguard-w2"), rates.get("naive")),
                "sendguard_vs_postfix": ratio(rates.get("sendguard"), rates.get("postfix")),
                "naive_vs_postfix": ratio(rates.get("naive"), rates.get("postfix")),
                "only_busy_machine_runs": sorted(t for t, flag in noisy_only.items() if flag),
            }
        )
    return summary


def _cell(value: Any, width: int, digits: int = 1) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.{digits}f}".rjust(width)
    return str(value).rjust(width)


def print_run(run: dict[str, Any], out: TextIO, first: bool) -> None:
    scenario = Scenario(**run["scenario"]).label if first else ""
    relay = run.get("relay") or {}
    delivered = f"{run.get('delivered', 0)}/{run['messages']}"
    line = (
        f"{scenario:<20} {run['target']:<18}{_cell(run.get('messages_per_s'), 9)}{_cell(run.get('seconds'), 8, 2)}"
        f"{_cell(relay.get('cpu_s'), 11, 2)}{_cell(relay.get('cpu_ms_per_message'), 11, 2)}"
        f"{_cell(relay.get('peak_rss_mib'), 9)}{_cell(run.get('load_generator_cpu_s'), 9, 2)}"
        f"{_cell(run.get('sink_cpu_s'), 9, 2)}{_cell(run.get('background_cpu_s'), 10, 2)}  {delivered}"
    )
    if run.get("noisy"):
        line += "  (busy machine)"
    if not run.get("ok"):
        line += f"  FAILED: {run.get('error', '')[:200]}"
    print(line, file=out, flush=True)


def print_header(out: TextIO) -> None:
    print(
        f"{'scenario':<20} {'target':<18}{'msg/s':>9}{'time s':>8}{'relay CPU':>11}{'CPU ms/msg':>11}"
        f"{'RSS MiB':>9}{'src CPU':>9}{'sink CPU':>9}{'other CPU':>10}  delivered",
        file=out,
    )


def print_summary(summary: list[dict[str, Any]], out: TextIO) -> None:
    print(
        f"\n{'median msg/s':<20}{'direct':>9}{'naive':>9}{'sendguard':>11}{'noaudit':>9}{'w2':>9}"
        f"{'sg/direct':>11}{'sg/naive':>10}{'naive/direct':>14}{'audit on/off':>14}{'w2/w1':>8}{'w2/naive':>10}",
        file=out,
    )
    for row in summary:
        rates = row["messages_per_s"]
        line = (
            f"{Scenario(**row['scenario']).label:<20}{_cell(rates.get('direct'), 9)}{_cell(rates.get('naive'), 9)}"
            f"{_cell(rates.get('sendguard'), 11)}{_cell(rates.get('sendguard-noaudit'), 9)}"
            f"{_cell(rates.get('sendguard-w2'), 9)}"
            f"{_cell(row['sendguard_vs_direct'], 11, 3)}{_cell(row['sendguard_vs_naive'], 10, 3)}"
            f"{_cell(row['naive_vs_direct'], 14, 3)}{_cell(row['sendguard_audit_on_vs_off'], 14, 3)}"
            f"{_cell(row['sendguard_w2_vs_w1'], 8, 3)}{_cell(row['sendguard_w2_vs_naive'], 10, 3)}"
        )
        if row["only_busy_machine_runs"]:
            line += f"  (busy machine: {', '.join(row['only_busy_machine_runs'])})"
        print(line, file=out)
    if any(row["messages_per_s"].get("postfix") for row in summary):
        print(f"\n{'median msg/s':<20}{'postfix':>9}{'sg/postfix':>12}{'naive/postfix':>15}", file=out)
        for row in summary:
            print(
                f"{Scenario(**row['scenario']).label:<20}{_cell(row['messages_per_s'].get('postfix'), 9)}"
                f"{_cell(row['sendguard_vs_postfix'], 12, 3)}{_cell(row['naive_vs_postfix'], 15, 3)}",
                file=out,
            )


@contextlib.contextmanager
def work_directory(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sendguard-bench-"))
    # smtp-sink drops to "nobody" as root; its counter file is ours, but let it read the directory.
    path.chmod(0o755)
    try:
        yield path
    finally:
        if keep:
            print(f"logs and configs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def run_benchmark(
    scenarios: Sequence[Scenario],
    targets: Sequence[str],
    load: Load,
    *,
    repeat: int = 1,
    keep: bool = False,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.UTC)
    clock = time.perf_counter()
    max_sessions = max(s.sessions for s in scenarios)
    runs: list[dict[str, Any]] = []
    code_versions = versions()
    with work_directory(keep) as workdir:
        snapshot_code(workdir)
        _, config_changes = bench_config(workdir, audit=True, max_sessions=max_sessions)
        print_header(out)
        for scenario in scenarios:
            for round_number in range(repeat):
                # Each round starts with a different target, so a slow drift of the machine favours none.
                shift = round_number % len(targets)
                for index, target in enumerate([*targets[shift:], *targets[:shift]]):
                    run = run_once(load, scenario, target, workdir, max_sessions)
                    run["round"] = round_number + 1
                    runs.append(run)
                    print_run(run, out, first=index == 0 and round_number == 0)
    summary = summarise(runs, scenarios, targets)
    print_summary(summary, out)
    return {
        "benchmark": "relay_throughput",
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - clock, 1),
        "ok": all(r.get("ok") for r in runs),
        "machine": machine(),
        "versions": code_versions,
        "parameters": {
            "messages_per_run": load.messages,
            "warmup_messages": "max(20, 2 x sessions)" if load.warmup < 0 else load.warmup,
            "repeat": repeat,
            "targets": list(targets),
            "scenarios": [s.as_dict() for s in scenarios],
            "smtp_source": "smtp-source [-d] -s SESSIONS -m MESSAGES -r RECIPIENTS -l SIZE "
            f"-M {HELO} -f {SENDER} -t {RECIPIENT} 127.0.0.1:PORT (-d only where reuse_sessions)",
            "naive_relay": "aiosmtpd in, aiosmtplib out, 250 after the upstream's 250, shared LIFO upstream pool",
            "sendguard_config": "config/sendguard.yaml with: " + "; ".join(config_changes),
            "timing": "wall clock of the smtp-source process; warm-up messages not timed",
            "code": "proxy/, policies/ and config/ copied at the start of the run; sendguard runs that copy",
            "quiet_wait_s": load.quiet_wait,
            "summary_rule": "median msg/s over the runs not marked noisy (over all runs if every one was)",
        },
        "summary": summary,
        "runs": runs,
    }


def parse_targets(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
    """A ``--targets`` list (comma-separated), each one of ``known``; a usage error otherwise."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(known))
    if unknown or not targets:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return targets


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of smtp-source -> [nothing | naive relay | sendguard] -> smtp-sink on 127.0.0.1."
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a short run: {QUICK_MESSAGES} messages, {len(QUICK_SCENARIOS)} scenarios"
    )
    parser.add_argument("--messages", type=int, help=f"messages per timed run (default {FULL_MESSAGES})")
    parser.add_argument(
        "--scenario",
        action="append",
        type=Scenario.parse,
        metavar="S:L:R[:d]",
        help="sessions:size:recipients, ':d' for smtp-source -d (session reuse); repeatable (default: built-in list)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join((*TARGETS, *EXTRA_TARGETS))} "
        "(default: all but the extra targets sendguard-redis, -asyncio, -uvloop and postfix)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario and target; the median is reported")
    parser.add_argument(
        "--warmup", type=int, default=-1, help="untimed messages first (default: 2 x sessions, at least 20)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each timed run, wait up to this many seconds for the machine to be idle (0: do not wait)",
    )
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/relay_throughput[-quick].json)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (configs, relay logs)")
    args = parser.parse_args(argv)
    args.targets = parse_targets(parser, args.targets, (*TARGETS, *EXTRA_TARGETS))
    if args.messages is None:
        args.messages = QUICK_MESSAGES if args.quick else FULL_MESSAGES
    if args.messages <= 0 or args.repeat <= 0:
        parser.error("--messages and --repeat must be positive")
    if args.scenario is None:
        args.scenario = list(QUICK_SCENARIOS if args.quick else FULL_SCENARIOS)
    if args.output is None:
        args.output = RESULTS / ("relay_throughput-quick.json" if args.quick else "relay_throughput.json")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        load = Load(
            source=find_program("smtp-source"),
            sink=find_program("smtp-sink"),
            messages=args.messages,
            warmup=args.warmup,
            quiet_wait=args.quiet_wait,
        )
    except BenchError as exc:
        print(f"relay_throughput: {exc}", file=sys.stderr)
        return 2
    report = run_benchmark(args.scenario, args.targets, load, repeat=args.repeat, keep=args.keep)
    report["command"] = " ".join(["bench/relay_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {args.output}", file=sys.stderr)
    if not report["ok"]:
        print("relay_throughput: some runs FAILED (see the table and the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
