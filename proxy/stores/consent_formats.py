"""Reading the exports of mailing tools: Mailchimp, Brevo, Laposta, and sendguard's own CSV.

``sendguard consent import --format mailchimp|brevo|laposta|generic`` reads each tool's export
as the tool writes it and turns every row into the text fields of ``consent_csv.CSV_COLUMNS``,
which ``event_from_row`` then checks as it checks any event. A format only translates; the
rules stay in one place.

What each format takes from a row, and what it leaves (data minimisation, AVG art. 5(1)(c):
names, phone numbers, postal addresses, ratings and locations are never read):

- **mailchimp** (an audience export: one CSV per status, ``Email Address`` first). The file's
  own columns say which status it holds: ``UNSUB_TIME`` an unsubscribed file (opted_out at that
  time, with ``UNSUB_REASON``), ``CLEAN_TIME`` a cleaned one (suppressed: hard bounces or
  repeated soft bounces), otherwise subscribed (opted_in at ``OPTIN_TIME`` from ``OPTIN_IP``;
  a later ``CONFIRM_TIME`` makes it a double opt-in confirmed then; without ``OPTIN_TIME`` the
  person was added by hand or by an import into Mailchimp, and the opt-in is recorded with the
  default method, ``import`` unless ``--method`` says otherwise).
- **brevo** (semicolon-separated; ``EMAIL``, ``ADDED_TIME``, ``MODIFIED_TIME``,
  ``DOUBLE_OPT-IN``, ``OPT_IN``, ``EMAIL_BLACKLISTED`` or ``BLACKLISTED``): a blocklisted contact
  is an opt-out as of ``MODIFIED_TIME`` (Brevo keeps no unsubscription time); a ``DOUBLE_OPT-IN``
  contact a double opt-in confirmed at ``ADDED_TIME`` (Brevo creates the contact when the
  confirmation link is followed, and keeps no other confirmation time); ``OPT_IN`` a web form.
- **laposta** (the API's field names ``email``, ``state``, ``signup_date``, ``modified``,
  ``ip``, ``source_url``, or the Dutch column labels of the export): ``active`` is an opt-in,
  ``unsubscribed`` an opt-out, ``cleaned`` a suppression, ``unconfirmed`` a double opt-in that
  is still pending (recorded, and it counts only once confirmed).
- **generic**: sendguard's own columns (``sendguard consent import --help``).

For every format ``--map COLUMN=FIELD`` reads a column into one of sendguard's fields (or
``ignore`` drops it), over what the format would put there; ``--method``, ``--source``,
``--topic`` and ``--sender`` fill a field the row leaves empty. Times without an offset are
read as UTC; day-first dates (``31-12-2024``, ``31/12/2024 10:00``) are read as Brevo and
Laposta write them in the Netherlands.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from proxy.stores.consent_csv import CSV_COLUMNS, CSV_EXPORT_ONLY, CsvProblem, event_from_row
from proxy.stores.consent_events import (
    OPTED_IN,
    OPTED_OUT,
    SUPPRESSED,
    ConsentEvent,
    ConsentInputError,
    format_time,
    parse_time,
    utcnow,
)

__all__ = (
    "FORMATS",
    "IGNORE",
    "ImportOptions",
    "ImportReader",
    "parse_mapping",
)

FORMATS: tuple[str, ...] = ("generic", "mailchimp", "brevo", "laposta")
IGNORE = "ignore"
#: Problems listed in full; the rest are counted (a broken 200,000-line file must not print
#: 200,000 lines before the summary).
FIRST_PROBLEMS = 20

Row = dict[str, str]


@dataclass(frozen=True)
class ImportOptions:
    format: str = "generic"
    delimiter: str | None = None  # None: the first line decides between , ; and tab
    mapping: Mapping[str, str] = field(default_factory=dict)  # column (as written) -> field or "ignore"
    method: str | None = None
    source: str | None = None
    topic: str | None = None
    sender: str | None = None
    keep_recorded_at: bool = False


def parse_mapping(items: list[str]) -> dict[str, str]:
    """``--map COLUMN=FIELD`` arguments; the field must be one of sendguard's, or ``ignore``."""
    known = {*CSV_COLUMNS, "recorded_at", IGNORE}
    mapping: dict[str, str] = {}
    for item in items:
        column, sep, target = item.partition("=")
        target = target.strip().lower()
        if not sep or not column.strip():
            raise ConsentInputError(f"--map {item!r}: write COLUMN=FIELD, e.g. 'E-mail=address'")
        if target not in known:
            raise ConsentInputError(f"--map {item!r}: {target!r} is not a field; use one of {', '.join(sorted(known))}")
        mapping[column.strip().lower()] = target
    return mapping


# ---- times as the tools write them ------------------------------------------------------------

_DAY_FIRST = ("%d-%m-%Y %H:%M:%S", "%d-%m-%Y %H:%M", "%d-%m-%Y", "%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M", "%d/%m/%Y")


@functools.lru_cache(maxsize=65536)
def tool_time(text: str) -> str:
    """A tool's time as ISO 8601 UTC text; cached, because an export repeats its times a lot."""
    value = text.strip()
    try:
        return format_time(parse_time(value)) or ""
    except ConsentInputError:
        pass
    for pattern in _DAY_FIRST:
        try:
            return format_time(datetime.strptime(value, pattern).replace(tzinfo=UTC)) or ""
        except ValueError:
            continue
    raise ConsentInputError(f"not a time: {text!r} (ISO 8601, or day first: 31-12-2024 10:00)")


def _time_or_empty(text: str) -> str:
    return tool_time(text) if text.strip() else ""


_TRUE = {"yes", "y", "true", "1", "ja", "j", "x"}


def _flag(text: str) -> bool:
    return text.strip().lower() in _TRUE


# ---- the formats -------------------------------------------------------------------------------

#: A translator takes one row (column names lower-cased) and gives sendguard's fields.
Translator = Callable[[Row], Row]


def _mailchimp_ended(row: Row, kind: str, prefix: str, reason: str) -> Row:
    """A row of Mailchimp's unsubscribed (``UNSUB_*``) or cleaned (``CLEAN_*``) file."""
    campaign = row.get(f"{prefix}_campaign_title", "").strip()
    return {
        "address": row["email address"],
        "event": kind,
        "at": _time_or_empty(row.get(f"{prefix}_time", "")),
        "method": "import",
        "reason": reason,
        "note": f"Mailchimp campaign: {campaign}" if campaign else "",
    }


def _mailchimp(header: list[str]) -> tuple[Translator | None, list[str]]:
    if "email address" not in header:
        return None, ["a Mailchimp export has an 'Email Address' column; this file has none (see --format)"]
    if "unsub_time" in header:

        def unsubscribed(row: Row) -> Row:
            reason = " ".join(p for p in (row.get("unsub_reason", ""), row.get("unsub_reason_other", "")) if p.strip())
            return _mailchimp_ended(row, OPTED_OUT, "unsub", reason or "unsubscribed in Mailchimp")

        return unsubscribed, []
    if "clean_time" in header:

        def cleaned(row: Row) -> Row:
            reason = "cleaned by Mailchimp (hard bounce or repeated soft bounces)"
            return _mailchimp_ended(row, SUPPRESSED, "clean", reason)

        return cleaned, []

    def subscribed(row: Row) -> Row:
        optin = _time_or_empty(row.get("optin_time", ""))
        confirm = _time_or_empty(row.get("confirm_time", ""))
        out = {"address": row["email address"], "event": OPTED_IN, "ip": row.get("optin_ip", "")}
        if optin and confirm and confirm > optin:  # same-shaped UTC text: compares as time
            out.update(at=optin, method="double_opt_in", confirmed_at=confirm)
        elif optin:
            out.update(at=optin, method="web_form")
        else:
            # Added by an admin or an import into Mailchimp: no evidence of its own. The
            # default method (import, unless --method) never lifts an earlier opt-out.
            out.update(at=_time_or_empty(row.get("last_changed", "")) or confirm, ip=row.get("confirm_ip", ""))
        leid = row.get("leid", "").strip()
        if leid:
            out["note"] = f"Mailchimp LEID {leid}"  # finds the member again in Mailchimp
        return out

    return subscribed, []


def _brevo(header: list[str]) -> tuple[Translator | None, list[str]]:
    if "email" not in header:
        return None, ["a Brevo export has an EMAIL column; this file has none (see --format and --delimiter)"]
    blocked = next((name for name in ("email_blacklisted", "blacklisted") if name in header), None)

    def translate(row: Row) -> Row:
        if blocked and _flag(row.get(blocked, "")):
            return {
                "address": row["email"],
                "event": OPTED_OUT,
                "at": _time_or_empty(row.get("modified_time", "")),
                "method": "import",
                "reason": "blocklisted (unsubscribed) in Brevo",
            }
        added = _time_or_empty(row.get("added_time", ""))
        out = {"address": row["email"], "event": OPTED_IN, "at": added}
        if _flag(row.get("double_opt-in", "")):
            out.update(method="double_opt_in", confirmed_at=added)
        elif _flag(row.get("opt_in", "")):
            out["method"] = "web_form"
        contact = row.get("contact id", "").strip()
        if contact:
            out["note"] = f"Brevo contact {contact}"
        return out

    return translate, []


#: Laposta's export columns in Dutch, by the API field they hold.
_LAPOSTA_LABELS = {
    "e-mailadres": "email",
    "emailadres": "email",
    "status": "state",
    "aangemeld op": "signup_date",
    "aanmelddatum": "signup_date",
    "inschrijfdatum": "signup_date",
    "gewijzigd op": "modified",
    "gewijzigd": "modified",
    "ip-adres": "ip",
    "bron": "source_url",
    "aanmeld-url": "source_url",
    "relatie-id": "member_id",
}
_LAPOSTA_STATES = {
    "active": "active", "actief": "active",
    "unsubscribed": "unsubscribed", "afgemeld": "unsubscribed", "uitgeschreven": "unsubscribed",
    "cleaned": "cleaned", "opgeschoond": "cleaned", "bounced": "cleaned",
    "unconfirmed": "unconfirmed", "onbevestigd": "unconfirmed",
}  # fmt: skip


def _laposta(header: list[str]) -> tuple[Translator | None, list[str]]:
    names = {column: _LAPOSTA_LABELS.get(column, column) for column in header}
    if "email" not in names.values():
        return None, ["a Laposta export has an 'email' (E-mailadres) column; this file has none (see --format)"]

    def translate(raw: Row) -> Row:
        row = {names.get(k, k): v for k, v in raw.items()}
        state_text = row.get("state", "").strip().lower() or "active"
        state = _LAPOSTA_STATES.get(state_text)
        if state is None:
            raise ConsentInputError(f"Laposta state {state_text!r} is not active, unsubscribed, cleaned or unconfirmed")
        member = row.get("member_id", "").strip()
        note = f"Laposta member {member}" if member else ""
        if state == "unsubscribed":
            at = _time_or_empty(row.get("modified", ""))
            return {"address": row["email"], "event": OPTED_OUT, "at": at, "method": "import", "note": note}
        if state == "cleaned":
            at = _time_or_empty(row.get("modified", ""))
            reason = "cleaned by Laposta (bounces)"
            return {"address": row["email"], "event": SUPPRESSED, "at": at, "method": "import", "reason": reason}
        out = {
            "address": row["email"],
            "event": OPTED_IN,
            "at": _time_or_empty(row.get("signup_date", "")),
            "ip": row.get("ip", ""),
            "source": row.get("source_url", ""),
            "note": note,
        }
        if state == "unconfirmed":
            out["method"] = "double_opt_in"  # pending: counts only once a confirmation is recorded
        elif row.get("source_url", "").strip():
            out["method"] = "web_form"
        return out

    return translate, []


def _generic(header: list[str]) -> tuple[Translator | None, list[str]]:
    known = {*CSV_COLUMNS, *CSV_EXPORT_ONLY}
    unknown = [name for name in header if name not in known]
    problems: list[str] = []
    if unknown:
        hint = _guess_format(header)
        problems.append(
            f"unknown column(s): {', '.join(unknown)}; known: {', '.join(CSV_COLUMNS)}"
            + (f" (this looks like a {hint} export: add --format {hint})" if hint else " (see --map)")
        )
    missing = [name for name in ("address", "event") if name not in header]
    if missing:
        problems.append(f"required column(s) missing: {', '.join(missing)}")
    if problems:
        return None, problems

    def translate(row: Row) -> Row:
        return row

    return translate, []


def _guess_format(header: list[str]) -> str | None:
    columns = set(header)
    if "email address" in columns and columns & {"optin_time", "unsub_time", "clean_time", "leid"}:
        return "mailchimp"
    if "email" in columns and columns & {"added_time", "modified_time", "double_opt-in", "email_blacklisted"}:
        return "brevo"
    if columns & {"e-mailadres", "signup_date", "aangemeld op"}:
        return "laposta"
    return None


_FORMATS: dict[str, Callable[[list[str]], tuple[Translator | None, list[str]]]] = {
    "generic": _generic,
    "mailchimp": _mailchimp,
    "brevo": _brevo,
    "laposta": _laposta,
}


def sniff_delimiter(first_line: str) -> str:
    """The separator of the header line: the most frequent of , ; and tab outside quotes."""
    counts: Counter[str] = Counter()
    quoted = False
    for char in first_line:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in ",;\t":
            counts[char] += 1
    return counts.most_common(1)[0][0] if counts else ","


# ---- reading a file ----------------------------------------------------------------------------


@dataclass
class ImportReader:
    """One pass over an export: yields checked events, counts every outcome, keeps the problems.

    ``events()`` ends by raising ``ConsentInputError`` when any row had a problem, so a store
    consuming it inside its import transaction rolls everything back (all or nothing) after
    one pass over the file, with every problem known. ``progress`` is called every
    ``progress_every`` rows and at least every ``progress_seconds``.
    """

    stream: TextIO
    options: ImportOptions = field(default_factory=ImportOptions)
    now: datetime = field(default_factory=utcnow)
    progress: Callable[[ImportReader], None] | None = None
    progress_every: int = 25_000
    progress_seconds: float = 5.0
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[CsvProblem] = field(default_factory=list)
    problem_count: int = 0
    rows: int = 0
    started: float = field(default_factory=time.monotonic)

    def _problem(self, line: int, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < FIRST_PROBLEMS:
            self.problems.append(CsvProblem(line, message))

    def events(self) -> Iterator[ConsentEvent]:
        yield from self._read()
        if self.problem_count:
            raise ConsentInputError(f"{self.problem_count} row(s) have problems; nothing was imported")

    def read_all(self) -> None:
        """Check the whole file without writing (the dry run)."""
        for _ in self._read():
            pass

    def _read(self) -> Iterator[ConsentEvent]:
        options = self.options
        first = self.stream.readline()
        if not first.strip():
            self._problem(1, "the file is empty; the first line must name the columns")
            return
        delimiter = options.delimiter or sniff_delimiter(first)
        # The header line is already read (standard input cannot be rewound): chain it back.
        reader = csv.reader(itertools.chain([first], self.stream), delimiter=delimiter)
        try:
            written_header = next(reader)
        except csv.Error as exc:
            self._problem(1, f"not a readable CSV file: {exc}")
            return
        header = [name.strip().lower() for name in written_header]
        mapped = {index: options.mapping[name] for index, name in enumerate(header) if name in options.mapping}
        unused = sorted(set(options.mapping) - set(header))
        if unused:
            self._problem(1, f"--map names column(s) the file does not have: {', '.join(unused)}")
            return
        # The format sees the columns that --map does not take over.
        format_header = [name for index, name in enumerate(header) if index not in mapped]
        if options.format == "generic":
            format_header = format_header + sorted({f for f in mapped.values() if f != IGNORE} - set(format_header))
        translator, header_problems = _FORMATS[options.format](format_header)
        for message in header_problems:
            self._problem(1, message)
        if translator is None:
            return
        defaults = {
            name: value
            for name, value in (
                ("method", options.method),
                ("source", options.source),
                ("topic", options.topic),
                ("sender", options.sender),
            )
            if value
        }
        fallback_method = "import" if options.format != "generic" else ""
        width = len(header)
        next_report, last_report = self.progress_every, time.monotonic()
        try:
            for values in reader:
                line = reader.line_num
                if not any(v.strip() for v in values):
                    self.counts["blank"] += 1
                    continue
                self.rows += 1
                if self.progress is not None and (
                    self.rows >= next_report or time.monotonic() - last_report >= self.progress_seconds
                ):
                    self.progress(self)
                    next_report, last_report = self.rows + self.progress_every, time.monotonic()
                if len(values) > width:
                    self._problem(line, f"more fields ({len(values)}) than the {width} columns of the header")
                    self.counts["error"] += 1
                    continue
                raw: Row = {}
                overrides: Row = {}
                for index, value in enumerate(values):
                    target = mapped.get(index)
                    if target is None:
                        raw[header[index]] = value
                    elif target != IGNORE:
                        overrides[target] = value
                try:
                    if options.format == "generic":
                        raw.update(overrides)
                        fields = raw
                    else:
                        fields = translator(raw)
                        fields.update((k, v) for k, v in overrides.items() if v.strip())
                    for name, value in defaults.items():
                        if not (fields.get(name) or "").strip():
                            fields[name] = value
                    if not (fields.get("method") or "").strip() and fields.get("event") == OPTED_IN and fallback_method:
                        fields["method"] = fallback_method
                    event = event_from_row(fields, now=self.now)
                    recorded = (fields.get("recorded_at") or "").strip()
                    if options.keep_recorded_at and recorded:
                        recorded_at = parse_time(recorded)
                        if recorded_at < event.effective_at:
                            raise ConsentInputError("recorded_at is earlier than at")
                        event = dataclasses.replace(event, recorded_at=recorded_at)
                except ConsentInputError as exc:
                    self._problem(line, str(exc))
                    self.counts["error"] += 1
                    continue
                self.counts[event.kind] += 1
                yield event
        except (csv.Error, UnicodeDecodeError) as exc:
            self._problem(reader.line_num, f"not a readable CSV file: {exc}")

    @property
    def rate(self) -> float:
        return self.rows / max(time.monotonic() - self.started, 1e-6)

    def summary(self) -> list[str]:
        """Counts by outcome, then the first problems with their line numbers."""
        order = (OPTED_IN, "customer", OPTED_OUT, SUPPRESSED, "unsuppressed", "blank", "error")
        parts = [f"{kind} {self.counts[kind]:,}" for kind in order if self.counts[kind]]
        lines = [f"{self.rows:,} row(s): " + (", ".join(parts) if parts else "nothing")]
        if self.problem_count:
            shown = len(self.problems)
            more = f" (the first {shown} below)" if self.problem_count > shown else ""
            lines.append(f"{self.problem_count:,} problem(s){more}:")
            lines.extend(f"  line {p.line}: {p.message}" for p in self.problems)
        return lines
