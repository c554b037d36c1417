"""append_footer: the footer lands in every readable part, in its own charset and transfer
encoding, and every other byte of the message stays as it was; malformed input never crashes."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from policies.message import ParsedMessage
from policies.unsubscribe import UnsubscribePolicy
from proxy.unsubscribe.footer import FOOTER_TEXTS, NoReadablePart, append_footer, footer_for, readable_part_count
from tests.conftest import CORPUS

URL = "https://unsubscribe.shop.example/u/AbC-123_xyz"
TEXT, HTML = footer_for(URL, "Shop BV", ("en",))
HEADER = (
    b"From: Shop <news@shop.example>\r\nTo: bob@example.org\r\nSubject: =?utf-8?q?Nieuws_=E2=9C=93?=\r\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <n1@shop.example>\r\n"
    b"X-Folded: one\r\n two\r\n"
)


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def text_parts(raw: bytes) -> list[tuple[str, str]]:
    return [(p.content_type, p.text) for p in ParsedMessage(raw).text_parts]


# ---- single-part -------------------------------------------------------------------------------


def test_plain_7bit_gets_the_footer_at_the_end_and_nothing_else_changes() -> None:
    raw = HEADER + b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHello Bob,\r\nnew shoes.\r\n"
    out = append_footer(raw, TEXT, HTML)
    assert out == raw + b"\r\n" + TEXT.encode() + b"\r\n"
    assert header_block(out) == header_block(raw)


def test_a_message_without_content_type_is_plain_text() -> None:
    raw = HEADER + b"\r\nHello"
    out = append_footer(raw, TEXT, HTML)
    assert out == raw + b"\r\n\r\n" + TEXT.encode() + b"\r\n"


_BODIES = [
    ("utf-8", "Grüße aus Köln – €10 korting ✓"),
    ("iso-8859-1", "Geachte heer, café à la carte"),
    ("windows-1252", "Prijs \u20ac 10 \u2026 \u201caanbieding\u201d"),
    ("iso-2022-jp", "新しい靴"),
    ("utf-16", "Hello in UTF-16"),
]


@pytest.mark.parametrize(
    ("charset", "body", "encoding"),
    [
        (charset, body, encoding)
        for charset, body in _BODIES
        for encoding in ("quoted-printable", "base64", "8bit")
        if not (charset == "utf-16" and encoding == "8bit")  # NUL bytes: never 8bit in mail
    ],
)
def test_plain_text_in_its_own_charset_and_encoding(charset: str, body: str, encoding: str) -> None:
    data = (body + "\r\n").encode(charset)
    if encoding == "quoted-printable":
        # binary mode: the body's own CR LF become =0D=0A, so only soft breaks are raw line ends
        encoded = binascii.b2a_qp(data, istext=False).replace(b"\n", b"\r\n")
    elif encoding == "base64":
        encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    else:
        encoded = data
    raw = (
        HEADER
        + f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n".encode()
        + encoded
    )
    out = append_footer(raw, TEXT, HTML)
    assert header_block(out) == header_block(raw)
    ((ctype, shown),) = text_parts(out)
    assert ctype == "text/plain"
    assert shown.replace("\r\n", "\n") == body + "\n\n" + TEXT + "\n"
    if encoding != "8bit":
        body_lines = out.split(b"\r\n\r\n", 1)[1].split(b"\r\n")
        assert all(len(line) <= 76 for line in body_lines), "transfer-encoded lines stay short"
        assert out.split(b"\r\n\r\n", 1)[1].isascii()


def test_a_footer_the_charset_cannot_hold_is_made_to_fit() -> None:
    text, markup = footer_for(URL, "Société Générale ✓", ("nl",))
    raw = HEADER + b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\nHoi\r\n"
    out = append_footer(raw, text, markup)
    assert out.isascii(), "a 7bit part stays 7bit"
    assert "Societe Generale ?" in text_parts(out)[0][1]
    html_raw = HEADER + b"Content-Type: text/html; charset=us-ascii\r\n\r\n<html><body><p>Hoi</p></body></html>\r\n"
    out = append_footer(html_raw, text, markup)
    assert b"Soci&#233;t&#233; G&#233;n&#233;rale &#10003;" in out
    assert "Société Générale ✓" in ParsedMessage(out).readable_texts[0].text


def test_html_gets_the_footer_before_the_end_of_the_body() -> None:
    page = "<html><head><title>x</title></head><BODY><p>Nieuwe schoenen €</p>\r\n</BODY>\r\n</html>\r\n"
    raw = (
        HEADER
        + b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(page.encode()).replace(b"\n", b"\r\n")
    )
    out = append_footer(raw, TEXT, HTML)
    ((_, shown),) = text_parts(out)
    assert shown == page.replace("</BODY>", HTML + "\r\n</BODY>")


def test_html_without_a_body_tag() -> None:
    for page, expected in (
        ("<p>Hi</p>\r\n</html>\r\n", "<p>Hi</p>\r\n" + HTML + "\r\n</html>\r\n"),
        ("<p>Hi</p>\r\n", "<p>Hi</p>\r\n" + HTML + "\r\n"),
        ("<p>Hi</p>", "<p>Hi</p>\r\n" + HTML + "\r\n"),
    ):
        raw = HEADER + b"Content-Type: text/html\r\n\r\n" + page.encode()
        assert text_parts(append_footer(raw, TEXT, HTML))[0][1] == expected


def test_quoted_printable_html_with_a_body_tag_split_by_a_soft_break() -> None:
    page = "<html><body><p>" + "x" * 40 + "=</p></body></html>\r\n"
    encoded = b"<html><body><p>" + b"x" * 40 + b"=3D</p></bo=\r\ndy></html>\r\n"
    raw = HEADER + b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    out = append_footer(raw + encoded, TEXT, HTML)
    assert text_parts(out)[0][1] == page.replace("</body>", HTML + "\r\n</body>")


# ---- multipart ---------------------------------------------------------------------------------

ALTERNATIVE = (
    HEADER + b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="=_alt"\r\n\r\n'
    b"This is the preamble.\r\n"
    b"--=_alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Nieuwe schoenen =E2=82=AC10\r\n"
    b"--=_alt  \r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><body><p>Nieuwe schoenen</p></body></html>\r\n"
    b"--=_alt--\r\nThe epilogue.\r\n"
)


def test_multipart_alternative_gets_a_footer_in_both_parts_and_keeps_its_frame() -> None:
    out = append_footer(ALTERNATIVE, TEXT, HTML)
    parts = text_parts(out)
    assert parts == [
        ("text/plain", "Nieuwe schoenen €10\r\n\r\n" + TEXT + "\r\n"),
        # the CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1), not to the part
        ("text/html", "<html><body><p>Nieuwe schoenen</p>" + HTML + "\r\n</body></html>"),
    ]
    assert header_block(out) == header_block(ALTERNATIVE)
    for frame in (
        b"This is the preamble.\r\n--=_alt\r\n",
        b"\r\n--=_alt  \r\nContent-Type: text/html",
        b"\r\n--=_alt--\r\nThe epilogue.\r\n",
    ):
        assert frame in out
    assert readable_part_count(ALTERNATIVE) == 2


def test_attachments_and_forwarded_messages_are_untouched() -> None:
    attached_text = b"Content-Type: text/plain; name=notes.txt\r\nContent-Disposition: attachment; filename=notes.txt\r\n\r\nprivate notes\r\n"
    pdf = b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"
    forwarded = (
        b"Content-Type: message/rfc822\r\n\r\n"
        b"From: a@b.example\r\nSubject: old\r\nContent-Type: text/plain\r\n\r\nforwarded text\r\n"
    )
    raw = (
        HEADER + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="m"\r\n\r\n'
        b"--m\r\nContent-Type: text/plain\r\n\r\nBody text\r\n"
        b"--m\r\n" + attached_text + b"--m\r\n" + pdf + b"--m\r\n" + forwarded + b"--m--\r\n"
    )
    out = append_footer(raw, TEXT, HTML)
    for untouched in (attached_text, pdf, forwarded):
        assert untouched in out
    assert out == raw.replace(b"Body text\r\n", b"Body text\r\n\r\n" + TEXT.encode() + b"\r\n\r\n", 1)


def test_nested_related_inside_alternative_inside_mixed() -> None:
    raw = (
        HEADER + b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n'
        b'--a\r\nContent-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
        b'--b\r\nContent-Type: multipart/related; boundary="c"\r\n\r\n'
        b"--c\r\nContent-Type: text/html\r\n\r\n<body>html</body>\r\n"
        b"--c\r\nContent-Type: image/png\r\nContent-ID: <logo>\r\n\r\niVBORw0KGgo=\r\n--c--\r\n"
        b"--b--\r\n--a--\r\n"
    )
    out = append_footer(raw, TEXT, HTML)
    assert [t for _, t in text_parts(out)] == ["plain\r\n\r\n" + TEXT + "\r\n", "<body>html" + HTML + "\r\n</body>"]
    assert b"--c\r\nContent-Type: image/png\r\nContent-ID: <logo>\r\n\r\niVBORw0KGgo=\r\n--c--\r\n" in out


def test_no_readable_part_adds_nothing_and_says_so() -> None:
    cases = [
        HEADER + b"Content-Type: application/pdf\r\n\r\nJVBERi0xLjQK\r\n",
        HEADER + b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n",  # C02
        HEADER + b'Content-Type: multipart/mixed; boundary="never"\r\n\r\nno parts here\r\n',  # C04
        HEADER + b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner text\r\n",
        HEADER + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64===\r\n",  # C06
        HEADER + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n",  # C06
    ]
    for raw in cases:
        with pytest.raises(NoReadablePart):
            append_footer(raw, TEXT, HTML)


def test_an_unknown_charset_is_kept_byte_for_byte() -> None:  # C05
    raw = HEADER + b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nCaf\xe9 \xff\xfe\r\n"
    out = append_footer(raw, TEXT, HTML)
    assert out == raw + b"\r\n" + TEXT.encode() + b"\r\n"


@pytest.mark.parametrize("encoding", ["7-bit", "8bits", "plain", "X-Unknown"])
def test_misspelled_transfer_encodings_are_read_as_written(encoding: str) -> None:
    raw = HEADER + f"Content-Type: text/plain\r\nContent-Transfer-Encoding: {encoding}\r\n\r\nHi\r\n".encode()
    text, markup = footer_for(URL, "Bücher GmbH", ("en",))
    out = append_footer(raw, text, markup)
    assert out == raw + b"\r\n" + text.replace("ü", "u").encode("ascii") + b"\r\n", "ASCII: the encoding is unknown"


def test_base64_with_stray_characters_is_read_as_readers_do() -> None:
    raw = HEADER + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGV!sbG8\r\n"
    assert text_parts(append_footer(raw, TEXT, HTML))[0][1] == "hello\r\n\r\n" + TEXT + "\r\n"


def test_undeclared_utf8_stays_utf8() -> None:
    raw = HEADER + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    text, markup = footer_for(URL, "Bücher GmbH", ("en",))
    out = append_footer(raw, text, markup)
    assert out == raw + b"\r\n" + text.encode("utf-8") + b"\r\n"


def test_missing_close_delimiter_ends_the_last_part_at_the_end() -> None:  # C03
    raw = (
        HEADER
        + b'Content-Type: multipart/alternative; boundary="q"\r\n\r\n--q\r\nContent-Type: text/plain\r\n\r\nlast words\r\n'
    )
    out = append_footer(raw, TEXT, HTML)
    assert out.endswith(b"last words\r\n\r\n" + TEXT.encode() + b"\r\n")


def test_lf_only_messages() -> None:
    raw = b'From: a@b.example\nContent-Type: multipart/alternative; boundary="z"\n\n--z\nContent-Type: text/plain\n\nhi\n--z--\n'
    out = append_footer(raw, TEXT, HTML)
    assert out == raw.replace(b"hi\n", b"hi\n\n" + TEXT.encode() + b"\n\n")


# ---- robustness --------------------------------------------------------------------------------


def _malformed() -> list[tuple[str, bytes]]:
    deep = b"".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode() for i in range(1000))
    return [
        ("C01 1000 nested multiparts", HEADER + deep + b"Content-Type: text/plain\r\n\r\ndeep\r\n"),
        ("C02 no boundary", HEADER + b"Content-Type: multipart/mixed\r\n\r\nbody\r\n"),
        ("C03 no close delimiter", HEADER + b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\nhi\r\n'),
        ("C04 boundary never appears", HEADER + b'Content-Type: multipart/mixed; boundary="x"\r\n\r\nhi\r\n'),
        ("C05 unknown charset", HEADER + b"Content-Type: text/html; charset=x-no-such-charset\r\n\r\n<b>\xe9</b>\r\n"),
        ("C06 bad base64", HEADER + b"Content-Transfer-Encoding: base64\r\n\r\n!!!notbase64===\r\n"),
        (
            "C06 broken QP",
            HEADER + b'Content-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ <a href=3D"https://x/=\r\ny">\r\n',
        ),
        ("C07 no-colon line", b"Subject: x\r\nThis line has no colon\r\nTo: hidden@victim.example\r\n\r\nbody\r\n"),
        ("C08 space before colon", b"TO : hidden@victim.example\r\nSubject: x\r\n\r\nbody\r\n"),
        ("C09 long folded subject", b"Subject: " + b"a" * 900 + b"\r\n" + b" b\r\n" * 20000 + b"\r\nbody\r\n"),
        ("C10 many header fields", b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)) + b"\r\nbody\r\n"),
        (
            "C12 8-bit junk in headers",
            b"From: J\xf6rg <j@x.example>\r\nTo: \xff\xfe <t@x.example>\r\n\r\nbody \xc3\r\n",
        ),
        ("empty", b""),
        ("header only", b"Subject: nothing\r\n"),
        ("blank line only", b"\r\n"),
        ("bad params", HEADER + b'Content-Type: text/plain; charset="\r\n\r\nbody\r\n'),
        (
            "boundary with regex chars",
            HEADER
            + b'Content-Type: multipart/mixed; boundary="(.*)+[x]"\r\n\r\n--(.*)+[x]\r\n\r\nhi\r\n--(.*)+[x]--\r\n',
        ),
        (
            "multipart/digest",
            HEADER
            + b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\nSubject: s\r\n\r\ninner\r\n--d--\r\n',
        ),
        ("utf-16 declared, odd bytes", HEADER + b"Content-Type: text/plain; charset=utf-16\r\n\r\n\xff\xfeh\x00i"),
        ("charset=rot13", HEADER + b"Content-Type: text/plain; charset=rot13\r\n\r\nuryyb\r\n"),
    ]


@pytest.mark.parametrize(("name", "raw"), _malformed(), ids=[name for name, _ in _malformed()])
def test_malformed_messages_never_crash(name: str, raw: bytes) -> None:
    try:
        out = append_footer(raw, TEXT, HTML)
    except NoReadablePart:
        return
    assert len(out) > len(raw)
    assert URL.encode() in out or any(URL in text.text for text in ParsedMessage(out).readable_texts)


def _corpus() -> list[Path]:
    return sorted((CORPUS / "messages").glob("*.eml"))


def _seen(raw: bytes) -> bool:
    """A reader (sendguard's own parse) sees the footer: in the text, or as a link."""
    return any(
        URL in text.text or any(link.target == URL for link in text.links) for text in ParsedMessage(raw).readable_texts
    )


def test_every_corpus_message() -> None:
    footered = seen = 0
    unseen: list[str] = []
    for path in _corpus():
        raw = path.read_bytes()
        try:
            out = append_footer(raw, TEXT, HTML)
        except NoReadablePart:
            continue
        footered += 1
        separator = b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n"
        assert out.split(separator, 1)[0] == raw.split(separator, 1)[0], f"{path.name}: the header block changed"
        if _seen(out):
            seen += 1
        else:
            unseen.append(path.name)
            # Only where readers disagree about the structure (the parser reports defects) may
            # the footer land where sendguard's own reading does not look.
            assert ParsedMessage(raw).defects, f"{path.name}: a well-formed message whose footer nobody sees"
    assert footered >= 125, footered
    assert seen >= footered - 3, unseen


def test_the_footer_satisfies_the_unsubscribe_policy() -> None:
    policy = UnsubscribePolicy(UnsubscribePolicy.Options(require=("body",)))
    for language in FOOTER_TEXTS:
        text, markup = footer_for(URL, "Shop BV", (language,))
        for raw in (HEADER + b"Content-Type: text/plain\r\n\r\nNieuwe schoenen!\r\n", ALTERNATIVE):
            assert policy.judge(ParsedMessage(raw)).action == "reject"
            verdict = policy.judge(ParsedMessage(append_footer(raw, text, markup)))
            assert verdict.action == "accept", (language, verdict.reason)
            assert verdict.evidence["body_link"] == URL
