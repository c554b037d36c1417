"""``sendguard queue list|retry|drop``: the retry queue of per-recipient copies and DSNs
(``spool.path`` of the config), read and changed from outside the running proxy.

``list`` prints each row: id, kind, recipient, attempts, next attempt, last reply, age.
``retry`` makes rows due now (the running proxy sends them at its next look, within
``spool.interval``). ``drop`` deletes rows: the copies are then never delivered, and
their senders are not told.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from proxy.config.settings import Settings
from proxy.relay.spool import Spool, SpoolEntry

__all__ = ("add_queue_parser", "run_queue")

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def add_queue_parser(subparsers: Any) -> None:
    """Add ``queue list|retry|drop`` to the ``sendguard`` command's sub-parsers."""
    queue = subparsers.add_parser("queue", help="the retry queue of per-recipient copies and DSNs")
    commands = queue.add_subparsers(dest="queue_command", required=True, metavar="SUBCOMMAND")
    listing = commands.add_parser("list", help="every queued copy and DSN")
    listing.add_argument("--config", required=True, help="YAML config file (its spool.path)")
    listing.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    for name, what in (("retry", "make rows due now"), ("drop", "delete rows (never delivered, nobody told)")):
        command = commands.add_parser(name, help=what)
        command.add_argument("--config", required=True, help="YAML config file (its spool.path)")
        command.add_argument("ids", nargs="*", type=int, metavar="ID", help="row ids (sendguard queue list)")
        command.add_argument("--all", action="store_true", help="every row")


def _when(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _row(entry: SpoolEntry, now: float) -> dict[str, Any]:
    return {
        "id": entry.id,
        "kind": entry.kind,
        "txn": entry.txn_id,
        "sender": entry.sender,
        "recipient": entry.recipient,
        "attempts": entry.attempts,
        "next_attempt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.next_attempt)),
        "last_reply": entry.last_reply,
        "age_seconds": round(entry.age(now), 1),
    }


def print_queue(entries: list[SpoolEntry], *, as_json: bool, out: TextIO) -> None:
    now = time.time()
    if as_json:
        for entry in entries:
            print(json.dumps(_row(entry, now)), file=out)
        return
    if not entries:
        print("the queue is empty", file=out)
        return
    print(f"{'ID':>6}  {'KIND':4}  {'RECIPIENT':32}  {'TRIES':>5}  {'NEXT':>8}  {'AGE':>7}  LAST REPLY", file=out)
    for e in entries:
        due = "now" if e.next_attempt <= now else "in " + _when(e.next_attempt - now)
        print(
            f"{e.id:>6}  {e.kind:4}  {e.recipient:32}  {e.attempts:>5}  {due:>8}  {_when(e.age(now)):>7}  "
            f"{e.last_reply or '-'}",
            file=out,
        )


def run_queue(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    spool = Spool(settings.spool.path)
    if args.queue_command == "list":
        print_queue(spool.list_sync(), as_json=args.json, out=out)
        return EXIT_OK
    if bool(args.ids) == bool(args.all):
        print(f"sendguard queue {args.queue_command}: give row ids or --all (not both)", file=sys.stderr)
        return EXIT_BAD_INPUT
    ids = None if args.all else list(args.ids)
    if args.queue_command == "retry":
        count = spool.retry_sync(ids)
        print(f"{count} row(s) due now; the running proxy sends them at its next look", file=out)
    else:
        count = spool.drop_sync(ids)
        print(f"{count} row(s) dropped", file=out)
    return EXIT_OK
