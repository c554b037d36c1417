"""Reloading: atomic swap, a bad file keeps the running config, SIGHUP on a real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT, Proxy, RawClient, message, submit
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]
NO_SUBJECT = b"From: a@example.com\r\nTo: b@example.org\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nhi\r\n"


def rewrite(proxy: Proxy, change: Callable[[dict[str, Any]], None]) -> None:
    config = yaml.safe_load(proxy.config_path.read_text())
    change(config)
    proxy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def require_subject(config: dict[str, Any]) -> None:
    config["policies"] = [{"name": "required_headers", "require": ["From", "Date", "Subject"]}]


async def send(port: int, content: bytes) -> tuple[int, str]:
    return await submit(port, content, sender="a@example.com", recipients=["b@example.org"])


async def test_reload_swaps_the_rules(proxy: Proxy, upstream: FakeUpstream) -> None:
    assert (await send(proxy.port, NO_SUBJECT))[0] == 250
    generation = proxy.app.runtime.generation
    rewrite(proxy, require_subject)
    assert await proxy.app.reload()
    assert proxy.app.runtime.generation == generation + 1
    code, text = await send(proxy.port, NO_SUBJECT)
    assert code == 550
    assert "Subject" in text


async def test_bad_reload_keeps_the_running_config(proxy: Proxy, upstream: FakeUpstream) -> None:
    before = proxy.app.runtime
    proxy.config_path.write_text(proxy.config_path.read_text() + "\nnonsense_key: 1\n")
    assert not await proxy.app.reload()
    assert proxy.app.runtime is before
    assert (await send(proxy.port, NO_SUBJECT))[0] == 250  # still the old rules
    metrics = proxy.app.services.metrics.registry
    assert metrics.get_sample_value("sendguard_config_reloads_total", {"result": "failure"}) == 1
    assert metrics.get_sample_value("sendguard_config_last_reload_success") == 0


async def test_transaction_in_flight_finishes_under_the_rules_it_started_with(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b@example.org>"))[0] == 250
    rewrite(proxy, require_subject)
    assert await proxy.app.reload()
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(NO_SUBJECT + b".\r\n")
    assert (await client.reply())[0] == 250  # started before the reload: old rules
    await client.close()
    assert (await send(proxy.port, NO_SUBJECT))[0] == 550  # a new transaction: new rules


async def test_file_change_is_picked_up_by_the_watcher(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(upstream.address, {"reload": {"watch": True, "interval": "100ms"}})
    generation = proxy.app.runtime.generation
    rewrite(proxy, require_subject)
    for _ in range(100):
        if proxy.app.runtime.generation > generation:
            break
        await asyncio.sleep(0.05)
    assert proxy.app.runtime.generation == generation + 1


# ---- a real process and real signals --------------------------------------------------------------


class ServeProcess:
    """``sendguard serve`` as a real process (``args`` after the config); its JSON log lines."""

    def __init__(
        self, config: Path, workdir: Path, args: Sequence[str] = ("--listen", "127.0.0.1:0", "--http", "127.0.0.1:0")
    ) -> None:
        self.log_path = workdir / "serve.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), *args],
            cwd=workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"msg": line})
        return out

    async def wait_for(self, text: str, timeout: float = 20) -> dict[str, Any]:
        for _ in range(int(timeout / 0.05)):
            for line in self.lines():
                if text in line.get("msg", ""):
                    return line
            if self.process.poll() is not None:
                raise AssertionError(f"sendguard exited: {self.log_path.read_text()}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"no log line with {text!r} in {self.log_path.read_text()}")

    def count(self, text: str) -> int:
        return sum(1 for line in self.lines() if text in line.get("msg", ""))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.log.close()
        return code


def address_in(line: dict[str, Any]) -> tuple[str, int]:
    host, port = line["msg"].split(" on ")[1].split(" ")[0].rsplit(":", 1)
    return host, int(port)


async def test_sighup_with_a_broken_file_keeps_serving(tmp_path: Path) -> None:
    config = tmp_path / "sendguard.yaml"
    settings = {
        "listeners": [{"name": "local", "address": "127.0.0.1:2525"}],
        "upstream": {"address": "maildir:maildir"},
        "audit": {"path": "audit.jsonl"},
        "reload": {"watch": False},
        "logging": {"format": "json"},
        "policies": [{"name": "required_headers"}],
    }
    config.write_text(yaml.safe_dump(settings))
    serve = ServeProcess(config, tmp_path)
    try:
        _, port = address_in(await serve.wait_for("listener local on"))
        _, http_port = address_in(await serve.wait_for("http on"))
        await serve.wait_for("ready")

        config.write_text("listeners: [this is: not valid\n")
        serve.process.send_signal(signal.SIGHUP)
        refused = await serve.wait_for("config reload (SIGHUP) refused")
        assert refused["level"] == "error"
        assert any("YAML syntax error" in problem for problem in refused["problems"])

        def send_blocking() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                return smtp.sendmail("a@example.com", ["b@example.org"], message())

        assert await asyncio.to_thread(send_blocking) == {}  # still serving, old config
        assert len(list((tmp_path / "maildir" / "new").iterdir())) == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'sendguard_config_reloads_total{result="failure"} 1.0' in metrics
        assert "sendguard_config_last_reload_success 0.0" in metrics

        settings["policies"] = [{"name": "required_headers", "mode": "monitor"}]
        config.write_text(yaml.safe_dump(settings))
        serve.process.send_signal(signal.SIGHUP)
        await serve.wait_for("config reloaded (SIGHUP)")
    finally:
        assert serve.stop() == 0
    assert serve.count("stopped") == 1


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "sendguard.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listeners": [{"name": "local", "address": f"127.0.0.1:{port}"}],
                    "upstream": {"address": "maildir:maildir"},
                    "http": {"address": None},
                    "logging": {"format": "json"},
                }
            )
        )
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert result.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port} for listener 'local'" in result.stdout
