"""The lean parse of big messages (policies/mimewalk.py) must show the policies exactly what
the full parse shows them.

Every message of the corpus and of the classifier's cases is parsed twice: in full, and lean
(``lean_above=0`` forces the lean path whatever the size). Everything a policy reads must be
equal: header values, addresses, the visible recipients, the text parts and what a reader
sees of them. Then the cases the lean copy exists for: a big attachment left out, a long
text part kept at its beginning and end.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from policies.message import ParsedMessage
from policies.mimewalk import lean_copy, walk
from tests.conftest import CORPUS, ROOT

FILES = sorted((CORPUS / "messages").glob("*.eml")) + sorted(
    (ROOT / "tests" / "fixtures" / "classifier").rglob("*.eml")
)
HEADERS = ("From", "To", "Cc", "Subject", "List-Unsubscribe", "List-Id", "Precedence", "Content-Type")


def test_there_are_messages_to_compare() -> None:
    assert len(FILES) > 200


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_lean_parse_shows_the_policies_what_the_full_parse_shows(path: Path) -> None:
    raw = path.read_bytes()
    full = ParsedMessage(raw)
    lean = ParsedMessage(raw, lean_above=0)
    assert lean.raw is raw
    for name in HEADERS:
        assert lean.header_values(name) == full.header_values(name), name
    assert lean.header_names == full.header_names
    assert lean.addresses("From", "Reply-To", "Sender") == full.addresses("From", "Reply-To", "Sender")
    assert lean.visible_recipients == full.visible_recipients
    assert lean.text_parts == full.text_parts
    assert lean.readable_texts == full.readable_texts


def newsletter_with_attachment(attachment_size: int, text: str = "Hello, our offer.\r\n") -> bytes:
    attachment = base64.encodebytes(bytes(range(256)) * (attachment_size // 256)).replace(b"\n", b"\r\n")
    return (
        b"From: news@shop.example\r\nTo: ann@example.net\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"This is the preamble no reader shows.\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode() + b"\r\n"
        b"--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="catalogue.pdf"\r\n\r\n' + attachment + b"\r\n"
        b"--b1--\r\nand an epilogue\r\n"
    )


def test_a_big_attachment_is_left_out_of_the_parse() -> None:
    raw = newsletter_with_attachment(3 * 1024 * 1024)
    lean, left_out = lean_copy(raw, head_bytes=1024, tail_bytes=1024)
    assert len(lean) < 1000
    assert left_out == len(raw) - len(lean)
    message = ParsedMessage(raw)  # above the default threshold: lean
    assert message.left_out == left_out
    assert [part.text for part in message.text_parts] == ["Hello, our offer.\r\n"]
    assert message.header("Subject") == "big"


def test_a_long_text_part_keeps_its_beginning_and_its_end() -> None:
    body = "".join(f"line {i:07d} of the offer\r\n" for i in range(200_000))
    footer = "To unsubscribe: https://shop.example/u/abc\r\n"
    raw = newsletter_with_attachment(1024, "Dear Ann,\r\n" + body + footer)
    message = ParsedMessage(raw, lean_above=0)
    (text,) = [part.text for part in message.text_parts]
    assert text.startswith("Dear Ann,\r\nline 0000000")
    assert text.endswith(footer + "\r\n") or text.endswith(footer)
    assert len(text) < 3 * 1024 * 1024 < len(body)
    assert message.left_out > 0


def test_a_long_base64_text_part_still_decodes_at_both_ends() -> None:
    text = ("Our catalogue, page after page. " * 40 + "\n") * 5000 + "Afmelden: https://shop.example/u/x\n"
    encoded = base64.encodebytes(text.encode()).replace(b"\n", b"\r\n")
    raw = (
        b"From: news@shop.example\r\nTo: ann@example.net\r\nSubject: b64\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded
    )
    message = ParsedMessage(raw, lean_above=0)
    (part,) = message.text_parts
    assert part.text.startswith("Our catalogue, page after page.")
    assert part.text.rstrip().endswith("Afmelden: https://shop.example/u/x")


@pytest.mark.parametrize(
    ("raw", "readable"),
    [
        (b"Subject: plain\r\n\r\nhello\r\n", ["text/plain"]),
        (b"Content-Type: multipart/mixed\r\n\r\nno boundary at all\r\n", ["multipart/mixed"]),
        (b'Content-Type: multipart/mixed; boundary="x"\r\n\r\nthe boundary never comes\r\n', ["multipart/mixed"]),
        (
            b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nContent-Type: message/rfc822\r\n\r\n'
            b"Subject: inner\r\n\r\nforwarded text\r\n--x\r\n\r\nown text\r\n",  # no close delimiter (C03)
            ["text/plain"],
        ),
        (
            b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nContent-Type: text/plain\r\n'
            b"Content-Disposition: attachment\r\n\r\nattached notes\r\n--x--\r\n",
            [],
        ),
    ],
    ids=["plain", "multipart-without-boundary", "boundary-never-appears", "forwarded-and-no-close", "text-attachment"],
)
def test_which_parts_are_readable(raw: bytes, readable: list[str]) -> None:
    assert [e.content_type for e in walk(raw) if e.readable] == readable
    full, lean = ParsedMessage(raw), ParsedMessage(raw, lean_above=0)
    assert lean.text_parts == full.text_parts


def test_deep_nesting_does_not_exhaust_the_stack() -> None:
    depth = 5000
    raw = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    raw += b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    entities = walk(raw)
    assert len(entities) > 50  # walked down to MAX_DEPTH, then one leaf; no RecursionError
    lean, _ = lean_copy(raw, head_bytes=1024, tail_bytes=1024)
    assert lean.endswith(b"deep\r\n")
