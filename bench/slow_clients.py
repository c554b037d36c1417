"""Slow clients (issue 15, part 4): how long a normal client waits while tricklers hold the slots.

``sendguard serve`` runs as a real process with the shipped config (its defaults: max_sessions
500, max_sessions_per_ip 50, stress_at 0.8, timeouts.command 60s, stress_idle 10s; the
upstream a Maildir in a scratch directory). Then:

* a burst of N slow connections from 12 loopback addresses (127.0.0.2 ...) at once: how many
  got a greeting, a 421, or nothing within 10 s (the issue counted 104 of 500 with nothing);
* each slow connection sends one byte every ``--interval`` seconds and never ends a line; when
  sendguard cuts it, it reconnects at once (the load holds every slot it can, for the whole run);
* meanwhile a normal client from 127.0.0.1, every ``--probe-every`` seconds: the time to its
  first reply (220 or 421), and the time until one message is relayed (retrying after a 421
  every 0.5 s, as a patient MTA would, only faster).

    .venv/bin/python bench/slow_clients.py            # 500 tricklers, about 80 s
    .venv/bin/python bench/slow_clients.py --quick    # 100 tricklers, about 25 s

The table goes to stdout, the figures to bench/results/slow_clients.json. Not part of pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.relay_throughput import (  # noqa: E402
    BenchError,
    free_port,
    sendguard_command,
    stop_process,
    wait_for_ready,
)

RESULTS = ROOT / "bench" / "results"
SHIPPED_CONFIG = ROOT / "config" / "sendguard.yaml"
SOURCES = [f"127.0.0.{i}" for i in range(2, 14)]  # 12 addresses
MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: probe\r\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <probe@example.com>\r\n\r\nHello.\r\n"
)


async def first_reply(reader: asyncio.StreamReader, within: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.readline(), within)
    except (TimeoutError, ConnectionError):
        return b""


class Trickler:
    """One slow connection, reconnecting whenever it is cut, until ``stop`` is set."""

    def __init__(self, port: int, source: str, interval: float, stop: asyncio.Event) -> None:
        self.port, self.source, self.interval, self.stop = port, source, interval, stop
        self.first: bytes | None = None  # the burst's first reply (b"" for none within 10 s)
        self.connections = 0
        self.cut = 0

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.source, 0))
            except OSError:
                await asyncio.sleep(0.2)
                continue
            self.connections += 1
            try:
                greeting = await first_reply(reader, 10)
                if self.first is None:
                    self.first = greeting
                if not greeting.startswith(b"220"):
                    await asyncio.sleep(1)  # refused: come back soon
                    continue
                while not self.stop.is_set():
                    writer.write(b"X")
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(512), self.interval) is not None:
                            self.cut += 1
                            break
            except (ConnectionError, OSError):
                self.cut += 1
            finally:
                writer.close()


async def probe(port: int, deadline: float) -> dict[str, Any]:
    """A normal client: time to its first reply, then the time until one message is relayed."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    greeting_s: float | None = None
    refusals = 0
    while loop.time() - started < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            line = await first_reply(reader, deadline)
            if greeting_s is None:
                greeting_s = loop.time() - started if line else None
            if not line.startswith(b"220"):
                refusals += 1
                await asyncio.sleep(0.5)
                continue
            for command in (
                b"EHLO probe.test",
                b"MAIL FROM:<alice@example.com>",
                b"RCPT TO:<bob@example.org>",
                b"DATA",
            ):
                writer.write(command + b"\r\n")
                while (reply := await asyncio.wait_for(reader.readline(), 30))[3:4] == b"-":
                    pass
                if reply[:1] not in (b"2", b"3"):
                    raise BenchError(f"probe refused at {command!r}: {reply!r}")
            writer.write(MESSAGE + b".\r\nQUIT\r\n")
            reply = await asyncio.wait_for(reader.readline(), 30)
            return {
                "greeting_s": greeting_s,
                "relayed_s": loop.time() - started if reply.startswith(b"250") else None,
                "refusals": refusals,
            }
        except (ConnectionError, TimeoutError):
            refusals += 1
        finally:
            writer.close()
    return {"greeting_s": greeting_s, "relayed_s": None, "refusals": refusals}


async def load(port: int, args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    tricklers = [Trickler(port, SOURCES[i % len(SOURCES)], args.interval, stop) for i in range(args.connections)]
    tasks = [asyncio.create_task(t.run()) for t in tricklers]
    await asyncio.sleep(10.5)  # the burst's first replies (10 s each at most)
    firsts = [t.first or b"" for t in tricklers]
    burst = {
        "greeted": sum(f.startswith(b"220") for f in firsts),
        "refused_421": sum(f.startswith(b"421") for f in firsts),
        "nothing_within_10s": sum(not f for f in firsts),
    }
    probes = []
    loop = asyncio.get_running_loop()
    end = loop.time() + args.duration
    while loop.time() < end:
        probes.append(await probe(port, 60))
        await asyncio.sleep(args.probe_every)
    stop.set()
    await asyncio.wait(tasks, timeout=args.interval + 5)
    for task in tasks:
        task.cancel()
    greetings = [p["greeting_s"] for p in probes if p["greeting_s"] is not None]
    relayed = [p["relayed_s"] for p in probes if p["relayed_s"] is not None]
    return {
        "burst": burst,
        "probes": probes,
        "probe_greeting_s": {"median": statistics.median(greetings), "max": max(greetings)} if greetings else None,
        "probe_relayed_s": {"median": statistics.median(relayed), "max": max(relayed)} if relayed else None,
        "probes_relayed": f"{len(relayed)}/{len(probes)}",
        "slow_connections_made": sum(t.connections for t in tricklers),
        "slow_connections_cut": sum(t.cut for t in tricklers),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 tricklers, a short run")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between a trickler's bytes")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of probing")
    parser.add_argument("--probe-every", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "slow_clients.json")
    args = parser.parse_args()
    if args.quick:
        args.connections, args.duration = 100, 12.0
    with tempfile.TemporaryDirectory(prefix="sendguard-slow-") as scratch:
        workdir = Path(scratch)
        port, http_port = free_port(), free_port()
        log_path = workdir / "sendguard.log"
        with open(log_path, "wb") as log:
            command = [*sendguard_command(), "serve", "--config", str(SHIPPED_CONFIG)]
            command += ["--listen", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http_port}"]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            wait_for_ready(f"http://127.0.0.1:{http_port}/readyz", process, log_path)
            started = time.monotonic()
            figures = asyncio.run(load(port, args))
            figures["wall_s"] = round(time.monotonic() - started, 1)
            stress_lines = [line for line in log_path.read_text(errors="replace").splitlines() if "stress" in line]
            figures["stress_log_lines"] = len(stress_lines)
        finally:
            stop_process(process)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    burst = figures["burst"]
    print(f"burst of {args.connections}: {burst['greeted']} greeted, {burst['refused_421']} got 421, ", end="")
    print(f"{burst['nothing_within_10s']} nothing within 10 s")
    print(f"normal client, first reply (s): {figures['probe_greeting_s']}")
    print(f"normal client, message relayed (s): {figures['probe_relayed_s']} ({figures['probes_relayed']} probes)")
    print(f"slow connections made {figures['slow_connections_made']}, cut {figures['slow_connections_cut']}")
    print(f"figures in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
