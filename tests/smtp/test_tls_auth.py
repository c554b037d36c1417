"""TLS and AUTH on both sides: trustme certificates, real handshakes, the users file."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib
import pytest

from proxy.smtp.auth import add_user
from tests.conftest import Proxy, RawClient, TLSFiles, message, submit
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]


def listener(tls_files: TLSFiles, **changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "submission",
        "address": "127.0.0.1:0",
        "trusted_networks": [],
        "auth": "optional",
        "plaintext_auth_networks": [],  # behave as for a client on another machine
        "tls": {"mode": "starttls", "cert": str(tls_files.cert_file), "key": str(tls_files.key_file)},
    }
    config.update(changes)
    return config


def plain_auth(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_starttls_then_auth_then_relay(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Any
) -> None:
    add_user(str(tmp_path / "users"), "alice", "correct horse battery staple")
    proxy = await proxy_factory(upstream.address, {"listeners": [listener(tls_files)]})
    errors, reply = await aiosmtplib.send(
        message(),
        sender="alice@example.com",
        recipients=["bob@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=True,
        tls_context=tls_files.client_context(),
        username="alice",
        password="correct horse battery staple",
        timeout=20,
    )
    assert errors == {}
    assert "queued as Q1" in reply
    audit = await proxy.wait_audit(1)
    assert audit[-1]["tls"] is True
    assert audit[-1]["auth_user"] == "alice"


async def test_auth_is_not_offered_or_accepted_before_tls(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Any
) -> None:
    add_user(str(tmp_path / "users"), "alice", "secret")
    proxy = await proxy_factory(upstream.address, {"listeners": [listener(tls_files)]})
    client = await RawClient.connect(proxy.port)
    code, ehlo = await client.cmd("EHLO client.test")
    assert "STARTTLS" in ehlo
    assert "AUTH" not in ehlo
    assert (await client.cmd(f"AUTH PLAIN {plain_auth('alice', 'secret')}"))[0] == 538
    code, text = await client.cmd("MAIL FROM:<alice@example.com>")
    assert (code, text.split(" ")[0]) == (530, "5.7.0")
    await client.close()
    assert upstream.connections == 0


async def test_wrong_password_then_lockout(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Any
) -> None:
    add_user(str(tmp_path / "users"), "alice", "secret")
    proxy = await proxy_factory(upstream.address, {"listeners": [listener(tls_files, max_auth_failures=3)]})
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=proxy.port, start_tls=True, tls_context=tls_files.client_context(), timeout=10
    )
    await smtp.connect()
    await smtp.ehlo()
    for _ in range(3):
        response = await smtp.execute_command(b"AUTH", b"PLAIN", plain_auth("alice", "wrong").encode())
        assert (response.code, response.message) == (535, "5.7.8 Authentication credentials invalid")
    # the right password is now refused too, for a while, from this address
    response = await smtp.execute_command(b"AUTH", b"PLAIN", plain_auth("alice", "secret").encode())
    assert (response.code, response.message.split(" ")[0]) == (454, "4.7.0")
    smtp.close()


async def test_auth_login_uses_printable_challenges(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Any
) -> None:
    add_user(str(tmp_path / "users"), "bob", "pw")
    proxy = await proxy_factory(
        upstream.address, {"listeners": [listener(tls_files, plaintext_auth_networks=["127.0.0.0/8"])]}
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    code, challenge = await client.cmd("AUTH LOGIN")
    assert (code, base64.b64decode(challenge)) == (334, b"Username:")  # not aiosmtpd's "User Name\0" (#566)
    code, challenge = await client.cmd(base64.b64encode(b"bob").decode())
    assert (code, base64.b64decode(challenge)) == (334, b"Password:")
    assert (await client.cmd(base64.b64encode(b"pw").decode()))[0] == 235
    assert (await client.cmd("MAIL FROM:<bob@example.com>"))[0] == 250
    await client.close()


async def test_listener_without_auth_does_not_offer_it(upstream: FakeUpstream, proxy: Proxy) -> None:
    client = await RawClient.connect(proxy.port)
    _, ehlo = await client.cmd("EHLO client.test")
    assert "AUTH" not in ehlo
    assert (await client.cmd("AUTH PLAIN AGEAYg=="))[0] == 503
    await client.close()


async def test_required_starttls_refuses_mail_in_clear(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    config = listener(tls_files, trusted_networks=["127.0.0.0/8"], auth="none")
    config["tls"]["required"] = True
    proxy = await proxy_factory(upstream.address, {"listeners": [config]})
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert await client.cmd("MAIL FROM:<a@example.com>") == (530, "5.7.0 Must issue a STARTTLS command first")
    await client.close()


async def test_implicit_tls_listener(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Any
) -> None:
    add_user(str(tmp_path / "users"), "alice", "pw")
    config = listener(tls_files)
    config["tls"]["mode"] = "implicit"
    proxy = await proxy_factory(upstream.address, {"listeners": [config]})
    errors, _ = await aiosmtplib.send(
        message(),
        sender="alice@example.com",
        recipients=["bob@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        use_tls=True,
        tls_context=tls_files.client_context(),
        username="alice",
        password="pw",
        timeout=20,
    )
    assert errors == {}
    assert len(upstream.messages) == 1


async def test_plaintext_injection_before_starttls_is_discarded(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    """CVE-2024-34083 (B18): commands sent in the clear with STARTTLS must not run inside TLS."""
    proxy = await proxy_factory(upstream.address, {"listeners": [listener(tls_files)]})
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO plain.test")
    await client.send(b"STARTTLS\r\nEHLO injected.test\r\n")
    assert (await client.reply())[0] == 220
    loop_reader, loop_writer = client.reader, client.writer
    await loop_writer.start_tls(tls_files.client_context(), server_hostname="localhost")
    tls = RawClient(loop_reader, loop_writer)
    code, _ = await tls.cmd("NOOP")  # the first reply inside TLS answers NOOP, not the injected EHLO
    assert code == 250
    await tls.close()


# ---- the upstream side ---------------------------------------------------------------------------


async def test_upstream_starttls_with_certificate_verification(
    tls_files: TLSFiles, upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(tls_context=tls_files.server_context(), require_starttls=True)
    proxy = await proxy_factory(
        f"localhost:{upstream.port}", {"upstream": {"tls": "starttls", "ca_file": str(tls_files.ca_file)}}
    )
    assert (await submit(proxy.port))[0] == 250
    assert len(upstream.messages) == 1


async def test_upstream_with_unknown_ca_is_refused_with_451(
    tls_files: TLSFiles, upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(tls_context=tls_files.server_context(), require_starttls=True)
    proxy = await proxy_factory(f"localhost:{upstream.port}", {"upstream": {"tls": "starttls"}})  # system CAs only
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    code, text = await client.cmd("MAIL FROM:<a@example.com>")
    # Told apart from an unreachable host (issue 15 part 6): a configuration to fix.
    assert (code, text.split(" ")[0]) == (451, "4.3.5")
    assert "TLS with the upstream mail server failed" in text
    await client.close()
    assert upstream.messages == []
    registry = proxy.app.services.metrics.registry
    assert (
        registry.get_sample_value("sendguard_upstream_replies_total", {"stage": "connect", "code_class": "tls_failed"})
        == 1
    )


async def test_upstream_implicit_tls_and_auth_with_password_from_environment(
    tls_files: TLSFiles, upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SG_TEST_UPSTREAM_PASSWORD", "relay-secret")
    upstream = await upstream_factory(
        tls_context=tls_files.server_context(), implicit_tls=True, credentials=("relay@example.com", "relay-secret")
    )
    proxy = await proxy_factory(
        f"localhost:{upstream.port}",
        {
            "upstream": {
                "tls": "implicit",
                "ca_file": str(tls_files.ca_file),
                "username": "relay@example.com",
                "password": "${SG_TEST_UPSTREAM_PASSWORD}",
            }
        },
    )
    assert (await submit(proxy.port))[0] == 250
    assert len(upstream.messages) == 1


async def test_upstream_refusing_our_credentials_gives_451(
    tls_files: TLSFiles, upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(
        tls_context=tls_files.server_context(), implicit_tls=True, credentials=("relay@example.com", "right")
    )
    proxy = await proxy_factory(
        f"localhost:{upstream.port}",
        {
            "upstream": {
                "tls": "implicit",
                "ca_file": str(tls_files.ca_file),
                "username": "relay@example.com",
                "password": "wrong",
            }
        },
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    code, text = await client.cmd("MAIL FROM:<a@example.com>")
    assert (code, text.split(" ")[0]) == (451, "4.3.5")
    assert "refused sendguard's credentials" in text
    assert "wrong" not in text and "relay@example.com" not in text
    await client.close()


def test_client_context_really_verifies(tls_files: TLSFiles) -> None:
    """Guard against a test setup that would pass without verification."""
    context = tls_files.client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


async def test_credentials_never_reach_the_logs(
    tls_files: TLSFiles,
    upstream: FakeUpstream,
    proxy_factory: ProxyFactory,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    add_user(str(tmp_path / "users"), "alice", "s3cret-Passw0rd")
    proxy = await proxy_factory(
        upstream.address, {"listeners": [listener(tls_files, plaintext_auth_networks=["127.0.0.0/8"])]}
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd(f"AUTH PLAIN {plain_auth('alice', 's3cret-Passw0rd')}"))[0] == 235
    assert (await client.cmd(f"AUTH PLAIN {plain_auth('alice', 'wrong-Passw0rd')}"))[0] == 503
    await client.close()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "AUTH success for alice" in logged
    for secret in ("s3cret-Passw0rd", plain_auth("alice", "s3cret-Passw0rd")):
        assert secret not in logged


async def test_only_real_mechanisms_are_offered_and_auth_after_helo_is_out_of_sequence(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Any
) -> None:
    """Issue 15 part 7: aiosmtpd offers every ``auth_*`` attribute as a SASL mechanism (a
    property once appeared as ``AUTH ... POSSIBLE``); AUTH after HELO is 503, not 500."""
    add_user(str(tmp_path / "users"), "alice", "pw")
    proxy = await proxy_factory(
        upstream.address, {"listeners": [listener(tls_files, plaintext_auth_networks=["127.0.0.0/8"])]}
    )
    client = await RawClient.connect(proxy.port)
    _, ehlo = await client.cmd("EHLO client.test")
    offered = next(line for line in ehlo.splitlines() if "AUTH" in line)
    assert offered.split("AUTH", 1)[1].split() == ["LOGIN", "PLAIN"]
    code, text = await client.cmd("AUTH POSSIBLE")
    assert (code, text.split(" ")[0]) == (504, "5.5.4")
    await client.close()
    client = await RawClient.connect(proxy.port)
    await client.cmd("HELO client.test")
    code, text = await client.cmd(f"AUTH PLAIN {plain_auth('alice', 'pw')}")
    assert (code, text.split(" ")[0]) == (503, "5.5.1")
    await client.close()


async def test_auth_logs_no_deprecation_warning(
    tls_files: TLSFiles,
    upstream: FakeUpstream,
    proxy_factory: ProxyFactory,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 15 part 7: aiosmtpd logs "Session.login_data is deprecated" on every AUTH."""
    caplog.set_level("WARNING")
    add_user(str(tmp_path / "users"), "alice", "pw")
    proxy = await proxy_factory(
        upstream.address, {"listeners": [listener(tls_files, plaintext_auth_networks=["127.0.0.0/8"])]}
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd(f"AUTH PLAIN {plain_auth('alice', 'pw')}"))[0] == 235
    await client.close()
    assert not [r for r in caplog.records if "login_data" in r.getMessage()]
