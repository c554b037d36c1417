"""The one parse of a message that every policy shares.

``ParsedMessage`` wraps the bytes the upstream will receive (already normalised by the
proxy) and the ``email`` package's parse of them. Expensive views (decoded text parts,
address lists) are computed on first use and cached, so a message is decoded at most once
whatever the number of policies.

Everything here is defensive: the stdlib parser raises on some malformed input
(unknown charsets, missing boundaries, deep nesting), and a policy must never crash on
a message, so every accessor degrades to a best-effort answer instead.

What a reader sees of each text part (the visible text of HTML, the links) is worked out in
policies/readable.py; its names are importable from here too.
"""

from __future__ import annotations

import binascii
import codecs
import email
import email.header
import email.policy
import email.utils
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import _header_value_parser as header_parser
from email.message import EmailMessage, Message
from functools import cached_property

from policies.mimewalk import lean_copy
from policies.readable import Link, ReadableText, find_text_links, readable_text, render_html
from proxy.addresses import address_key

__all__ = (
    "Address",
    "Link",
    "MessageParseError",
    "ParsedMessage",
    "ReadableText",
    "VISIBLE_RECIPIENT_FIELDS",
    "TextPart",
    "canonical_field_names",
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
    #: False for an alternative a mail client does not show: in multipart/alternative it
    #: shows the last alternative it can display, the HTML one when there is one.
    displayed: bool = True


@dataclass(frozen=True, slots=True)
class Address:
    display_name: str
    addr_spec: str
    #: Not a mailbox of the field but an address written in its text (a display name, a
    #: comment, a bare encoded-word): every reader sees it, so it counts as exposed, but
    #: nothing is ever sent to it (never an envelope or consent recipient).
    in_text: bool = False

    @property
    def normalized(self) -> str:
        """The key for comparing and counting (``proxy.addresses.address_key``: case folded,
        needless quotes dropped, the domain as A-labels without a trailing dot)."""
        return address_key(self.addr_spec)

    @property
    def domain(self) -> str:
        """The part after the last "@" as written, in lower case, without a trailing dot (an
        IDN stays in its spelling: globs in the config are matched against it as written;
        ``proxy.addresses.domain_key`` gives the one form for comparing)."""
        return self.addr_spec.strip().lower().rpartition("@")[2].rstrip(".")


#: RFC 5322 4.5.3 (obs-optional, obs-to ...): a field name followed by white space before
#: the colon, ``To : a@example.com``. Readers must accept it, and mail clients and Postfix
#: (``is_header()``) do, but the stdlib parser ends the header block at such a line and reads
#: the rest as body (reliability anchors C08): recipients and headers hidden from the checks.
_OBS_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]+:", re.M)
#: A field line as the stdlib's feedparser takes one (its ``headerRE``).
_FIELD_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")


def canonical_field_names(raw: bytes) -> bytes:
    """The message with the white space between a field name and its colon removed in the
    header block (``To :`` becomes ``To:``), so that the stdlib, the relay and the upstream
    read the same fields; the bytes unchanged when there is none (the usual case).

    The header block is what a reader takes for one: it ends at the first empty line or at a
    line that is neither a field (obsolete spacing allowed) nor a continuation (C07).
    """
    head = split_header_block(raw)[0]
    if not _OBS_FIELD_NAME.search(head):
        return raw
    out: list[bytes] = []
    pos = 0
    first = True
    changed = False
    while pos < len(raw):
        newline = raw.find(b"\n", pos)
        line_end = len(raw) if newline == -1 else newline + 1
        line = raw[pos:line_end]
        if line in (b"\r\n", b"\n"):
            break
        if first and line.startswith(b"From "):
            pass  # an mbox "From " line before the fields, which the stdlib skips too
        elif line[:1] not in (b" ", b"\t"):
            match = _OBS_FIELD_NAME.match(line)
            if match is None and not _FIELD_LINE.match(line):
                break  # not a field: the header block ends here for every reader
            if match is not None:
                line = match.group(1) + line[match.end() - 1 :]
                changed = True
        out.append(line)
        first = False
        pos = line_end
    # The very bytes when nothing changed (a line the stdlib ends the header at came first).
    return b"".join(out) + raw[pos:] if changed else raw


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


#: Messages above this size are parsed lean: attachments, forwarded messages, preambles and
#: epilogues left out, long text parts shortened (``policies.mimewalk.lean_copy``).
LEAN_PARSE_ABOVE = 1024 * 1024
#: What a lean parse keeps of a long text part: its beginning and its end (a newsletter's
#: way out is in its footer). Text in between is not read by any policy.
TEXT_HEAD_BYTES = 2 * 1024 * 1024
TEXT_TAIL_BYTES = 512 * 1024


class ParsedMessage:
    """A message parsed once with ``email.policy.default``; a big one without the parts no
    policy reads (see ``LEAN_PARSE_ABOVE``). ``raw`` is always the whole message."""

    def __init__(self, raw: bytes, *, max_mime_depth: int = 50, lean_above: int = LEAN_PARSE_ABOVE) -> None:
        # The proxy canonicalises the bytes it relays the same way (proxy/relay/intake.py),
        # so what is parsed here is what the upstream receives.
        raw = canonical_field_names(raw)
        self.raw = raw
        self._addresses: dict[str, list[Address]] = {}
        self._in_text: dict[str, list[Address]] = {}
        #: Bytes of the message the parse left out (0 for a message of ordinary size).
        self.left_out = 0
        parse_from = raw
        if len(raw) > lean_above:
            # A big message: parse only what a policy reads (policies/mimewalk.py). The
            # ``email`` package holds about eight times what it parses; a 25 MB attachment
            # would cost 200 MB for nothing.
            parse_from, self.left_out = lean_copy(raw, head_bytes=TEXT_HEAD_BYTES, tail_bytes=TEXT_TAIL_BYTES)
        try:
            parsed = email.message_from_bytes(parse_from, policy=email.policy.default)
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
        """Mailboxes in the named fields, group members included, in order of appearance:
        the addresses mail can be sent to, never an address written in a display name.

        Each field is parsed with the structured parser; where it reports defects the raw
        value is also parsed leniently and the larger result is kept, because the strict
        parser drops some malformed but visible addresses. Display names are decoded after
        the structure is parsed, never before (an encoded comma is not a separator).
        """
        out: list[Address] = []
        for name in names:
            out.extend(self._field_addresses(name)[0])
        return out

    def addresses_in_text(self, *names: str) -> list[Address]:
        """Addresses a reader sees written in the named fields outside their mailboxes: in a
        display name (quoted, or RFC 2047 encoded), a comment, a bare encoded-word that the
        parser takes for a local part without a domain. Each has ``in_text`` set."""
        out: list[Address] = []
        for name in names:
            out.extend(self._field_addresses(name)[1])
        return out

    def _field_addresses(self, name: str) -> tuple[list[Address], list[Address]]:
        key = name.lower()
        mailboxes = self._addresses.get(key)
        if mailboxes is None:  # every policy asks for From; parse each field once per message
            mailboxes, in_text = [], []
            for raw in self.raw_header_values(name):
                found, written = _parse_address_field(name, raw, self.msg)
                mailboxes.extend(found)
                in_text.extend(written)
            self._addresses[key], self._in_text[key] = mailboxes, in_text
        return mailboxes, self._in_text[key]

    @cached_property
    def visible_recipients(self) -> list[Address]:
        """The distinct addresses every recipient sees, as a mail client shows them: the
        mailboxes of To, Cc, Resent-To and Resent-Cc (every field of each name, group members
        included; clients show the Resent-* fields of a resent message, RFC 5322 3.6.6), then
        the addresses written in those fields' display names and comments (``in_text``),
        compared by ``address_key``, first spelling kept.

        Bcc, Resent-Bcc, From and Reply-To are not recipient lists others see.
        """
        seen: dict[str, Address] = {}
        for address in self.addresses(*VISIBLE_RECIPIENT_FIELDS):
            seen.setdefault(address.normalized, address)
        for address in self.addresses_in_text(*VISIBLE_RECIPIENT_FIELDS):
            seen.setdefault(address.normalized, address)
        return list(seen.values())

    @cached_property
    def header_recipients(self) -> list[Address]:
        """The distinct mailboxes of To and Cc (first spelling kept): who the author addressed,
        for the classifier's judgement of a conversation."""
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
            out.append(readable_text(part.content_type, part.text, displayed=part.displayed))
            repaired = _undo_misdeclared_qp(part)
            if repaired is not None:
                out.append(readable_text(part.content_type, repaired, repaired=True, displayed=part.displayed))
        return out

    @cached_property
    def text_parts(self) -> list[TextPart]:
        """text/plain and text/html parts a reader sees: not attachments, nothing below
        a message/* part (forwarded mail, bounces)."""
        return list(self._walk_text(self.msg, top=True))

    def _walk_text(self, part: Message, *, top: bool, displayed: bool = True) -> Iterator[TextPart]:
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
                subs = [sub for sub in payload if isinstance(sub, Message)]
                shown = None
                if ctype == "multipart/alternative":
                    shown = next((i for i in range(len(subs) - 1, -1, -1) if _holds_html(subs[i])), None)
                for index, sub in enumerate(subs):
                    yield from self._walk_text(sub, top=False, displayed=displayed and shown in (None, index))
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
        yield TextPart(ctype, text, used, transfer_encoding, displayed)


def _holds_html(part: Message) -> bool:
    """A text/html part that is not an attachment, here or in a multipart below (not in an
    attached message; the MIME depth is bounded when the message is parsed)."""
    mime = _mime_fields(part)
    try:
        ctype = mime.get_content_type()
    except Exception:
        return False
    if ctype.startswith("message/"):
        return False
    if part.is_multipart():
        payload = part.get_payload()
        return isinstance(payload, list) and any(isinstance(sub, Message) and _holds_html(sub) for sub in payload)
    return ctype == "text/html" and (mime.get_content_disposition() or "").lower() != "attachment"


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


#: The fields whose addresses every recipient of a message is shown (a split copy drops them
#: all, proxy/relay/copies.py).
VISIBLE_RECIPIENT_FIELDS = ("To", "Cc", "Resent-To", "Resent-Cc")


#: The everyday single mailbox, ``a@b.example`` or ``Display Name <a@b.example>``, in a
#: grammar narrow enough that the structured parser provably reads it the same way: a
#: dot-atom address with a dotted domain; a display name of atext words (RFC 5322 3.2.3)
#: without ".", "=" or "?" (no obsolete phrase, no encoded-word); one line. Anything else
#: (quotes, comments, groups, lists, encoded-words, folding, non-ASCII) takes the full parse.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]"
_SIMPLE_SPEC = rf"{_ATEXT}+(?:\.{_ATEXT}+)*+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)++"
_SIMPLE_DISPLAY = rf"{_ATEXT}++(?:[ \t]++{_ATEXT}++)*+"
_SIMPLE_MAILBOX = re.compile(
    rf"[ \t]*+(?:(?P<display>{_SIMPLE_DISPLAY})?[ \t]*+<(?P<bracketed>{_SIMPLE_SPEC})>|(?P<bare>{_SIMPLE_SPEC}))[ \t]*+"
)


def _parse_address_field(name: str, raw: str, msg: EmailMessage) -> tuple[list[Address], list[Address]]:
    """(the field's mailboxes, the addresses written in its text outside them)."""
    simple = _SIMPLE_MAILBOX.fullmatch(raw)
    if simple is not None:
        # What the full parse below returns for it (tests/policies/test_message_addresses.py
        # compares both): the display name with its white space collapsed, no text address
        # (the display name holds no "@"). A third of a small message's header work.
        display = " ".join((simple["display"] or "").split())
        return [Address(display, simple["bracketed"] or simple["bare"])], []
    return _parse_address_field_fully(name, raw, msg)


def _parse_address_field_fully(name: str, raw: str, msg: EmailMessage) -> tuple[list[Address], list[Address]]:
    strict: list[Address] = []
    tree: header_parser.TokenList | None = None
    defective = True
    try:
        header = msg.policy.header_factory(name, raw)  # type: ignore[attr-defined]
        # An addr-spec needs a domain: an encoded-word that decodes to "a@x, b@y" parses as
        # one quoted local part without a domain (reliability anchors C14), not an address.
        strict = [Address(str(a.display_name), str(a.addr_spec)) for a in header.addresses if a.domain and a.username]
        defective = bool(header.defects)
        tree = getattr(header, "_parse_tree", None)  # the header keeps the parse it was made from
    except Exception:
        strict, defective = [], True
    mailboxes = strict
    if defective:
        try:
            lenient_pairs = email.utils.getaddresses([raw])
        except Exception:
            lenient_pairs = []
        # The lenient parser works on the undecoded text, so an encoded-word can never turn
        # into a mailbox (C13); its display names are decoded afterwards, for display only.
        lenient = [Address(_decode_display_name(display), spec) for display, spec in lenient_pairs if _has_domain(spec)]
        strict_set = {a.normalized for a in strict}
        lenient_set = {a.normalized for a in lenient}
        mailboxes = lenient if len(lenient_set) > len(strict_set) else strict
    text = _text_outside_mailboxes(tree) if isinstance(tree, header_parser.TokenList) else _decode_words(raw)
    return mailboxes, [Address("", spec, in_text=True) for spec in _addresses_in(text)]


#: The parse tree's names for an addr-spec and a comment (``TokenList.token_type``).
_ADDR_SPEC, _COMMENT = "addr-spec", "comment"


def _text_outside_mailboxes(tree: header_parser.TokenList) -> str:
    """What a reader sees of an address field apart from its mailboxes' addr-specs: display
    names (the parser has decoded their encoded-words, inside quotes too), comments, groups'
    names, and the text of malformed addresses. Each addr-spec left out becomes a space, so
    that the text around it cannot join into an address nobody sees."""
    chunks: list[str] = []

    def walk(node: header_parser.TokenList) -> bool:
        """Append the node's text (whole, when it holds no mailbox); whether it holds one."""
        if node.token_type == _ADDR_SPEC and getattr(node, "domain", None) and getattr(node, "local_part", None):
            chunks.append(" ")
            _comments(node, chunks)
            return True
        start = len(chunks)
        held = False
        for child in node:
            if isinstance(child, header_parser.TokenList):
                held = walk(child) or held
            else:
                chunks.append(str(child))
        if not held:
            del chunks[start:]
            chunks.append(str(node))
        return held

    walk(tree)
    return _decode_words("".join(chunks))


def _comments(node: header_parser.TokenList, chunks: list[str]) -> None:
    """The comments inside an addr-spec (``k@example.com (Kay <x@evil.example>)``): the parser
    files them under the domain's white space, and a reader sees them."""
    for child in node:
        if isinstance(child, header_parser.TokenList):
            if child.token_type == _COMMENT:
                chunks.append(f" {child} ")
            else:
                _comments(child, chunks)


def _decode_words(text: str) -> str:
    """RFC 2047 encoded-words the structured parser leaves as they are (in comments, in a
    field it could not parse) decoded as a mail client shows them."""
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:
        return text


#: An address as a reader recognises one in running text: an RFC 5322 atext local part
#: (letters of any script, RFC 6532), "@", a domain of at least two labels. Possessive
#: quantifiers and the look-behind keep the scan linear on any input: each run of local-part
#: characters is tried once, from its start.
_LOCAL_CHARS = r"[\w.!#$%&'*+/=?^`{|}~-]"
_ADDRESS_IN_TEXT = re.compile(rf"(?<!{_LOCAL_CHARS}){_LOCAL_CHARS}++@[\w-]++(?:\.[\w-]++)++\.?")


def _addresses_in(text: str) -> list[str]:
    if "@" not in text:
        return []
    # A dot before the local part is punctuation of the sentence, not of the address.
    return [match.group().lstrip(".") for match in _ADDRESS_IN_TEXT.finditer(text)]


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


# ---- a part sent quoted-printable under another name ---------------------------------------

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
