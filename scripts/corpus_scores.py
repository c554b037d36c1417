#!/usr/bin/env python3
"""Score the unsubscribe and visible-recipient detectors against the labelled corpus.

    .venv/bin/python scripts/corpus_scores.py [--corpus tests/corpus] [-v]

Prints precision and recall of the body-link detector, the List-Unsubscribe header detector
(presence, and presence of an https:/mailto: URI), the RFC 8058 one-click detector and the
visible_recipients policy's refusal at its default limit (label: more than that many
addresses), and the exact-match rate of the recipient counter's To/Cc mailboxes (the label's
definition; the policy also counts Resent-To/Cc and addresses written in display names and
comments), against MANIFEST.tsv; -v also lists every message with what was found. Exit
status 0 when every label is matched, 1 otherwise.
Messages are read as the proxy's policies read them: line endings normalised, parsed once.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from policies.message import ParsedMessage
from policies.recipients import VisibleRecipientsPolicy, count_visible_recipients
from policies.unsubscribe import find_unsubscribe_links, inspect_list_unsubscribe, load_vocabulary
from proxy.relay import rawmsg

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT / "tests" / "corpus"
#: The visible_recipients policy's default max_visible: the limit its refusal is scored at.
RECIPIENT_LIMIT = VisibleRecipientsPolicy.Options().max_visible


@dataclass
class Confusion:
    """A yes/no detector against a yes/no label."""

    name: str
    label: str
    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0
    misses: list[str] = field(default_factory=list)

    def add(self, file: str, detected: bool, labelled: bool) -> None:
        if detected and labelled:
            self.true_positive += 1
        elif detected:
            self.false_positive += 1
            self.misses.append(f"{file}: found, label says no")
        elif labelled:
            self.false_negative += 1
            self.misses.append(f"{file}: not found, label says yes")
        else:
            self.true_negative += 1

    @property
    def precision(self) -> float:
        found = self.true_positive + self.false_positive
        return self.true_positive / found if found else 1.0

    @property
    def recall(self) -> float:
        labelled = self.true_positive + self.false_negative
        return self.true_positive / labelled if labelled else 1.0

    def line(self) -> str:
        return (
            f"{self.name:<36} precision {self.precision:6.1%}  recall {self.recall:6.1%}  "
            f"(tp {self.true_positive}, fp {self.false_positive}, fn {self.false_negative}, tn {self.true_negative}; "
            f"label: {self.label})"
        )


@dataclass
class Scores:
    body: Confusion
    body_as_labelled: Confusion  # against the corpus label itself, for the record
    header: Confusion
    header_valid: Confusion
    one_click: Confusion
    recipients_refused: Confusion
    recipients_exact: int = 0
    recipients_total: int = 0
    recipient_misses: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def confusions(self) -> list[Confusion]:
        return [self.body, self.header, self.header_valid, self.one_click, self.recipients_refused]

    @property
    def perfect(self) -> bool:
        return (
            all(c.precision == 1.0 and c.recall == 1.0 for c in self.confusions)
            and self.recipients_exact == self.recipients_total
        )


def read_manifest(corpus: Path) -> list[dict[str, str]]:
    text = (corpus / "MANIFEST.tsv").read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))


def read_reader_view(corpus: Path) -> dict[str, str]:
    """file -> the body-link label as a reader sees the message (READER_VIEW.tsv, if any)."""
    path = corpus / "READER_VIEW.tsv"
    if not path.exists():
        return {}
    rows = csv.DictReader(path.read_text(encoding="utf-8").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    return {row["file"]: row["has_unsubscribe_link_in_body"] for row in rows}


def parse(path: Path) -> ParsedMessage:
    return ParsedMessage(rawmsg.normalize_newlines(path.read_bytes()))


def score(corpus: Path = DEFAULT_CORPUS, clock: Callable[[], float] = time.perf_counter) -> Scores:
    vocabulary = load_vocabulary()
    scores = Scores(
        body=Confusion("body unsubscribe link", "has_unsubscribe_link_in_body, reader's view"),
        body_as_labelled=Confusion("  against the label as written", "has_unsubscribe_link_in_body"),
        header=Confusion("List-Unsubscribe present", "has_list_unsubscribe_header"),
        header_valid=Confusion("List-Unsubscribe https:/mailto: URI", "has_list_unsubscribe_header"),
        one_click=Confusion("RFC 8058 one-click", "has_list_unsubscribe_post"),
        recipients_refused=Confusion(
            f"visible_recipients refusal (> {RECIPIENT_LIMIT})", f"visible_recipients > {RECIPIENT_LIMIT}"
        ),
    )
    reader_view = read_reader_view(corpus)
    for row in read_manifest(corpus):
        file = row["file"]
        started = clock()
        message = parse(corpus / "messages" / file)
        findings = find_unsubscribe_links(message, vocabulary)
        header = inspect_list_unsubscribe(message)
        counted = count_visible_recipients(message)
        visible = counted.addressed  # the label counts the mailboxes of To and Cc
        scores.seconds.append(clock() - started)

        labelled = row["has_unsubscribe_link_in_body"]
        scores.body.add(file, bool(findings), reader_view.get(file, labelled) == "y")
        scores.body_as_labelled.add(file, bool(findings), labelled == "y")
        scores.header.add(file, header.present, row["has_list_unsubscribe_header"] == "y")
        scores.header_valid.add(file, header.valid, row["has_list_unsubscribe_header"] == "y")
        scores.one_click.add(file, header.one_click, row["has_list_unsubscribe_post"] == "y")
        labelled_over = int(row["visible_recipients"]) > RECIPIENT_LIMIT
        scores.recipients_refused.add(file, counted.external > RECIPIENT_LIMIT, labelled_over)
        scores.recipients_total += 1
        if str(visible) == row["visible_recipients"]:
            scores.recipients_exact += 1
        else:
            scores.recipient_misses.append(f"{file}: counted {visible}, label says {row['visible_recipients']}")
        link = f"{findings[0].target[:80]} ({findings[0].reason})" if findings else "-"
        scores.details.append(
            f"{file:<24} link {link}; header {'valid' if header.valid else 'present' if header.present else '-'}"
            f"{', one-click' if header.one_click else ''}; recipients {visible} (shown {counted.visible})"
        )
    return scores


def report(scores: Scores, verbose: bool = False) -> str:
    lines = [c.line() for c in scores.confusions]
    lines.insert(1, scores.body_as_labelled.line())
    rate = scores.recipients_exact / scores.recipients_total if scores.recipients_total else 1.0
    lines.append(
        f"{'To/Cc mailboxes, exact count':<36} {scores.recipients_exact}/{scores.recipients_total} ({rate:.1%})"
    )
    if scores.seconds:
        total = sum(scores.seconds)
        lines.append(
            f"{'time per message (all detectors)':<36} mean {total / len(scores.seconds) * 1000:.1f} ms, "
            f"max {max(scores.seconds) * 1000:.1f} ms, total {total:.2f} s"
        )
    for confusion in scores.confusions:
        lines.extend(f"  {confusion.name}: {miss}" for miss in confusion.misses)
    lines.extend(f"  recipients: {miss}" for miss in scores.recipient_misses)
    if verbose:
        lines.append("")
        lines.extend(scores.details)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="directory with MANIFEST.tsv and messages/")
    parser.add_argument("-v", "--verbose", action="store_true", help="list what was found in every message")
    args = parser.parse_args(argv)
    scores = score(args.corpus)
    print(report(scores, args.verbose))
    return 0 if scores.perfect else 1


if __name__ == "__main__":
    sys.exit(main())
