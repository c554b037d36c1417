"""Where sendguard's CPU goes per message: ``sendguard serve`` under cProfile, under load.

sendguard runs as relay_throughput.py runs it (the shipped config, audit log on, a code
snapshot), but started as ``python -m cProfile -o FILE -m proxy serve ...``; smtp-source sends
a warm-up and then ``--messages`` messages (default 4 KB to one recipient over 10 sessions) to
smtp-sink through it; sendguard is stopped with SIGTERM (a clean shutdown, so cProfile writes
its file). The report lists the functions with the most own time and the most cumulative time,
in microseconds per message (the warm-up's share included: its messages are counted).

    .venv/bin/python bench/profile_relay.py                       # 3000 messages, top 25
    .venv/bin/python bench/profile_relay.py --scenario 10:102400:1 --top 40

The profile (pstats) is written to a temporary file unless --output says where; the top lists
go to stdout and, with --json, to a JSON file (bench/results/profile_relay.json is the
committed one). ``--read FILE`` lists an existing profile instead (``--messages`` then says
how many messages it covers).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.relay_throughput import (  # noqa: E402
    CODE_DIR,
    BenchError,
    Load,
    Scenario,
    Sink,
    bench_config,
    find_program,
    free_port,
    send,
    serve_command,
    snapshot_code,
    stop_process,
    wait_for_ready,
    work_directory,
)

WARMUP = 200


def profile(scenario: Scenario, messages: int, workdir: Path, output: Path) -> int:
    """Profile one run; returns the number of messages the profile covers (warm-up included)."""
    snapshot_code(workdir)
    config, _ = bench_config(workdir, audit=True, max_sessions=scenario.sessions)
    sink = Sink(find_program("smtp-sink"), workdir)
    port, http_port = free_port(), free_port()
    profiled = [sys.executable, "-m", "cProfile", "-o", str(output), "-m", "proxy"]
    command = serve_command(config, port, sink.port, http_port, program=profiled)
    log_path = workdir / "sendguard-profiled.log"
    environment = {**os.environ, "PYTHONPATH": str(workdir / CODE_DIR)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=environment)
    try:
        wait_for_ready(f"http://127.0.0.1:{http_port}/readyz", process, log_path)
        load = Load(source=find_program("smtp-source"), sink="", messages=messages, warmup=WARMUP)
        for count in (WARMUP, messages):
            completed = send(load, scenario, port, count)
            if completed.returncode != 0:
                raise BenchError(f"smtp-source failed: {completed.stderr.decode(errors='replace')}")
        if sink.wait_delivered(WARMUP + messages) != WARMUP + messages:
            raise BenchError("smtp-sink did not count every message")
    finally:
        stop_process(process)
        sink.stop()
    if not output.exists():
        raise BenchError(f"sendguard wrote no profile; see {log_path}")
    return WARMUP + messages


def top(stats: pstats.Stats, key: str, count: int, messages: int) -> list[dict[str, Any]]:
    """The ``count`` functions first by ``key`` (tottime or cumtime), in µs per message."""
    rows = []
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in table.items():
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({name})",
                "calls_per_message": round(calls / messages, 2),
                "own_us_per_message": round(1e6 * tottime / messages, 1),
                "cumulative_us_per_message": round(1e6 * cumtime / messages, 1),
            }
        )
    field = "own_us_per_message" if key == "tottime" else "cumulative_us_per_message"
    return sorted(rows, key=lambda row: row[field], reverse=True)[:count]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sendguard serve under cProfile, under smtp-source's load.")
    parser.add_argument("--scenario", type=Scenario.parse, default=Scenario(10, 4096, 1), metavar="S:L:R[:d]")
    parser.add_argument("--messages", type=int, default=3000, help="messages after a warm-up of 200 (default 3000)")
    parser.add_argument("--top", type=int, default=25, help="functions listed per table (default 25)")
    parser.add_argument(
        "--output", type=Path, default=Path(tempfile.gettempdir()) / "sendguard-profile_relay.prof", help="pstats file"
    )
    parser.add_argument("--read", type=Path, help="list this existing profile instead of making one")
    parser.add_argument("--json", type=Path, help="also write the tables as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)
    if args.read is not None:
        args.output, messages = args.read, args.messages
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        try:
            with work_directory(args.keep) as workdir:
                messages = profile(args.scenario, args.messages, workdir, args.output.resolve())
        except BenchError as exc:
            print(f"profile_relay: {exc}", file=sys.stderr)
            return 2
    stats = pstats.Stats(str(args.output))
    total = stats.total_tt  # type: ignore[attr-defined]
    tables = {key: top(stats, key, args.top, messages) for key in ("tottime", "cumtime")}
    print(f"{messages} messages, {1e3 * total / messages:.3f} ms of profiled CPU per message (cProfile inflates it)")
    for key, rows in tables.items():
        print(f"\nby {'own' if key == 'tottime' else 'cumulative'} time, µs per message:")
        for row in rows:
            print(
                f"{row['own_us_per_message']:>9.1f} {row['cumulative_us_per_message']:>9.1f} "
                f"{row['calls_per_message']:>7.2f}  {row['function']}"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "scenario": args.scenario.as_dict(),
                    "messages": messages,
                    "profiled_ms_per_message": round(1e3 * total / messages, 3),
                    **tables,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
