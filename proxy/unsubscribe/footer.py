"""Append a footer (an unsubscribe link) to the readable body of a raw message, byte-exactly.

``append_footer`` finds every part a reader sees - text/plain and text/html leaves that are
not attachments and not inside a message/* part (a forwarded mail or a bounce) - and adds
the footer to each, in that part's own charset and Content-Transfer-Encoding. Only those
parts' bodies change: the message header, every part header, the MIME boundaries, the
preamble, the epilogue and every other part keep their exact bytes, because the message is
never re-serialised by the ``email`` package (which re-folds headers and re-wraps bodies,
reliability anchors C27). HTML gets the footer before ``</body>`` (else before ``</html>``,
else at the end).

The walk is done on the bytes by ``policies.mimewalk`` (the one the shared parse of a big
message uses too), following RFC 2045/2046: a part's body ends before the CRLF that precedes
its boundary delimiter (that CRLF belongs to the delimiter, 2046 section 5.1.1). Malformed
structure is handled the way readers see it: a missing close delimiter ends the last part at
the end of the message (C03); a multipart without a boundary (C02) or whose boundary never
appears (C04) has no readable part here; an unknown charset (C05) is taken
as ASCII-compatible and its bytes are kept as they are; a body that cannot be decoded
(invalid base64, C06) or has an unknown transfer encoding (x-uuencode) is left alone.
Nesting deeper than ``MAX_DEPTH`` is not entered (C01).

When nothing readable is found, nothing is added and ``NoReadablePart`` is raised, so the
caller can refuse the message instead of sending it without its way out.

The work is CPU-bound on large messages: call it from a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import email
import email.policy
import email.quoprimime
import html
import re
import unicodedata
from dataclasses import dataclass

from policies.mimewalk import MAX_DEPTH, walk

__all__ = (
    "FOOTER_TEXTS",
    "MAX_DEPTH",
    "FooterError",
    "NoReadablePart",
    "append_footer",
    "footer_for",
    "readable_part_count",
)


#: The unsubscribe footer in each language: (plain text, HTML); ``{url}`` is the recipient's
#: own https link, ``{company}`` who sends. The words are ones every unsubscribe-link
#: detector knows ("Unsubscribe", "Afmelden"), so the footer satisfies a body-link check.
FOOTER_TEXTS: dict[str, tuple[str, str]] = {
    "en": (
        "You receive this mail from {company}. Unsubscribe: {url}",
        '<p style="font-size:12px;color:#555555;margin:24px 0 0 0">You receive this mail from {company}. '
        '<a href="{url}" style="color:#555555">Unsubscribe</a></p>',
    ),
    "nl": (
        "U ontvangt deze mail van {company}. Afmelden: {url}",
        '<p style="font-size:12px;color:#555555;margin:24px 0 0 0">U ontvangt deze mail van {company}. '
        '<a href="{url}" style="color:#555555">Afmelden</a></p>',
    ),
}


def footer_for(url: str, company: str, languages: tuple[str, ...] = ("en",)) -> tuple[str, str]:
    """The (plain text, HTML) footer for one recipient's link, in one or more languages."""
    texts: list[str] = []
    htmls: list[str] = []
    for language in languages:
        text, markup = FOOTER_TEXTS[language]
        texts.append(text.format(company=company, url=url))
        htmls.append(markup.format(company=html.escape(company), url=html.escape(url, quote=True)))
    return "\n".join(texts), "\n".join(htmls)


class FooterError(Exception):
    """The footer could not be added."""


class NoReadablePart(FooterError):
    """The message has no text/plain or text/html part a reader sees; nothing was added."""


@dataclass(frozen=True, slots=True)
class _Leaf:
    """A readable part: where its body lies in the message, and how it is encoded."""

    start: int
    end: int
    subtype: str  # "plain" or "html"
    charset: str | None
    transfer_encoding: str
    newline: str  # the message's line ending, for a body that has no line break of its own


_UUENCODE = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_BODY_END = re.compile(r"</body[\s>/]", re.IGNORECASE)
_HTML_END = re.compile(r"</html[\s>/]", re.IGNORECASE)
# Where a </body> does not end the body: inside a comment, a script, a style or a title.
_HIDDEN_HTML = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style|title)\b.*?(?:</\1\s*>|\Z)", re.IGNORECASE | re.DOTALL)


def _inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def append_footer(content: bytes, text: str, html_footer: str) -> bytes:
    """The message with ``text`` appended to every readable text/plain part and
    ``html_footer`` inserted into every readable text/html part.

    Raises ``NoReadablePart`` (and changes nothing) when no part could take the footer.
    Never raises anything else for any input.
    """
    leaves = _readable_leaves(content)
    edits: list[tuple[int, int, bytes]] = []
    for leaf in leaves:
        try:
            new_body = _with_footer(content[leaf.start : leaf.end], leaf, text, html_footer)
        except (ValueError, LookupError, UnicodeError, binascii.Error):
            new_body = None
        if new_body is not None:
            edits.append((leaf.start, leaf.end, new_body))
    if not edits:
        raise NoReadablePart("the message has no text/plain or text/html part a reader sees")
    out = bytearray()
    position = 0
    for start, end, body in sorted(edits):
        out += content[position:start]
        out += body
        position = end
    out += content[position:]
    return bytes(out)


def readable_part_count(content: bytes) -> int:
    """How many parts ``append_footer`` would consider (decodable or not)."""
    return len(_readable_leaves(content))


# ---- the walk ---------------------------------------------------------------------------------


def _readable_leaves(content: bytes) -> list[_Leaf]:
    """The text/plain and text/html parts a reader sees, from the shared MIME walk."""
    newline = "\r\n" if b"\r\n" in content or b"\n" not in content else "\n"
    return [
        _Leaf(entity.body_start, entity.end, entity.content_type[5:], entity.charset, entity.transfer_encoding, newline)
        for entity in walk(content)
        if entity.readable and entity.content_type in ("text/plain", "text/html")
    ]


# ---- one part ---------------------------------------------------------------------------------


def _codec(charset: str | None) -> tuple[str, bool]:
    """(Python codec, known) for a declared charset; unknown ones are read as ASCII-compatible."""
    if not charset:
        return "ascii", True
    name = charset.strip().strip('"').lower()
    candidates = [name, "cp" + name[len("windows-") :]] if name.startswith("windows-") else [name]
    for candidate in candidates:
        try:
            info = codecs.lookup(candidate)
        except (LookupError, ValueError):
            continue
        if getattr(info, "_is_text_encoding", True) and info.name not in {"idna", "punycode", "undefined"}:
            return info.name, True
    return "ascii", False


def _transfer_decode(body: bytes, encoding: str) -> bytes | None:
    """The part's bytes as a reader's client decodes them, or None when the footer cannot be
    added without changing what the reader sees."""
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding == "base64":
        # As the email package (and mail clients) read it: characters outside the alphabet are
        # skipped. A length no padding can repair (C06 "!!!notbase64===") is left alone.
        alphabet = _NOT_BASE64.sub(b"", body.split(b"=", 1)[0] if b"=" in body else body)
        if len(alphabet) % 4 == 1:
            return None
        try:
            return binascii.a2b_base64(alphabet + b"=" * (-len(alphabet) % 4))
        except binascii.Error:
            return None
    if encoding in _UUENCODE:
        return None  # uuencoded text: appending plain text would corrupt it
    # 7bit, 8bit, binary, none, and the misspellings seen in the wild ("7-bit", "8bits",
    # "plain"): readers show these bodies as they are.
    return body


def _transfer_encode(data: bytes, encoding: str, newline: bytes, *, text_lines: bool) -> bytes:
    if encoding == "quoted-printable":
        if not text_lines:
            # UTF-16 and the like: CR and LF bytes are halves of characters, not line ends, so
            # they are escaped (=0D, =0A) and only soft line breaks end the encoded lines.
            return binascii.b2a_qp(data, istext=False).replace(b"\n", newline)
        # quoprimime works on str; latin-1 maps each byte to one character and back. It escapes
        # every byte but printable ASCII before it splits lines, so only CR and LF break them.
        encoded = email.quoprimime.body_encode(data.decode("latin-1"), maxlinelen=76, eol=newline.decode("ascii"))
        return encoded.encode("ascii")
    if encoding == "base64":  # 76-character lines (RFC 2045 6.8), in the part's own line ending
        return base64.encodebytes(data).replace(b"\n", newline)
    return data


def _ascii_compatible(codec: str) -> bool:
    try:
        return "\r\na</>".encode(codec) == b"\r\na</>"
    except (UnicodeError, LookupError):
        return False


def _encodable(footer: str, codec: str, *, markup: bool, ascii_only: bool) -> str:
    """The footer made representable in the part's charset: HTML gets character references
    (&#233;), plain text loses its accents (é → e), then anything left becomes "?"."""
    target = "ascii" if ascii_only else codec
    try:
        footer.encode(target)
        return footer
    except UnicodeEncodeError:
        pass
    if markup:
        return footer.encode(target, "xmlcharrefreplace").decode(target)
    stripped = "".join(c for c in unicodedata.normalize("NFKD", footer) if not unicodedata.combining(c))
    return stripped.encode(target, "replace").decode(target)


def _newline_of(text: str, default: str) -> str:
    if "\r\n" in text:
        return "\r\n"
    if "\n" in text:
        return "\n"
    return default


def _with_footer(body: bytes, leaf: _Leaf, text_footer: str, html_footer: str) -> bytes | None:
    decoded = _transfer_decode(body, leaf.transfer_encoding)
    if decoded is None:
        return None
    codec, known = _codec(leaf.charset)
    with contextlib.suppress(UnicodeDecodeError):
        # A body that declares no charset but carries UTF-8 is read as UTF-8, as readers do.
        if codec == "ascii" and not leaf.charset and not decoded.isascii():
            decoded.decode("utf-8")
            codec = "utf-8"
    # surrogateescape keeps every byte the codec cannot read exactly as it was.
    text = decoded.decode(codec, "surrogateescape")
    newline = _newline_of(text, leaf.newline)
    ascii_only = leaf.transfer_encoding not in ("8bit", "binary", "quoted-printable", "base64") or not known
    if leaf.subtype == "html":
        footer = _encodable(html_footer, codec, markup=True, ascii_only=ascii_only).replace("\n", newline)
        hidden = [m.span() for m in _HIDDEN_HTML.finditer(text)]
        matches = [m for m in _BODY_END.finditer(text) if not _inside(m.start(), hidden)] or [
            m for m in _HTML_END.finditer(text) if not _inside(m.start(), hidden)
        ]
        if matches:
            at = matches[-1].start()
            new_text = text[:at] + footer + newline + text[at:]
        else:
            separator = "" if text.endswith(("\n", "\r")) or not text else newline
            new_text = text + separator + footer + newline
    else:
        footer = _encodable(text_footer, codec, markup=False, ascii_only=ascii_only).replace("\n", newline)
        separator = newline if text.endswith(("\n", "\r")) else newline * 2
        if not text:
            separator = ""
        new_text = text + separator + footer + newline
    encoded = new_text.encode(codec, "surrogateescape")
    return _transfer_encode(
        encoded, leaf.transfer_encoding, newline.encode("ascii"), text_lines=_ascii_compatible(codec)
    )
