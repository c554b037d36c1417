"""A private Postfix instance's files and its start and stop, without pytest: shared by the
tests' harness (``tests/postfix.py``) and the throughput benchmark's Postfix target
(``bench/relay_throughput.py``), so both run the same Postfix.

Each instance has its own configuration directory, queue and data directory in a fresh
temporary directory (mode 0755: the ``postfix`` user must traverse it), listens on 127.0.0.1
only on ephemeral ports, logs to a file through ``postfix start-fg`` (``maillog_file =
/dev/stdout``, Postfix 3.4+, so nothing needs a syslog daemon) and is stopped with ``postfix
stop``. Nothing of the machine's own Postfix (/etc/postfix) is used but its binaries and
``master.cf.proto``. Postfix's master runs as root and its daemons as ``postfix``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ("BASE_MAIN_CF", "PostfixFiles", "free_port", "prepare", "start", "stop")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Settings every instance shares: loopback only, no DNS, no local delivery, retries fast
# enough for a test, and no TLS unless asked (the machine has no certificates for it).
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


@dataclass(frozen=True)
class PostfixFiles:
    """An instance's directory (``etc/``, ``queue/``, ``data/``), its SMTP port and other ports."""

    directory: Path
    port: int
    extra_ports: dict[str, int]

    @property
    def config_directory(self) -> Path:
        return self.directory / "etc"

    @property
    def log_path(self) -> Path:
        return self.directory / "maillog"


def _write_main_cf(config_directory: Path, settings: Mapping[str, str]) -> None:
    lines = [f"{name} = {value}" for name, value in settings.items()]
    (config_directory / "main.cf").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_master_cf(
    config_directory: Path, port: int, smtpd_options: Mapping[str, str], services: Sequence[str]
) -> None:
    """Debian's master.cf.proto with its public smtp listener moved to 127.0.0.1:PORT, no
    chroot anywhere (a chroot would need copies of /etc files in the queue directory), and
    the caller's own services appended."""
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


def prepare(
    *,
    relayhost: str | None = None,
    main_cf: Mapping[str, str] | None = None,
    smtpd_options: Mapping[str, str] | None = None,
    services: Sequence[str] = (),
    extra_ports: Sequence[str] = (),
) -> PostfixFiles:
    """A fresh directory with main.cf and master.cf for one instance (see ``postfix_instance``
    in tests/postfix.py for what the arguments mean)."""
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
    return PostfixFiles(directory, port, ports)


def environment(files: PostfixFiles) -> dict[str, str]:
    return {**os.environ, "MAIL_CONFIG": str(files.config_directory)}


def start(program: str, files: PostfixFiles) -> subprocess.Popen[bytes]:
    """``postfix start-fg`` in its own session, its log (stdout) to ``files.log_path``."""
    with files.log_path.open("wb") as log:
        return subprocess.Popen(
            [program, "-c", str(files.config_directory), "start-fg"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment(files),
            start_new_session=True,
        )


def stop(program: str, files: PostfixFiles, process: subprocess.Popen[bytes], *, remove: bool = True) -> None:
    """``postfix stop``, then the master's exit (killed with its session after 15 s)."""
    subprocess.run(
        [program, "-c", str(files.config_directory), "stop"],
        env=environment(files),
        capture_output=True,
        timeout=30,
        check=False,
    )
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout=5)
    if remove:
        shutil.rmtree(files.directory, ignore_errors=True)
