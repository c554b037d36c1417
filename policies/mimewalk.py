"""The MIME structure of a raw message, found on its bytes (RFC 2045/2046), without the
``email`` package decoding anything.

Two users share this one walk, so that they agree on what a reader sees:

* ``proxy/unsubscribe/footer.py`` edits the readable parts byte-exactly (an unsubscribe
  footer), and must know where their bodies lie;
* ``policies/message.py`` parses a big message through ``lean_copy``: the message with the
  bodies no policy reads (attachments, forwarded messages, preambles, epilogues) left out and
  long text parts shortened, so that a 25 MB message with a 24 MB attachment is parsed as a
  message of a few kilobytes (issue 15 part 3: the ``email`` package holds about eight times
  what it parses).

The rules are the ones readers use: a part's body ends before the CRLF that precedes its
boundary delimiter (that CRLF belongs to the delimiter, 2046 5.1.1); a missing close
delimiter ends the last part at the end of the message (reliability anchors C03); a
multipart without a boundary (C02) has no parts of its own; nesting deeper than
``MAX_DEPTH`` is not entered (C01). A text/plain or text/html part is *readable* unless it
is an attachment below the top or lies inside a message/* part (a forwarded mail, a bounce).
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

__all__ = ("MAX_DEPTH", "Entity", "lean_copy", "walk")

#: Deeper multipart nesting is not entered (Postfix's mime_nesting_limit is 100; sendguard
#: refuses messages deeper than message.max_mime_depth, 50 by default, before this matters).
MAX_DEPTH = 100

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_READABLE = frozenset({"text/plain", "text/html"})


@dataclass(frozen=True, slots=True)
class Entity:
    """One MIME entity: where its header and body lie in the message, and what it is."""

    start: int
    body_start: int
    end: int
    content_type: str
    charset: str | None
    transfer_encoding: str
    disposition: str
    top: bool
    #: A multipart whose parts were found: the byte ranges between them that hold no part
    #: (the preamble and the epilogue, RFC 2046 5.1.1), empty for every other entity.
    gaps: tuple[tuple[int, int], ...] = ()
    #: A multipart whose parts were found (its body is only delimiters, parts and gaps).
    container: bool = False
    #: A multipart whose boundary the ``email`` package's default policy reads differently
    #: (an unquoted boundary with "=" in it, say): the lean copy keeps it whole.
    opaque: bool = False

    @property
    def readable(self) -> bool:
        """A text part a reader sees as this message's own text."""
        if self.container:
            return False
        if self.content_type in _READABLE:
            return self.top or self.disposition != "attachment"
        # A multipart declared without a boundary: the ``email`` package reads it as one
        # text leaf, and so does the shared parse (nothing in it goes unseen).
        return self.content_type.startswith("multipart/")


def walk(content: bytes, *, as_default_policy: bool = False) -> list[Entity]:
    """Every entity of the message in document order; message/* parts are leaves (their
    content is another message, not this one's text). Never raises for any input.

    ``as_default_policy``: a multipart is only entered when ``email.policy.default`` (what
    the shared parse uses) finds the same boundary; otherwise it is an opaque leaf."""
    out: list[Entity] = []
    # (start, end, depth, default content type, top level): an explicit stack, so deep
    # nesting can never exhaust the interpreter's recursion limit.
    stack: list[tuple[int, int, int, str, bool]] = [(0, len(content), 0, "text/plain", True)]
    while stack:
        start, end, depth, default_type, top = stack.pop()
        header_end, body_start = _split_entity(content, start, end)
        headers = _parse_headers(content[start:header_end])
        ctype, boundary, charset, encoding, disposition = _content_info(headers, default_type)
        if (
            ctype.startswith("multipart/")
            and boundary
            and as_default_policy
            and _default_policy_boundary(content[start:header_end]) != boundary
        ):
            out.append(Entity(start, body_start, end, ctype, charset, encoding, disposition, top, opaque=True))
            continue
        if ctype.startswith("multipart/") and boundary and depth < MAX_DEPTH:
            parts, gaps = _multipart_parts(content, body_start, end, boundary)
            if parts:  # only delimiters, or none: the email package reads it as one text
                out.append(Entity(start, body_start, end, ctype, charset, encoding, disposition, top, gaps, True))
                child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                stack.extend((s, e, depth + 1, child_default, False) for s, e in reversed(parts))
                continue
        out.append(Entity(start, body_start, end, ctype, charset, encoding, disposition, top))
    return out


def lean_copy(content: bytes, *, head_bytes: int, tail_bytes: int) -> tuple[bytes, int]:
    """The message as the shared parse needs it, and how many bytes were left out.

    Kept byte for byte: every header block, every delimiter, the bodies of readable parts.
    Left out: the bodies of every other leaf (attachments, images, message/* parts) and the
    preambles and epilogues. A readable body longer than ``head_bytes + tail_bytes`` keeps
    its first ``head_bytes`` and its last ``tail_bytes``, both cut at line ends (a base64
    body's lines are whole groups of four, so both halves still decode), because a footer
    with the way out sits at the end of a long newsletter."""
    cuts: list[tuple[int, int]] = []
    for entity in walk(content, as_default_policy=True):
        if entity.opaque:
            continue
        if entity.container:
            cuts.extend(entity.gaps)
        elif not entity.readable:
            cuts.append((entity.body_start, entity.end))
        elif entity.end - entity.body_start > head_bytes + tail_bytes:
            keep_to = _line_end_after(content, entity.body_start + head_bytes, entity.end)
            resume_at = _line_end_after(content, entity.end - tail_bytes, entity.end)
            if resume_at > keep_to:
                cuts.append((keep_to, resume_at))
    if not cuts:
        return content, 0
    pieces: list[bytes] = []
    position = 0
    for cut_start, cut_end in sorted(cuts):
        if cut_start < position:  # ranges never overlap; be safe anyway
            cut_start = position
        pieces.append(content[position:cut_start])
        position = max(position, cut_end)
    pieces.append(content[position:])
    lean = b"".join(pieces)
    return lean, len(content) - len(lean)


def _line_end_after(content: bytes, position: int, limit: int) -> int:
    """The offset just after the first line break at or after ``position`` (or ``limit``)."""
    newline = content.find(b"\n", position, limit)
    return limit if newline == -1 else newline + 1


def _split_entity(content: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the header block, start of the body) of the entity in content[start:end]."""
    if content.startswith(b"\r\n", start) and start + 2 <= end:
        return start, start + 2
    if content.startswith(b"\n", start) and start + 1 <= end:
        return start, start + 1
    match = _BLANK_LINE.search(content, start, end)
    if match is None:
        return end, end  # all header, no body
    separator = match.group()
    first_newline = 2 if separator.startswith(b"\r\n") else 1
    return match.start() + first_newline, match.end()


def _parse_headers(block: bytes) -> Message:
    try:
        return email.message_from_bytes(block + b"\r\n", policy=email.policy.compat32)
    except Exception:
        return Message()


def _default_policy_boundary(block: bytes) -> str | None:
    try:
        return email.message_from_bytes(block + b"\r\n", policy=email.policy.default).get_boundary()
    except Exception:
        return None


def _content_info(headers: Message, default_type: str) -> tuple[str, str | None, str | None, str, str]:
    """(content type, boundary, charset, transfer encoding, disposition), defensively."""
    try:
        ctype = default_type if headers.get("Content-Type") is None else headers.get_content_type()
    except Exception:
        ctype = "text/plain"
    boundary: str | None
    try:
        boundary = headers.get_boundary()
    except Exception:
        boundary = None
    charset: str | None
    try:
        charset = headers.get_content_charset()
    except Exception:
        charset = None
    try:
        encoding = str(headers.get("Content-Transfer-Encoding", "")).strip().lower()
    except Exception:
        encoding = "?"
    try:
        disposition = (headers.get_content_disposition() or "").lower()
    except Exception:
        disposition = ""
    return ctype, boundary, charset, encoding, disposition


def _multipart_parts(
    content: bytes, start: int, end: int, boundary: str
) -> tuple[list[tuple[int, int]], tuple[tuple[int, int], ...]]:
    """The (start, end) of each body part between the delimiters of ``boundary``, and the
    ranges before the first delimiter line and after the close delimiter line."""
    try:
        marker = boundary.encode("ascii")
    except UnicodeEncodeError:
        marker = boundary.encode("utf-8", "surrogateescape")
    # A delimiter line: "--" boundary, "--" for the close delimiter, then only white space
    # (transport padding, RFC 2046 5.1.1) up to the line end.
    delimiter = re.compile(rb"(?m)^--" + re.escape(marker) + rb"(--)?[ \t]*(?:\r?\n|\r?\Z)")
    parts: list[tuple[int, int]] = []
    gaps: list[tuple[int, int]] = []
    part_start: int | None = None
    for match in delimiter.finditer(content, start, end):
        if part_start is None:
            preamble_end = match.start()
            # The line break before the delimiter belongs to the delimiter.
            if content[preamble_end - 2 : preamble_end] == b"\r\n" and preamble_end - 2 >= start:
                preamble_end -= 2
            elif content[preamble_end - 1 : preamble_end] == b"\n" and preamble_end - 1 >= start:
                preamble_end -= 1
            if preamble_end > start:
                gaps.append((start, preamble_end))
        else:
            part_end = match.start()
            if content[part_end - 2 : part_end] == b"\r\n" and part_end - 2 >= part_start:
                part_end -= 2
            elif content[part_end - 1 : part_end] == b"\n" and part_end - 1 >= part_start:
                part_end -= 1
            parts.append((part_start, part_end))
        if match.group(1):  # the close delimiter: the epilogue follows
            if match.end() < end:
                gaps.append((match.end(), end))
            return parts, tuple(gaps)
        part_start = match.end()
    if part_start is not None and part_start < end:
        parts.append((part_start, end))  # no close delimiter: the last part runs to the end (C03)
    return parts, tuple(gaps)
