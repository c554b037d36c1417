"""Real outside programs as peers: swaks as a client, Postfix's smtp-source as a load client
and smtp-sink as the upstream. (Installed by scripts/install-test-tools; CI runs them.)"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.conftest import Proxy, need_program
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]


async def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, list(args), capture_output=True, text=True, timeout=timeout)


async def test_swaks_delivers_through_sendguard(proxy: Proxy, upstream: FakeUpstream) -> None:
    swaks = need_program("swaks")
    result = await run(
        swaks,
        "--server",
        f"127.0.0.1:{proxy.port}",
        "--from",
        "alice@example.com",
        "--to",
        "bob@example.org",
        "--header",
        "Subject: swaks test",
        "--timeout",
        "20",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: queued as Q1" in result.stdout
    assert len(upstream.messages) == 1
    assert b"Subject: swaks test" in upstream.messages[0].content


async def test_swaks_sees_a_policy_rejection(proxy: Proxy, upstream: FakeUpstream, tmp_path: Path) -> None:
    swaks = need_program("swaks")
    data = tmp_path / "nofrom.eml"
    data.write_bytes(b"To: bob@example.org\r\nSubject: anonymous\r\n\r\nwho sent this?\r\n.")
    result = await run(
        swaks,
        "--server",
        f"127.0.0.1:{proxy.port}",
        "--from",
        "alice@example.com",
        "--to",
        "bob@example.org",
        "--data",
        f"@{data}",
        "--timeout",
        "20",
    )
    assert result.returncode != 0
    assert "<** 550 5.6.0 Message has no From: header" in result.stdout
    assert upstream.messages == []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_smtp_source_through_sendguard_to_smtp_sink(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    source = need_program("smtp-source")
    sink = need_program("smtp-sink")
    sink_port = free_port()
    # smtp-sink runs as nobody: its dump directory must be reachable by nobody (not under pytest's 0700 tmp)
    dumps = Path(tempfile.mkdtemp(prefix="sendguard-sink-"))
    dumps.chmod(0o777)
    # smtp-sink: -u nobody (it refuses to run as root), -c count, -d dump each transaction to a file
    sink_process = await asyncio.create_subprocess_exec(
        sink,
        "-u",
        "nobody",
        "-c",
        "-d",
        str(dumps / "%M."),
        f"127.0.0.1:{sink_port}",
        "100",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", sink_port), timeout=1):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        proxy = await proxy_factory(f"127.0.0.1:{sink_port}", {"policies": []})
        result = await run(
            source,
            "-s",
            "5",
            "-m",
            "40",
            "-r",
            "2",
            "-l",
            "2000",
            "-M",
            "client.test",
            "-f",
            "load@example.com",
            "-t",
            "rcpt@example.org",
            f"127.0.0.1:{proxy.port}",
        )
        assert result.returncode == 0, result.stderr
        audit = await proxy.wait_audit(40)
        assert [line["outcome"] for line in audit].count("delivered") == 40
        for _ in range(100):
            if len(list(dumps.iterdir())) >= 40:
                break
            await asyncio.sleep(0.05)
        assert len(list(dumps.iterdir())) == 40  # smtp-sink wrote one file per transaction
    finally:
        if sink_process.returncode is None:
            sink_process.terminate()
        await sink_process.wait()
        shutil.rmtree(dumps, ignore_errors=True)
