"""Newsletter throughput: commercial mail to recipients with consent, each recipient's own
one-click List-Unsubscribe link (so one DKIM-signed copy per recipient), in recipients per second.

smtp-source sends a prepared newsletter (``-F``: X-Sendguard-Class: commercial, topic
newsletter, an unsubscribe link in the body, about 4 KB) with RECIPIENTS recipients per message
through ``sendguard serve`` into smtp-sink, which must count one message per recipient (each
copy is its own upstream transaction). sendguard runs the shipped config (bench_config of
relay_throughput.py) plus:

* the ``list_unsubscribe`` policy and an ``unsubscribe:`` section (each recipient's one-click
  link, RFC 8058: the copies);
* a consent store in the run directory with an opt-in (topic newsletter, web form) for every
  recipient smtp-source generates, imported with ``sendguard consent import``;
* DKIM with a fresh RSA-2048 key for the From domain (every copy is signed);
* no blocklist zones (the watch would query the Internet for the DKIM domain);
* ``upstream.copy_concurrency`` per target: ``copies-1`` sends the copies one after another,
  ``copies-default`` as shipped (4 at once); ``copies-default-w2`` is the shipped concurrency
  with ``workers: 2`` (the state store in Redis, as two workers require; the consent store
  stays SQLite, which the workers share).

The targets run interleaved (each round starts with another), medians of ``--repeat`` runs.

    .venv/bin/python bench/newsletter.py                    # 3 rounds, sessions 1 and 10
    .venv/bin/python bench/newsletter.py --quick            # one short round

The JSON goes to bench/results/newsletter.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.relay_throughput import (  # noqa: E402
    CODE_DIR,
    BenchError,
    Sink,
    bench_config,
    find_program,
    free_port,
    machine,
    parse_targets,
    peak_rss_mib,
    run_errors,
    sendguard_command,
    serve_command,
    snapshot_code,
    stop_process,
    tree_cpu_times,
    versions,
    wait_for_ready,
    wait_until_quiet,
    work_directory,
)
from proxy.reputation.dkim import generate_private_key, write_private_key  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: target: (upstream.copy_concurrency, None: as shipped; workers, state in Redis when > 1)
TARGETS = {"copies-1": (1, 1), "copies-default": (None, 1), "copies-default-w2": (None, 2)}
SENDER, DOMAIN, RECIPIENT = "news@shop.example", "shop.example", "sub@bench.example"
BODY_SIZE = 4000


class DelayedReplies:
    """A TCP relay on 127.0.0.1 in front of smtp-sink that holds every byte the sink sends for
    ``delay`` seconds (smtp-sink's own -w takes whole seconds): each SMTP round trip then
    costs what it costs over a network to a real MTA. Runs its own event loop in a thread."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: float) -> None:
        """Copy ``source`` to ``sink``, each chunk ``delay`` after it arrived, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                sink.write(data)
                await sink.drain()
            sink.close()

        task = self.loop.create_task(forward())
        try:
            while data := await source.read(65536):
                queue.put_nowait((self.loop.time() + delay, data))
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(OSError, ConnectionError):
                await task

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, 0.0), self._pipe(up_reader, writer, self.delay), return_exceptions=True
        )

    def start(self) -> int:
        """Listen; returns the port."""
        self._thread.start()
        start = asyncio.start_server(self._connection, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self.loop.call_soon_threadsafe(self._server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def recipients_of(count: int) -> list[str]:
    """The addresses smtp-source -r COUNT -t sub@bench.example generates: COUNTsub@..., down to
    2sub@..., then sub@... itself."""
    return [f"{n}{RECIPIENT}" for n in range(count, 1, -1)] + [RECIPIENT]


def newsletter_file(workdir: Path) -> Path:
    """The message smtp-source sends with -F (it adds CRLF to every line and stuffs dots)."""
    paragraph = (
        "Our winter collection is here: warm boots, wool coats and scarves at 20% off "
        "until Sunday. Order today at https://shop.example/winter and get free delivery.\n"
    )
    body = paragraph * (BODY_SIZE // len(paragraph) + 1)
    text = (
        f"From: Shop News <{SENDER}>\n"
        f"To: Shop subscribers <{SENDER}>\n"
        "Subject: Winter sale: 20% off boots and coats\n"
        "Date: Thu, 03 Dec 2026 10:00:00 +0000\n"
        "Message-ID: <winter-2026@shop.example>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "X-Sendguard-Class: commercial\n"
        "X-Sendguard-Topic: newsletter\n"
        "\n"
        f"{body}\n"
        "Unsubscribe: https://shop.example/unsubscribe\n"
    )
    path = workdir / "newsletter.eml"
    path.write_text(text)
    return path


def newsletter_config(
    workdir: Path, recipients: int, concurrency: int | None, workers: int = 1
) -> tuple[Path, list[str]]:
    """bench_config's shipped config plus consent, one-click links, DKIM RSA-2048; returns the changes."""
    base, changes = bench_config(workdir, audit=True, max_sessions=10, workers=workers, redis=workers > 1)
    config: dict[str, Any] = yaml.safe_load(base.read_text())
    key = workdir / "dkim-rsa.pem"
    if not key.exists():
        write_private_key(key, generate_private_key("rsa-sha256", 2048))
    config["dkim"]["keys"] = [{"domain": DOMAIN, "selector": "s1", "key_file": str(key), "algorithm": "rsa-sha256"}]
    config["stores"]["consent"] = {"backend": "sqlite", "path": str(workdir / "consent.db")}
    config["policies"].append({"name": "list_unsubscribe"})
    config["unsubscribe"] = {
        "enabled": True,
        "base_url": "https://unsubscribe.shop.example",
        "listen": f"127.0.0.1:{free_port()}",
        "keys": [{"id": "k1", "secret": base64.b64encode(os.urandom(32)).decode()}],
        "company": "Shop BV",
        "contact": "privacy@shop.example",
        "topics": [{"id": "newsletter", "nl": "Nieuwsbrief", "en": "Newsletter"}],
    }
    config["dns"]["blocklists"]["zones"] = []
    config["listeners"][0]["max_recipients"] = max(int(config["listeners"][0].get("max_recipients", 500)), recipients)
    if concurrency is not None:
        config["upstream"]["copy_concurrency"] = concurrency
    changes += [
        "dkim.keys: one RSA-2048 key for shop.example",
        "stores.consent: SQLite in the run directory, an opt-in (topic newsletter) for every recipient",
        "policies: + list_unsubscribe; unsubscribe: enabled (each recipient's one-click link)",
        "dns.blocklists.zones: [] (no Internet lookups)",
        f"upstream.copy_concurrency: {concurrency if concurrency is not None else 'as shipped'}",
    ]
    path = workdir / f"newsletter-{concurrency or 'default'}-w{workers}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, changes


def environment(workdir: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(workdir / CODE_DIR)}


def seed_consent(workdir: Path, config: Path, recipients: int) -> None:
    """An opt-in for every address smtp-source generates, through ``sendguard consent import``."""
    csv_path = workdir / "consent.csv"
    rows = ["address,event,topic,sender,method,source"]
    rows += [
        f"{a},opted_in,newsletter,{DOMAIN},web_form,https://shop.example/signup" for a in recipients_of(recipients)
    ]
    csv_path.write_text("\n".join(rows) + "\n")
    completed = subprocess.run(
        [*sendguard_command(), "consent", "import", "--config", str(config), "--quiet", str(csv_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=workdir,
        env=environment(workdir),
    )
    if completed.returncode != 0:
        raise BenchError(f"consent import failed: {completed.stdout}{completed.stderr}")


@dataclass(frozen=True)
class Scenario:
    sessions: int
    delay_ms: int  # added to every reply of the upstream (0: smtp-sink answers at once)
    messages: int

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """``SESSIONS:DELAY_MS:MESSAGES``, e.g. ``1:10:10``."""
        parts = text.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1 or int(parts[2]) < 1:
            raise argparse.ArgumentTypeError(f"expected SESSIONS:DELAY_MS:MESSAGES, got {text!r}")
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))

    @property
    def label(self) -> str:
        return f"sessions={self.sessions} upstream+{self.delay_ms}ms"


# Straight into smtp-sink (the relay's own cost: CPU-bound), and with 10 ms on each upstream
# reply (a nearby MTA: four round trips per copy), where copies in parallel pay off.
FULL_SCENARIOS = (Scenario(1, 0, 30), Scenario(10, 0, 30), Scenario(1, 10, 10), Scenario(10, 10, 30))
QUICK_SCENARIOS = (Scenario(1, 0, 4), Scenario(1, 10, 2))


def run_once(workdir: Path, target: str, scenario: Scenario, recipients: int, quiet_wait: float) -> dict[str, Any]:
    """One timed run: a fresh sink (behind the delay, if any) and sendguard, a warm-up, then
    the scenario's newsletters."""
    sessions, messages = scenario.sessions, scenario.messages
    result: dict[str, Any] = {
        "target": target,
        "sessions": sessions,
        "upstream_delay_ms": scenario.delay_ms,
        "messages": messages,
        "recipients": recipients,
    }
    config, _ = newsletter_config(workdir, recipients, *TARGETS[target])
    sink = Sink(find_program("smtp-sink"), workdir)
    delayed = DelayedReplies(sink.port, scenario.delay_ms / 1000)
    process: subprocess.Popen[bytes] | None = None
    log_path = workdir / f"{target}-{sink.port}.log"
    try:
        upstream_port = sink.port
        if scenario.delay_ms:
            upstream_port = delayed.start()
        port, http_port = free_port(), free_port()
        # The unsubscribe pages need a port of their own each run.
        data = yaml.safe_load(config.read_text())
        data["unsubscribe"]["listen"] = f"127.0.0.1:{free_port()}"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        command = serve_command(config, port, upstream_port, http_port)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=environment(workdir)
            )
        wait_for_ready(f"http://127.0.0.1:{http_port}/readyz", process, log_path)
        source = find_program("smtp-source")
        newsletter = newsletter_file(workdir)

        def send(count: int) -> subprocess.CompletedProcess[bytes]:
            command = [
                source,
                "-s",
                str(sessions),
                "-m",
                str(count),
                "-r",
                str(recipients),
                "-F",
                str(newsletter),
                "-M",
                "bench.example",
                "-f",
                SENDER,
                "-t",
                RECIPIENT,
                f"127.0.0.1:{port}",
            ]
            return subprocess.run(command, capture_output=True, timeout=60 + count * recipients, check=False)

        warmup = max(2, sessions)
        warm = send(warmup)
        if warm.returncode != 0 or sink.wait_delivered(warmup * recipients) != warmup * recipients:
            raise BenchError(f"warm-up failed: exit {warm.returncode}: {warm.stderr.decode(errors='replace')}")
        if quiet_wait > 0:
            result["waited_for_quiet_s"] = wait_until_quiet(quiet_wait)
        user, system = tree_cpu_times(process.pid)  # with workers: the parent and its workers
        started = time.perf_counter()
        completed = send(messages)
        elapsed = time.perf_counter() - started
        user2, system2 = tree_cpu_times(process.pid)
        expected = (warmup + messages) * recipients
        delivered = sink.wait_delivered(expected) - warmup * recipients
        cpu = (user2 - user) + (system2 - system)
        result.update(
            seconds=round(elapsed, 3),
            messages_per_s=round(messages / elapsed, 2),
            recipients_per_s=round(messages * recipients / elapsed, 1),
            delivered_copies=delivered,
            relay_cpu_s=round(cpu, 2),
            relay_cpu_ms_per_recipient=round(1000 * cpu / (messages * recipients), 3),
            relay_cpu_utilisation=round(cpu / elapsed, 2),
            peak_rss_mib=peak_rss_mib(process.pid),
        )
        errors = run_errors(completed, delivered, messages * recipients, "copies")
        result["ok"] = not errors
        if errors:
            result["error"] = "; ".join(errors)
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        result.update(ok=False, error=str(exc))
    finally:
        if process is not None:
            stop_process(process)
        if scenario.delay_ms:
            delayed.stop()
        sink.stop()
    return result


def summarise(runs: list[dict[str, Any]], scenarios: Sequence[Scenario]) -> list[dict[str, Any]]:
    summary = []
    for scenario in scenarios:
        rates: dict[str, float | None] = {}
        for target in TARGETS:
            samples = [
                r["recipients_per_s"]
                for r in runs
                if r["target"] == target
                and (r["sessions"], r["upstream_delay_ms"]) == (scenario.sessions, scenario.delay_ms)
                and r["ok"]
            ]
            rates[target] = round(statistics.median(samples), 1) if samples else None
        one, default, two = rates.get("copies-1"), rates.get("copies-default"), rates.get("copies-default-w2")
        summary.append(
            {
                "sessions": scenario.sessions,
                "upstream_delay_ms": scenario.delay_ms,
                "recipients_per_s": rates,
                "default_vs_one_at_a_time": round(default / one, 3) if one and default else None,
                "w2_vs_w1": round(two / default, 3) if two and default else None,
            }
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Newsletter recipients per second through sendguard, copies 1 vs 4.")
    parser.add_argument("--quick", action="store_true", help="one round of two short scenarios")
    parser.add_argument(
        "--scenario",
        action="append",
        type=Scenario.parse,
        metavar="S:D:M",
        help="sessions:upstream delay ms:newsletters per run; repeatable (default: "
        + ", ".join(f"{s.sessions}:{s.delay_ms}:{s.messages}" for s in FULL_SCENARIOS)
        + ")",
    )
    parser.add_argument("--recipients", type=int, default=50, help="recipients per newsletter (default 50)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported (default 3)")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="wait up to this long for an idle machine")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/newsletter[-quick].json)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)} (default all; copies-default-w2 needs "
        "Redis at $SENDGUARD_BENCH_REDIS, default redis://127.0.0.1:6379/0)",
    )
    args = parser.parse_args(argv)
    scenarios = args.scenario or list(QUICK_SCENARIOS if args.quick else FULL_SCENARIOS)
    repeat = 1 if args.quick else args.repeat
    output = args.output or RESULTS / ("newsletter-quick.json" if args.quick else "newsletter.json")
    if repeat <= 0 or args.recipients <= 0:
        parser.error("--repeat and --recipients must be positive")
    started = datetime.datetime.now(datetime.UTC)
    clock = time.perf_counter()
    runs: list[dict[str, Any]] = []
    targets = parse_targets(parser, args.targets, tuple(TARGETS))
    code_versions = versions()
    try:
        with work_directory(args.keep) as workdir:
            snapshot_code(workdir)
            config, changes = newsletter_config(workdir, args.recipients, None)
            seed_consent(workdir, config, args.recipients)
            for scenario in scenarios:
                for round_number in range(repeat):
                    shift = round_number % len(targets)
                    for target in [*targets[shift:], *targets[:shift]]:
                        run = run_once(workdir, target, scenario, args.recipients, args.quiet_wait)
                        run["round"] = round_number + 1
                        runs.append(run)
                        print(
                            f"{scenario.label:<30} {target:<15} {run.get('recipients_per_s', '-'):>8} rcpt/s "
                            f"cpu {run.get('relay_cpu_ms_per_recipient', '-')} ms/rcpt "
                            f"{'ok' if run['ok'] else 'FAILED: ' + run.get('error', '')[:200]}",
                            flush=True,
                        )
    except BenchError as exc:
        print(f"newsletter: {exc}", file=sys.stderr)
        return 2
    summary = summarise(runs, scenarios)
    print()
    for row, scenario in zip(summary, scenarios, strict=True):
        rates = row["recipients_per_s"]
        print(
            f"{scenario.label:<30} copies 1: {rates['copies-1']} rcpt/s, default: {rates['copies-default']} rcpt/s, "
            f"default w2: {rates['copies-default-w2']} rcpt/s, default / 1 = {row['default_vs_one_at_a_time']}, "
            f"w2 / w1 = {row['w2_vs_w1']}"
        )
    report = {
        "benchmark": "newsletter",
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - clock, 1),
        "ok": all(r["ok"] for r in runs),
        "machine": machine(),
        "versions": code_versions,
        "parameters": {
            "recipients_per_message": args.recipients,
            "scenarios": [
                {"sessions": s.sessions, "upstream_delay_ms": s.delay_ms, "messages": s.messages} for s in scenarios
            ],
            "repeat": repeat,
            "targets": {
                t: {"copy_concurrency": c if c is not None else "as shipped", "workers": w}
                for t, (c, w) in TARGETS.items()
                if t in targets
            },
            "message": f"about {BODY_SIZE} bytes of text/plain, X-Sendguard-Class: commercial, topic newsletter",
            "upstream": "smtp-sink; with a delay, through a TCP relay holding each of its replies that long",
            "sendguard_config": "config/sendguard.yaml with: " + "; ".join(changes),
            "timing": "wall clock of smtp-source; the sink counted one message per recipient",
            "summary_rule": "median recipients/s per scenario and target",
        },
        "command": " ".join(["bench/newsletter.py", *(sys.argv[1:] if argv is None else argv)]),
        "summary": summary,
        "runs": runs,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
