"""Fixtures: real servers on 127.0.0.1 with ephemeral ports, trustme certificates, and a
running sendguard built from a YAML config written for the test."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import os
import shutil
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
import yaml

from proxy.app import App
from proxy.config.settings import load_config
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream, LenientUpstream
from tests.services import postgres_target, redis_target  # noqa: F401 - fixtures for every test module

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _collect_what_the_test_left() -> Iterator[None]:
    """Finalize, at the end of each test, the sockets and streams it left unclosed: otherwise
    the garbage collector finalizes them during some later test, whose ResourceWarning then
    fails that unrelated test at random (the suite turns warnings into errors)."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI no test may skip: a skip there means a missing tool, service or feature that
    CI must have, and a silent skip would switch an end-to-end test off unnoticed. Every
    helper that skips (need_program, the Redis and PostgreSQL fixtures) already fails under
    CI; this turns any other skip into a failure too."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {report.longrepr}"


def need_program(name: str) -> str:
    """Path of an outside program; skip when missing, but fail under CI, where .ci/run installs it."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed, and CI must run this test (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (apt-get install swaks postfix); the test needs it")
    return path


# ---- TLS --------------------------------------------------------------------------------------


@dataclass
class TLSFiles:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = directory / "ca.pem"
    cert_file = directory / "cert.pem"
    key_file = directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with open(cert_file, "wb") as handle:
        for blob in cert.cert_chain_pems:
            handle.write(blob.bytes())
    return TLSFiles(ca, ca_file, cert_file, key_file)


# ---- upstreams --------------------------------------------------------------------------------


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[..., Awaitable[FakeUpstream]]]:
    started: list[FakeUpstream] = []

    async def make(**kwargs: Any) -> FakeUpstream:
        upstream = await FakeUpstream(**kwargs).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def upstream(upstream_factory: Callable[..., Awaitable[FakeUpstream]]) -> FakeUpstream:
    return await upstream_factory()


@pytest.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    """A DNS server on loopback whose zone the test sets (PTR, TXT, A ...)."""
    server = await DNSServer().start()
    yield server
    await server.stop()


def dns_section(dns_server: DNSServer) -> dict[str, Any]:
    """The ``dns`` config section that sends sendguard's lookups (the Received field's PTR
    names among them) to the test's DNS server, never off this machine."""
    return {"resolver": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": "1s"}}


@contextlib.asynccontextmanager
async def foreground(*argv: str, port: int) -> AsyncIterator[None]:
    """Run a real peer (HAProxy, nginx) in the foreground for the test, once it listens on
    ``port`` of 127.0.0.1 (at most 10 s), and stop it after."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        yield
    finally:
        process.terminate()
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(process.wait(), 10)


@pytest.fixture
async def lenient_upstream() -> AsyncIterator[LenientUpstream]:
    server = await LenientUpstream().start()
    yield server
    await server.stop()


# ---- sendguard ------------------------------------------------------------------------------


def base_config(tmp_path: Path, upstream_address: str) -> dict[str, Any]:
    return {
        "listeners": [{"name": "local", "address": "127.0.0.1:0", "trusted_networks": ["127.0.0.0/8"], "auth": "none"}],
        "users_file": str(tmp_path / "users"),
        "upstream": {
            "address": upstream_address,
            "tls": "none",
            "timeouts": {"connect": "5s", "command": "5s", "data": "10s"},
        },
        "policies": [{"name": "required_headers"}],
        "stores": {"consent": {"path": str(tmp_path / "consent.db")}},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "spool": {"path": str(tmp_path / "spool.db")},
        "http": {"address": "127.0.0.1:0"},
        "reload": {"watch": False},
        "logging": {"format": "json", "level": "info"},
        # A test's proxy stops at teardown: wait at most 5 s (not 30) for work in flight, such
        # as a retry-queue attempt, so a loaded machine stays inside the per-test timeout.
        "timeouts": {"shutdown": "5s"},
    }


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class Proxy:
    app: App
    config_path: Path
    tmp_path: Path

    @property
    def port(self) -> int:
        return next(iter(self.app.bound.values()))[1]

    def listener_port(self, name: str) -> int:
        return self.app.bound[name][1]

    @property
    def http_port(self) -> int:
        assert self.app.http_bound is not None
        return self.app.http_bound[1]

    def audit_lines(self) -> list[dict[str, Any]]:
        import json

        path = self.tmp_path / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    async def wait_audit(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            lines = self.audit_lines()
            if len(lines) >= count or asyncio.get_running_loop().time() > deadline:
                return lines
            await asyncio.sleep(0.02)


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    started: list[App] = []

    async def make(
        upstream_address: str, changes: dict[str, Any] | None = None, *, raw: dict[str, Any] | None = None
    ) -> Proxy:
        config = raw if raw is not None else merge(base_config(tmp_path, upstream_address), changes or {})
        path = tmp_path / f"sendguard-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        settings = load_config(path)
        app = App(settings, config_path=str(path))
        await app.start()
        started.append(app)
        return Proxy(app, path, tmp_path)

    yield make
    for app in started:
        await app.stop()


@pytest.fixture
async def proxy(proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream) -> Proxy:
    return await proxy_factory(upstream.address)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll until ``condition()`` holds (True) or the time is up (False): for what the
    process does in the background, such as the retry queue's worker sending a DSN."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# ---- a raw SMTP client ------------------------------------------------------------------------


class RawClient:
    """Speaks SMTP byte by byte, for the inputs a polite client library refuses to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        greeting: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        local: str | None = None,
    ) -> RawClient:
        """``local``: connect from this address (another of 127.0.0.0/8, all local on Linux),
        so that clients behind a balancer or an MTA in front differ by address."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=ssl_context,
            server_hostname="localhost" if ssl_context else None,
            local_addr=(local, 0) if local else None,
        )
        client = cls(reader, writer)
        if greeting:
            await client.reply()
        return client

    async def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                return (0, "\n".join(lines) or "<EOF>")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> tuple[int, str]:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def transaction(self, *, sender: str = "alice@example.com") -> tuple[int, str]:
        """MAIL, RCPT and DATA of a one-recipient message (after EHLO), each only when the one
        before it passed: the reply that decided it."""
        for command in (f"MAIL FROM:<{sender}>", "RCPT TO:<bob@example.org>"):
            code, text = await self.cmd(command)
            if code != 250:
                return code, text
        assert (await self.cmd("DATA"))[0] == 354
        await self.send(message(sender=sender) + b".\r\n")
        return await self.reply()


async def submit(
    port: int,
    content: bytes | None = None,
    *,
    sender: str = "alice@example.com",
    recipients: Sequence[str] = ("bob@example.org",),
    timeout: float = 15,
    source: str | None = None,
    helo: str | None = None,
) -> tuple[int, str]:
    """Send one message with aiosmtplib; the (code, text) of the answer that decided it,
    whichever command it came at. Recipients refused individually are not reported here.
    ``source``: connect from this loopback address; ``helo``: the EHLO name."""
    try:
        _, reply = await aiosmtplib.send(
            content if content is not None else message(),
            sender=sender,
            recipients=list(recipients),
            hostname="127.0.0.1",
            port=port,
            start_tls=False,
            timeout=timeout,
            source_address=(source, 0) if source else None,
            local_hostname=helo,
        )
    except aiosmtplib.SMTPRecipientsRefused as error:
        return error.recipients[0].code, error.recipients[0].message
    except aiosmtplib.SMTPResponseException as error:  # sender refused, DATA refused
        return error.code, error.message
    return 250, reply


def message(
    subject: str = "Hello",
    body: str = "Just a test.",
    *,
    sender: str = "alice@example.com",
    to: str = "bob@example.org",
    extra: str = "",
) -> bytes:
    text = (
        f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{abs(hash(subject + body))}@example.com>\r\n"
        f"{extra}\r\n{body}\r\n"
    )
    return text.encode("utf-8")


def run_quick_bench(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``bench/SCRIPT --quick --out FILE`` as the README says; its output and its JSON."""
    import json

    output = tmp_path / (Path(script).stem + ".json")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(output)],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report: dict[str, Any] = json.loads(output.read_text())
    return completed, report
