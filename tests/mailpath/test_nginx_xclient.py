"""sendguard behind a real XCLIENT sender: nginx's mail proxy (``xclient on``).

nginx takes the client's SMTP session and its AUTH (checked by an ``auth_http`` service,
here a small HTTP server of the test's own), then connects to sendguard and, because
sendguard offers XCLIENT to it, sends ``XCLIENT ADDR=<client> LOGIN=<user> NAME=...``,
waits for the new 220 greeting, says EHLO with the client's own HELO name and relays the
transaction (nginx 1.22 observed: it never sends XFORWARD). Postfix's before-queue filter
client does not send XCLIENT (``test_postfix_proxy_filter``); nginx is the XCLIENT peer that
carries a SASL login. Clients connect from their own loopback addresses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import IN_CI, Proxy, RawClient, dns_section, foreground, need_program
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream
from tests.postfix import free_port

MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")


@contextlib.asynccontextmanager
async def auth_http(backend_port: int, passwords: dict[str, str]) -> AsyncIterator[int]:
    """nginx's auth_http protocol: a GET with Auth-User/Auth-Pass (Auth-Method none for a
    client that did not AUTH); the answer names the backend, or refuses."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        method, user, password = fields.get("Auth-Method"), fields.get("Auth-User", ""), fields.get("Auth-Pass", "")
        if method == "none" or passwords.get(user) == password:
            answer = f"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {backend_port}\r\n"
        else:
            answer = "Auth-Status: Invalid login or password\r\nAuth-Wait: 0\r\n"
        writer.write(f"HTTP/1.0 200 OK\r\n{answer}\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


@contextlib.asynccontextmanager
async def nginx_mail_proxy(tmp_path: Path, auth_port: int) -> AsyncIterator[int]:
    """nginx in the foreground (one process, no daemon) with only its mail module, proxying
    SMTP with XCLIENT; yields its port."""
    program = need_program("nginx")
    if not MAIL_MODULE.exists():
        reason = f"nginx's mail module is missing ({MAIL_MODULE}; Debian: libnginx-mod-mail)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    port = free_port()
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"load_module {MAIL_MODULE};\n"
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/nginx-error.log info;\n"
        "events { worker_connections 64; }\n"
        "mail {\n"
        "  server_name front.example.test;\n"
        f"  auth_http 127.0.0.1:{auth_port}/auth;\n"
        "  xclient on;\n"
        "  proxy_pass_error_message on;\n"
        f"  server {{ listen 127.0.0.1:{port}; protocol smtp; smtp_auth plain none; }}\n"
        "}\n"
    )
    async with foreground(
        program, "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "nginx-error.log"), port=port
    ):
        yield port


async def send(
    port: int, source: str, *, login: str | None = None, sender: str = "alice@example.com"
) -> tuple[int, str]:
    """One message through nginx from ``source``; the deciding reply."""
    client = await RawClient.connect(port, local=source)
    try:
        assert (await client.cmd(f"EHLO {source.replace('.', '-')}.example"))[0] == 250
        if login is not None:
            blob = base64.b64encode(f"\0{login}\0secret-{login}".encode()).decode()
            assert (await client.cmd(f"AUTH PLAIN {blob}"))[0] == 235
        return await client.transaction(sender=sender)
    finally:
        await client.close()


async def test_behind_nginx_xclient_each_client_is_itself_with_its_login(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream, dns_server: DNSServer, tmp_path: Path
) -> None:
    sendguard_port = free_port()
    proxy = await proxy_factory(
        upstream.address,
        {
            "listeners": [
                {
                    "name": "backend",
                    "address": f"127.0.0.1:{sendguard_port}",
                    "hostname": "relay.example.com",
                    # nginx itself may not relay: every client is judged as itself
                    "trusted_networks": ["127.0.0.9/32"],
                    "xclient_hosts": ["127.0.0.1/32"],
                }
            ],
            "policies": [
                {"name": "required_headers"},
                {"name": "consent"},
                {
                    "name": "rate_limit",
                    "limits": [
                        {"key": "client_ip", "name": "per_client", "rates": ["2/h"]},
                        {"key": "auth_user", "name": "per_user", "rates": ["1/h"]},
                    ],
                },
            ],
            "classes": {"rules": [{"class": "commercial", "mail_from": ["news@*"]}]},
            "dns": dns_section(dns_server),
        },
    )
    async with (
        auth_http(sendguard_port, {name: f"secret-{name}" for name in ("alice", "carol", "dave")}) as auth_port,
        nginx_mail_proxy(tmp_path, auth_port) as port,
    ):
        # LOGIN is alice's AUTH at sendguard: she may relay from anywhere, and her per-user
        # budget (1/h) is hers, whichever address she comes from.
        assert (await send(port, "127.0.0.2", login="alice"))[0] == 250
        code, text = await send(port, "127.0.0.3", login="alice")
        assert (code, text.split(" ")[0]) == (451, "4.7.1") and "user alice" in text, text
        assert (await send(port, "127.0.0.3", login="carol"))[0] == 250
        # No login and not a trusted network: refused for this client, in sendguard's words.
        code, text = await send(port, "127.0.0.4")
        assert (code, text.split(" ")[0]) == (550, "5.7.1"), text
        # A trusted client without AUTH: its per-IP budget (2/h) is its own.
        assert (await send(port, "127.0.0.9"))[0] == 250
        assert (await send(port, "127.0.0.9"))[0] == 250
        code, text = await send(port, "127.0.0.9")
        assert (code, text.split(" ")[0]) == (451, "4.7.1") and "client 127.0.0.9" in text, text
        # A consent refusal reaches the original client through nginx as sendguard's 5xx.
        code, text = await send(port, "127.0.0.5", login="dave", sender="news@example.com")
        assert (code, text.split(" ")[0]) == (550, "5.7.1") and "no recorded consent" in text, text

    audit = await proxy.wait_audit(7)
    seen = [(line["client"], line["helo"], line["auth_user"], line["outcome"]) for line in audit]
    assert ("127.0.0.2", "127-0-0-2.example", "alice", "delivered") in seen
    assert ("127.0.0.3", "127-0-0-3.example", "carol", "delivered") in seen
    assert ("127.0.0.9", "127-0-0-9.example", None, "delivered") in seen
    consent = next(line for line in audit if line["client"] == "127.0.0.5")
    assert consent["auth_user"] == "dave" and consent["outcome"] == "rejected"
    assert all(line["forwarded"]["by"] == "127.0.0.1" for line in audit)
    first = upstream.messages[0].content
    assert first.split(b"\r\n\tby", 1)[0] == b"Received: from 127-0-0-2.example (unknown [127.0.0.2])"
    assert b"with ESMTPA id" in first
