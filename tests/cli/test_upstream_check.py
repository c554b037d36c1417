"""`sendguard upstream check`: each step against a real fake upstream on loopback, with what
to fix when it goes wrong (issue 12: diagnose an upstream problem with one command)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli.main import main
from proxy.cli.upstream import Step, check_upstream
from proxy.config.settings import load_config
from tests.conftest import TLSFiles
from tests.fakes import FakeUpstream


def settings_for(tmp_path: Path, upstream: dict[str, Any], **listener: Any) -> Path:
    config = {
        "listeners": [{"name": "local", "address": "127.0.0.1:0", **listener}],
        "users_file": str(tmp_path / "users"),
        "upstream": {"helo_name": "relay.example.com", **upstream},
        "policies": [{"name": "required_headers"}],
        "stores": {"consent": {"path": str(tmp_path / "consent.db")}},
        "spool": {"path": str(tmp_path / "spool.db")},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    path = tmp_path / "upstream-check.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def check(path: Path) -> dict[str, Step]:
    return {step.name: step for step in await check_upstream(load_config(path))}


async def test_a_healthy_plain_upstream(upstream: FakeUpstream, tmp_path: Path) -> None:
    steps = await check(settings_for(tmp_path, {"address": upstream.address, "tls": "none"}))
    assert [s.status for s in steps.values()].count("fail") == 0
    assert steps["connect"].status == "ok" and steps["greeting"].detail.startswith("220")
    assert steps["ehlo"].detail == "EHLO relay.example.com: 250"
    assert steps["tls"].status == "ok"  # tls: none on loopback: fine
    assert "33,554,432" in steps["size"].detail
    assert "8BITMIME" in steps["extensions"].detail
    assert upstream.messages == []  # nothing sent


async def test_starttls_certificate_and_auth(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]], tls_files: TLSFiles, tmp_path: Path
) -> None:
    upstream = await upstream_factory(
        tls_context=tls_files.server_context(), require_starttls=True, credentials=("relay", "right-password")
    )
    good = {
        "address": upstream.address,
        "tls": "starttls",
        "ca_file": str(tls_files.ca_file),
        "username": "relay",
        "password": "right-password",
    }
    steps = await check(settings_for(tmp_path, good))
    assert steps["tls"].status == "ok" and steps["tls"].detail.startswith("STARTTLS: TLSv1.")
    assert steps["certificate"].status == "ok" and "valid until" in steps["certificate"].detail
    assert steps["auth"].status == "ok" and steps["auth"].detail == "relay: 235"

    steps = await check(settings_for(tmp_path, {**good, "password": "wrong"}))
    assert steps["auth"].status == "fail" and steps["auth"].detail.startswith("relay: 535")
    assert "upstream.username and the password" in steps["auth"].fix

    # The upstream's certificate from a CA the system does not know: refused, and said how to fix.
    steps = await check(settings_for(tmp_path, {**good, "ca_file": None}))
    assert steps["tls"].status == "fail" and "certificate" in steps["tls"].detail
    assert "upstream.ca_file" in steps["tls"].fix
    assert "auth" not in steps  # stopped: nothing after it can be tried


async def test_no_starttls_and_a_small_size(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]], tmp_path: Path
) -> None:
    upstream = await upstream_factory(size_limit=1_000_000)
    path = settings_for(tmp_path, {"address": upstream.address, "tls": "starttls"}, max_message_size="25MB")
    steps = await check(path)
    assert steps["tls"].status == "fail" and steps["tls"].detail == "STARTTLS not offered"
    assert "tls: implicit" in steps["tls"].fix
    path = settings_for(tmp_path, {"address": upstream.address, "tls": "none"}, max_message_size="25MB")
    steps = await check(path)
    assert steps["size"].status == "warn" and "1,000,000" in steps["size"].detail
    assert "max_message_size" in steps["size"].fix


async def test_unreachable_and_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    path = settings_for(tmp_path, {"address": f"127.0.0.1:{dead}", "tls": "none"})
    steps = await check(path)
    assert list(steps) == ["connect"] and steps["connect"].status == "fail"
    assert "upstream.address" in steps["connect"].fix
    code = await asyncio.to_thread(main, ["upstream", "check", "--config", str(path), "--json"])
    assert code == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["name"] == "connect" and printed[0]["status"] == "fail"


async def test_the_command_line_says_ok(
    upstream: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = settings_for(tmp_path, {"address": upstream.address, "tls": "none"})
    code = await asyncio.to_thread(main, ["upstream", "check", "--config", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith("OK    connect")
