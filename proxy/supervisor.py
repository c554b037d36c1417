"""Worker processes (``workers: N``): a supervising parent and N SMTP worker processes.

The parent binds every SMTP listener once and starts each worker as a fresh interpreter
(``python -m proxy serve`` with ``SENDGUARD_WORKER`` set), handing it the listening sockets
by descriptor (``pass_fds``): no event loop, thread or connection crosses a ``fork``. All
workers accept on the same sockets, so a worker that dies leaves no gap: its siblings keep
accepting from the same queue while the parent starts a new one (with a growing delay when it
keeps dying early). SO_REUSEPORT was the other way; it spreads connections by a hash even
onto a worker that is busy or gone (its queue waits for the replacement), where a shared
socket goes to whichever worker calls accept() first, the least busy.

The parent also runs, once, everything that is not an SMTP session (``App`` with
``role="parent"``): /metrics, /healthz, /readyz, the consent API and the webhook deliverer,
the unsubscribe pages and mailto listener, the retry queue's drainer, the blocklist watch,
the config watcher and the purges. Signals: SIGHUP makes the parent reload first (a config it
refuses changes nothing anywhere) and then each worker; SIGTERM or SIGINT closes the parent's
copies of the sockets and tells every worker to drain (``timeouts.shutdown``), and the parent
stops after the last one.

Metrics: prometheus_client's multiprocess mode. Every process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (the operator's, else a private temporary directory), and the
parent's /metrics adds them up: counters and histograms summed, each gauge by its own mode
(``multiprocess_mode`` in observability/metrics.py); a dead worker's live gauges go with it
(``mark_process_dead``), its counters stay counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Metric, PlatformCollector, ProcessCollector, multiprocess, values

from proxy import __version__
from proxy.app import App, listen_backlog
from proxy.config.settings import Settings, load_config
from proxy.observability.memory import tune_allocator
from proxy.observability.metrics import FORGOTTEN_AT_ZERO

__all__ = ("WORKER_ENV", "Supervisor", "bind_listeners", "serve_worker", "worker_spec")

log = logging.getLogger("sendguard")

#: Set in a worker's environment: ``INDEX;NAME=FD,NAME=FD`` (its number, its listening sockets).
WORKER_ENV = "SENDGUARD_WORKER"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: A worker that lived this long was not crash-looping: the next restart is immediate again.
HEALTHY_AFTER = 10.0
#: Restart delays of a worker that keeps dying early: doubling from the first to the last.
BACKOFF_FIRST, BACKOFF_LAST = 0.5, 30.0
#: A worker still running this long after the shutdown timeout is killed.
STOP_GRACE = 10.0
#: Signals a worker must not get before it can handle them (SIGHUP's default is to exit).
_HELD = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def bind_listeners(settings: Settings) -> dict[str, socket.socket]:
    """One listening socket per SMTP listener (the first address its host resolves to)."""
    sockets: dict[str, socket.socket] = {}
    try:
        for config in settings.listeners:
            address = config.address
            try:
                family, kind, proto, _, sockaddr = socket.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )[0]
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds
                    sock.bind(sockaddr)
                    sock.listen(listen_backlog(config))
                except OSError:
                    sock.close()
                    raise
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot listen on {address} for listener {config.name!r}: {exc.strerror}"
                ) from exc
            sockets[config.name] = sock
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


def worker_spec(index: int, sockets: Mapping[str, socket.socket]) -> str:
    return f"{index};" + ",".join(f"{name}={sock.fileno()}" for name, sock in sockets.items())


def _parse_spec(text: str) -> tuple[int, dict[str, int]]:
    index, _, pairs = text.partition(";")
    fds = {}
    for pair in filter(None, pairs.split(",")):
        name, _, fd = pair.rpartition("=")
        fds[name] = int(fd)
    return int(index), fds


class _Aggregated(multiprocess.MultiProcessCollector):
    """Every process's values, added up; a series removed in its process (set to 0 there,
    see FORGOTTEN_AT_ZERO) is left out."""

    def collect(self) -> Iterable[Metric]:
        for family in super().collect():  # type: ignore[no-untyped-call]
            if family.name in FORGOTTEN_AT_ZERO:
                family.samples = [sample for sample in family.samples if sample.value != 0]
            yield family


def _multiprocess_metrics() -> tuple[str, bool]:
    """Switch this process's metrics to files and give the directory (and whether it is ours
    to remove). Must run before any metric is made; workers inherit the variable."""
    path = os.environ.get(MULTIPROC_ENV)
    owned = not path
    if not path:
        path = tempfile.mkdtemp(prefix="sendguard-metrics-")
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):  # a previous run's: its pids are gone
        os.remove(stale)
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return path, owned


class Supervisor:
    """The parent of ``workers: N`` (N > 1)."""

    def __init__(self, settings: Settings, config_path: str, overrides: Mapping[str, str]) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = dict(overrides)
        self.count = int(settings.workers)
        self.sockets: dict[str, socket.socket] = {}
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = asyncio.Event()
        self._metrics_dir = ""
        self._collector: _Aggregated | None = None
        self.app: App | None = None

    def _command(self) -> list[str]:
        flags = {"listen": "--listen", "upstream": "--upstream", "http": "--http", "workers": "--workers"}
        command = [sys.executable, "-m", "proxy", "serve", "--config", self.config_path]
        for key, flag in flags.items():
            if self.overrides.get(key):
                command += [flag, self.overrides[key]]
        return command

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = {**os.environ, WORKER_ENV: worker_spec(index, self.sockets)}
        # The child starts with these signals blocked and unblocks them once it handles them:
        # a reload or stop sent while it is still starting waits instead of killing it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            return await asyncio.create_subprocess_exec(
                *self._command(), env=env, pass_fds=[sock.fileno() for sock in self.sockets.values()]
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    async def _keep(self, index: int) -> None:
        """Worker ``index``: start it, and start it again when it dies, until the stop."""
        early_deaths = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                process = await self._spawn(index)
            except OSError as exc:  # no process at all (out of memory, of file descriptors)
                early_deaths += 1
                delay = min(BACKOFF_LAST, BACKOFF_FIRST * 2 ** (early_deaths - 1))
                log.error("cannot start worker %d: %s; trying again in %.1fs", index, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                continue
            self.processes[index] = process
            log.info("worker %d started (pid %d)", index, process.pid)
            code = await process.wait()
            del self.processes[index]
            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if self._stopping.is_set():
                log.info("worker %d (pid %d) stopped", index, process.pid)
                return
            lived = time.monotonic() - started
            early_deaths = 0 if lived >= HEALTHY_AFTER else early_deaths + 1
            delay = 0.0 if early_deaths == 0 else min(BACKOFF_LAST, BACKOFF_FIRST * 2 ** (early_deaths - 1))
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.error(
                "worker %d (pid %d) died (%s) after %.1fs; starting another in %.1fs",
                index,
                process.pid,
                how,
                lived,
                delay,
            )
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _reloaded(self, reason: str) -> None:
        """The parent took the new config: now each worker (which reads the same file)."""
        for index, process in list(self.processes.items()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)
                log.info("reload (%s) passed to worker %d (pid %d)", reason, index, process.pid)

    def _readiness(self) -> tuple[dict[str, object], list[str]]:
        running = len(self.processes)
        problems = [] if running else ["no worker process is running"]
        if self._collector is not None:
            # The workers' view of the upstream: the latest connection attempt of any of them.
            for family in self._collector.collect():
                if family.name == "sendguard_upstream_up":
                    if any(sample.value == 0 for sample in family.samples):
                        problems.append("upstream: the last connection attempt of a worker failed")
                    break
        return {"workers": {"configured": self.count, "running": running, "restarts": self.restarts}}, problems

    async def run(self) -> int:
        self._metrics_dir, owned = _multiprocess_metrics()
        registry = CollectorRegistry()
        self._collector = _Aggregated(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        ProcessCollector(registry=registry)  # the parent's own process_* figures
        PlatformCollector(registry=registry)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        try:
            self.sockets = bind_listeners(self.settings)
            app = self.app = App(
                self.settings,
                config_path=self.config_path,
                overrides=self.overrides,
                role="parent",
                sockets=self.sockets,
                metrics_registry=registry,
            )
            app.on_reload = self._reloaded
            app.readiness_extra = self._readiness
            await app.start()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: app._spawn(app.reload("SIGHUP")))
            # A worker queued a row due now (a DSN): the one drainer, here, looks at once.
            spool = app.services.spool
            assert spool is not None
            loop.add_signal_handler(signal.SIGUSR1, spool.wakeup.set)
            keepers = [loop.create_task(self._keep(index)) for index in range(self.count)]
            log.info(
                "sendguard %s ready (%d workers, event loop %s)",
                __version__,
                self.count,
                type(loop).__module__.split(".")[0],
            )
            await stop.wait()
            log.info("stopping: draining transactions in flight in %d worker(s)", len(self.processes))
            self._stopping.set()
            for sock in self.sockets.values():  # the workers' copies close as they stop
                sock.close()
            for process in list(self.processes.values()):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            limit = float(app.runtime.settings.timeouts.shutdown) + STOP_GRACE
            _, pending = await asyncio.wait(keepers, timeout=limit)
            if pending:
                for process in list(self.processes.values()):
                    log.error("worker pid %d did not stop in %.0fs; killing it", process.pid, limit)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                await asyncio.wait(pending, timeout=10)
            await app.stop()
            log.info("stopped")
            return 0
        finally:
            for sock in self.sockets.values():
                sock.close()
            if owned:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)


async def _wake_the_drainer(app: App, parent: int) -> None:
    """The retry queue's drainer runs in the parent: a row this worker queued due now (a DSN)
    wakes it with SIGUSR1 instead of waiting for its next look (spool.interval)."""
    spool = app.services.spool
    assert spool is not None
    while True:
        await spool.wakeup.wait()
        spool.wakeup.clear()
        with contextlib.suppress(ProcessLookupError):
            os.kill(parent, signal.SIGUSR1)


async def serve_worker(config_path: str, overrides: Mapping[str, str], spec: str) -> int:
    """One worker: SMTP sessions on the parent's sockets until SIGTERM; SIGHUP reloads."""
    tune_allocator()
    index, fds = _parse_spec(spec)
    sockets = {name: socket.socket(fileno=fd) for name, fd in fds.items()}
    settings = load_config(config_path, overrides=overrides)
    app = App(settings, config_path=config_path, overrides=overrides, role="worker", sockets=sockets)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    parent = os.getppid()
    try:
        await app.start()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: app._spawn(app.reload("SIGHUP")))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # held since the parent started us
        log.info("worker %d ready", index)
        wake = loop.create_task(_wake_the_drainer(app, parent))
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if os.getppid() != parent:  # the parent died without stopping us: stop, do not linger
                log.error("worker %d: the parent process is gone; stopping", index)
                stop.set()
        log.info("worker %d stopping: draining transactions in flight", index)
        await app.stop()
        wake.cancel()
        log.info("worker %d stopped", index)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
    return 0
