"""Shared pieces of the unsubscribe tests: a config, a service on a real SQLite consent store,
the real HTTP and mailto servers on 127.0.0.1:0, and a real running sendguard that relays
through the list_unsubscribe and consent policies.

``start_relay`` uses the application's own wiring (``settings.unsubscribe``,
``App.unsubscribe`` and ``App.unsubscribe_servers``) when it exists; until the lead lands it,
it builds the same pieces around a running ``App``: the policies are registered, the service
is handed to the pipeline as ``resources["unsubscribe"]`` and the pages are started beside it.
"""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.observability.logsetup import AuditLog
from proxy.schema import HostPort, Rate
from proxy.stores.consent import ConsentStore
from proxy.stores.consent_sqlite import SQLiteConsentStore
from proxy.unsubscribe import (
    MailtoConfig,
    TopicConfig,
    UnsubscribeConfig,
    UnsubscribeKeyConfig,
    UnsubscribeRateLimits,
    UnsubscribeService,
)
from proxy.unsubscribe.web import UnsubscribeServers
from tests.conftest import Proxy

SECRET_A = base64.b64encode(bytes(range(32))).decode()
SECRET_B = base64.b64encode(bytes(range(100, 132))).decode()
BASE_URL = "https://unsubscribe.shop.example"
TOPICS = (
    TopicConfig("newsletter", nl="Nieuwsbrief", en="Newsletter"),
    TopicConfig("offers", nl="Aanbiedingen", en="Offers"),
)
GENEROUS = UnsubscribeRateLimits(per_ip=Rate(1000, 60), per_token=Rate(1000, 60), invalid_per_ip=Rate(1000, 60))


def make_config(**changes: Any) -> UnsubscribeConfig:
    config = UnsubscribeConfig(
        enabled=True,
        base_url=BASE_URL,
        listen=HostPort("127.0.0.1", 0),
        keys=(UnsubscribeKeyConfig("k2026", SECRET_A),),
        mailto=MailtoConfig("unsubscribe@shop.example", listen=HostPort("127.0.0.1", 0)),
        company="Shop BV",
        contact="privacy@shop.example",
        privacy_url="https://shop.example/privacy",
        topics=TOPICS,
        rate_limits=GENEROUS,
    )
    return dataclasses.replace(config, **changes)


def config_section(config: UnsubscribeConfig) -> dict[str, Any]:
    """The YAML form of a config (for the application's own wiring)."""
    section: dict[str, Any] = {
        "enabled": config.enabled,
        "base_url": config.base_url,
        "listen": str(config.listen),
        "keys": [{"id": key.id, "secret": key.secret} for key in config.keys],
        "company": config.company,
        "contact": config.contact,
        "topics": [{"id": t.id, "nl": t.nl, "en": t.en} for t in config.topics],
        "rate_limits": {
            name: str(getattr(config.rate_limits, name)) for name in ("per_ip", "per_token", "invalid_per_ip")
        },
    }
    if config.privacy_url:
        section["privacy_url"] = config.privacy_url
    if config.mailto is not None:
        section["mailto"] = {"address": config.mailto.address}
        if config.mailto.listen is not None:
            section["mailto"]["listen"] = str(config.mailto.listen)
    return section


@dataclass
class Running:
    """A service with its store, audit log and servers."""

    service: UnsubscribeService
    store: ConsentStore
    servers: UnsubscribeServers
    audit_path: Path

    @property
    def base(self) -> str:
        assert self.servers.http_bound is not None
        return f"http://127.0.0.1:{self.servers.http_bound[1]}"

    @property
    def mailto_port(self) -> int:
        assert self.servers.mailto_bound is not None
        return self.servers.mailto_bound[1]

    async def wait_audit(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The audit lines, once at least ``count`` are written (the log writes from a thread)."""
        import asyncio
        import json

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            lines: list[dict[str, Any]] = []
            if self.audit_path.exists():
                lines = [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]
            if len(lines) >= count or asyncio.get_running_loop().time() > deadline:
                return lines
            await asyncio.sleep(0.02)


async def open_store(tmp_path: Path) -> SQLiteConsentStore:
    return await SQLiteConsentStore.open(str(tmp_path / "consent.db"), lookup_timeout=5)


@pytest.fixture
async def running_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[tuple[UnsubscribeServers, ConsentStore, UnsubscribeService]] = []

    async def make(config: UnsubscribeConfig | None = None, *, store: ConsentStore | None = None) -> Running:
        own_store = store or await open_store(tmp_path)
        audit_path = tmp_path / f"unsubscribe-audit-{len(started)}.jsonl"
        service = UnsubscribeService(
            config or make_config(),
            lambda: own_store,
            audit=AuditLog(str(audit_path), 10 * 1024 * 1024, 1),
        )
        servers = UnsubscribeServers(service)
        await servers.start()
        started.append((servers, own_store, service))
        return Running(service, own_store, servers, audit_path)

    yield make
    for servers, store, service in started:
        await servers.stop()
        await store.close()
        if isinstance(service.audit, AuditLog):
            service.audit.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No cookie jar: RFC 8058 one-click requests carry no cookies, and the pages need none.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


# ---- through a running sendguard ---------------------------------------------------------------------


@dataclass
class Relay:
    proxy: Proxy
    service: UnsubscribeService
    http_port: int

    @property
    def store(self) -> ConsentStore:
        store = self.proxy.app.runtime.consent
        assert store is not None
        return store

    def local(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        return f"http://127.0.0.1:{self.http_port}{parts.path}" + (f"?{parts.query}" if parts.query else "")


async def start_relay(
    proxy_factory: Callable[..., Awaitable[Proxy]],
    upstream_address: str,
    tmp_path: Path,
    *,
    config: UnsubscribeConfig | None = None,
    policies: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> AsyncIterator[Relay]:
    """A running sendguard with the consent and list_unsubscribe policies and the unsubscribe
    pages (an async generator: the caller's fixture yields from it)."""
    config = config or make_config()
    changes: dict[str, Any] = {
        "stores": {"consent": {"backend": "sqlite", "path": str(tmp_path / "relay-consent.db")}},
        "classes": {"rules": [{"class": "commercial", "listeners": ["local"]}]},
        "policies": policies or [{"name": "required_headers"}, {"name": "consent"}, {"name": "list_unsubscribe"}],
        "unsubscribe": config_section(config),
        **(extra or {}),
    }
    proxy = await proxy_factory(upstream_address, changes)
    app = proxy.app
    assert app.unsubscribe is not None and app.unsubscribe_servers is not None
    assert app.unsubscribe_servers.http_bound is not None
    yield Relay(proxy, app.unsubscribe, app.unsubscribe_servers.http_bound[1])


# ---- reading relayed messages -------------------------------------------------------------------------

_URI = re.compile(r"<([^>]+)>")


def list_unsubscribe_uris(content: bytes) -> list[str]:
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    value = parsed.get("List-Unsubscribe")
    assert value is not None, "the relayed message has no List-Unsubscribe"
    return _URI.findall(str(value))


def https_link(content: bytes) -> str:
    uris = list_unsubscribe_uris(content)
    assert uris[0].startswith("https://"), uris
    return uris[0]


def token_of(url: str) -> str:
    return urllib.parse.urlsplit(url).path.rsplit("/", 1)[1]
