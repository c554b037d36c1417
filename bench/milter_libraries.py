"""Milter protocol libraries side by side, and sendguard's milter mode.

Each target is a milter process on 127.0.0.1; Debian's ``miltertest`` drives it with the
same Lua script: N transactions, each on a new connection (Postfix opens one milter
connection per SMTP session), each with connect, HELO, MAIL, RCPT, six header fields, a
body, end of message, and one header inserted by the milter at end of message. Targets:

* ``pymilter``: pymilter 1.0.5 over Sendmail's libmilter (C), accept and insert a field;
* ``pymilter-nodelay``: the same with TCP_NODELAY on the listening socket, as ``sendguard
  milter`` sets it (``proxy.milter.server.no_delay``);
* ``purepythonmilter``: purepythonmilter (pure Python, asyncio), the same (needs
  ``--ppm-python``: a Python that has it, e.g. a throwaway venv; not a project dependency);
* ``sendguard``: ``sendguard milter`` (pymilter) with required_headers, the audit log and
  the Received field: the whole pipeline per message.

Rounds alternate the order of the targets (the machine is shared and noisy); the median per
target is reported, in messages per second, with the ratios.

    .venv/bin/python bench/milter_libraries.py [--messages 300] [--rounds 3] [--ppm-python PATH] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

PYMILTER = """
import sys, Milter
class M(Milter.Base):
    def connect(self, hostname, family, hostaddr): return Milter.CONTINUE
    def hello(self, name): return Milter.CONTINUE
    def envfrom(self, sender, *params): return Milter.CONTINUE
    def envrcpt(self, recipient, *params): return Milter.CONTINUE
    def header(self, name, value): return Milter.CONTINUE
    def eoh(self): return Milter.CONTINUE
    def body(self, chunk): return Milter.CONTINUE
    def eom(self):
        self.addheader("X-Bench", "yes", 0)
        return Milter.ACCEPT
Milter.factory = M
Milter.set_flags(Milter.ADDHDRS)
if len(sys.argv) > 2:  # TCP_NODELAY on the listening socket, as sendguard milter sets it
    from proxy.milter.server import no_delay
    _open = Milter.milter.opensocket
    def opensocket(rmsock):
        result = _open(rmsock)
        no_delay("inet:%s@127.0.0.1" % sys.argv[1])
        return result
    Milter.milter.opensocket = opensocket
Milter.runmilter("bench", "inet:%s@127.0.0.1" % sys.argv[1], timeout=60)
"""

PUREPYTHONMILTER = """
import sys, logging
from purepythonmilter import PurePythonMilter, Continue, Accept, InsertHeader
async def on_any(cmd) -> Continue: return Continue()
on_header = on_any
async def on_eoh(cmd) -> Continue: return Continue()
async def on_body(cmd) -> Continue: return Continue()
async def on_eom(cmd) -> Accept:
    return Accept(manipulations=[InsertHeader(headername="X-Bench", headertext="yes", index=0)])
logging.disable(logging.CRITICAL)
PurePythonMilter(name="bench", hook_on_connect=on_any, hook_on_helo=on_any, hook_on_mail_from=on_any,
    hook_on_rcpt_to=on_any, hook_on_header=on_header, hook_on_end_of_headers=on_eoh,
    hook_on_body_chunk=on_body, hook_on_end_of_message=on_eom, can_add_headers=True,
).run_server(host="127.0.0.1", port=int(sys.argv[1]))
"""

LUA = """
local ok, err = pcall(function()
for i = 1, {count} do
  local conn = mt.connect("inet:{port}@127.0.0.1")
  if conn == nil then error("no connection") end
  mt.conninfo(conn, "client.example.test", "127.0.0.9")
  mt.helo(conn, "client.example.test")
  mt.mailfrom(conn, "<alice@example.com>")
  mt.rcptto(conn, "<bob@example.org>")
  mt.header(conn, "From", "Alice <alice@example.com>")
  mt.header(conn, "To", "bob@example.org")
  mt.header(conn, "Subject", "Bench " .. i)
  mt.header(conn, "Date", "Sun, 29 Nov 2026 10:00:00 +0000")
  mt.header(conn, "Message-ID", "<" .. i .. "@example.com>")
  mt.header(conn, "MIME-Version", "1.0")
  mt.eoh(conn)
  mt.bodystring(conn, "Just a test message, a few lines long.\\r\\nSecond line.\\r\\n")
  mt.eom(conn)
  if mt.getreply(conn) ~= SMFIR_ACCEPT then error("not accepted") end
  if not mt.eom_check(conn, MT_HDRINSERT) then error("no field inserted") end
  mt.disconnect(conn)
end
end)
if not ok then print("FAILED: " .. tostring(err)); os.exit(1) end
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"milter exited {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("milter never listened")


def start(target: str, port: int, work: Path, ppm_python: str | None) -> subprocess.Popen[bytes]:
    if target == "pymilter":
        command = [sys.executable, "-c", PYMILTER, str(port)]
    elif target == "pymilter-nodelay":
        command = [sys.executable, "-c", PYMILTER, str(port), "nodelay"]
    elif target == "purepythonmilter":
        assert ppm_python is not None
        command = [ppm_python, "-c", PUREPYTHONMILTER, str(port)]
    else:
        config = {
            "listeners": [{"name": "local", "address": "127.0.0.1:0"}],
            "users_file": str(work / "users"),
            "upstream": {"address": "maildir:" + str(work / "maildir")},
            "policies": [{"name": "required_headers"}],
            "audit": {"path": str(work / "audit.jsonl")},
            "spool": {"path": str(work / "spool.db")},
            "reload": {"watch": False},
            "logging": {"format": "json", "level": "warning"},
        }
        path = work / "sendguard.yaml"
        path.write_text(yaml.safe_dump(config))
        sendguard = str(Path(sys.executable).parent / "sendguard")
        command = [sendguard, "milter", "--config", str(path), "--listen", f"inet:127.0.0.1:{port}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, process)
    return process


def one_run(target: str, count: int, work: Path, ppm_python: str | None) -> float:
    port = free_port()
    process = start(target, port, work, ppm_python)
    try:
        script = work / f"{target}.lua"
        script.write_text(LUA.format(count=count, port=port))
        started = time.perf_counter()
        done = subprocess.run(["miltertest", "-s", str(script)], capture_output=True, text=True, timeout=600)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{target}: miltertest failed: {done.stdout}{done.stderr}")
        return count / elapsed
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ppm-python", help="a Python with purepythonmilter installed")
    parser.add_argument("--quick", action="store_true", help="30 messages, one round (a smoke run)")
    parser.add_argument("--out", "--output", dest="output", help="where the JSON goes (default: bench/results/)")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds = 30, 1
    output = args.output or str(ROOT / "bench" / "results" / f"milter_libraries{'-quick' if args.quick else ''}.json")
    if shutil.which("miltertest") is None:
        print("miltertest is missing (Debian package miltertest; scripts/install-test-tools)", file=sys.stderr)
        return 2
    targets = ["pymilter", "pymilter-nodelay", "sendguard"] + (["purepythonmilter"] if args.ppm_python else [])
    rates: dict[str, list[float]] = {t: [] for t in targets}
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        for index in range(args.rounds):
            order = targets[index % len(targets) :] + targets[: index % len(targets)]
            for target in order:
                rates[target].append(one_run(target, args.messages, work, args.ppm_python))
                print(f"round {index + 1} {target}: {rates[target][-1]:.0f} msg/s", flush=True)
    medians = {t: statistics.median(v) for t, v in rates.items()}
    base = medians["pymilter"]
    for target, value in medians.items():
        print(f"{target:18} {value:7.0f} msg/s  {value / base:5.2f}x pymilter")
    result = {
        "benchmark": "milter_libraries",
        "quick": args.quick,
        "messages_per_run": args.messages,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "rates": rates,
        "median_msgs_per_s": medians,
        "ratio_to_pymilter": {t: v / base for t, v in medians.items()},
    }
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
