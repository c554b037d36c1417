"""The pieces of the API tests: a running sendguard with the API on 127.0.0.1:0 (SQLite or
PostgreSQL consent store, memory or Redis limit store), tokens, a client, a real webhook
receiver that fails on purpose, and a check of every answer against the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web

from proxy.api.config import hash_token
from proxy.api.openapi import openapi_document
from tests.conftest import Proxy
from tests.fakes import FakeUpstream
from tests.services import PostgresTarget, RedisTarget

WRITER = "sgapi_writer-token-for-the-tests-0123456789abcdef"
READER = "sgapi_reader-token-for-the-tests-0123456789abcdef"
SECRET = "webhook-secret-of-the-tests-0123"
DOCUMENT = openapi_document()


def api_section(**changes: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "address": "127.0.0.1:0",
        "tokens": [
            {"name": "crm", "hash": hash_token(WRITER), "scopes": ["read", "write"]},
            {"name": "dashboard", "hash": hash_token(READER), "scopes": ["read"]},
        ],
    }
    section.update(changes)
    return section


def stores_section(
    tmp_path: Path, consent: str, state: str, pg: PostgresTarget | None, redis: RedisTarget | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"consent": {"path": str(tmp_path / "consent.db")}}
    if consent == "postgres":
        assert pg is not None
        out["consent"] = {"backend": "postgres", "dsn": pg.dsn}
    if state == "redis":
        assert redis is not None
        out["state"] = {"backend": "redis", "url": redis.url, "key_prefix": redis.prefix}
    return out


@dataclass
class Api:
    proxy: Proxy
    session: aiohttp.ClientSession

    @property
    def base(self) -> str:
        server = self.proxy.app.api_server
        assert server is not None
        assert server.bound is not None
        return f"http://127.0.0.1:{server.bound[1]}"

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = WRITER,
        body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        route: str | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """One request; the answer is checked against the OpenAPI document before it is returned."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=sent) as response:
            text = await response.text()
            answer = json.loads(text) if text else None
            conform(route or path, method.lower(), response.status, answer)
            return response.status, answer, dict(response.headers)


def conform(route: str, method: str, status: int, answer: Any) -> None:
    """The answer is one the document declares for this route, and its body fits the schema."""
    operation = DOCUMENT["paths"][route][method]
    declared = operation["responses"].get(str(status))
    assert declared is not None, f"{method.upper()} {route} answered {status}, which the document does not declare"
    schema = declared.get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        resolver_doc = {"components": DOCUMENT["components"], **schema}
        jsonschema.validate(answer, resolver_doc, cls=jsonschema.Draft202012Validator)


@dataclass
class Receiver:
    """A webhook endpoint on loopback: answers ``failures`` times with 500, then 204."""

    failures: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    attempts: int = 0
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        async def hook(request: web.Request) -> web.Response:
            self.attempts += 1
            body = await request.read()
            if self.failures > 0:
                self.failures -= 1
                return web.Response(status=500, text="failing on purpose")
            self.received.append((dict(request.headers), body))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.stop()


@pytest.fixture
async def api_factory(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    sessions: list[aiohttp.ClientSession] = []

    async def make(changes: dict[str, Any] | None = None) -> Api:
        merged = {"api": api_section()} | (changes or {})
        proxy = await proxy_factory(upstream.address, merged)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Api(proxy, session)

    yield make
    for session in sessions:
        await session.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)
