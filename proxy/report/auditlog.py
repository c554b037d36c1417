"""Reading the audit log as a stream: one transaction or consent line at a time.

The audit log (``proxy/observability/logsetup.py`` ``AuditLog``) is JSON lines, rotated by
size into ``audit.jsonl.1`` … ``.N`` (the highest number the oldest). A report reads the
rotated files oldest first and then the live one, line by line, so a log of millions of
lines costs the memory of one line plus what the report keeps (counters, not lines).

A line that is not JSON, or not an object, is counted and skipped: a log cut short by a
crash or a full disk must not hide the rest of the period.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = (
    "AuditFiles",
    "RecipientFate",
    "consent_evidence",
    "line_time",
    "parse_reply",
    "recipient_fates",
    "rotated_files",
)

_ROTATED = re.compile(r"\.(\d+)$")


def rotated_files(path: str | Path) -> list[Path]:
    """The live file and its rotations, oldest first (``.N`` … ``.1``, then the live one)."""
    live = Path(path)
    rotations: list[tuple[int, Path]] = []
    if live.parent.is_dir():
        for candidate in live.parent.iterdir():
            if candidate.name.startswith(live.name + "."):
                match = _ROTATED.search(candidate.name[len(live.name) :])
                if match and candidate.name == f"{live.name}.{match.group(1)}":
                    rotations.append((int(match.group(1)), candidate))
    ordered = [p for _, p in sorted(rotations, reverse=True)]
    if live.exists():
        ordered.append(live)
    return ordered


@dataclass
class AuditFiles:
    """The lines of one audit log and its rotations, parsed one at a time."""

    files: list[Path]
    lines_read: int = 0
    lines_skipped: int = 0
    bytes_read: int = 0

    @classmethod
    def at(cls, path: str | Path) -> AuditFiles:
        return cls(rotated_files(path))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for path in self.files:
            # Binary and split by hand: a stray invalid byte spoils one line, not the file.
            with open(path, "rb") as handle:
                for raw in handle:
                    self.bytes_read += len(raw)
                    if not raw.strip():
                        continue
                    self.lines_read += 1
                    try:
                        entry = json.loads(raw)
                    except ValueError:
                        self.lines_skipped += 1
                        continue
                    if not isinstance(entry, dict) or line_time(entry) is None:
                        self.lines_skipped += 1
                        continue
                    yield entry

    def describe(self) -> list[dict[str, Any]]:
        return [{"path": str(p), "size": os.path.getsize(p) if p.exists() else 0} for p in self.files]


@functools.lru_cache(maxsize=4096)
def parse_time(text: str) -> datetime | None:
    """An ISO 8601 time (UTC when it has no zone). Cached: the audit log's times are to the
    second, so a busy log repeats each one many times, and each line's is read twice."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def line_time(entry: dict[str, Any]) -> datetime | None:
    value = entry.get("time")
    return parse_time(value) if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class ParsedReply:
    code: int
    status: str
    text: str


def parse_reply(line: Any) -> ParsedReply | None:
    """``"550 5.1.1 no such user"`` -> (550, "5.1.1", the line)."""
    if not isinstance(line, str) or len(line) < 3 or not line[:3].isdigit():
        return None
    parts = line.split(" ", 2)
    status = parts[1] if len(parts) > 1 and re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", parts[1]) else ""
    return ParsedReply(int(line[:3]), status, line)


@dataclass(slots=True)
class RecipientFate:
    """What became of one recipient of one transaction line.

    ``fate``: delivered (the upstream took it, or it waits in the retry queue), refused_policy
    (a sendguard policy or a pause refused it), refused_upstream (the upstream refused it),
    or pending (the transaction ended before a decision: the client left, a 4xx the client
    retries).
    """

    recipient: str
    fate: str
    policy: str | None = None  # refused_policy: which policy
    reason: str | None = None  # refused_policy: the policy's reason
    reply: str | None = None  # the reply that decided it, when there was one
    basis: dict[str, Any] | None = field(default=None)  # the consent evidence relied on


def _policy_results(entry: dict[str, Any]) -> list[dict[str, Any]]:
    results = entry.get("policies")
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def _refusing(result: dict[str, Any]) -> bool:
    return result.get("action") in ("reject", "tempfail") and result.get("mode", "enforce") == "enforce"


def consent_evidence(entry: dict[str, Any], recipient: str) -> dict[str, Any] | None:
    """The consent policy's evidence for this recipient: its own verdict (RCPT, or after
    DATA), else its line in a re-judgement for a From domain unlike the envelope's."""
    found: dict[str, Any] | None = None
    for result in _policy_results(entry):
        if result.get("policy") != "consent":
            continue
        evidence = result.get("evidence")
        if not isinstance(evidence, dict):
            continue
        if result.get("recipient") == recipient:
            found = evidence  # the last verdict wins: after DATA overrides RCPT
            continue
        for judged in evidence.get("rejudged") or ():
            if isinstance(judged, dict) and judged.get("recipient") == recipient:
                found = judged
    return found


def recipient_fates(entry: dict[str, Any]) -> list[RecipientFate]:
    """Every recipient of a transaction line with its fate, as the relay counted it
    (``RelayTransaction._recipient_outcomes``)."""
    results = _policy_results(entry)
    per_recipient: dict[str, dict[str, Any]] = {}
    message_level: dict[str, Any] | None = None
    for result in results:
        if not _refusing(result):
            continue
        recipient = result.get("recipient")
        if isinstance(recipient, str):
            per_recipient.setdefault(recipient, result)
        elif message_level is None or result.get("decided"):
            message_level = result
    fates: list[RecipientFate] = []
    refused = entry.get("refused")
    for recipient, reply in refused.items() if isinstance(refused, dict) else ():
        fates.append(_refused(str(recipient), reply, per_recipient.get(str(recipient))))
    recipients = entry.get("recipients")
    copies = entry.get("copies") if isinstance(entry.get("copies"), dict) else None
    outcome = entry.get("outcome")
    for recipient in recipients if isinstance(recipients, list) else ():
        recipient = str(recipient)
        copy = copies.get(recipient) if copies is not None else None
        if isinstance(copy, dict):
            if copy.get("fate") in ("delivered", "queued"):
                fates.append(RecipientFate(recipient, "delivered", reply=copy.get("reply")))
            else:
                fates.append(_refused(recipient, copy.get("reply"), per_recipient.get(recipient)))
        elif outcome == "delivered":
            fates.append(RecipientFate(recipient, "delivered", reply=entry.get("upstream_reply")))
        elif outcome in ("tempfailed", "abandoned"):
            decided = message_level if message_level is not None else per_recipient.get(recipient)
            fates.append(
                RecipientFate(
                    recipient,
                    "pending",
                    policy=decided.get("policy") if decided else None,
                    reason=decided.get("reason") if decided else None,
                    reply=entry.get("reply"),
                )
            )
        elif (upstream := parse_reply(entry.get("upstream_reply"))) is not None and upstream.code >= 400:
            fates.append(RecipientFate(recipient, "refused_upstream", reply=upstream.text))
        else:
            decided = per_recipient.get(recipient) or message_level
            fates.append(
                RecipientFate(
                    recipient,
                    "refused_policy",
                    policy=str(decided.get("policy")) if decided else "unknown",
                    reason=str(decided.get("reason") or "") if decided else "",
                    reply=entry.get("reply"),
                )
            )
    for fate in fates:
        fate.basis = consent_evidence(entry, fate.recipient)
    return fates


def _refused(recipient: str, reply: Any, result: dict[str, Any] | None) -> RecipientFate:
    text = reply if isinstance(reply, str) else None
    if result is not None:
        return RecipientFate(
            recipient,
            "refused_policy",
            policy=str(result.get("policy")),
            reason=str(result.get("reason") or ""),
            reply=text,
        )
    return RecipientFate(recipient, "refused_upstream", reply=text)
