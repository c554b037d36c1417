"""``sendguard milter`` as a process of its own, for the milter tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import base_config, merge
from tests.postfix import free_port, wait_listening
from tests.unsubscribe.harness import config_section, make_config

ROOT = Path(__file__).resolve().parents[2]


def milter_config(tmp_path: Path, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Commercial mail by rule (the milter's listener), consent and one-click unsubscribe."""
    config = merge(
        base_config(tmp_path, "maildir:" + str(tmp_path / "unused-maildir")),
        {
            "classes": {"rules": [{"class": "commercial", "listeners": ["milter"]}]},
            "policies": [{"name": "required_headers"}, {"name": "consent"}, {"name": "list_unsubscribe"}],
            "unsubscribe": config_section(make_config()),
        },
    )
    return merge(config, changes or {})


@dataclass
class RunningMilter:
    process: subprocess.Popen[bytes]
    port: int
    tmp_path: Path
    log_path: Path

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def audit_lines(self) -> list[dict[str, Any]]:
        path = self.tmp_path / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    async def wait_audit(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.audit_lines()) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.audit_lines()


@contextlib.asynccontextmanager
async def running_milter(tmp_path: Path, config: dict[str, Any]) -> AsyncIterator[RunningMilter]:
    path = tmp_path / "milter.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log_path = tmp_path / "milter.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "sendguard"),
                "milter",
                "--config",
                str(path),
                "--listen",
                f"inet:127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    running = RunningMilter(process, port, tmp_path, log_path)
    try:
        await wait_listening(port, process, "sendguard milter", running.log)
        yield running
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 5)


def add_consent(config_path: Path, address: str) -> None:
    """Consent for every topic, recorded with the CLI as an operator would."""
    sendguard = str(Path(sys.executable).parent / "sendguard")
    subprocess.run(
        [sendguard, "consent", "add", "--config", str(config_path), "--topic", "*", "--method", "web_form", address],
        check=True,
        capture_output=True,
        timeout=30,
    )
