"""``workers: N``: a real ``sendguard serve --workers 2`` with its real worker processes, a real
upstream (tests/fakes.py) and the real Redis the workers share their state through."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import __version__
from proxy.config.settings import load_config_text
from proxy.schema import ConfigError, cores
from tests.config.test_reload import ServeProcess
from tests.conftest import ROOT, RawClient, base_config, message, submit
from tests.fakes import FakeUpstream, Faults
from tests.observability.test_operator_metrics import _families, _readme_table
from tests.services import IN_CI, RedisTarget

NO_SUBJECT = b"From: a@example.com\r\nTo: b@example.org\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nhi\r\n"


# ---- the config ----------------------------------------------------------------------------------


def _config_text(workers: str, backend: str = "memory") -> str:
    return (
        "listeners: [{name: local, address: '127.0.0.1:0'}]\n"
        f"workers: {workers}\n"
        f"stores: {{state: {{backend: {backend}}}}}\n"
    )


def test_workers_with_the_in_memory_state_store_is_refused_naming_the_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(_config_text("2"))
    text = str(caught.value.issues[0])
    assert "workers" in text and "stores.state.backend: redis" in text and "workers: 1" in text
    assert load_config_text(_config_text("2", "redis")).workers == 2
    assert load_config_text(_config_text("1")).workers == 1


def test_workers_auto_is_the_core_count_and_nonsense_is_refused() -> None:
    assert load_config_text(_config_text("auto", "redis")).workers == cores()
    for bad in ("0", "two", "-1", "1000"):
        with pytest.raises(ConfigError, match="workers"):
            load_config_text(_config_text(bad, "redis"))


def test_serve_with_workers_and_memory_state_exits_with_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "sendguard.yaml"
    config.write_text(yaml.safe_dump({"listeners": [{"name": "local", "address": "127.0.0.1:0"}]}))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode != 0
    assert "needs the shared state in Redis" in result.stderr
    assert "stores.state.backend: redis" in result.stderr


# ---- the audit log written by several processes --------------------------------------------------

_WRITER = """
import sys
from proxy.observability.logsetup import AuditLog
log = AuditLog(sys.argv[1], 4096, 1000, shared=True)
for i in range(int(sys.argv[3])):
    log.write({"writer": sys.argv[2], "n": i, "pad": "x" * 200})
log.close()
"""


def test_the_shared_audit_log_keeps_every_line_whole_across_processes_and_rotations(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines_each = 300
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(n), str(lines_each)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for n in range(3)
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0]
    seen: dict[str, list[int]] = {}
    files = [p for p in tmp_path.iterdir() if p.name.startswith("audit.jsonl") and not p.name.endswith(".lock")]
    assert len(files) > 10  # it rotated (4 KB files), many times, from three processes
    for file in files:
        assert file.stat().st_size <= 4096 + 300  # no file grew past its size: rotated once, not twice
        for line in file.read_text().splitlines():
            entry = json.loads(line)  # whole lines only
            seen.setdefault(entry["writer"], []).append(entry["n"])
    assert {writer: sorted(ns) for writer, ns in seen.items()} == {str(n): list(range(lines_each)) for n in range(3)}


# ---- a real supervising parent and its workers ---------------------------------------------------


class Served(ServeProcess):
    """``sendguard serve --workers N`` as a real process."""

    def __init__(self, config: Path, workdir: Path, workers: int = 2) -> None:
        super().__init__(config, workdir, ("--workers", str(workers)))
        self.config = config
        self.port = 0
        self.http_port = 0

    def matching(self, text: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if text in str(line.get("msg", ""))]

    async def wait_lines(self, text: str, count: int = 1, timeout: float = 40) -> list[dict[str, Any]]:
        for _ in range(int(timeout / 0.05)):
            found = self.matching(text)
            if len(found) >= count:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"sendguard exited: {self.log_path.read_text()}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"not {count} log line(s) with {text!r} in {self.log_path.read_text()}")

    async def ready(self) -> None:
        (line,) = await self.wait_lines("listener local on")
        self.port = int(re.search(r":(\d+) ", line["msg"]).group(1))  # type: ignore[union-attr]
        (line,) = await self.wait_lines("http on")
        self.http_port = int(re.search(r":(\d+) ", line["msg"]).group(1))  # type: ignore[union-attr]
        await self.wait_lines("worker 0 ready")
        await self.wait_lines("worker 1 ready")

    def workers(self) -> dict[int, int]:
        """worker number -> pid, the latest started of each."""
        out = {}
        for line in self.matching(" started (pid "):
            match = re.match(r"worker (\d+) started \(pid (\d+)\)", line["msg"])
            assert match
            out[int(match.group(1))] = int(match.group(2))
        return out

    async def get(self, path: str) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()

        return await asyncio.to_thread(fetch)

    def stop(self) -> int:
        if self.process.poll() is not None:
            self.log.close()
            return self.process.returncode
        return super().stop()


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve_factory(tmp_path: Path, redis_target: RedisTarget) -> AsyncIterator[ServeFactory]:
    started: list[Served] = []

    async def make(upstream_address: str, changes: dict[str, Any] | None = None) -> Served:
        config = base_config(tmp_path, upstream_address)
        config.update(
            {
                "stores": {
                    **config["stores"],
                    "state": {"backend": "redis", "url": redis_target.url, "key_prefix": redis_target.prefix},
                },
                "http": {"address": "127.0.0.1:0"},
                "logging": {"format": "json", "level": "info"},
                "reload": {"watch": False},
                "timeouts": {"shutdown": "20s"},
                "policies": [],
                **(changes or {}),
            }
        )
        path = tmp_path / "sendguard.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve = Served(path, tmp_path)
        started.append(serve)
        await serve.ready()
        return serve

    yield make
    for serve in started:
        serve.stop()


@pytest.fixture
async def served(serve_factory: ServeFactory, upstream: FakeUpstream) -> Served:
    return await serve_factory(upstream.address)


def _delivered_by(serve: Served) -> set[int]:
    return {line["pid"] for line in serve.matching("transaction delivered")}


async def _send_many(port: int, count: int, content: bytes | None = None) -> list[int]:
    """``count`` messages over as many connections, a few at a time."""
    gate = asyncio.Semaphore(4)

    async def one(n: int) -> int:
        async with gate:
            return (await submit(port, content if content is not None else message(subject=f"m{n}")))[0]

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def test_connections_spread_over_the_workers_and_metrics_add_up(served: Served, upstream: FakeUpstream) -> None:
    pids = set(served.workers().values())
    assert len(pids) == 2
    count = 0
    for _ in range(10):  # which worker accepts is the kernel's and the load's choice: send until both did
        assert await _send_many(served.port, 8) == [250] * 8
        count += 8
        if _delivered_by(served) == pids:
            break
    assert _delivered_by(served) == pids, "every connection went to one worker"
    assert len(upstream.messages) == count
    await served.wait_lines("transaction delivered", count)
    status, text = await served.get("/metrics")
    assert status == 200
    # Counters and histograms summed over the workers: each message once.
    assert _sample(text, "sendguard_messages_total", outcome="delivered") == count
    assert _sample(text, "sendguard_recipients_total", outcome="delivered") == count
    assert _sample(text, "sendguard_transaction_duration_seconds_count", outcome="delivered") == count
    assert _sample(text, "sendguard_transaction_duration_seconds_bucket", outcome="delivered", le="+Inf") == count
    assert _sample(text, "sendguard_message_size_bytes_count") == count
    assert _sample(text, "sendguard_sessions_total", outcome="accepted") == count
    # Gauges by their mode: nothing open now (summed), one config digest, one build.
    assert _sample(text, "sendguard_sessions_active") == 0
    assert _sample(text, "sendguard_transactions_in_flight") == 0
    assert len(re.findall(r"^sendguard_config_info\{", text, re.M)) == 1
    assert _sample(text, "sendguard_build_info") == 1
    assert "pid=" not in text  # no gauge left in prometheus_client's per-process "all" mode
    assert re.search(r"^process_resident_memory_bytes ", text, re.M)
    # The README's metric table holds with workers too (tests/observability does it for one process).
    scraped = _families(text)
    documented = _readme_table()
    shown = {name for name in documented if not name.startswith(("sendguard_unsubscribe", "sendguard_webhook"))}
    # In multiprocess mode a family shows once it has a series: those whose series come from the
    # config (policies, backoff rules, DKIM domains, blocklists, pauses) are absent with none here.
    assert shown - set(scraped) <= {
        "sendguard_backoff_matches_total",
        "sendguard_backoff_pauses_total",
        "sendguard_blocklist_listed",
        "sendguard_blocklist_unknown",
        "sendguard_dkim_domain_signatures_total",
        "sendguard_pause_until_timestamp_seconds",
        "sendguard_policy_duration_seconds",
        "sendguard_policy_errors_total",
        "sendguard_policy_verdicts_total",
        "sendguard_ratelimit_refusals_total",
    }
    assert len(scraped) >= 30
    assert sorted(set(scraped) - set(documented)) == []
    assert {name: labels for name, labels in scraped.items() if labels and labels != documented[name]} == {}
    status, body = await served.get("/readyz")
    assert status == 200 and json.loads(body)["workers"] == {"configured": 2, "running": 2, "restarts": 0}


async def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(served: Served) -> None:
    before = served.workers()
    os.kill(before[0], signal.SIGKILL)
    # Its sibling accepts from the same socket meanwhile: no connection is refused.
    assert await _send_many(served.port, 6) == [250] * 6
    await served.wait_lines("worker 0 ready", 2)
    after = served.workers()
    assert after[1] == before[1] and after[0] != before[0]
    (died,) = served.matching("died (signal 9)")
    assert died["msg"].startswith(f"worker 0 (pid {before[0]})")
    assert await _send_many(served.port, 6) == [250] * 6
    status, body = await served.get("/readyz")
    assert status == 200 and json.loads(body)["workers"] == {"configured": 2, "running": 2, "restarts": 1}
    _, text = await served.get("/metrics")
    # The dead worker's counts stay counted; its live gauges went with it.
    assert _sample(text, "sendguard_messages_total", outcome="delivered") == 12
    assert _sample(text, "sendguard_sessions_active") == 0


async def test_sighup_reloads_every_worker_and_a_bad_file_none(served: Served) -> None:
    assert await _send_many(served.port, 4, NO_SUBJECT) == [250] * 4
    config = yaml.safe_load(served.config.read_text())
    config["policies"] = [{"name": "required_headers", "require": ["From", "Date", "Subject"]}]
    served.config.write_text(yaml.safe_dump(config, sort_keys=False))
    served.process.send_signal(signal.SIGHUP)
    reloaded = await served.wait_lines("config reloaded (SIGHUP)", 3)  # the parent and both workers
    assert sorted(line.get("worker", -1) for line in reloaded) == [-1, 0, 1]
    assert await _send_many(served.port, 8, NO_SUBJECT) == [550] * 8  # whichever worker answers
    # A broken file: the parent refuses it and tells no worker; every worker keeps the rules.
    served.config.write_text("listeners: [")
    served.process.send_signal(signal.SIGHUP)
    await served.wait_lines("config reload (SIGHUP) refused")
    await asyncio.sleep(0.5)
    assert len(served.matching("config reload (SIGHUP)")) == 1
    assert len(served.matching("reload (SIGHUP) passed to worker")) == 2
    assert await _send_many(served.port, 4, NO_SUBJECT) == [550] * 4
    assert await _send_many(served.port, 4) == [250] * 4


async def test_sigterm_lets_a_transaction_in_flight_finish(served: Served, upstream: FakeUpstream) -> None:
    client = await RawClient.connect(served.port)
    assert (await client.cmd("EHLO client.example"))[0] == 250
    assert (await client.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@example.org>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(message(subject="in flight").replace(b"\r\n.", b"\r\n.."))
    served.process.send_signal(signal.SIGTERM)
    await served.wait_lines("stopping: draining transactions in flight", 3)  # the parent and both workers
    await asyncio.sleep(0.5)
    refused = await asyncio.to_thread(_connect_refused, served.port)
    assert refused, "a new connection was still accepted while draining"
    await client.send(b".\r\n")
    code, text = await client.reply()
    assert code == 250, text
    assert any(m.content.find(b"Subject: in flight") >= 0 for m in upstream.messages)
    await client.close()
    assert await asyncio.to_thread(served.process.wait, 60) == 0
    assert len(served.matching("stopped")) >= 1


def _connect_refused(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(2)
            return sock.recv(100) == b""  # accepted by nobody and closed
    except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
        return True


async def test_a_dsn_a_worker_queues_is_sent_once_by_the_parents_drainer_at_once(
    serve_factory: ServeFactory, upstream_factory: Callable[..., Awaitable[FakeUpstream]], tmp_path: Path
) -> None:
    """Workers write the retry queue; only the parent drains it, woken by the worker (SIGUSR1)
    rather than at its next look, which spool.interval puts a minute away here."""
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "550 5.1.1 no such user"}))
    served = await serve_factory(
        upstream.address,
        {
            "policies": [{"name": "visible_recipients", "max_visible": 2, "remedy": "split"}],
            "spool": {"path": str(tmp_path / "spool.db"), "interval": "60s"},
        },
    )
    recipients = ["ann@example.org", "ben@example.org", "cat@example.org"]
    content = message(sender="news@example.com", to=", ".join(recipients))
    senders = await asyncio.gather(
        *(submit(served.port, content, sender="news@example.com", recipients=recipients) for _ in range(4))
    )
    assert [code for code, _ in senders] == [250] * 4

    def dsns() -> int:
        return sum(1 for m in upstream.messages if m.mail_from == "<>")

    for _ in range(200):
        if dsns() == 4:
            break
        await asyncio.sleep(0.05)
    assert dsns() == 4  # within 10 s, not spool.interval's 60
    await asyncio.sleep(1.0)
    assert dsns() == 4  # each sent once: one drainer
    _, text = await served.get("/metrics")
    assert _sample(text, "sendguard_spool_deliveries_total", kind="dsn", result="delivered") == 4
    assert _sample(text, "sendguard_spool_messages", kind="dsn") == 0


# ---- the event loop ------------------------------------------------------------------------------


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_serve_runs_on_the_event_loop_the_config_names(
    serve_factory: ServeFactory, upstream: FakeUpstream, event_loop: str
) -> None:
    if event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        missing = "uvloop is not installed (it is in the test extra: pip install -e '.[test]')"
        pytest.fail(missing) if IN_CI else pytest.skip(missing)
    served = await serve_factory(upstream.address, {"event_loop": event_loop})
    (ready,) = await served.wait_lines(f"sendguard {__version__} ready")
    assert ready["msg"].endswith(f"event loop {event_loop})")
    assert await _send_many(served.port, 4) == [250] * 4
    assert len(upstream.messages) == 4
