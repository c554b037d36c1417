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
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import IN_CI, need_program


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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


# Settings every test instance shares: loopback only, no DNS, no local delivery, retries fast
# enough for a test, and no TLS unless a test asks (the machine has no certificates for it).
BASE_MAIN_CF: dict[str, str] = {
    "compatibility_level": "3.6",
    "mail_owner": "postfix",
    "setgid_group": "postdrop",
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    "myhostname": "postfix.example.test",
    "mydomain": "example.test",
    "myorigin": "$myhostname",
    "mydestination": "",
    "local_transport": "error:local delivery is disabled in this test instance",
    "mynetworks": "127.0.0.0/8",
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    "alias_maps": "",
    "alias_database": "",
    "biff": "no",
    "append_dot_mydomain": "no",
    "disable_dns_lookups": "yes",
    "smtp_dns_support_level": "disabled",
    "smtp_tls_security_level": "none",
    "smtpd_tls_security_level": "none",
    "smtp_connect_timeout": "5s",
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
    "delay_warning_time": "0",
    "smtputf8_enable": "yes",
    "maillog_file": "/dev/stdout",
}


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


def _write_main_cf(config_directory: Path, settings: Mapping[str, str]) -> None:
    lines = [f"{name} = {value}" for name, value in settings.items()]
    (config_directory / "main.cf").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_master_cf(
    config_directory: Path, port: int, smtpd_options: Mapping[str, str], services: Sequence[str]
) -> None:
    """Debian's master.cf.proto with its public smtp listener moved to 127.0.0.1:PORT, no
    chroot anywhere (a chroot would need copies of /etc files in the queue directory), and
    the test's own services appended."""
    proto = Path("/etc/postfix/master.cf.proto")
    if not proto.exists():
        proto = Path("/etc/postfix/master.cf")
    lines: list[str] = []
    for line in proto.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if fields[:2] == ["smtp", "inet"]:
            lines.append(f"127.0.0.1:{port} inet n - n - - smtpd")
            lines.extend(f"  -o {name}={value}" for name, value in smtpd_options.items())
            continue
        if len(fields) >= 8 and not line[0].isspace() and not line.startswith("#"):
            fields[4] = "n"
            line = " ".join(fields)
        lines.append(line)
    lines.extend(services)
    (config_directory / "master.cf").write_text("\n".join(lines) + "\n", encoding="utf-8")


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
    directory = Path(tempfile.mkdtemp(prefix="sendguard-postfix-"))
    directory.chmod(0o755)
    config_directory = directory / "etc"
    config_directory.mkdir()
    (directory / "queue").mkdir()
    data_directory = directory / "data"
    data_directory.mkdir()
    shutil.chown(data_directory, user="postfix")
    port = free_port()
    ports = {name: free_port() for name in extra_ports}
    settings = dict(BASE_MAIN_CF)
    settings.update(
        queue_directory=str(directory / "queue"),
        data_directory=str(data_directory),
        syslog_name=f"postfix-{port}",
    )
    if relayhost is not None:
        settings["relayhost"] = relayhost
    settings.update(main_cf or {})
    _write_main_cf(config_directory, settings)
    _write_master_cf(config_directory, port, smtpd_options or {}, [line.format(**ports) for line in services])
    log_path = directory / "maillog"
    environment = {**os.environ, "MAIL_CONFIG": str(config_directory)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [program, "-c", str(config_directory), "start-fg"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    instance = PostfixInstance(directory, port, process, log_path, ports)
    try:
        await wait_listening(port, process, "Postfix", instance.log, start_timeout)
        yield instance
    finally:
        await asyncio.to_thread(_stop, program, config_directory, process, environment)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(program: str, config_directory: Path, process: subprocess.Popen[bytes], environment: dict[str, str]) -> None:
    subprocess.run(
        [program, "-c", str(config_directory), "stop"], env=environment, capture_output=True, timeout=30, check=False
    )
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout=5)
