"""``sendguard consent``: record, import, export and inspect consent in the configured store.

Every command opens the store named by ``stores.consent`` in the config file (SQLite
``var/consent.db`` when the section is absent). ``show`` judges with the soft opt-in scope of
the config's ``consent`` policy, so it answers as the proxy would.

Exit codes: 0 done, 2 bad input or config (nothing was written), 3 the store is unreachable.
Runnable alone as ``python -m proxy.cli.consent --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from policies.consent import ConsentPolicy
from proxy.schema import ConfigError, ConfigIssue, Converter, compose, is_invalid
from proxy.stores.consent import (
    ADDRESS,
    CSV_COLUMNS,
    CSV_EXPORT_ONLY,
    METHODS,
    NO_SOFT_OPT_IN,
    OPTED_IN,
    OPTED_OUT,
    SUPPRESSED,
    Basis,
    ConsentEvent,
    ConsentInputError,
    ConsentStore,
    ConsentStoreConfig,
    ConsentStoreError,
    CsvProblem,
    SoftOptInRules,
    event_to_row,
    format_time,
    iter_csv,
    new_event,
    open_consent_store,
    parse_subject,
    parse_time,
)

__all__ = ("add_consent_parser", "load_consent_config", "main", "run_consent", "run_consent_command")

EXIT_OK, EXIT_BAD_INPUT, EXIT_STORE_DOWN = 0, 2, 3

IMPORT_HELP = """\
CSV columns (first line names them; only address and event are required):
  address           user@example.com, or @example.com for everyone at a domain (B2B)
  event             opted_in | customer | opted_out | suppressed | unsuppressed
  at                when it happened, ISO 8601 (2024-05-01 or 2024-05-01T10:00:00Z; no offset = UTC);
                    for customer: the date of the sale; default: now
  topic             newsletter, offers ... or * for every topic (default *)
  sender            the From domain that holds the relation, or * (customer: required)
  method            opted_in: web_form double_opt_in paper api admin import
                    customer: sale api admin import (default sale)
                    opted_out: one_click link reply complaint preference_center admin api import
                    suppressed: hard_bounce complaint manual api import
  source            where the proof lives: form URL, system, paper archive reference
  ip, user_agent    of the opt-in, where known
  text_version      version of the consent text agreed to
  confirmed_at      double opt-in: when the confirmation link was followed (without it: pending)
  relation          customer: order or customer number
  product_category  customer: what was bought (matched against soft_opt_in.topics)
  objection_offered customer: yes or no - was the chance to object given when the address was collected
  reason            suppressed/unsuppressed (required), opted_out (optional)
  upstream_reply    suppressed after a bounce: the upstream's reply
  note              free text
  id, recorded_at   written by export; id is ignored, recorded_at only kept with --keep-recorded-at
Every line is checked first and every problem is reported with its line number; the file is
imported in one transaction, all of it or nothing.
"""


# ---- config -------------------------------------------------------------------------------------


def load_consent_config(path: str) -> tuple[ConsentStoreConfig, SoftOptInRules]:
    """``stores.consent`` and the first ``consent`` policy's soft opt-in scope from a config file.

    Only these two parts are read, so the consent commands work on a host where, say, the
    listeners' TLS files are missing.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(path, None, "", f"cannot read the file: {exc.strerror or exc}")]) from exc
    node = compose(text, path)
    conv = Converter(path)
    store_config = ConsentStoreConfig()
    rules = NO_SOFT_OPT_IN
    top = conv.mapping_items(node, "") if node is not None else []
    for key, _, value in top or []:
        if key == "stores":
            for store_key, _, store_node in conv.mapping_items(value, "stores") or []:
                if store_key == "consent":
                    converted = conv.dataclass(store_node, ConsentStoreConfig, "stores.consent")
                    if not is_invalid(converted):
                        store_config = converted
        elif key == "policies" and isinstance(value, yaml.SequenceNode):
            for index, entry in enumerate(value.value):
                items = conv.mapping_items(entry, f"policies[{index}]") or []
                names = {k: v for k, _, v in items}
                name_node = names.get("name")
                if not isinstance(name_node, yaml.ScalarNode) or name_node.value != ConsentPolicy.name:
                    continue
                option_names = set(ConsentPolicy.Options.__dataclass_fields__)
                others = frozenset(k for k in names if k not in option_names)
                options = conv.dataclass(entry, ConsentPolicy.Options, f"policies[{index}]", skip=others)
                if not is_invalid(options):
                    rules = options.soft_opt_in.rules()
                break
    if conv.issues:
        raise ConfigError(conv.issues)
    return store_config, rules


# ---- parser --------------------------------------------------------------------------------------


def add_consent_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``consent`` and its commands to the ``sendguard`` sub-command set."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "consent", help="consent records: import, export, show, add, revoke, suppress"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, help="YAML config file (its stores.consent section)")
    commands = parser.add_subparsers(dest="consent_command", required=True, metavar="SUBCOMMAND")

    imp = commands.add_parser(
        "import",
        parents=[common],
        help="import a CSV file, all or nothing",
        description=IMPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("file", help="the CSV file (UTF-8; - for standard input)")
    imp.add_argument("--keep-recorded-at", action="store_true", help="keep the recorded_at column (moving a store)")
    imp.add_argument("--dry-run", action="store_true", help="check the file, write nothing")

    exp = commands.add_parser("export", parents=[common], help="write every event as CSV or JSON lines")
    exp.add_argument("file", nargs="?", help="output file (default: standard output)")
    exp.add_argument("--format", choices=("csv", "jsonl"), help="default: from the file name, else csv")

    show = commands.add_parser("show", parents=[common], help="the history of an address and its basis now")
    show.add_argument("address", help="user@example.com, or @example.com for a domain")
    show.add_argument("--topic", default="*", help="topic to judge the basis for (default *)")
    show.add_argument("--sender", default="*", help="sender (From domain) to judge the basis for (default *)")
    show.add_argument("--at", help="judge as the store knew it at this time (ISO 8601)")
    show.add_argument("--json", action="store_true", help="print JSON")

    evidence = argparse.ArgumentParser(add_help=False)
    evidence.add_argument("--at", help="when it happened (ISO 8601; default now)")
    evidence.add_argument("--source", help="where the proof lives: form URL, system, archive reference")
    evidence.add_argument("--note", help="free text")

    add = commands.add_parser("add", parents=[common, evidence], help="record an opt-in with its evidence")
    add.add_argument("address", help="user@example.com, or @example.com for a business domain")
    add.add_argument("--topic", required=True, help="topic consented to, or * for all")
    add.add_argument("--method", required=True, choices=METHODS[OPTED_IN], help="how consent was given")
    add.add_argument("--sender", default="*", help="From domain the consent was given to (default * = any)")
    add.add_argument("--ip", help="IP address the opt-in came from")
    add.add_argument("--user-agent", help="browser user agent of the opt-in")
    add.add_argument("--text-version", help="version of the consent text agreed to")
    add.add_argument("--confirmed-at", help="double opt-in: when it was confirmed (without it: pending)")

    customer = commands.add_parser(
        "customer", parents=[common, evidence], help="record a customer relation (soft opt-in)"
    )
    customer.add_argument("address")
    customer.add_argument("--sender", required=True, help="From domain of the seller")
    customer.add_argument("--category", required=True, help="product category sold")
    customer.add_argument(
        "--objection-offered",
        required=True,
        choices=("yes", "no"),
        help="was the chance to object given when the address was collected",
    )
    customer.add_argument("--relation", help="order or customer number")
    customer.add_argument("--method", default="sale", choices=METHODS["customer"])

    revoke = commands.add_parser("revoke", parents=[common, evidence], help="record an opt-out")
    revoke.add_argument("address")
    revoke.add_argument("--topic", default="*", help="topic opted out of (default *: everything)")
    revoke.add_argument("--sender", default="*", help="From domain opted out of (default *: every sender)")
    revoke.add_argument("--method", default="admin", choices=METHODS[OPTED_OUT])
    revoke.add_argument("--reason", help="why, in the person's words where known")

    suppress = commands.add_parser("suppress", parents=[common, evidence], help="suppress an address")
    suppress.add_argument("address")
    suppress.add_argument("--reason", required=True)
    suppress.add_argument("--method", default="manual", choices=METHODS[SUPPRESSED])
    suppress.add_argument("--upstream-reply", help="the bounce or complaint text")

    unsuppress = commands.add_parser(
        "unsuppress", parents=[common, evidence], help="lift a suppression (admin; needs a reason)"
    )
    unsuppress.add_argument("address")
    unsuppress.add_argument("--reason", required=True)

    commands.add_parser("count", parents=[common], help="number of events in the store")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sendguard", description="Consent records of sendguard.")
    add_consent_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


# ---- running -----------------------------------------------------------------------------------


def run_consent_command(args: argparse.Namespace) -> int:
    """Entry point for ``sendguard consent ...`` (synchronous, for proxy/cli.py)."""
    return asyncio.run(run_consent(args))


async def run_consent(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        store_config, rules = load_consent_config(args.config)
    except ConfigError as exc:
        print(f"sendguard: the config has {len(exc.issues)} problem(s):", file=err)
        for issue in exc.issues:
            print(f"  {issue}", file=err)
        return EXIT_BAD_INPUT
    command = args.consent_command
    if command == "import":
        problems = _precheck_import(args, err)
        if problems is None or problems:
            return EXIT_BAD_INPUT
        if args.dry_run:
            print(f"{args.file}: OK, nothing written (--dry-run)", file=out)
            return EXIT_OK
    try:
        event = _event_from_args(args) if command in _RECORDERS else None
    except ConsentInputError as exc:
        print(f"sendguard: {exc}", file=err)
        return EXIT_BAD_INPUT
    try:
        store = await open_consent_store(store_config)
    except ConsentStoreError as exc:
        print(f"sendguard: {exc}", file=err)
        return EXIT_STORE_DOWN
    try:
        if event is not None:
            (stored,) = await store.add(event)
            print(f"recorded {stored.kind} for {stored.label} as record #{stored.id}", file=out)
            return EXIT_OK
        if command == "import":
            return await _import(store, args, out, err)
        if command == "export":
            return await _export(store, args, out, err)
        if command == "show":
            return await _show(store, args, rules, out, err)
        if command == "count":
            print(await store.count(), file=out)
            return EXIT_OK
        raise AssertionError(f"unknown consent command {command!r}")
    except ConsentInputError as exc:
        print(f"sendguard: {exc}", file=err)
        return EXIT_BAD_INPUT
    except ConsentStoreError as exc:
        print(f"sendguard: {exc}", file=err)
        return EXIT_STORE_DOWN
    finally:
        await store.close()


_RECORDERS = frozenset({"add", "customer", "revoke", "suppress", "unsuppress"})


def _event_from_args(args: argparse.Namespace) -> ConsentEvent:
    command = args.consent_command
    common: dict[str, Any] = {"at": args.at, "source": args.source, "note": args.note}
    if command == "add":
        return new_event(
            OPTED_IN,
            args.address,
            topic=args.topic,
            sender=args.sender,
            method=args.method,
            ip=args.ip,
            user_agent=args.user_agent,
            text_version=args.text_version,
            confirmed_at=args.confirmed_at,
            **common,
        )
    if command == "customer":
        return new_event(
            "customer",
            args.address,
            sender=args.sender,
            method=args.method,
            product_category=args.category,
            objection_offered=args.objection_offered == "yes",
            relation=args.relation,
            **common,
        )
    if command == "revoke":
        return new_event(
            OPTED_OUT,
            args.address,
            topic=args.topic,
            sender=args.sender,
            method=args.method,
            reason=args.reason,
            **common,
        )
    if command == "suppress":
        return new_event(
            SUPPRESSED,
            args.address,
            method=args.method,
            reason=args.reason,
            upstream_reply=args.upstream_reply,
            **common,
        )
    return new_event("unsuppressed", args.address, reason=args.reason, **common)


def _open_input(name: str) -> TextIO:
    if name == "-":
        return sys.stdin
    # utf-8-sig: spreadsheets often write a byte-order mark before the first column name.
    return open(name, encoding="utf-8-sig", newline="")


def _precheck_import(args: argparse.Namespace, err: TextIO) -> list[CsvProblem] | None:
    """First pass over the file: every problem, with line numbers. None: unreadable."""
    if args.file == "-" and not args.dry_run:
        # Standard input cannot be read twice; check and import from one buffered copy.
        args.buffered = sys.stdin.read()
    try:
        stream = _reopen(args)
    except OSError as exc:
        print(f"sendguard: cannot read {args.file}: {exc.strerror or exc}", file=err)
        return None
    problems: list[CsvProblem] = []
    try:
        for item in iter_csv(stream, keep_recorded_at=args.keep_recorded_at):
            if isinstance(item, CsvProblem):
                problems.append(item)
    except (csv.Error, UnicodeDecodeError) as exc:
        problems.append(CsvProblem(0, f"not a readable CSV file: {exc}"))
    finally:
        if stream is not sys.stdin:
            stream.close()
    if problems:
        print(f"sendguard: {args.file} has {len(problems)} problem(s); nothing was imported:", file=err)
        for problem in problems:
            print(f"  {args.file}:{problem.line}: {problem.message}", file=err)
    return problems


def _reopen(args: argparse.Namespace) -> TextIO:
    buffered = getattr(args, "buffered", None)
    if buffered is not None:
        return io.StringIO(buffered)
    return _open_input(args.file)


async def _import(store: ConsentStore, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    stream = _reopen(args)
    try:
        events = (
            item for item in iter_csv(stream, keep_recorded_at=args.keep_recorded_at) if isinstance(item, ConsentEvent)
        )
        count = await store.import_events(events, keep_recorded_at=args.keep_recorded_at)
    finally:
        if stream is not sys.stdin:
            stream.close()
    print(f"imported {count} event(s) from {args.file}", file=out)
    return EXIT_OK


#: Columns written by whoever clicked, mailed or imported: never a formula in a spreadsheet.
#: (Addresses, topics and methods are validated; a domain subject legitimately starts with @.)
_FREE_TEXT = frozenset(
    {"user_agent", "note", "source", "reason", "upstream_reply", "relation", "text_version", "product_category"}
)


def _spreadsheet_safe(value: object) -> object:
    """Cells that a spreadsheet would run as a formula (a user agent or a mail note is written
    by whoever clicked or mailed) get a leading quote (OWASP CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


async def _export(store: ConsentStore, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    fmt = args.format or ("jsonl" if args.file and args.file.endswith((".jsonl", ".json", ".ndjson")) else "csv")
    target = open(args.file, "w", encoding="utf-8", newline="") if args.file else out  # noqa: SIM115, ASYNC230
    count = 0
    try:
        writer = csv.DictWriter(target, fieldnames=[*CSV_EXPORT_ONLY, *CSV_COLUMNS]) if fmt == "csv" else None
        if writer is not None:
            writer.writeheader()
        async for event in store.export():
            if writer is not None:
                row = {"id": event.id, "recorded_at": format_time(event.recorded_at), **event_to_row(event)}
                writer.writerow({k: _spreadsheet_safe(v) if k in _FREE_TEXT else v for k, v in row.items()})
            else:
                target.write(json.dumps(event.as_dict(), ensure_ascii=False) + "\n")
            count += 1
    finally:
        if target is not out:
            target.close()
    if args.file:
        print(f"exported {count} event(s) to {args.file}", file=out)
    return EXIT_OK


async def _show(store: ConsentStore, args: argparse.Namespace, rules: SoftOptInRules, out: TextIO, err: TextIO) -> int:
    subject = parse_subject(args.address)
    at: datetime | None = parse_time(args.at) if args.at else None
    events = await store.history(subject, at=at)
    basis: Basis | None = None
    if subject.kind == ADDRESS:
        basis = await store.basis(subject.value, args.topic, args.sender, at=at, rules=rules)
    if args.json:
        document = {
            "subject": str(subject),
            "at": format_time(at),
            "events": [event.as_dict() for event in events],
            "basis": basis.as_dict() if basis is not None else None,
        }
        print(json.dumps(document, indent=2, ensure_ascii=False), file=out)
        return EXIT_OK
    scope = f" and its domain @{subject.domain}" if subject.kind == ADDRESS else ""
    when = f" as known at {format_time(at)}" if at else ""
    print(f"{subject}{scope}: {len(events)} event(s){when}", file=out)
    for event in events:
        print("  " + _describe(event), file=out)
    if basis is not None:
        verdict = "ALLOWED" if basis.allowed else "REFUSED"
        print(
            f"basis for commercial mail (topic {basis.topic}, sender {basis.sender}): {verdict} "
            f"[{basis.kind}] {basis.explanation}",
            file=out,
        )
    return EXIT_OK


def _describe(event: ConsentEvent) -> str:
    row = event_to_row(event)
    parts = [
        f"#{event.id:<7}",
        f"{row['at']:<27}",
        f"{event.kind:<12}",
        event.label,
        f"topic={event.topic}",
        f"sender={event.sender}",
        f"method={event.method}",
    ]
    for name in (
        "confirmed_at", "text_version", "ip", "user_agent", "relation", "product_category",
        "objection_offered", "reason", "upstream_reply", "source", "note",
    ):  # fmt: skip
        if row[name]:
            parts.append(f"{name}={json.dumps(row[name], ensure_ascii=False) if ' ' in row[name] else row[name]}")
    parts.append(f"(recorded {format_time(event.recorded_at)})")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m proxy.cli.consent SUBCOMMAND ...``: the same as ``sendguard consent SUBCOMMAND ...``."""
    args = build_parser().parse_args(["consent", *(sys.argv[1:] if argv is None else argv)])
    return run_consent_command(args)


if __name__ == "__main__":
    sys.exit(main())
