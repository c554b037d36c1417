"""config/docker.yaml is no open relay through Docker's networking (issue 12): with the
userland proxy, outside clients reach the container from the bridge gateway, so only an
explicit list of single addresses may relay without AUTH.

Traffic stays on loopback: 127.0.0.2 plays the gateway (an address of the container's
network that is not on the list), 127.0.0.1 the container itself (on the list)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from proxy.schema import address_in
from proxy.smtp.auth import add_user
from tests.config.test_shipped_configs import load_shipped
from tests.conftest import ROOT, Proxy, TLSFiles, message
from tests.fakes import FakeUpstream

DOCKER_CONFIG = ROOT / "config" / "docker.yaml"
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "sendguard.yaml"
# Bridge gateways as a container sees them: Docker's default bridge, the first compose
# networks, Docker Desktop's VM, a daemon configured for 10/8 or 192.168/16 pools.
GATEWAYS = ("172.17.0.1", "172.18.0.1", "172.19.0.1", "192.168.65.1", "10.0.0.1", "192.168.0.1", "172.20.0.1")


@pytest.mark.parametrize("path", [DOCKER_CONFIG, COMPOSE_CONFIG], ids=lambda p: p.name)
def test_no_bridge_gateway_is_trusted(path: Path, tls_files: TLSFiles, tmp_path: Path) -> None:
    settings = load_shipped(path, tls_files, tmp_path)
    for listener in settings.listeners:
        assert listener.auth != "none", "clients outside the list must be able to AUTH, and must"
        # Single addresses only: a network wide enough for app containers holds the gateway too.
        assert all(network.num_addresses == 1 for network in listener.trusted_networks), listener.trusted_networks
        for gateway in GATEWAYS:
            assert not address_in(gateway, listener.trusted_networks), gateway


async def _relay_from(source: str, port: int, *, login: tuple[str, str] | None = None, tls: Any = None) -> int:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, source_address=(source, 0), start_tls=False, timeout=10, tls_context=tls
    )
    await client.connect()
    try:
        if login is not None:
            await client.starttls()
            await client.login(*login)
        try:
            await client.sendmail("app@example.com", ["bob@example.org"], message())
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code
        return 250
    finally:
        client.close()


async def test_a_client_from_a_gateway_like_address_cannot_relay_without_auth(
    upstream: FakeUpstream, proxy_factory: Callable[..., Awaitable[Proxy]], tls_files: TLSFiles, tmp_path: Path
) -> None:
    config = yaml.safe_load(DOCKER_CONFIG.read_text())
    (listener,) = config["listeners"]
    # The shipped listener, as it is (trusted list, auth, STARTTLS), on a loopback port with
    # test certificates; everything else to the test's own files and fake upstream.
    listener["address"] = "127.0.0.1:0"
    listener["tls"] = {**listener["tls"], "cert": str(tls_files.cert_file), "key": str(tls_files.key_file)}
    users = tmp_path / "users"
    add_user(str(users), "app", "s3cret-app-password")
    config.update(
        users_file=str(users),
        upstream={"address": upstream.address, "tls": "none"},
        stores={"consent": {"backend": "sqlite", "path": str(tmp_path / "consent.db")}},
        spool={"path": str(tmp_path / "spool.db")},
        audit={"path": str(tmp_path / "audit.jsonl")},
        http={"address": "127.0.0.1:0"},
        policies=[{"name": "required_headers"}],
    )
    proxy = await proxy_factory(upstream.address, raw=config)
    assert await _relay_from("127.0.0.2", proxy.port) == 530  # the gateway: AUTH required
    assert upstream.messages == []
    assert await _relay_from("127.0.0.1", proxy.port) == 250  # the container itself: on the list
    # The gateway's client with a password, over STARTTLS: relays.
    code = await _relay_from(
        "127.0.0.2", proxy.port, login=("app", "s3cret-app-password"), tls=tls_files.client_context()
    )
    assert code == 250
    assert len(upstream.messages) == 2
