"""The one parse of a message that every policy shares.

``ParsedMessage`` wraps the bytes the upstream will receive (already normalised by the
proxy) and the ``email`` package's parse of them. Expensive views (decoded text parts,
address lists) are computed on first use and cached, so a message is decoded at most once
whatever the number of policies.

Everything here is defensive: the stdlib parser raises on some malformed input
(unknown charsets, missing boundaries, deep nesting), and a policy must never crash on
a message, so every accessor degrades to a best-effort answer instead.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import email
import email.header
import email.policy
import email.utils
import html
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from functools import cached_property

__all__ = (
    "Address",
    "Link",
    "MessageParseError",
    "ParsedMessage",
    "ReadableText",
    "TextPart",
    "find_text_links",
    "render_html",
    "split_header_block",
)


class MessageParseError(Exception):
    """The message cannot be parsed safely (e.g. MIME nesting beyond the limit)."""


@dataclass(frozen=True, slots=True)
class TextPart:
    """A human-readable body part: text/plain or text/html, decoded to str."""

    content_type: str
    text: str
    charset: str
    #: The declared Content-Transfer-Encoding, lower case ("" when absent).
    transfer_encoding: str = ""


@dataclass(frozen=True, slots=True)
class Address:
    display_name: str
    addr_spec: str

    @property
    def normalized(self) -> str:
        """Case-folded addr-spec, for comparing and counting (RFC 5321 local parts are
        case-sensitive in theory, but every real mail system treats them as equal)."""
        return self.addr_spec.strip().lower()

    @property
    def domain(self) -> str:
        """The part after the last "@", lower case, without a trailing dot."""
        return self.normalized.rpartition("@")[2].rstrip(".")


@dataclass(frozen=True, slots=True)
class Link:
    """Something a reader can follow: an HTML anchor with visible content, or a URL or a bare
    e-mail address written in the text.

    ``target`` is the href, URL or address as written (entities resolved, white space
    removed); ``label`` is what the reader sees of an anchor (its text, the alt text of an
    image in it, its title) and empty for a link written as text; ``start`` and ``end``
    locate the link in the text of its ``ReadableText``.
    """

    kind: str  # "anchor", "url" or "address"
    target: str
    label: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ReadableText:
    """One text part as a reader sees it, with the links in it.

    For text/html, ``text`` is the rendered visible text: no markup, comments, head, script
    or style, and nothing inside hidden elements; block elements become line breaks (a
    blank line ends a paragraph). For text/plain it is the decoded text itself.
    ``repaired`` marks a second reading of a part that declared one transfer encoding but
    was sent quoted-printable (``=3D"http...`` left in the markup).
    """

    content_type: str
    text: str
    links: tuple[Link, ...] = field(default=())
    repaired: bool = False


def split_header_block(raw: bytes) -> tuple[bytes, bytes]:
    """Split raw message bytes into (header block, rest starting with the blank line).

    The header block ends at the first empty line (RFC 5322 section 2.1). A message
    without a blank line is all header.
    """
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = raw.find(separator)
        if index != -1:
            cut = index + len(separator) // 2
            return raw[:cut], raw[cut:]
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw
    return raw, b""


#: Codecs Python knows that are not mail charsets: decoding with them would read text no
#: mail reader shows (``unicode_escape`` turns ``\\u0041`` into ``A``).
_NOT_MAIL_CHARSETS = frozenset({"idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined", "charmap"})


def _mail_codec(name: str) -> str | None:
    """The Python codec for a declared charset, or None when there is no usable one."""
    candidates = [name]
    if name.lower().startswith("windows-"):  # windows-874 is known to Python as cp874 only
        candidates.append("cp" + name[len("windows-") :])
    for candidate in candidates:
        try:
            info = codecs.lookup(candidate)
        except (LookupError, ValueError):
            continue
        # rot13, base64, zlib ... are bytes-to-bytes codecs: bytes.decode() raises LookupError.
        if getattr(info, "_is_text_encoding", True) and info.name not in _NOT_MAIL_CHARSETS:
            return candidate
    return None


def _decode_bytes(payload: bytes, charset: str | None) -> tuple[str, str]:
    """Decode with the declared charset, falling back safely when it is unknown or wrong."""
    candidates = [c for c in (charset, "utf-8", "cp1252") if c]
    for name in candidates:
        codec = _mail_codec(name)
        if codec is None:
            continue
        try:
            return payload.decode(codec), codec
        except (UnicodeDecodeError, ValueError, LookupError):
            continue
    return payload.decode("latin-1", errors="replace"), "latin-1"


class ParsedMessage:
    """A message parsed once with ``email.policy.default``."""

    def __init__(self, raw: bytes, *, max_mime_depth: int = 50) -> None:
        self.raw = raw
        self._addresses: dict[str, list[Address]] = {}
        try:
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            self.msg: EmailMessage = parsed
        except RecursionError as error:
            raise MessageParseError("MIME structure is nested too deeply to parse") from error
        depth = self._depth(self.msg, 0, max_mime_depth)
        if depth > max_mime_depth:
            raise MessageParseError(f"MIME nesting exceeds the limit of {max_mime_depth} levels")

    @staticmethod
    def _depth(part: Message, level: int, limit: int) -> int:
        if level > limit:
            return level
        payload = part.get_payload()
        if isinstance(payload, list):
            return max(
                (ParsedMessage._depth(p, level + 1, limit) for p in payload if isinstance(p, Message)), default=level
            )
        return level

    # ---- headers ---------------------------------------------------------------------

    def raw_header_values(self, name: str) -> list[str]:
        """Undecoded values of every field called ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [str(value) for key, value in self.msg._headers if key.lower() == wanted]  # type: ignore[attr-defined]

    def header_values(self, name: str) -> list[str]:
        """Decoded values (RFC 2047 words resolved) of every field called ``name``."""
        out: list[str] = []
        for raw in self.raw_header_values(name):
            try:
                out.append(str(self.msg.policy.header_factory(name, raw)))  # type: ignore[attr-defined]
            except Exception:  # a malformed field must not crash a policy
                out.append(raw)
        return out

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def has_header(self, name: str) -> bool:
        return any(value.strip() for value in self.raw_header_values(name))

    @cached_property
    def raw_fields(self) -> dict[str, list[str]]:
        """Lower-case field name -> its undecoded, non-empty values, in order."""
        out: dict[str, list[str]] = {}
        for key, value in self.msg._headers:  # type: ignore[attr-defined]
            text = str(value)
            if text.strip():
                out.setdefault(key.lower(), []).append(text)
        return out

    @cached_property
    def header_names(self) -> list[str]:
        return [key for key, _ in self.msg._headers]  # type: ignore[attr-defined]

    @cached_property
    def defects(self) -> list[str]:
        found = [type(d).__name__ for d in self.msg.defects]
        for part in self.msg.walk():
            if part is not self.msg:
                found.extend(type(d).__name__ for d in part.defects)
        return found

    # ---- addresses ---------------------------------------------------------------------

    def addresses(self, *names: str) -> list[Address]:
        """Addresses in the named fields, group members included, in order of appearance.

        Each field is parsed with the structured parser; where it reports defects the raw
        value is also parsed leniently and the larger result is kept, because the strict
        parser drops some malformed but visible addresses. Display names are decoded after
        the structure is parsed, never before (an encoded comma is not a separator).
        """
        out: list[Address] = []
        for name in names:
            key = name.lower()
            parsed = self._addresses.get(key)
            if parsed is None:  # every policy asks for From; parse each field once per message
                parsed = [a for raw in self.raw_header_values(name) for a in _parse_address_field(name, raw, self.msg)]
                self._addresses[key] = parsed
            out.extend(parsed)
        return out

    @cached_property
    def visible_recipients(self) -> list[Address]:
        """The distinct addresses every recipient sees: To and Cc (all fields of each name,
        group members included), compared case-insensitively, first spelling kept.

        Bcc, Resent-*, From and Reply-To are not recipients others can see.
        """
        seen: dict[str, Address] = {}
        for address in self.addresses("To", "Cc"):
            seen.setdefault(address.normalized, address)
        return list(seen.values())

    # ---- body --------------------------------------------------------------------------

    @cached_property
    def readable_texts(self) -> list[ReadableText]:
        """What a reader sees of each text part, with its links (see ``ReadableText``).

        A part whose declared transfer encoding is not quoted-printable but whose text
        still carries quoted-printable escapes (``=3D``, soft line breaks) is read twice:
        as sent, and decoded, so that links inside it are seen either way.
        """
        out: list[ReadableText] = []
        for part in self.text_parts:
            out.append(_readable(part.content_type, part.text))
            repaired = _undo_misdeclared_qp(part)
            if repaired is not None:
                out.append(_readable(part.content_type, repaired, repaired=True))
        return out

    @cached_property
    def text_parts(self) -> list[TextPart]:
        """text/plain and text/html parts a reader sees: not attachments, nothing below
        a message/* part (forwarded mail, bounces)."""
        return list(self._walk_text(self.msg, top=True))

    def _walk_text(self, part: Message, *, top: bool) -> Iterator[TextPart]:
        mime = _mime_fields(part)
        try:
            ctype = mime.get_content_type()
        except Exception:
            ctype = "text/plain"
        if ctype.startswith("message/"):
            return
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                for sub in payload:
                    if isinstance(sub, Message):
                        yield from self._walk_text(sub, top=False)
            return
        if not top and (mime.get_content_disposition() or "").lower() == "attachment":
            return
        if ctype not in ("text/plain", "text/html"):
            # A multipart declared without a boundary parses as a leaf of a multipart type;
            # read it as text so that nothing in it goes unseen.
            if not ctype.startswith("multipart/"):
                return
            ctype = "text/plain"
        try:
            payload_bytes = part.get_payload(decode=True)
        except Exception:
            payload_bytes = None
        if not isinstance(payload_bytes, bytes):
            raw_payload = part.get_payload()
            payload_bytes = raw_payload.encode("utf-8", "surrogateescape") if isinstance(raw_payload, str) else b""
        try:
            declared = mime.get_content_charset()
        except Exception:
            declared = None
        text, used = _decode_bytes(payload_bytes, declared)
        transfer_encoding = str(mime.get("Content-Transfer-Encoding", "")).strip().lower()
        yield TextPart(ctype, text, used, transfer_encoding)


#: The MIME fields a part's type, disposition, charset and encoding come from.
_MIME_FIELDS = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})


def _mime_fields(part: Message) -> Message:
    """A part's MIME fields in a ``compat32`` message, which reads type, parameters and
    disposition from the raw strings with the stdlib's long-standing parser, where
    ``policy.default`` builds a structured header object for every read (most of the cost
    of walking a message's parts). The default type (message/rfc822 in a digest) is kept."""
    fields = Message()
    for key, value in part._headers:  # type: ignore[attr-defined]
        if key.lower() in _MIME_FIELDS:
            fields[key] = str(value)
    fields.set_default_type(part.get_default_type())
    return fields


def _parse_address_field(name: str, raw: str, msg: EmailMessage) -> list[Address]:
    strict: list[Address] = []
    defective = True
    try:
        header = msg.policy.header_factory(name, raw)  # type: ignore[attr-defined]
        # An addr-spec needs a domain: an encoded-word that decodes to "a@x, b@y" parses as
        # one quoted local part without a domain (reliability anchors C14), not an address.
        strict = [Address(str(a.display_name), str(a.addr_spec)) for a in header.addresses if a.domain and a.username]
        defective = bool(header.defects)
    except Exception:
        strict, defective = [], True
    if not defective:
        return strict
    try:
        lenient_pairs = email.utils.getaddresses([raw])
    except Exception:
        lenient_pairs = []
    # The lenient parser works on the undecoded text, so an encoded-word can never turn into
    # an address (C13); its display names are decoded afterwards, for display only.
    lenient = [Address(_decode_display_name(display), spec) for display, spec in lenient_pairs if _has_domain(spec)]
    strict_set = {a.normalized for a in strict}
    lenient_set = {a.normalized for a in lenient}
    return lenient if len(lenient_set) > len(strict_set) else strict


def _has_domain(spec: str) -> bool:
    local, at, domain = spec.strip().rpartition("@")
    return bool(at and local and domain.strip("."))


def _decode_display_name(display: str) -> str:
    if "=?" not in display:
        return display
    try:
        return str(email.header.make_header(email.header.decode_header(display)))
    except Exception:
        return display


# ---- readable text -------------------------------------------------------------------------
#
# HTML is rendered by a small tokenizer written for this purpose instead of html.parser: on
# the CPython 3.11 this project runs on, html.parser re-scans an unfinished construct to the
# end of the input each time it meets one, so a message of repeated "<!--" or "<a " takes
# time quadratic in its size (measured: 40 KB of "<a " 17 s, 1 MB of "<!--" 420 s). The
# tokenizer follows the HTML5 tokenizer where it matters for reading (comments, raw-text
# elements, quoted attribute values; an unfinished tag or comment at the end swallows the
# rest, as in a browser) and looks at every character a bounded number of times: 1 MB of
# any of those inputs renders in under a second.

#: Text parts longer than this are read at their head and tail only (the unsubscribe
#: footer is at the end); bounds the work on a 25 MB single-part message.
MAX_READABLE_CHARS = 4_000_000

_QP_ESCAPE = re.compile(r"=[0-9A-F]{2}")
_QP_SOFT_BREAK = re.compile(r"=\r?\n")


def _undo_misdeclared_qp(part: TextPart) -> str | None:
    """The part decoded as quoted-printable when it declared another encoding but was QP."""
    if part.transfer_encoding in ("quoted-printable", "base64"):
        return None
    text = part.text
    if "=3D" not in text and len(_QP_SOFT_BREAK.findall(text, 0, 200_000)) < 3:
        return None
    if not _QP_ESCAPE.search(text):
        return None
    try:
        raw = text.encode(part.charset, errors="replace")
        decoded = binascii.a2b_qp(raw)
    except Exception:
        return None
    return _decode_bytes(decoded, part.charset)[0]


def _readable(content_type: str, text: str, *, repaired: bool = False) -> ReadableText:
    if len(text) > MAX_READABLE_CHARS:
        half = MAX_READABLE_CHARS // 2
        text = text[:half] + "\n\n" + text[-half:]
    if content_type == "text/html":
        visible, anchors = render_html(text)
        covered = [(link.start, link.end) for link in anchors]
        written = [
            link for link in find_text_links(visible) if not any(s <= link.start < e for s, e in covered)
        ]  # a URL that is itself an anchor's text is that anchor
        links = sorted([*anchors, *written], key=lambda link: link.start)
        return ReadableText(content_type, visible, tuple(links), repaired)
    return ReadableText(content_type, text, tuple(find_text_links(text)), repaired)


# URLs as mail readers auto-link them; the look-behind keeps "xhttp://" and "a.www." out.
_TEXT_URL = re.compile(r"(?<![\w@.\-])(?:https?://|mailto:|www\.)[^\s<>\"'`{}|\\^\[\]]+", re.I)
# ASCII only: a CJK character glued to an address must not become part of its local part.
# The look-behind lets a match start only where a run of address characters starts, which
# keeps the scan linear on long runs without "@".
_TEXT_ADDRESS = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
_URL_TRAILING = ".,;:!?)'=*"


def find_text_links(text: str) -> list[Link]:
    """URLs (http, https, mailto, www.) and bare e-mail addresses written in ``text``."""
    links: list[Link] = []
    for match in _TEXT_URL.finditer(text):
        url = match.group().rstrip(_URL_TRAILING)
        lowered = url.lower()
        if lowered in ("mailto:", "www.") or lowered.endswith("://"):
            continue
        links.append(Link("url", url, "", match.start(), match.start() + len(url)))
    url_spans = [(link.start, link.end) for link in links]
    span_index = 0
    for match in _TEXT_ADDRESS.finditer(text):
        start = match.start()
        while span_index < len(url_spans) and url_spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(url_spans) and url_spans[span_index][0] <= start:
            continue  # part of a URL (mailto:a@b, http://user@host)
        address = match.group().strip(".")
        links.append(Link("address", address, "", start, start + len(address)))
    links.sort(key=lambda link: link.start)
    return links


# ---- the HTML tokenizer ----

_MARKUP_OPEN = re.compile(r"<[A-Za-z/!?]")
_TAG_NAME = re.compile(r"[A-Za-z][^\t\n\f\r />]*")
_TAG_SPACE = re.compile(r"[\t\n\f\r /]*")
_ATTR_NAME = re.compile(r"[^\t\n\f\r />][^\t\n\f\r />=]*")
_ATTR_EQUALS = re.compile(r"[\t\n\f\r ]*=[\t\n\f\r ]*")
_UNQUOTED_VALUE = re.compile(r"[^\t\n\f\r >]*")
_MAX_ATTRIBUTES = 64

#: Elements whose content is raw text up to their end tag (HTML5 "raw text" and "RCDATA").
_RAW_TEXT = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes")
_RAW_TEXT_END = {name: re.compile(rf"</{name}(?=[\t\n\f\r />]|$)", re.I) for name in _RAW_TEXT}

Token = tuple[str, str, tuple[tuple[str, str], ...]]  # (kind, name or text, attributes)


def _tokenize(source: str) -> Iterator[Token]:
    """HTML tokens: ("text", data, ()), ("start", name, attrs), ("end", name, ()) and
    ("raw", data, ()) for the content of raw-text elements."""
    n = len(source)
    pos = 0  # where to look for the next "<"
    text_from = 0  # start of the text not yet given out
    while pos < n:
        opening = _MARKUP_OPEN.search(source, pos)  # a "<" that starts nothing is text
        if opening is None:
            break
        lt = opening.start()
        nxt = source[lt + 1]
        is_tag = nxt.isalpha()
        if lt > text_from:
            yield ("text", source[text_from:lt], ())
        if source.startswith("<!--", lt):
            if source.startswith("<!-->", lt) or source.startswith("<!--->", lt):
                pos = source.index(">", lt) + 1  # abruptly closed empty comment
            else:
                close = source.find("-->", lt + 4)
                if close == -1:
                    return  # an unfinished comment runs to the end (HTML5: EOF in comment)
                pos = close + 3
        elif is_tag:
            parsed = _parse_start_tag(source, lt)
            if parsed is None:
                return  # an unfinished tag at the end is dropped with what follows
            name, attrs, pos = parsed
            yield ("start", name, attrs)
            if name in _RAW_TEXT_END:
                match = _RAW_TEXT_END[name].search(source, pos)
                end = match.start() if match else n
                if end > pos:
                    yield ("raw", source[pos:end], ())
                pos = end
            elif name == "plaintext":
                yield ("raw", source[pos:], ())
                return
        elif nxt == "/":
            close = source.find(">", lt + 2)
            if close == -1:
                return
            match = _TAG_NAME.match(source, lt + 2)
            if match:
                yield ("end", match.group().lower(), ())
            pos = close + 1  # "</>" and "</ junk>" are dropped (bogus comments)
        else:
            close = source.find(">", lt + 2)
            if close == -1:
                return
            pos = close + 1  # doctype, CDATA, conditional comments, processing instructions
        text_from = pos
    if text_from < n:
        yield ("text", source[text_from:], ())


def _parse_start_tag(source: str, lt: int) -> tuple[str, tuple[tuple[str, str], ...], int] | None:
    n = len(source)
    match = _TAG_NAME.match(source, lt + 1)
    assert match is not None  # the caller saw a letter after "<"
    name = match.group().lower()
    pos = match.end()
    attrs: list[tuple[str, str]] = []
    while True:
        space = _TAG_SPACE.match(source, pos)
        assert space is not None  # matches the empty string
        pos = space.end()
        if pos >= n:
            return None
        if source[pos] == ">":
            return name, tuple(attrs), pos + 1
        attr_match = _ATTR_NAME.match(source, pos)
        assert attr_match is not None  # source[pos] is none of the excluded characters
        attr = attr_match.group().lower()
        pos = attr_match.end()
        value = ""
        equals = _ATTR_EQUALS.match(source, pos)
        if equals:
            pos = equals.end()
            if pos >= n:
                return None
            quote = source[pos]
            if quote in "\"'":
                close = source.find(quote, pos + 1)
                if close == -1:
                    return None
                value = source[pos + 1 : close]
                pos = close + 1
            else:
                unquoted = _UNQUOTED_VALUE.match(source, pos)
                assert unquoted is not None  # matches empty
                value = unquoted.group()
                pos = unquoted.end()
        if len(attrs) < _MAX_ATTRIBUTES:
            attrs.append((attr, html.unescape(value) if "&" in value else value))


# ---- rendering ----

_VOID = frozenset(
    {
        "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr",
        "img", "input", "keygen", "link", "meta", "param", "source", "track", "wbr",
    }
)  # fmt: skip
#: Elements whose content is never shown.
_UNSHOWN = frozenset({"head", "script", "style", "title", "template", "iframe", "noembed", "noframes", "object"})
#: Elements that start and end a paragraph of the rendered text (a blank line).
_PARAGRAPH = frozenset(
    {
        "address", "article", "aside", "blockquote", "center", "dd", "details", "dialog", "dir", "div", "dl", "dt",
        "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hgroup",
        "hr", "li", "main", "menu", "nav", "ol", "p", "pre", "section", "table", "tbody", "thead", "tfoot", "tr", "ul",
    }
)  # fmt: skip
#: Elements that only start a new line (a table cell is part of its row's sentence).
_LINE = frozenset({"br", "td", "th", "caption"})
#: Start tags that close an open element (HTML5 "implied end tags"), and where to stop looking.
_IMPLIED_CLOSE: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "li": (frozenset({"li"}), frozenset({"ul", "ol", "table"})),
    "dt": (frozenset({"dt", "dd"}), frozenset({"dl", "table"})),
    "dd": (frozenset({"dt", "dd"}), frozenset({"dl", "table"})),
    "tr": (frozenset({"tr", "td", "th"}), frozenset({"table"})),
    "td": (frozenset({"td", "th"}), frozenset({"tr", "table"})),
    "th": (frozenset({"td", "th"}), frozenset({"tr", "table"})),
    "option": (frozenset({"option"}), frozenset({"select"})),
    "a": (frozenset({"a"}), frozenset()),  # anchors do not nest
}
_CLOSES_P = _PARAGRAPH - {"dd", "dt", "li", "tbody", "thead", "tfoot", "tr"}
_HEAD = frozenset({"head"})
_MAX_DEPTH = 512  # open elements kept; deeper ones are not tracked
_SEARCH_DEPTH = 64  # how far down the stack an end tag looks for its element
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u00ad\u034f\u180e\u200b\u200c\u200d\u2060\ufeff"), None)
_SPACES = re.compile(r"\s+")
_HAS_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_CSS_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)")


def _css_number(value: str | None) -> float | None:
    match = _CSS_NUMBER.match(value or "")
    return float(match.group()) if match else None


def _hides(attrs: dict[str, str]) -> bool:
    """True when an element's own attributes keep it, and all inside it, from being seen."""
    if "hidden" in attrs:
        return True
    style = attrs.get("style")
    if not style:
        return False
    declarations: dict[str, str] = {}
    for declaration in style.split(";"):
        prop, colon, value = declaration.partition(":")
        if colon:
            declarations[prop.strip().lower()] = value.lower().replace("!important", "").strip()
    if declarations.get("display") == "none" or declarations.get("visibility") in ("hidden", "collapse"):
        return True
    if declarations.get("mso-hide") == "all":  # Outlook's own way to hide
        return True
    if _css_number(declarations.get("font-size")) == 0 or _css_number(declarations.get("opacity")) == 0:
        return True
    if declarations.get("overflow") == "hidden":  # the usual way to hide a preheader
        return any(_css_number(declarations.get(p)) == 0 for p in ("height", "max-height", "width", "max-width"))
    return False


def _tiny_image(attrs: dict[str, str]) -> bool:
    """A tracking pixel: an image of at most 1 pixel across is nothing to see or click."""
    return any((size := _css_number(attrs.get(name))) is not None and size <= 1 for name in ("width", "height"))


@dataclass(slots=True)
class _OpenAnchor:
    href: str
    title: str
    start: int
    label: list[str] = field(default_factory=list)
    has_image: bool = False


class _Renderer:
    """Turns tokens into visible text and anchors, tracking which open elements hide."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.length = 0
        self.stack: list[tuple[str, bool]] = []  # (name, hides its content)
        self.hiding = 0  # entries of the stack that hide their content
        self.lost_hiding = False  # a hiding element beyond the depth limit: fail closed
        self.anchors: list[Link] = []
        self.anchor: _OpenAnchor | None = None
        self.base = ""  # <base href>: what relative links are relative to

    @property
    def hidden(self) -> bool:
        return self.hiding > 0 or self.lost_hiding

    # -- output

    def _emit(self, text: str) -> None:
        self.chunks.append(text)
        self.length += len(text)
        if self.anchor is not None:
            self.anchor.label.append(text)

    def _ends_with(self, suffix: str) -> bool:
        tail = ""
        for chunk in reversed(self.chunks):
            tail = chunk + tail
            if len(tail) >= len(suffix):
                break
        return tail.endswith(suffix)

    def _break(self, paragraph: bool) -> None:
        if self.hidden or not self.length:
            return
        if paragraph and not self._ends_with("\n\n"):
            self._emit("\n" if self._ends_with("\n") else "\n\n")
        elif not paragraph and not self._ends_with("\n"):
            self._emit("\n")

    def text(self, data: str) -> None:
        if self.hidden:
            return
        if "&" in data:
            data = html.unescape(data)
        data = _SPACES.sub(" ", data.translate(_ZERO_WIDTH))
        if data:
            self._emit(data)

    # -- elements

    def _push(self, name: str, hides: bool) -> None:
        if len(self.stack) >= _MAX_DEPTH:
            self.lost_hiding = self.lost_hiding or hides
            return
        self.stack.append((name, hides))
        self.hiding += hides

    def _pop_through(self, index: int) -> None:
        while len(self.stack) > index:
            name, hides = self.stack.pop()
            self.hiding -= hides
            if name == "a":
                self._finish_anchor()

    def _find_open(self, names: frozenset[str], stop: frozenset[str]) -> int | None:
        lowest = max(-1, len(self.stack) - 1 - _SEARCH_DEPTH)
        for index in range(len(self.stack) - 1, lowest, -1):
            name = self.stack[index][0]
            if name in names:
                return index
            if name in stop:
                return None
        return None

    def start(self, name: str, attrs: tuple[tuple[str, str], ...]) -> None:
        if name in _IMPLIED_CLOSE:
            closes, stop = _IMPLIED_CLOSE[name]
            index = self._find_open(closes, stop)
            if index is not None:
                self._pop_through(index)
        if name in _CLOSES_P and self.stack and self.stack[-1][0] == "p":
            self._pop_through(len(self.stack) - 1)
        if name == "body":  # a head never closed ends where the body starts
            index = self._find_open(_HEAD, frozenset())
            if index is not None:
                self._pop_through(index)
        attributes = dict(attrs)
        hides = name in _UNSHOWN or _hides(attributes)
        if name in _PARAGRAPH:
            self._break(True)
        elif name in _LINE:
            self._break(False)
        if name == "img":
            self._image(attributes, hides)
        if name == "base" and not self.base:
            self.base = "".join(attributes.get("href", "").split())
        if name in _VOID:
            return
        self._push(name, hides)
        if name == "a" and not self.hidden and "href" in attributes:
            self._finish_anchor()  # one left open past the depth limit
            self.anchor = _OpenAnchor(attributes["href"], attributes.get("title", ""), self.length)

    def end(self, name: str) -> None:
        if name in ("body", "html"):
            return  # content after </body> is still shown
        if name == "br":  # HTML5 reads </br> as <br>
            self._break(False)
            return
        index = self._find_open(frozenset({name}), frozenset())
        if index is not None:
            self._pop_through(index)
        if name in _PARAGRAPH:
            self._break(True)
        elif name in _LINE:
            self._break(False)

    def _image(self, attrs: dict[str, str], hides: bool) -> None:
        if self.hidden or hides or self.anchor is None or _tiny_image(attrs):
            return
        alt = " ".join(v for v in (attrs.get("alt", ""), attrs.get("title", "")) if v)
        self.anchor.label.append(f" {alt} ")
        self.anchor.has_image = True

    def _finish_anchor(self) -> None:
        anchor, self.anchor = self.anchor, None
        if anchor is None:
            return
        text = "".join(anchor.label)
        if not text.strip() and not anchor.has_image:
            return  # an anchor with nothing in it cannot be seen or clicked
        target = "".join(anchor.href.split())  # URL parsers drop tabs and newlines
        if self.base and not _HAS_SCHEME.match(target):
            with contextlib.suppress(ValueError):  # a malformed base or href stays as written
                target = urllib.parse.urljoin(self.base, target)
        label = _SPACES.sub(" ", f"{text} {anchor.title}").strip()
        self.anchors.append(Link("anchor", target, label, anchor.start, max(anchor.start, self.length)))

    def finish(self) -> tuple[str, list[Link]]:
        self._pop_through(0)
        self._finish_anchor()
        return "".join(self.chunks), self.anchors


def render_html(source: str) -> tuple[str, list[Link]]:
    """The text a reader sees in an HTML document, and the anchors with visible content.

    Left out: comments, ``<head>``, ``<script>``, ``<style>``, ``<title>``, ``<template>``
    and everything inside an element hidden by ``hidden``, ``display:none``,
    ``visibility:hidden``, ``font-size:0``, ``opacity:0``, ``mso-hide:all`` or a zero
    height or width with ``overflow:hidden``. CSS classes are not resolved.
    """
    renderer = _Renderer()
    for kind, value, attrs in _tokenize(source):
        if kind == "text":
            renderer.text(value)
        elif kind == "start":
            renderer.start(value, attrs)
        elif kind == "end":
            renderer.end(value)
        elif renderer.stack and renderer.stack[-1][0] in ("textarea", "xmp", "plaintext"):  # raw text, shown
            renderer.text(value)
    return renderer.finish()
