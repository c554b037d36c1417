"""The fast reading of a plain mailbox (``a@b.example``, ``Name <a@b.example>``) must give
exactly what the full structured parse gives, and must leave everything else to it."""

from __future__ import annotations

import email
import email.policy
import random
from email.message import EmailMessage
from pathlib import Path

import pytest

from policies.message import _SIMPLE_MAILBOX, ParsedMessage, _parse_address_field, _parse_address_field_fully

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "messages"
FIELDS = ("From", "To", "Cc", "Reply-To", "Sender", "Bcc", "Resent-To")

PLAIN = [
    "a@b.example",
    " a@b.example ",
    "<a@b.example>",
    "Jan Jansen <jan@example.nl>",
    "Jan   Jansen<jan@example.nl>",
    "Jan\tJansen <jan@example.nl>",
    "O'Brien <o@b.ie>",
    "first.last+tag@sub-domain.example.co.uk",
    "- <a@b.example>",
    "a@-b.example",
    "x{y}|z~ <a!#$%&'*+/^_`{|}~-@b.example>",
    "Shop <noreply@123.example>",
]

NOT_PLAIN = [
    "",
    "a@b",  # no dot in the domain: the full parse decides
    "a@b.example.",
    ".a@b.example",
    "a..b@b.example",
    "a@b_c.example",
    "a@b.example, c@d.example",
    "a@b.example,",
    "A.B <a@b.example>",  # obsolete phrase: a defect the full parse reports
    '"Jansen, Jan" <jan@example.nl>',
    "=?utf-8?q?a=40b=2Eexample?= <x@y.example>",
    "Jan =?utf-8?q?Jansen?= <jan@example.nl>",
    "Jan (comment) <jan@example.nl>",
    "jan@example.nl (Jan)",
    "Team: a@b.example, c@d.example;",
    "Jan\r\n Jansen <jan@example.nl>",
    "Jan <jan@example.nl> trailing",
    "Jan <jan@example.nl",
    "Jän <jan@example.nl>",
    "jan@exämple.nl",
    "<a@b.example> <c@d.example>",
    "Jan <<jan@example.nl>>",
    "a@b.example@c.example",
    "Jan? <jan@example.nl>",
    "Jan= <jan@example.nl>",
]


def _message() -> EmailMessage:
    msg = email.message_from_bytes(b"Subject: x\r\n\r\nbody\r\n", policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


@pytest.mark.parametrize("raw", PLAIN)
def test_plain_mailbox_read_fast_as_the_full_parse_reads_it(raw: str) -> None:
    assert _SIMPLE_MAILBOX.fullmatch(raw), "this one takes the fast reading"
    msg = _message()
    assert _parse_address_field("From", raw, msg) == _parse_address_field_fully("From", raw, msg)


@pytest.mark.parametrize("raw", NOT_PLAIN)
def test_anything_else_takes_the_full_parse(raw: str) -> None:
    assert _SIMPLE_MAILBOX.fullmatch(raw) is None


def test_every_address_field_of_the_corpus_reads_the_same_both_ways() -> None:
    fast_read = 0
    compared = 0
    for path in sorted(CORPUS.glob("*.eml")):
        parsed = ParsedMessage(path.read_bytes())
        for name in FIELDS:
            for raw in parsed.raw_header_values(name):
                compared += 1
                fast_read += _SIMPLE_MAILBOX.fullmatch(raw) is not None
                assert _parse_address_field(name, raw, parsed.msg) == _parse_address_field_fully(
                    name, raw, parsed.msg
                ), (path.name, name, raw)
    # The corpus has both kinds in number, so both ways are really compared.
    assert compared > 200 and 50 < fast_read < compared, (compared, fast_read)


def test_generated_fields_read_the_same_both_ways() -> None:
    """Mailbox-like strings from a seeded generator (atext, specials, white space, brackets):
    wherever the fast reading takes one, it agrees with the full parse."""
    rnd = random.Random(7)
    specials = list("ab. \t\"(),;:=?-_'!#$%&*+/^`{|}~x1@<>[]\\")
    msg = _message()

    def noise(most: int) -> str:
        return "".join(rnd.choice(specials) for _ in range(rnd.randint(0, most)))

    taken = 0
    for _ in range(40_000):
        local = "".join(rnd.choice("ab.-_+'x1!") for _ in range(rnd.randint(1, 5)))
        domain = "".join(rnd.choice("ab.-_x1") for _ in range(rnd.randint(1, 6)))
        raw = rnd.choice(
            [
                f"{noise(3)}{local}@{domain}{noise(2)}",
                f"{noise(8)}<{local}@{domain}>{noise(2)}",
                f"{noise(8)}{local}@{domain}",
            ]
        )
        if _SIMPLE_MAILBOX.fullmatch(raw):
            taken += 1
            assert _parse_address_field("From", raw, msg) == _parse_address_field_fully("From", raw, msg), raw
    assert taken > 100
