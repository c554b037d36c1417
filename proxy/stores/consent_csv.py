"""Consent files: ``sendguard consent import`` reads CSV row by row, ``export`` writes the same columns.

A row is the text form of one event (``consent_events.event_to_row``); reading it back goes
through ``new_event``, so a file is held to the same checks as any other event, and every
problem is reported with its line number.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

from proxy.stores.consent_events import ConsentEvent, ConsentInputError, new_event, parse_time, utcnow

__all__ = (
    "CSV_COLUMNS",
    "CSV_EXPORT_ONLY",
    "CsvProblem",
    "event_from_row",
    "iter_csv",
    "read_csv",
)

# ---- CSV ---------------------------------------------------------------------------------------

#: Columns of ``sendguard consent import`` and ``export``. Only ``address`` and ``event`` are
#: required; see bench/README-consent.md and ``sendguard consent import --help``.
CSV_COLUMNS: tuple[str, ...] = (
    "address",
    "event",
    "at",
    "topic",
    "sender",
    "method",
    "source",
    "ip",
    "user_agent",
    "text_version",
    "confirmed_at",
    "relation",
    "product_category",
    "objection_offered",
    "reason",
    "upstream_reply",
    "note",
)
#: Written by export, accepted (and ignored, or honoured on request) by import.
CSV_EXPORT_ONLY: tuple[str, ...] = ("id", "recorded_at")

_YES = {"yes", "y", "true", "1", "ja", "j"}
_NO = {"no", "n", "false", "0", "nee"}


def event_from_row(row: Mapping[str, str | None], *, now: datetime | None = None) -> ConsentEvent:
    """One CSV row (column name -> text) to a checked event."""

    # One pass over the row: the stripped, non-empty values (an import calls this per line).
    values = {name: text for name, value in row.items() if value and (text := value.strip())}
    get = values.get

    flag_text = (get("objection_offered") or "").lower()
    objection: bool | None = None
    if flag_text in _YES:
        objection = True
    elif flag_text in _NO:
        objection = False
    elif flag_text:
        raise ConsentInputError(f"objection_offered must be yes or no, not {flag_text!r}")
    if not get("address"):
        raise ConsentInputError("address is empty")
    return new_event(
        get("event") or "",
        get("address") or "",
        at=get("at"),
        method=get("method"),
        topic=get("topic"),
        sender=get("sender"),
        source=get("source"),
        ip=get("ip"),
        user_agent=get("user_agent"),
        text_version=get("text_version"),
        confirmed_at=get("confirmed_at"),
        relation=get("relation"),
        product_category=get("product_category"),
        objection_offered=objection,
        reason=get("reason"),
        upstream_reply=get("upstream_reply"),
        note=get("note"),
        now=now,
    )


@dataclass(frozen=True, slots=True)
class CsvProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def iter_csv(
    stream: TextIO, *, keep_recorded_at: bool = False, now: datetime | None = None
) -> Iterator[ConsentEvent | CsvProblem]:
    """Parse a CSV file row by row: each row gives an event or a problem with its line number."""
    reader = csv.DictReader(stream)
    header = [name.strip().lower() for name in (reader.fieldnames or [])]
    if not header:
        yield CsvProblem(1, "the file is empty; the first line must name the columns")
        return
    reader.fieldnames = header
    known = set(CSV_COLUMNS) | set(CSV_EXPORT_ONLY)
    unknown = [name for name in header if name not in known]
    missing = [name for name in ("address", "event") if name not in header]
    if unknown:
        yield CsvProblem(1, f"unknown column(s): {', '.join(unknown)}; known: {', '.join(CSV_COLUMNS)}")
    if missing:
        yield CsvProblem(1, f"required column(s) missing: {', '.join(missing)}")
    if unknown or missing:
        return
    moment = now or utcnow()
    for row in reader:
        line = reader.line_num
        if None in row:  # DictReader files surplus fields under the key None
            yield CsvProblem(line, f"more fields than the {len(header)} columns of the header")
            continue
        if not any((value or "").strip() for value in row.values()):
            continue  # blank line
        try:
            event = event_from_row(row, now=moment)
            if keep_recorded_at and (row.get("recorded_at") or "").strip():
                recorded = parse_time(row["recorded_at"] or "")
                if recorded < event.effective_at:
                    raise ConsentInputError("recorded_at is earlier than at")
                event = dataclasses.replace(event, recorded_at=recorded)
        except ConsentInputError as exc:
            yield CsvProblem(line, str(exc))
            continue
        yield event


def read_csv(
    stream: TextIO, *, keep_recorded_at: bool = False, now: datetime | None = None
) -> tuple[list[ConsentEvent], list[CsvProblem]]:
    """Parse a whole CSV file; return the events and *every* problem with its line number."""
    events: list[ConsentEvent] = []
    problems: list[CsvProblem] = []
    for item in iter_csv(stream, keep_recorded_at=keep_recorded_at, now=now):
        if isinstance(item, CsvProblem):
            problems.append(item)
        else:
            events.append(item)
    return events, problems
