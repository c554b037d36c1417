"""Memory over a long run: sendguard's resident set while it relays many small messages.

One ``sendguard serve`` (the shipped config, as bench/relay_throughput.py runs it: audit log on)
between smtp-source and smtp-sink relays ``--messages`` messages (default 100,000) of 4 KB to
one recipient over 10 sessions. Every ``--interval`` seconds the process's VmRSS
(/proc/PID/status) is sampled with the number of messages smtp-sink has counted so far. Flat
means the median RSS of the last tenth of the samples is within a few percent of the first
tenth's (after a warm-up that fills the upstream pool and the caches).

    .venv/bin/python bench/soak.py                     # 100,000 messages (about 5 minutes here)
    .venv/bin/python bench/soak.py --messages 5000     # a short one

The JSON goes to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.relay_throughput import (  # noqa: E402
    BenchError,
    Load,
    Scenario,
    Sink,
    cpu_seconds,
    find_program,
    machine,
    peak_rss_mib,
    send,
    snapshot_code,
    start_relay,
    versions,
    work_directory,
)

RESULTS = ROOT / "bench" / "results"
SCENARIO = Scenario(10, 4096, 1)
DEFAULT_WARMUP = 2000  # messages before the first sample: the pool, the caches and the allocator settle


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise BenchError(f"no VmRSS for process {pid}")


def decile_medians(values: list[float]) -> tuple[float, float]:
    """Median of the first and of the last tenth of the samples (at least one each)."""
    tenth = max(1, len(values) // 10)
    return statistics.median(values[:tenth]), statistics.median(values[-tenth:])


def soak(messages: int, interval: float, workdir: Path, warmup: int = DEFAULT_WARMUP) -> dict[str, Any]:
    source, sink_program = find_program("smtp-source"), find_program("smtp-sink")
    load = Load(source=source, sink=sink_program, messages=messages, warmup=warmup)
    snapshot_code(workdir)
    sink = Sink(sink_program, workdir)
    relay = start_relay("sendguard", sink, workdir, SCENARIO.sessions)
    assert relay is not None
    pid = relay.process.pid
    samples: list[dict[str, float]] = []
    try:
        warm = send(load, SCENARIO, relay.port, warmup)
        if warm.returncode != 0 or sink.wait_delivered(warmup) != warmup:
            raise BenchError(f"warm-up failed: {warm.stderr.decode(errors='replace')}")
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        command = load.command(SCENARIO, relay.port, messages)
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as running:
            while running.poll() is None:
                samples.append(
                    {
                        "t_s": round(time.perf_counter() - started, 1),
                        "messages": sink.delivered() - warmup,
                        "rss_mib": rss_mib(pid),
                    }
                )
                time.sleep(interval)
            error = running.stderr.read().decode(errors="replace") if running.stderr else ""
        elapsed = time.perf_counter() - started
        delivered = sink.wait_delivered(warmup + messages) - warmup
        samples.append({"t_s": round(elapsed, 1), "messages": delivered, "rss_mib": rss_mib(pid)})
        cpu = cpu_seconds(pid) - cpu_before
        first, last = decile_medians([s["rss_mib"] for s in samples])
        return {
            "ok": running.returncode == 0 and delivered == messages,
            "error": error.strip() or None,
            "messages": messages,
            "delivered": delivered,
            "seconds": round(elapsed, 1),
            "messages_per_s": round(messages / elapsed, 1),
            "relay_cpu_ms_per_message": round(1000 * cpu / messages, 3),
            "rss_first_decile_median_mib": first,
            "rss_last_decile_median_mib": last,
            "rss_last_vs_first": round(last / first, 3),
            "rss_min_mib": min(s["rss_mib"] for s in samples),
            "rss_max_mib": max(s["rss_mib"] for s in samples),
            "peak_rss_mib": peak_rss_mib(pid),
            "samples": samples,
        }
    finally:
        relay.close()
        sink.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sendguard's RSS over a long run of small messages.")
    parser.add_argument("--messages", type=int, default=100_000, help="messages after the warm-up (default 100000)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed messages first (default 2000)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples (default 1)")
    parser.add_argument("--output", type=Path, default=RESULTS / "soak.json", help="JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)
    if args.messages <= 0 or args.interval <= 0 or args.warmup <= 0:
        parser.error("--messages, --warmup and --interval must be positive")
    started = datetime.datetime.now(datetime.UTC)
    code_versions = versions()
    try:
        with work_directory(args.keep) as workdir:
            result = soak(args.messages, args.interval, workdir, args.warmup)
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    print(
        f"{result['delivered']}/{result['messages']} messages in {result['seconds']} s "
        f"({result['messages_per_s']} msg/s, {result['relay_cpu_ms_per_message']} ms CPU each); RSS median "
        f"first tenth {result['rss_first_decile_median_mib']} MiB, last tenth {result['rss_last_decile_median_mib']} "
        f"MiB ({result['rss_last_vs_first']}x), range {result['rss_min_mib']}-{result['rss_max_mib']} MiB"
    )
    report = {
        "benchmark": "soak",
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": code_versions,
        "parameters": {
            "scenario": SCENARIO.as_dict(),
            "warmup_messages": args.warmup,
            "interval_s": args.interval,
            "sendguard_config": "config/sendguard.yaml as bench/relay_throughput.py changes it (audit log on)",
            "rule": "flat: the last tenth's median RSS within a few percent of the first tenth's",
        },
        "command": " ".join(["bench/soak.py", *(sys.argv[1:] if argv is None else argv)]),
        **result,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.output}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
