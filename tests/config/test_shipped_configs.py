"""Every config file we ship loads, and none of them is an open relay."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.settings import load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    [
        ROOT / "config" / "sendguard.yaml",
        ROOT / "config" / "docker.yaml",
        *(ROOT / "config" / "examples").glob("*.yaml"),
    ]
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_is_closed(path: Path) -> None:
    settings = load_config(
        path,
        environ={
            "SENDGUARD_UPSTREAM_PASSWORD": "x",
            "SENDGUARD_POSTGRES_DSN": "x",
            "SENDGUARD_REDIS_URL": "redis://127.0.0.1:6379/0",
        },
    )
    for listener in settings.listeners:
        assert all(network.prefixlen >= 8 for network in listener.trusted_networks)
        assert all(network.is_private or network.is_loopback for network in listener.trusted_networks)
    if settings.upstream.username:
        assert settings.upstream.tls in ("starttls", "implicit")
        assert settings.upstream.verify_certificate


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER sendguard\n" in text
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert "COPY config/docker.yaml /etc/sendguard/sendguard.yaml" in text
