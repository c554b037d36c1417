"""The service files: the systemd unit verifies and is hardened, the compose file validates,
and the container's healthcheck (`sendguard health`) follows the configured HTTP address.

Docker images cannot be pulled or built here, so the compose file is validated with
docker-compose's own `config` (Debian's package), not run."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import yaml

from proxy.cli.health import readyz_url
from proxy.cli.main import main
from tests.conftest import ROOT, Proxy, need_program, submit
from tests.fakes import FakeUpstream

UNIT = ROOT / "deploy" / "systemd" / "sendguard.service"
COMPOSE = ROOT / "deploy" / "compose.yaml"


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with its venv path pointed at this checkout's (systemd-analyze verify checks
    that the programs it starts exist)."""
    sendguard = shutil.which("sendguard") or str(Path(sys.executable).parent / "sendguard")
    text = UNIT.read_text().replace("/opt/sendguard/venv/bin/sendguard", sendguard)
    path = tmp_path / "sendguard.service"
    path.write_text(text)
    return path


def test_the_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = need_program("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on an unknown key too, with a warning: a clean unit says nothing at all.
    assert done.returncode == 0 and (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr
    text = UNIT.read_text()
    for line in (
        "User=sendguard",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=sendguard",
        "LogsDirectory=sendguard",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert f"\n{line}\n" in text, line
    # The commands it runs, as this machine has them, on the shipped default config: the check
    # before start passes, and serve and reload are spelled as the CLI and kill want them.
    (check,) = re.findall(r"^ExecStartPre=(.*)$", unit.read_text(), re.M)
    argv = check.replace("/etc/sendguard/sendguard.yaml", str(ROOT / "config" / "sendguard.yaml")).split()
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (serve,) = re.findall(r"^ExecStart=(.*)$", unit.read_text(), re.M)
    assert serve.split()[1:] == ["serve", "--config", "/etc/sendguard/sendguard.yaml"]
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for sendguard.service: ([\d.]+)", security.stdout + security.stderr)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0  # systemd's scale: 0 best, 10 worst; "OK" is below 4


def test_the_compose_file_validates() -> None:
    compose = need_program("docker-compose")
    environ = {
        **os.environ,
        "SENDGUARD_UPSTREAM": "smtp.example.net:587",
        "SENDGUARD_UPSTREAM_PASSWORD": "x",
        "POSTGRES_PASSWORD": "x",
        "GRAFANA_ADMIN_PASSWORD": "x",
    }
    done = subprocess.run(
        [compose, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, env=environ
    )
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert set(config["services"]) == {"sendguard", "postgres", "redis", "prometheus", "grafana"}
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("/") and "tls" not in source:
                assert Path(source).exists(), f"{name} mounts {source}, which the repository lacks"
    # Only SMTP is published beyond loopback; metrics, Prometheus and Grafana stay local.
    published = [port for service in config["services"].values() for port in service.get("ports", [])]
    assert all(str(port).startswith("127.0.0.1:") for port in published if "2525" not in str(port))
    # Without the secrets it refuses to start, instead of starting with empty passwords.
    bare = {k: v for k, v in environ.items() if k not in ("POSTGRES_PASSWORD", "SENDGUARD_UPSTREAM_PASSWORD")}
    refused = subprocess.run([compose, "-f", str(COMPOSE), "config"], capture_output=True, text=True, env=bare)
    assert refused.returncode != 0


def test_the_health_command_asks_the_configured_http_address(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("http: {address: '0.0.0.0:9125'}\n")
    assert readyz_url(str(config)) == "http://127.0.0.1:9125/readyz"
    config.write_text("http: {address: '[::]:9125'}\n")
    assert readyz_url(str(config)) == "http://[::1]:9125/readyz"
    config.write_text("http: {address: '10.1.2.3:9000'}\n")
    assert readyz_url(str(config), "/healthz") == "http://10.1.2.3:9000/healthz"
    config.write_text("listeners: []\n")  # no http: section: the default address
    assert readyz_url(str(config)) == "http://127.0.0.1:9025/readyz"
    config.write_text("http: {address: null}\n")
    assert main(["health", "--config", str(config)]) == 2


async def test_health_is_0_when_ready_and_1_when_not(
    upstream: FakeUpstream, proxy_factory: Callable[..., Awaitable[Proxy]], tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    ready = await proxy_factory(upstream.address)
    unready = await proxy_factory(f"127.0.0.1:{dead_port}")
    assert (await submit(unready.port))[0] == 451  # a failed upstream attempt: /readyz is 503

    async def health(port: int) -> int:
        config = tmp_path / f"health-{port}.yaml"
        config.write_text(yaml.safe_dump({"http": {"address": f"0.0.0.0:{port}"}}))
        # In a thread: the proxies answer from this event loop.
        return await asyncio.to_thread(main, ["health", "--config", str(config), "--timeout", "5"])

    assert await health(ready.http_port) == 0
    assert await health(unready.http_port) == 1
    assert await health(dead_port) == 1  # nothing listens


def test_the_install_guide_names_the_files_it_uses() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "deploy/systemd/sendguard.service" in readme
    assert "systemctl reload sendguard" in readme
