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
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from policies.consent import ConsentPolicy
from proxy.api.erasure import api_eraser, attach_erasers, counter_eraser, spool_eraser
from proxy.api.state import open_api_state
from proxy.config.settings import SpoolConfig
from proxy.relay.spool import Spool
from proxy.schema import ConfigError, ConfigIssue, Converter, compose, is_invalid
from proxy.stores.consent import (
    ADDRESS,
    CSV_COLUMNS,
    CSV_EXPORT_ONLY,
    EVENT_KINDS,
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
    SoftOptInRules,
    event_to_row,
    format_time,
    new_event,
    open_consent_store,
    parse_subject,
    parse_time,
)
from proxy.stores.consent_formats import FORMATS, ImportOptions, ImportReader, parse_mapping
from proxy.stores.limits_store import LimitStoreConfig
from proxy.stores.pauses import open_pause_store

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
Exports of mailing tools are read as the tools write them with --format mailchimp (one file
per status: subscribed, unsubscribed, cleaned), brevo (semicolon-separated) or laposta; names,
phone numbers and other columns that are not consent evidence are never read. --map reads
a column into one of the fields above (or ignore drops it); --method, --source, --topic and
--sender fill what a row leaves empty.

The file is read once, in one transaction: every row is checked as it is written, and any
problem rolls back the whole file once every row has been read, so it is imported all of it
or nothing. The summary counts the rows by outcome and lists the first problems with their
line numbers; long imports report progress on standard error.
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


def load_erasure_places(path: str) -> tuple[SpoolConfig, LimitStoreConfig]:
    """``spool`` and ``stores.state`` of a config file: where else an erasure must reach (the
    retry queue, the bounce counters). Read the same way as ``load_consent_config``."""
    node = compose(Path(path).read_text(encoding="utf-8"), path)
    conv = Converter(path)
    spool, state = SpoolConfig(), LimitStoreConfig()
    for key, _, value in (conv.mapping_items(node, "") if node is not None else None) or []:
        if key == "spool":
            converted = conv.dataclass(value, SpoolConfig, "spool")
            spool = spool if is_invalid(converted) else converted
        elif key == "stores":
            for store_key, _, store_node in conv.mapping_items(value, "stores") or []:
                if store_key == "state":
                    found = conv.dataclass(store_node, LimitStoreConfig, "stores.state")
                    state = state if is_invalid(found) else found
    if conv.issues:
        raise ConfigError(conv.issues)
    return spool, state


def _config_problems(exc: ConfigError, err: TextIO) -> int:
    print(f"sendguard: the config has {len(exc.issues)} problem(s):", file=err)
    for issue in exc.issues:
        print(f"  {issue}", file=err)
    return EXIT_BAD_INPUT


async def _erase(
    store: ConsentStore, store_config: ConsentStoreConfig, args: argparse.Namespace, out: TextIO, err: TextIO
) -> int:
    """Erase in the consent store, then wherever else the address is: the API's tables, the
    retry queue (when its file exists) and the bounce counters (in Redis: counters kept in a
    running proxy's memory are out of reach here; they end with bounces.suppress_window)."""
    try:
        spool_config, state_config = load_erasure_places(args.config)
    except ConfigError as exc:
        return _config_problems(exc, err)
    # Everything is opened before anything is erased: a place that cannot be reached stops the
    # erasure with nothing half done.
    try:
        spool = Spool(spool_config.path) if os.path.exists(spool_config.path) else None  # noqa: ASYNC240
    except (sqlite3.Error, OSError) as exc:
        print(f"sendguard: cannot open the retry queue {spool_config.path}: {exc}; nothing was erased", file=err)
        return EXIT_STORE_DOWN
    try:
        api_state = await open_api_state(store_config)
    except (sqlite3.Error, OSError) as exc:
        print(f"sendguard: cannot open the API's tables in the consent store: {exc}; nothing was erased", file=err)
        return EXIT_STORE_DOWN
    pauses = open_pause_store(state_config) if state_config.backend == "redis" else None
    try:
        erasers = [api_eraser(api_state)]
        if spool is not None:
            erasers.append(spool_eraser(spool))
        if pauses is not None:
            erasers.append(counter_eraser(pauses))
        attach_erasers(store, erasers)
        erasure = await store.erase(args.address, requested_via=args.via)
    finally:
        await api_state.close()
        if pauses is not None:
            await pauses.close()
    print(
        f"erased {erasure.suppression.subject}: {erasure.erased} event(s) made anonymous at "
        f"{format_time(erasure.at)}; commercial mail to it stays refused (record #{erasure.suppression.id})",
        file=out,
    )
    print("also removed: " + ", ".join(f"{what} {count}" for what, count in erasure.purged.items()), file=out)
    if erasure.failures:
        for failure in erasure.failures:
            print(f"sendguard: not erased everywhere: {failure}; run the erasure again", file=err)
        return EXIT_STORE_DOWN
    return EXIT_OK


# ---- parser --------------------------------------------------------------------------------------


def add_consent_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``consent`` and its commands to the ``sendguard`` sub-command set."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "consent", help="consent records: import, export, show, add, revoke, suppress, erase"
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
    imp.add_argument("--format", choices=FORMATS, default="generic", help="whose export the file is (default generic)")
    imp.add_argument(
        "--map",
        action="append",
        metavar="COLUMN=FIELD",
        help="read COLUMN into FIELD (a column above, or ignore); repeatable",
    )
    imp.add_argument("--delimiter", help="field separator: , ; or tab (default: from the first line)")
    imp.add_argument("--method", help="method where a row gives none (formats: default import)")
    imp.add_argument("--source", help="source where a row gives none (formats: default '<format> export FILE')")
    imp.add_argument("--topic", help="topic where a row gives none (default *)")
    imp.add_argument("--sender", help="sender where a row gives none (default *)")
    imp.add_argument("--keep-recorded-at", action="store_true", help="keep the recorded_at column (moving a store)")
    imp.add_argument("--dry-run", action="store_true", help="check the file, write nothing, print the summary")
    imp.add_argument("--quiet", action="store_true", help="no progress lines on standard error")

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

    erase = commands.add_parser(
        "erase",
        parents=[common],
        help="erase an address's personal data (AVG art. 17); commercial mail to it stays refused",
        description="Every record about the address becomes a tombstone: the address is replaced by a keyed "
        "hash (stores.consent.erasure_key), its IP, user agent, source, relation, reason, reply and note are "
        "removed; kind, topic, sender, method and times stay. A suppression under the same hash keeps "
        "refusing commercial mail to the address. Its domain's records (a business relation) stay.",
    )
    erase.add_argument("address", help="user@example.com")
    erase.add_argument("--via", default="admin", help="how the request came in, for the record (default admin)")

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
        return _config_problems(exc, err)
    command = args.consent_command
    try:
        event = _event_from_args(args) if command in _RECORDERS else None
        options = _import_options(args) if command == "import" else None
        if options is not None and args.dry_run:
            return await _import(None, args, options, out, err)
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
            assert options is not None
            return await _import(store, args, options, out, err)
        if command == "export":
            return await _export(store, args, out, err)
        if command == "show":
            return await _show(store, args, rules, out, err)
        if command == "count":
            print(await store.count(), file=out)
            return EXIT_OK
        if command == "erase":
            return await _erase(store, store_config, args, out, err)
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


def _import_options(args: argparse.Namespace) -> ImportOptions:
    source = args.source
    if source is None and args.format != "generic":
        # Where the proof lives, when the export says nothing: the tool and the file.
        source = f"{args.format} export {Path(args.file).name if args.file != '-' else '(standard input)'}"
    delimiter = args.delimiter
    if delimiter is not None:
        delimiter = "\t" if delimiter in ("\\t", "tab", "TAB") else delimiter
        if len(delimiter) != 1:
            raise ConsentInputError(f"--delimiter must be one character (or 'tab'), not {args.delimiter!r}")
    return ImportOptions(
        format=args.format,
        delimiter=delimiter,
        mapping=parse_mapping(args.map or []),
        method=args.method,
        source=source,
        topic=args.topic,
        sender=args.sender,
        keep_recorded_at=args.keep_recorded_at,
    )


def _progress_printer(err: TextIO) -> Callable[[ImportReader], None]:
    def report(reader: ImportReader) -> None:
        print(f"  ... {reader.rows:,} rows read ({reader.rate:,.0f}/s)", file=err, flush=True)

    return report


async def _import(
    store: ConsentStore | None, args: argparse.Namespace, options: ImportOptions, out: TextIO, err: TextIO
) -> int:
    """One pass: each row is checked as it is written, inside the store's one transaction; any
    problem rolls the whole file back once every row has been read (so every problem is
    reported). ``store`` None: the dry run, which opens no store at all."""
    try:
        stream = _open_input(args.file)
    except OSError as exc:
        print(f"sendguard: cannot read {args.file}: {exc.strerror or exc}", file=err)
        return EXIT_BAD_INPUT
    reader = ImportReader(stream, options, progress=None if args.quiet else _progress_printer(err))
    failed: ConsentInputError | None = None
    try:
        if store is None:
            reader.read_all()
        else:
            try:
                await store.import_events(reader.events(), keep_recorded_at=args.keep_recorded_at, checked=True)
            except ConsentInputError as exc:
                failed = exc
    finally:
        if stream is not sys.stdin:
            stream.close()
    summary = reader.summary()
    if reader.problem_count or failed is not None:
        print(f"sendguard: {args.file}: nothing was imported" + (" (--dry-run)" if store is None else ""), file=err)
        for line in summary:
            print(f"  {line}", file=err)
        if failed is not None and not reader.problem_count:
            print(f"  {failed}", file=err)
        return EXIT_BAD_INPUT
    if store is None:
        print(f"{args.file}: OK, nothing written (--dry-run)", file=out)
    else:
        print(f"imported {sum(reader.counts[k] for k in EVENT_KINDS):,} event(s) from {args.file}", file=out)
    for line in summary:
        print(f"  {line}", file=out)
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
    erasures = [
        {"at": format_time(e.recorded_at), "record": e.id, "reason": e.reason}
        for e in events
        if e.kind == SUPPRESSED and e.method == "erasure"
    ]
    if args.json:
        document = {
            "subject": str(subject),
            "at": format_time(at),
            "events": [event.as_dict() for event in events],
            "erasures": erasures,
            "basis": basis.as_dict() if basis is not None else None,
        }
        print(json.dumps(document, indent=2, ensure_ascii=False), file=out)
        return EXIT_OK
    scope = f" and its domain @{subject.domain}" if subject.kind == ADDRESS else ""
    when = f" as known at {format_time(at)}" if at else ""
    print(f"{subject}{scope}: {len(events)} event(s){when}", file=out)
    for erasure in erasures:
        print(f"ERASED at {erasure['at']} (record #{erasure['record']}): {erasure['reason']}", file=out)
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
    if event.erased_at is not None:
        parts.append(f"[personal data erased {format_time(event.erased_at)}]")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m proxy.cli.consent SUBCOMMAND ...``: the same as ``sendguard consent SUBCOMMAND ...``."""
    args = build_parser().parse_args(["consent", *(sys.argv[1:] if argv is None else argv)])
    return run_consent_command(args)


if __name__ == "__main__":
    sys.exit(main())
