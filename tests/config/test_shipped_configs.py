"""Every config file we ship loads, and none of them is an open relay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml

from proxy.config.settings import Settings, load_config
from tests.conftest import Proxy, TLSFiles, message, submit
from tests.fakes import FakeUpstream

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    [
        ROOT / "config" / "sendguard.yaml",
        ROOT / "config" / "docker.yaml",
        *(ROOT / "config" / "examples").glob("*.yaml"),
        ROOT / "deploy" / "compose" / "sendguard.yaml",
    ]
)


def with_test_certificates(path: Path, tls_files: TLSFiles, tmp_path: Path) -> Path:
    """The config with its listeners' certificate files (mounted in a container, absent
    here) replaced by the test CA's; everything else as shipped."""
    config = yaml.safe_load(path.read_text())
    for listener in config.get("listeners", []):
        if isinstance(listener.get("tls"), dict) and listener["tls"].get("cert"):
            listener["tls"] = {**listener["tls"], "cert": str(tls_files.cert_file), "key": str(tls_files.key_file)}
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def load_shipped(path: Path, tls_files: TLSFiles, tmp_path: Path) -> Settings:
    return load_config(
        with_test_certificates(path, tls_files, tmp_path),
        environ={
            "SENDGUARD_UPSTREAM_PASSWORD": "x",
            "SENDGUARD_POSTGRES_DSN": "x",
            "SENDGUARD_REDIS_URL": "redis://127.0.0.1:6379/0",
        },
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_is_closed(path: Path, tls_files: TLSFiles, tmp_path: Path) -> None:
    settings = load_shipped(path, tls_files, tmp_path)
    for listener in settings.listeners:
        assert all(network.prefixlen >= 8 for network in listener.trusted_networks)
        assert all(network.is_private or network.is_loopback for network in listener.trusted_networks)
    if settings.upstream.username:
        assert settings.upstream.tls in ("starttls", "implicit")
        assert settings.upstream.verify_certificate


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER sendguard\n" in text
    # The healthcheck asks /readyz at the config's http.address (tests/deploy/test_service_files.py).
    assert 'CMD ["sendguard", "health", "--config", "/etc/sendguard/sendguard.yaml"]' in text
    assert "COPY config/docker.yaml /etc/sendguard/sendguard.yaml" in text


NEWSLETTER = (
    "From: Shop <news@shop.example>\r\nTo: klant@example.org\r\nSubject: 25% korting op alles\r\n"
    "Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <n1@shop.example>\r\n\r\n"
    "Alleen dit weekend 25% korting op alles. Bestel nu in onze webwinkel!\r\n{footer}"
)
CROWD = [f"person{i}@customer{i}.example" for i in range(12)]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
async def test_every_shipped_config_enforces_the_law(
    path: Path,
    upstream: FakeUpstream,
    proxy_factory: Callable[..., Awaitable[Proxy]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 14: an admin who copies any shipped config gets the compliance checks: a
    newsletter without a link is refused, one with a link but without consent is refused,
    and mass mail with everyone in To is refused; config check warns about none of them."""
    monkeypatch.setenv("SENDGUARD_UPSTREAM_PASSWORD", "x")
    config = yaml.safe_load(path.read_text())
    # The first listener, on loopback (trusted by every shipped config), without TLS: this
    # test is about the policies; who may relay is tested in tests/deploy/test_container_relay.py.
    config["listeners"] = [
        {**listener, "address": "127.0.0.1:0", "tls": {"mode": "none"}} for listener in config["listeners"][:1]
    ]
    config["upstream"] = {"address": upstream.address, "tls": "none"}
    config["users_file"] = str(tmp_path / "users")
    config["audit"] = {"path": str(tmp_path / "audit.jsonl")}
    config["http"] = {"address": "127.0.0.1:0"}
    config["stores"] = {**config.get("stores", {}), "consent": {"backend": "sqlite", "path": str(tmp_path / "c.db")}}
    config["stores"]["state"] = {"backend": "memory"}
    config["spool"] = {"path": str(tmp_path / "spool.db")}
    config.pop("dns", None)
    config.pop("unsubscribe", None)
    proxy = await proxy_factory(upstream.address, raw=config)
    assert proxy.app.settings.compliance_warnings() == []
    sender, rcpt = "news@shop.example", ["klant@example.org"]
    code, text = await submit(proxy.port, NEWSLETTER.format(footer="").encode(), sender=sender, recipients=rcpt)
    assert code == 550 and "unsubscribe" in text.lower(), text
    with_link = NEWSLETTER.format(footer="Afmelden: https://shop.example/afmelden?u=1\r\n").encode()
    code, text = await submit(proxy.port, with_link, sender=sender, recipients=rcpt)
    assert code == 550 and "consent" in text, text
    code, text = await submit(proxy.port, message(to=", ".join(CROWD)), recipients=CROWD)
    assert code == 550 and "Bcc" in text, text
    assert upstream.messages == []
