"""``sendguard upstream check --config FILE``: diagnose the upstream MTA in one command.

It does what the relay does when it opens a connection, one step at a time, and says for
each what it saw and, when it went wrong, what to fix: connect (TCP), the greeting, EHLO
and the name sendguard gives, TLS (STARTTLS or implicit) and the certificate (who it is
for, who issued it, when it ends), AUTH with the configured account, and what the upstream
offers (SIZE against the listeners' max_message_size, 8BITMIME, SMTPUTF8). It never sends
MAIL: nothing is delivered. Exit 0 when nothing failed (warnings allowed), 1 when a step
failed, 2 for a config that does not load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiosmtplib

from proxy.config.settings import Settings, load_config

__all__ = ("Step", "add_upstream_parser", "check_upstream", "run_upstream")

#: A certificate ending within this many days is a warning.
_CERT_WARN_DAYS = 14


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""


def add_upstream_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    upstream = commands.add_parser("upstream", help="the upstream MTA: check the connection step by step")
    sub = upstream.add_subparsers(dest="upstream_command", required=True, metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check", help="connect, TLS and certificate, AUTH, EHLO name, SIZE: each with what to fix (sends no mail)"
    )
    check.add_argument("--config", required=True, help="YAML config file")
    check.add_argument("--json", action="store_true", help="print the steps as JSON")


def run_upstream(args: argparse.Namespace) -> int:
    settings = load_config(args.config)  # a ConfigError is printed by the caller (exit 2)
    steps = asyncio.run(check_upstream(settings))
    if args.json:
        print(json.dumps([asdict(step) for step in steps], indent=2))
    else:
        for step in steps:
            print(f"{step.status.upper():4}  {step.name:11} {step.detail}")
            if step.fix:
                print(f"      {'':11} fix: {step.fix}")
    return 1 if any(step.status == "fail" for step in steps) else 0


async def check_upstream(settings: Settings) -> list[Step]:
    """Every step, in the relay's order; stops at the first step the rest depend on."""
    config = settings.upstream
    if config.is_maildir:
        return [Step("upstream", "ok", f"{config.address}: a local Maildir, nothing to connect to")]
    host, port = config.hostport.host, config.hostport.port
    helo = config.helo_name or socket.getfqdn()
    steps: list[Step] = []
    implicit = config.tls == "implicit"
    context = _tls_context(config.verify_certificate, config.ca_file)
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        local_hostname=helo,
        timeout=float(config.timeouts.connect),
        use_tls=implicit,
        start_tls=False,
        tls_context=context if implicit else None,
    )
    started = time.perf_counter()
    try:
        greeting = await client.connect()
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
        steps.append(_connect_failure(host, port, implicit, exc, config.verify_certificate))
        return steps
    try:
        took = (time.perf_counter() - started) * 1000
        steps.append(Step("connect", "ok", f"{host}:{port} in {took:.0f} ms" + (" (implicit TLS)" if implicit else "")))
        steps.append(Step("greeting", "ok", f"{greeting.code} {greeting.message.splitlines()[0][:120]}"))
        if implicit:
            steps.append(_certificate(client, host, config.verify_certificate))
        steps.append(await _ehlo(client, helo))
        if steps[-1].status == "fail":
            return steps
        if config.tls in ("starttls", "opportunistic"):
            tls_step = await _starttls(client, host, context, required=config.tls == "starttls")
            steps.append(tls_step)
            if tls_step.status == "fail":
                return steps
            if tls_step.status == "ok":
                steps.append(_certificate(client, host, config.verify_certificate))
                await client.ehlo()
        elif config.tls == "none":
            steps.append(
                Step(
                    "tls",
                    "warn" if not _is_local(host) else "ok",
                    "tls: none: mail and passwords cross the network in the clear",
                    "" if _is_local(host) else "use tls: starttls (port 587) or implicit (465) for a remote upstream",
                )
            )
        steps.append(await _auth(client, config.username, config.password))
        steps.extend(_offers(client, settings))
        return steps
    finally:
        client.close()


def _tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _is_local(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _connect_failure(host: str, port: int, implicit: bool, exc: BaseException, verify: bool) -> Step:
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return Step("tls", "fail", f"certificate not accepted: {exc}", _cert_fix(host))
    if isinstance(exc, ssl.SSLError) or (implicit and "SSL" in type(exc).__name__):
        return Step(
            "tls",
            "fail",
            f"implicit TLS failed: {exc}",
            "port 465 speaks TLS from the start; for 587 or 25 write tls: starttls",
        )
    if isinstance(exc, (TimeoutError, aiosmtplib.SMTPConnectTimeoutError)):
        return Step(
            "connect",
            "fail",
            f"{host}:{port}: no answer in time",
            "a firewall may drop outbound traffic to this port (cloud providers often block 25); "
            "check upstream.address and try 587",
        )
    return Step(
        "connect",
        "fail",
        f"{host}:{port}: {exc}",
        "check upstream.address (host name in the DNS, port open: 587 for submission, 465 for implicit TLS)",
    )


def _cert_fix(host: str) -> str:
    return (
        f"the upstream's certificate must be valid and name {host}: use the name on its certificate in "
        "upstream.address, give its CA in upstream.ca_file, or (never across the internet) verify_certificate: false"
    )


async def _ehlo(client: aiosmtplib.SMTP, helo: str) -> Step:
    try:
        reply = await client.ehlo()
    except aiosmtplib.SMTPResponseException as exc:
        return Step(
            "ehlo", "fail", f"EHLO {helo}: {exc.code} {exc.message}", "set upstream.helo_name to this host's name"
        )
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return Step("ehlo", "fail", f"EHLO {helo}: {exc}", "the upstream closed the connection; check its logs")
    if "." not in helo or helo.endswith(".localdomain") or helo in ("localhost",):
        return Step(
            "ehlo",
            "warn",
            f"EHLO {helo}: {reply.code}; the name is not a fully qualified domain name",
            "set upstream.helo_name to this host's name in the DNS (many MTAs refuse or score bare names)",
        )
    return Step("ehlo", "ok", f"EHLO {helo}: {reply.code}")


async def _starttls(client: aiosmtplib.SMTP, host: str, context: ssl.SSLContext, *, required: bool) -> Step:
    if not client.supports_extension("starttls"):
        if not required:
            return Step("tls", "warn", "STARTTLS not offered: tls: opportunistic sends in the clear", "")
        return Step(
            "tls",
            "fail",
            "STARTTLS not offered",
            "use tls: implicit with port 465 if the upstream has it; tls: none only for an upstream on this machine",
        )
    try:
        await client.starttls(tls_context=context)
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            return Step("tls", "fail", f"STARTTLS: certificate not accepted: {exc}", _cert_fix(host))
        return Step("tls", "fail", f"STARTTLS failed: {exc}", "check the upstream's TLS setup (protocols, ciphers)")
    ssl_object = client.transport.get_extra_info("ssl_object") if client.transport else None
    version = ssl_object.version() if ssl_object is not None else "?"
    return Step("tls", "ok", f"STARTTLS: {version}")


def _certificate(client: aiosmtplib.SMTP, host: str, verified: bool) -> Step:
    peer: dict[str, Any] | None = client.transport.get_extra_info("peercert") if client.transport else None
    if not peer:
        return Step(
            "certificate",
            "warn" if not verified else "ok",
            "not verified (verify_certificate: false): anyone on the path can pretend to be the upstream"
            if not verified
            else "verified",
            "set verify_certificate: true (give upstream.ca_file for a private CA)" if not verified else "",
        )
    subject = dict(item for rdn in peer.get("subject", ()) for item in rdn).get("commonName", "?")
    issuer = dict(item for rdn in peer.get("issuer", ()) for item in rdn).get("organizationName") or dict(
        item for rdn in peer.get("issuer", ()) for item in rdn
    ).get("commonName", "?")
    not_after = peer.get("notAfter")
    days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400 if not_after else None
    detail = f"for {subject}, issued by {issuer}, valid until {not_after} ({days:.0f} days)" if days else subject
    if days is not None and days < _CERT_WARN_DAYS:
        return Step("certificate", "warn", detail, "the upstream's certificate ends soon: tell its administrator")
    return Step("certificate", "ok", detail)


async def _auth(client: aiosmtplib.SMTP, username: str | None, password: str | None) -> Step:
    if not username:
        if client.supports_extension("auth"):
            return Step(
                "auth",
                "warn",
                "the upstream offers AUTH but no account is configured",
                "set upstream.username/password if it requires one",
            )
        return Step("auth", "skip", "no account configured, none offered")
    if not client.supports_extension("auth"):
        return Step(
            "auth",
            "fail",
            "the upstream does not offer AUTH here",
            "many MTAs offer AUTH only after STARTTLS: keep tls: starttls; or the port is for relaying by IP (25)",
        )
    try:
        reply = await client.login(username, password or "")
    except aiosmtplib.SMTPAuthenticationError as exc:
        return Step(
            "auth",
            "fail",
            f"{username}: {exc.code} {exc.message}",
            "check upstream.username and the password (write ${ENV_NAME} to take it from the environment); "
            "Microsoft 365 and Google need SMTP AUTH enabled for the account or an app password",
        )
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return Step(
            "auth", "fail", f"{username}: {exc}", "the upstream offers no mechanism sendguard speaks (PLAIN, LOGIN)"
        )
    return Step("auth", "ok", f"{username}: {reply.code}")


def _offers(client: aiosmtplib.SMTP, settings: Settings) -> list[Step]:
    extensions = client.esmtp_extensions
    steps = []
    size = extensions.get("size", "")
    largest = max((int(listener.max_message_size) for listener in settings.listeners), default=0)
    if size.isdigit() and int(size) > 0:
        if int(size) < largest:
            steps.append(
                Step(
                    "size",
                    "warn",
                    f"the upstream takes at most {int(size):,} bytes; a listener accepts {largest:,}",
                    f"lower listeners[].max_message_size to {int(size):,} or less, so clients are refused before "
                    "they send a message the upstream will refuse",
                )
            )
        else:
            steps.append(Step("size", "ok", f"the upstream takes up to {int(size):,} bytes (listeners: {largest:,})"))
    else:
        steps.append(Step("size", "ok", "no SIZE limit announced"))
    offered = [name.upper() for name in ("8bitmime", "smtputf8", "pipelining") if name in extensions]
    steps.append(Step("extensions", "ok", ", ".join(offered) or "none of 8BITMIME, SMTPUTF8, PIPELINING"))
    return steps
