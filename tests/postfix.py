"""A private, real Postfix instance for the tests that put sendguard in a real mail path.

Each instance has its own configuration directory, queue and data directory in a fresh
temporary directory, listens on 127.0.0.1 only on ephemeral ports, logs to a file through
``postfix start-fg`` (``maillog_file = /dev/stdout``, Postfix 3.4+, so nothing needs a
syslog daemon) and is stopped with ``postfix stop``. Nothing of the machine's own Postfix
(/etc/postfix) is used but its binaries and ``master.cf.proto``.

Postfix's master runs as root and its daemons as the ``postfix`` user: the instance needs
root (the tests skip without it, and fail under CI, where they run as root). The directory is
made by ``tempfile.mkdtemp`` with mode 0755 rather than under pytest's ``tmp_path``, whose
0700 parents the ``postfix`` user could not traverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import IN_CI, need_program
from tests.postfix_config import BASE_MAIN_CF, free_port, prepare, start, stop

__all__ = ("BASE_MAIN_CF", "PostfixInstance", "free_port", "need_postfix", "postfix_instance")


def need_postfix() -> str:
    """The postfix command; skips (fails under CI) where Postfix or root is missing."""
    program = need_program("postfix")
    if os.geteuid() != 0:
        reason = "a private Postfix instance needs root (its master runs as root, its daemons as postfix)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return program


async def wait_listening(
    port: int, process: subprocess.Popen[bytes], what: str, log: Callable[[], str], timeout: float = 20.0
) -> None:
    """Wait until ``process`` accepts connections on 127.0.0.1:``port``; fails with its log
    when it exits or does not listen in time."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{what} did not start (exit {process.returncode}); its log:\n{log()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} never listened on {port}; its log:\n{log()}") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


@dataclass
class PostfixInstance:
    """One running instance: its SMTP port, its directories and its log."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    extra_ports: dict[str, int] = field(default_factory=dict)

    @property
    def config_directory(self) -> Path:
        return self.directory / "etc"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def postconf(self, *args: str) -> str:
        return subprocess.run(
            ["postconf", "-c", str(self.config_directory), *args], check=True, capture_output=True, text=True
        ).stdout

    def queue_ids(self) -> list[str]:
        """Ids of the messages in the instance's queue (all of its queues)."""
        found: list[str] = []
        for name in ("incoming", "active", "deferred", "hold", "maildrop"):
            folder = self.directory / "queue" / name
            if folder.is_dir():
                found.extend(path.name for path in folder.rglob("*") if path.is_file())
        return found

    async def wait_log(self, text: str, timeout: float = 15.0) -> str:
        """Wait until the log holds ``text``; returns the log. Fails with the log on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            await asyncio.sleep(0.1)
        raise AssertionError(f"Postfix never logged {text!r}; its log:\n{self.log()[-4000:]}")

    async def wait_queue_empty(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queue_ids():
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix's queue kept {self.queue_ids()}; its log:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def postfix_instance(
    *,
    relayhost: str | None = None,
    main_cf: Mapping[str, str] | None = None,
    smtpd_options: Mapping[str, str] | None = None,
    services: Sequence[str] = (),
    extra_ports: Sequence[str] = (),
    start_timeout: float = 20.0,
) -> AsyncIterator[PostfixInstance]:
    """Start a private Postfix on 127.0.0.1.

    ``relayhost`` ("[127.0.0.1]:PORT") is where it relays everything; ``main_cf`` adds or
    overrides main.cf settings; ``smtpd_options`` are ``-o`` options of the SMTP listener;
    ``services`` are master.cf lines appended (they may use ``{name}`` placeholders for the
    ports named in ``extra_ports``, which are allocated here and exposed as
    ``instance.extra_ports``)."""
    program = need_postfix()
    files = prepare(
        relayhost=relayhost, main_cf=main_cf, smtpd_options=smtpd_options, services=services, extra_ports=extra_ports
    )
    directory, port, ports, log_path = files.directory, files.port, files.extra_ports, files.log_path
    process = start(program, files)
    instance = PostfixInstance(directory, port, process, log_path, ports)
    try:
        await wait_listening(port, process, "Postfix", instance.log, start_timeout)
        yield instance
    finally:
        await asyncio.to_thread(stop, program, files, process)
