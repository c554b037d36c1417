"""aiosmtpd finds commands, AUTH mechanisms and hooks by reflection: the cheap ``dir()`` of
sendguard's session and handler must list exactly what the full one would."""

from __future__ import annotations

import pytest

from proxy.smtp.commands import RelayHandler
from proxy.smtp.reflection import ReflectedNames
from proxy.smtp.session import SendguardSMTP

PREFIXES = ("smtp_", "auth_", "handle_")


@pytest.mark.parametrize("cls", [SendguardSMTP, RelayHandler])
def test_dir_lists_every_name_aiosmtpd_looks_for(cls: type[ReflectedNames]) -> None:
    instance = cls.__new__(cls)
    full = sorted(name for name in object.__dir__(instance) if name.startswith(PREFIXES))
    assert dir(instance) == full
    assert full, "the class has commands or hooks to find"


def test_session_commands_found_as_aiosmtpd_would() -> None:
    session = SendguardSMTP.__new__(SendguardSMTP)
    commands = {name.removeprefix("smtp_") for name in dir(session) if name.startswith("smtp_")}
    # sendguard's own commands next to aiosmtpd's: all of them reachable.
    assert {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "AUTH", "STARTTLS", "XCLIENT", "XFORWARD"} <= commands
    mechanisms = {name for name in dir(session) if name.startswith("auth_")}
    assert {"auth_LOGIN", "auth_PLAIN"} <= mechanisms


def test_handler_hooks_found_as_aiosmtpd_would() -> None:
    handler = RelayHandler.__new__(RelayHandler)
    hooks = {name.removeprefix("handle_") for name in dir(handler) if name.startswith("handle_")}
    assert {"MAIL", "RCPT", "DATA"} <= hooks


def test_ehlo_hook_signature_is_the_one_aiosmtpd_expects() -> None:
    """aiosmtpd accepts a handle_EHLO of five parameters (self bound away: server, session,
    envelope, hostname, responses); the kept signature must say so."""
    import inspect

    handler = RelayHandler.__new__(RelayHandler)
    assert list(inspect.signature(handler.handle_EHLO).parameters) == [
        "server",
        "session",
        "envelope",
        "hostname",
        "responses",
    ]
