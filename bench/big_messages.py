"""Big messages: sendguard's memory for one, 5 and 20 concurrent 25 MB messages (issue 15, part 3).

A real ``sendguard serve`` process (the shipped config/sendguard.yaml with its policies, which
run without external services, ``max_message_size: 30MB``) relays into an upstream that is not
sendguard: Postfix's ``smtp-sink`` (the SMTP upstream path, as in production; the sink's memory
is its own process) or, with ``--upstream maildir`` or when smtp-sink is missing, a Maildir in
the run directory (sendguard writes the files itself, so that write is then measured too).

Every scenario gets a fresh sendguard process, warmed up with one small message. Then N client
threads in this process each send one message at once, with smtplib for the envelope and the
message bytes written straight to the socket (already CRLF, no line starting with "."), so
the client keeps one shared copy. The message is a realistic mix: a transactional text part
and a base64 PDF-like attachment, so the parser and the classifier have work to do.

For the sendguard process it records: RSS before, the peak RSS during the load (VmRSS of
/proc/PID/status sampled every 50 ms from a thread, and VmHWM, the kernel's high-water mark),
RSS 5 s after the last reply, the peak growth per message, and that growth divided by the
message size (the issue's target: at most 2). Also whether every message got 250 and was
delivered (smtp-sink's counter, or the files in the Maildir).

    .venv/bin/python bench/big_messages.py            # 1, 5 and 20 concurrent 25 MB messages
    .venv/bin/python bench/big_messages.py --quick    # 1 and 5 concurrent 5 MB messages
    .venv/bin/python bench/big_messages.py --dkim     # the same with DKIM signing on (RSA-2048 and
                                                      # Ed25519 keys for the sender's domain)

The table goes to stdout, the figures to bench/results/big_messages.json (``--out``; with
``--dkim``, big_messages_dkim.json). Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import random
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.relay_throughput import (  # noqa: E402
    BenchError,
    Sink,
    bench_config,
    find_program,
    free_port,
    machine,
    sendguard_command,
    snapshot_code,
    stop_process,
    versions,
    wait_for_ready,
    work_directory,
)

RESULTS = ROOT / "bench" / "results"
MIB = 1024 * 1024
FULL_SIZE, QUICK_SIZE = 25 * MIB, 5 * MIB
FULL_CONCURRENCY, QUICK_CONCURRENCY = (1, 5, 20), (1, 5)
SAMPLE_INTERVAL = 0.05  # seconds between VmRSS samples
SETTLE = 5.0  # seconds after the load before "RSS after"
SCENARIO_TIMEOUT = 300.0  # seconds for all messages of one scenario
SOCKET_TIMEOUT = 180.0  # seconds for one SMTP command or write
TARGET_RATIO = 2.0  # issue 15: peak RSS growth per concurrent message at most 2x its size
SENDER, RECIPIENT = "orders@shop.example", "customer@example.net"


# ---- the message --------------------------------------------------------------------------------


def make_message(size: int, seed: int = 15) -> bytes:
    """A transactional message of about ``size`` bytes: a text part and a base64 attachment, CRLF."""
    text = (
        "Dear customer,\r\n\r\nThank you for your order 48213. Your invoice is attached as a PDF.\r\n"
        "The total of EUR 129.95 was paid by iDEAL on 2 March; the parcel ships within two working days\r\n"
        "and you will receive a tracking number by e-mail.\r\n\r\nKind regards,\r\nShop Example customer service\r\n"
    )
    head = (
        f"From: Shop Example <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        "Subject: Your invoice for order 48213\r\n"
        "Date: Mon, 02 Mar 2026 10:00:00 +0100\r\n"
        "Message-ID: <invoice-48213@shop.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="=_bench_boundary"\r\n'
        "\r\n"
        "--=_bench_boundary\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        f"{text}\r\n"
        "--=_bench_boundary\r\n"
        'Content-Type: application/pdf; name="invoice-48213.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="invoice-48213.pdf"\r\n\r\n'
    ).encode()
    tail = b"\r\n--=_bench_boundary--\r\n"
    room = max(0, size - len(head) - len(tail))
    raw_len = room // 78 * 57  # 76 base64 characters + CRLF per 57 raw bytes
    raw = random.Random(seed).randbytes(raw_len)  # incompressible, like a real attachment
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return head + encoded + tail


# ---- /proc --------------------------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


class RssSampler(threading.Thread):
    """Samples VmRSS of a process every SAMPLE_INTERVAL seconds until stopped; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            value = status_kib(self.pid, "VmRSS")
            if value is not None:
                self.peak_kib = max(self.peak_kib, value)
                self.samples += 1
            self._done.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._done.set()
        self.join(5)


# ---- sending ------------------------------------------------------------------------------------


@dataclass
class Sent:
    code: int | None
    reply: str
    seconds: float


def send_one(port: int, message: bytes, deadline: float) -> Sent:
    """One SMTP session, one message; the bytes go to the socket as they are (no copy)."""
    started = time.perf_counter()
    timeout = max(5.0, min(SOCKET_TIMEOUT, deadline - time.monotonic()))
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example", timeout=timeout) as smtp:
            smtp.ehlo()
            code, text = smtp.mail(SENDER, [f"SIZE={len(message)}"] if smtp.has_extn("size") else [])
            if code != 250:
                return Sent(code, text.decode(errors="replace"), time.perf_counter() - started)
            code, text = smtp.rcpt(RECIPIENT)
            if code not in (250, 251):
                return Sent(code, text.decode(errors="replace"), time.perf_counter() - started)
            code, text = smtp.docmd("DATA")
            if code != 354:
                return Sent(code, text.decode(errors="replace"), time.perf_counter() - started)
            smtp.send(message)  # already CRLF, no line starts with "."
            smtp.send(b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n")
            code, text = smtp.getreply()
            return Sent(code, text.decode(errors="replace"), time.perf_counter() - started)
    except (OSError, smtplib.SMTPException) as exc:
        return Sent(None, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)


# ---- sendguard and its upstream -----------------------------------------------------------------


class MaildirTarget:
    """The upstream as a Maildir in the run directory; delivered = files in new/."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.path = workdir / f"maildir-{name}"
        self.address = f"maildir:{self.path}"

    def delivered(self) -> int:
        new = self.path / "new"
        return len(list(new.iterdir())) if new.exists() else 0

    def wait_delivered(self, expected: int) -> int:
        return self.delivered()  # written and fsync'd before the 250

    def stop(self) -> None:
        return None


class SinkTarget:
    def __init__(self, workdir: Path) -> None:
        self.sink = Sink(find_sink(), workdir)
        self.address = f"127.0.0.1:{self.sink.port}"

    def delivered(self) -> int:
        return self.sink.delivered()

    def wait_delivered(self, expected: int) -> int:
        return self.sink.wait_delivered(expected)

    def stop(self) -> None:
        self.sink.stop()


def find_sink() -> str:
    return find_program("smtp-sink")


def write_config(workdir: Path, max_sessions: int, *, dkim: bool = False) -> tuple[Path, list[str]]:
    """relay_throughput's benchmark config (shipped config, tls none, audit in the run dir) plus ours."""
    path, changes = bench_config(workdir, audit=True, max_sessions=max_sessions)
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    listener = config["listeners"][0]
    listener["max_message_size"] = "30MB"
    changes.append("listeners[0].max_message_size: 30MB")
    config["spool"]["path"] = str(workdir / "spool.db")
    config["stores"]["consent"]["path"] = str(workdir / "consent.db")
    changes.append("spool.path, stores.consent.path: files in the run directory")
    config["reload"] = {"watch": False, "interval": "2s"}
    changes.append("reload.watch: false")
    if dkim:
        from proxy.reputation.dkim import generate_private_key, write_private_key

        keys = []
        for algorithm, selector in (("rsa-sha256", "rsa2026"), ("ed25519-sha256", "ed2026")):
            path = workdir / f"dkim-{selector}.pem"
            write_private_key(path, generate_private_key(algorithm, 2048))  # type: ignore[arg-type]
            keys.append(
                {"domain": SENDER.split("@")[1], "selector": selector, "key_file": str(path), "algorithm": algorithm}
            )
        config["dkim"] = {"keys": keys}
        changes.append("dkim.keys: RSA-2048 and Ed25519 for the sender's domain (each message signed twice)")
    out = workdir / "sendguard-big.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out, changes


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path


def start_sendguard(config_path: Path, upstream: str, workdir: Path, name: str) -> Running:
    port, http_port = free_port(), free_port()
    log_path = workdir / f"sendguard-{name}.log"
    command = [
        *sendguard_command(),
        "serve",
        "--config",
        str(config_path),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream,
        "--http",
        f"127.0.0.1:{http_port}",
    ]
    environment = dict(os.environ)
    environment["PYTHONPATH"] = str(workdir / "code")  # the snapshot, ahead of the editable install
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=environment)
    try:
        wait_for_ready(f"http://127.0.0.1:{http_port}/readyz", process, log_path)
    except BenchError:
        stop_process(process)
        raise
    return Running(process, port, log_path)


# ---- one scenario -------------------------------------------------------------------------------


def run_scenario(
    concurrent: int, message: bytes, workdir: Path, config_path: Path, upstream_kind: str
) -> dict[str, Any]:
    name = f"c{concurrent}"
    result: dict[str, Any] = {"concurrent": concurrent, "message_bytes": len(message), "upstream": upstream_kind}
    target: MaildirTarget | SinkTarget = (
        MaildirTarget(workdir, name) if upstream_kind == "maildir" else SinkTarget(workdir)
    )
    running: Running | None = None
    try:
        running = start_sendguard(config_path, target.address, workdir, name)
        pid = running.process.pid
        warm = send_one(running.port, make_message(20_000, seed=1), time.monotonic() + 60)
        if warm.code != 250:
            raise BenchError(f"warm-up message refused: {warm.code} {warm.reply}")
        target.wait_delivered(1)
        time.sleep(1.0)
        before = status_kib(pid, "VmRSS")
        hwm_before = status_kib(pid, "VmHWM")
        sampler = RssSampler(pid)
        sampler.start()
        deadline = time.monotonic() + SCENARIO_TIMEOUT
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrent) as pool:
            futures = [pool.submit(send_one, running.port, message, deadline) for _ in range(concurrent)]
            sent = [f.result(timeout=SCENARIO_TIMEOUT + 30) for f in futures]
        elapsed = time.perf_counter() - started
        time.sleep(0.2)
        sampler.stop()
        hwm = status_kib(pid, "VmHWM")
        delivered = target.wait_delivered(1 + concurrent) - 1
        time.sleep(SETTLE)
        after = status_kib(pid, "VmRSS")
        peak_kib = max(sampler.peak_kib, hwm or 0)
        growth_kib = peak_kib - (before or 0)
        per_message = growth_kib * 1024 / concurrent
        accepted = sum(1 for s in sent if s.code == 250)
        result.update(
            seconds=round(elapsed, 2),
            rss_before_mib=mib(before),
            peak_rss_sampled_mib=mib(sampler.peak_kib),
            peak_rss_hwm_mib=mib(hwm),
            hwm_before_load_mib=mib(hwm_before),
            peak_rss_mib=mib(peak_kib),
            rss_after_mib=mib(after),
            rss_after_growth_mib=mib((after or 0) - (before or 0)),
            samples=sampler.samples,
            peak_growth_mib=mib(growth_kib),
            peak_growth_per_message_mib=round(per_message / MIB, 1),
            growth_ratio_to_size=round(per_message / len(message), 2),
            target_met=per_message / len(message) <= TARGET_RATIO,
            accepted=accepted,
            delivered=delivered,
            all_delivered=accepted == concurrent and delivered == concurrent,
            replies=sorted({f"{s.code} {s.reply[:120]}" for s in sent if s.code != 250}),
        )
        result["ok"] = result["all_delivered"]
    except (BenchError, OSError, TimeoutError) as exc:
        result.update(ok=False, error=str(exc))
    finally:
        if running is not None:
            stop_process(running.process)
            if not result.get("ok"):
                with contextlib.suppress(OSError):
                    result["log_tail"] = running.log_path.read_text(errors="replace").splitlines()[-5:]
        target.stop()
    return result


# ---- the whole benchmark ------------------------------------------------------------------------


def _cell(value: Any, width: int) -> str:
    return ("-" if value is None else str(value)).rjust(width)


def print_table(runs: list[dict[str, Any]]) -> None:
    print(
        f"{'concurrent':>10}{'size MiB':>9}{'before':>8}{'peak':>8}{'growth':>8}{'per msg':>9}"
        f"{'x size':>8}{'after':>8}{'delivered':>11}{'seconds':>9}  target <= {TARGET_RATIO:g}x"
    )
    for run in runs:
        if not run.get("ok") and "peak_rss_mib" not in run:
            print(f"{run['concurrent']:>10}  FAILED: {run.get('error', '')[:200]}")
            continue
        print(
            f"{run['concurrent']:>10}{run['message_bytes'] / MIB:>9.1f}{_cell(run['rss_before_mib'], 8)}"
            f"{_cell(run['peak_rss_mib'], 8)}{_cell(run['peak_growth_mib'], 8)}"
            f"{_cell(run['peak_growth_per_message_mib'], 9)}{_cell(run['growth_ratio_to_size'], 8)}"
            f"{_cell(run['rss_after_mib'], 8)}{run['delivered']:>7}/{run['concurrent']:<3}{_cell(run['seconds'], 9)}"
            f"  {'met' if run['target_met'] else 'NOT met'}"
        )
    print("(MiB; RSS of the sendguard process; 'after' is 5 s after the last reply)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 and 5 concurrent 5 MB messages")
    parser.add_argument("--out", type=Path, help="the JSON file (default bench/results/big_messages[_dkim].json)")
    parser.add_argument(
        "--upstream",
        choices=("auto", "sink", "maildir"),
        default="auto",
        help="smtp-sink (the SMTP path) or a Maildir in the run directory; auto: smtp-sink when installed",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directory (config, logs)")
    parser.add_argument("--dkim", action="store_true", help="DKIM signing on: an RSA-2048 and an Ed25519 key")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    size = QUICK_SIZE if args.quick else FULL_SIZE
    concurrency = QUICK_CONCURRENCY if args.quick else FULL_CONCURRENCY
    upstream = args.upstream
    if upstream == "auto":
        try:
            find_sink()
            upstream = "sink"
        except BenchError:
            upstream = "maildir"
    message = make_message(size)
    started = datetime.datetime.now(datetime.UTC)
    runs: list[dict[str, Any]] = []
    with work_directory(args.keep) as workdir:
        snapshot_code(workdir)
        config_path, changes = write_config(workdir, max(concurrency), dkim=args.dkim)
        for concurrent in concurrency:
            runs.append(run_scenario(concurrent, message, workdir, config_path, upstream))
    print_table(runs)
    report = {
        "benchmark": "big_messages",
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "dkim": args.dkim,
        "ok": all(r.get("ok") for r in runs),
        "target": f"peak RSS growth per concurrent message <= {TARGET_RATIO:g} x its size (issue 15)",
        "machine": machine(),
        "versions": versions(),
        "parameters": {
            "message_bytes": len(message),
            "message": "text/plain part (transactional) + base64 attachment of random bytes, CRLF",
            "concurrency": list(concurrency),
            "upstream": upstream,
            "sendguard_config": "config/sendguard.yaml with: " + "; ".join(changes),
            "sampling": f"VmRSS every {SAMPLE_INTERVAL * 1000:.0f} ms from a thread, and VmHWM; "
            "a fresh sendguard per scenario, warmed up with one 20 kB message",
            "rss_after": f"VmRSS {SETTLE:g} s after the last reply",
        },
        "runs": runs,
    }
    out: Path = args.out or RESULTS / ("big_messages_dkim.json" if args.dkim else "big_messages.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {out}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
