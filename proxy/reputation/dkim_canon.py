"""DKIM canonicalisation and hashing (RFC 6376 3.4, 3.7) on raw bytes, the body in blocks.

Written here instead of taken from dkimpy, for three reasons:

* **Memory.** dkimpy wants the whole message as one ``bytes``, splits it into a list of
  lines, joins them again and runs its regular expressions over the whole body: several
  whole-message copies for a 25 MB message. Here the body is read from a ``memoryview``
  in blocks of ``BLOCK_SIZE``; at most a block (plus one unfinished line) is ever copied.
* **The bytes the verifier sees.** Canonicalisation is applied to the message as it will be
  on the wire: SMTP ends the body with CRLF (the relay adds one when it is missing) and
  turns a bare CR or LF into CRLF (``rawmsg.stuffed_blocks``). dkimpy signs an unterminated
  last line as it is, so relaxed canonicalisation keeps its trailing whitespace, which a
  verifier (who receives it with CRLF) strips: a broken signature.
* **Speed.** The header work is a few small byte operations per field; the body is hashed
  with one or two C-level regular-expression passes per block (relaxed) or none (simple).

Only what signing needs is here: selecting the signed fields (RFC 6376 5.4.2), both
canonicalisations of header fields and body, and the DKIM-Signature field itself (3.5).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Literal

__all__ = (
    "BLOCK_SIZE",
    "BodyCanon",
    "HeaderCanon",
    "HeaderFormatError",
    "body_hash",
    "canonical_field",
    "fold_signature_value",
    "has_bare_newline",
    "header_fields",
    "header_hash_input",
    "normalize_newlines",
    "select_fields",
    "signature_field",
    "split_message",
)

HeaderCanon = Literal["relaxed", "simple"]
BodyCanon = Literal["relaxed", "simple"]

#: Body bytes hashed per step: big enough that the per-block Python work is noise, small
#: enough that the copy a block costs (relaxed canonicalisation rewrites it) is too.
BLOCK_SIZE = 256 * 1024

_CRLF = b"\r\n"
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# RFC 6376 3.4.2 and 3.4.4: WSP is SP and HTAB only (RFC 5234 B.1). Only the runs that are
# not already a single SP are matched: in ordinary text nearly every space is one, and a
# substitution per space would cost more than the signature.
_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")
# A field line: a name of printable ASCII up to the first colon (RFC 5322 2.2, as dkimpy reads it).
_FIELD_START = re.compile(rb"[\x21-\x7e]+?:")


class HeaderFormatError(ValueError):
    """A header line that is neither a field nor a continuation: the message cannot be signed."""


def has_bare_newline(data: bytes) -> bool:
    # Every CR and every LF belongs to a CRLF pair exactly when the three counts agree.
    pairs = data.count(_CRLF)
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def normalize_newlines(data: bytes) -> bytes:
    """Each bare CR and bare LF as CRLF: what the upstream receives (``rawmsg.stuffed_blocks``)."""
    return _BARE_NEWLINE.sub(_CRLF, data)


def split_message(message: bytes) -> int:
    """Length of the header block (its fields with their CRLFs, without the blank line).

    The same split as ``rawmsg.Outgoing.of``: the rest starts with the blank line, or is
    empty when the message has no body."""
    if message.startswith(_CRLF):
        return 0
    index = message.find(b"\r\n\r\n")
    return len(message) if index == -1 else index + 2


# ---- header fields --------------------------------------------------------------------------


def header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(name, raw field) for each field of a header block, continuation lines included.

    ``raw`` is the field exactly as it is on the wire, with its final CRLF (added when the
    block ends without one, as SMTP will). An mbox ``From `` line is passed over, as dkimpy
    does; any other line without a colon raises HeaderFormatError (RFC 5322 2.2: a field is a
    name, a colon and a body; a verifier could not find the fields we signed)."""
    if has_bare_newline(head):
        head = normalize_newlines(head)
    lines = head.split(_CRLF)
    if lines and not lines[-1]:
        lines.pop()  # the block ends with CRLF: the split leaves an empty last item
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise HeaderFormatError("the header starts with a continuation line")
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + _CRLF)
            continue
        match = _FIELD_START.match(line)
        if match is None:
            if line.startswith(b"From "):
                continue
            shown = line[:60].decode("ascii", "backslashreplace")
            raise HeaderFormatError(f"a header line is not a field (no colon): {shown!r}")
        fields.append((line[: match.end() - 1], line + _CRLF))
    return fields


def canonical_field(raw: bytes, canon: HeaderCanon) -> bytes:
    """One header field canonicalised (RFC 6376 3.4.1 simple, 3.4.2 relaxed), with CRLF."""
    if canon == "simple":
        return raw
    name, _, value = raw.partition(b":")
    # relaxed: lower-case name, no WSP around the colon; unfold (the CRLFs inside a field are
    # all followed by WSP once newlines are normalised), one SP per WSP run, none at the ends.
    value = _WSP_RUN.sub(b" ", value.replace(_CRLF, b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + _CRLF


def select_fields(fields: Sequence[tuple[bytes, bytes]], names: Sequence[bytes]) -> list[bytes]:
    """The raw fields ``h=`` names, in ``h=`` order: for a name listed n times, the last n
    instances bottom-up (RFC 6376 5.4.2); a name listed more often than the field occurs
    selects nothing the extra times (that is how oversigning works, 8.15)."""
    by_name: dict[bytes, list[bytes]] = {}
    for name, raw in fields:
        by_name.setdefault(name.lower(), []).append(raw)
    out: list[bytes] = []
    for name in names:
        instances = by_name.get(name)
        if instances:
            out.append(instances.pop())  # bottom-up: the last remaining instance
    return out


def header_hash_input(
    fields: Sequence[tuple[bytes, bytes]], names: Sequence[bytes], signature_head: bytes, canon: HeaderCanon
) -> bytes:
    """The bytes the header hash covers (RFC 6376 3.7): the selected fields canonicalised,
    then the DKIM-Signature field being made, up to and including its empty ``b=``,
    canonicalised the same way and without its trailing CRLF."""
    parts = [canonical_field(raw, canon) for raw in select_fields(fields, names)]
    parts.append(canonical_field(signature_head + _CRLF, canon)[:-2])
    return b"".join(parts)


# ---- the body ---------------------------------------------------------------------------------


class _BodyHasher:
    """SHA-256 of the canonical body, fed in pieces of complete lines.

    Trailing empty lines are ignored by both canonicalisations (RFC 6376 3.4.3, 3.4.4), and
    a run of empty lines is only known to be trailing at the end, so each run is held back
    as a count and hashed when a non-empty line follows it."""

    def __init__(self, canon: BodyCanon) -> None:
        self.canon = canon
        self.hash = hashlib.sha256()
        self.held_empty_lines = 0
        self.hashed_any = False

    def lines(self, data: bytes, end: int) -> None:
        """``data[:end]``: complete lines, each ending with CRLF, no bare CR or LF among them."""
        # 3.4.4 a: no WSP at the end of a line, every other WSP run one SP. Looking for what the
        # expressions would change is ten times faster than running them for nothing; a single
        # byte is found by memchr, so a block without WSP (base64: most of a big message) costs
        # two quick scans, and text without tabs two more of the slower kind.
        tab = self.canon == "relaxed" and data.find(b"\t", 0, end) >= 0
        if self.canon == "relaxed" and (tab or data.find(b" ", 0, end) >= 0):
            if tab or data.find(b" \r\n", 0, end) >= 0:
                data = _WSP_BEFORE_CRLF.sub(_CRLF, memoryview(data)[:end])
                end = len(data)
            if tab or data.find(b"  ", 0, end) >= 0:
                data = _WSP_RUN.sub(b" ", memoryview(data)[:end])
                end = len(data)
        content = _content_end(data, end)
        if content == 0:  # nothing but empty lines (or nothing)
            self.held_empty_lines += end // 2
            return
        if self.held_empty_lines:  # a non-empty line follows them: they are not trailing
            self.hash.update(_CRLF * self.held_empty_lines)
        # The last non-empty line keeps its CRLF; the empty lines after it are held back.
        upto = content + 2
        self.hash.update(data if upto == len(data) else memoryview(data)[:upto])
        self.held_empty_lines = (end - upto) // 2
        self.hashed_any = True

    def digest(self) -> bytes:
        if self.canon == "simple" and not self.hashed_any:
            self.hash.update(_CRLF)  # 3.4.3: an empty body is a single CRLF
        return self.hash.digest()


def _content_end(data: bytes, end: int) -> int:
    """Where the trailing CRs and LFs of ``data[:end]`` begin (0 when it is all line ends),
    looked for in windows from the end so that no long copy is made."""
    position = end
    while position > 0:
        start = max(0, position - 4096)
        kept = len(data[start:position].rstrip(b"\r\n"))
        if kept:
            return start + kept
        position = start
    return 0


def body_hash(body: bytes | memoryview, canon: BodyCanon, block_size: int = BLOCK_SIZE) -> bytes:
    """SHA-256 of the canonical body (the bytes after the blank line), read in blocks.

    The body is canonicalised as the upstream will receive it: a bare CR or LF is a line
    ending (CRLF), and a last line without CRLF gets one (RFC 5321 4.1.1.4: DATA ends with
    CRLF.CRLF, so on the wire the body always ends with CRLF)."""
    hasher = _BodyHasher(canon)
    view = memoryview(body)
    carry = b""  # the unfinished line at the end of the previous block
    for start in range(0, len(view), block_size):
        data = bytes(view[start : start + block_size])
        if carry:
            data = carry + data
        if has_bare_newline(data):  # sendguard repairs or refuses these on the way in: rare
            trailing_cr = data.endswith(b"\r")  # may be the first half of a CRLF in the next block
            data = normalize_newlines(data[:-1] if trailing_cr else data) + (b"\r" if trailing_cr else b"")
        end = data.rfind(_CRLF) + 2
        if end < 2:  # no line ends in this block: a long line, carried on
            carry = data
            continue
        carry = data[end:]
        hasher.lines(data, end)
    if carry:
        # A line without CRLF (or a lone CR) at the very end: on the wire it ends with CRLF.
        last = normalize_newlines(carry)
        if not last.endswith(_CRLF):
            last += _CRLF
        hasher.lines(last, len(last))
    return hasher.digest()


# ---- the DKIM-Signature field ---------------------------------------------------------------------

_MAX_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters


def signature_field(
    tags: Sequence[tuple[str, str]], header_names: Sequence[bytes], after: Sequence[tuple[str, str]] = ()
) -> bytes:
    """``DKIM-Signature: tags; h=...; after; b=`` folded at 78 columns, the value of b= left out.

    ``h=`` may be folded before each colon (RFC 6376 3.5, sig-h-tag). The order of the tags
    does not matter to verifiers; h= before bh= is the order dkimpy and OpenDKIM write.
    ``b=`` comes last on a line of its own, so the bytes up to it do not depend on how the
    signature value is folded (3.7: that value and the whitespace around it are left out of
    the hash)."""
    atoms: list[tuple[str, str]] = [(" ", f"{tag}={value};") for tag, value in tags]  # (joiner, text)
    names = [name.decode("ascii") for name in header_names]
    atoms.extend(("" if index else " ", (":" if index else "h=") + name) for index, name in enumerate(names))
    if names:
        atoms[-1] = (atoms[-1][0], atoms[-1][1] + ";")
    atoms.extend((" ", f"{tag}={value};") for tag, value in after)
    lines: list[str] = []
    line = "DKIM-Signature:"
    for joiner, text in atoms:
        if len(line) + len(joiner) + len(text) > _MAX_LINE:
            lines.append(line)
            line = " " + text
        else:
            line += joiner + text
    lines.append(line)
    lines.append(" b=")
    return "\r\n".join(lines).encode("ascii")


def fold_signature_value(value: str) -> bytes:
    """The base64 value of ``b=`` folded with FWS (allowed inside base64string, 3.5), to follow
    ``signature_field``'s `` b=``: the first line has 3 columns fewer."""
    width = _MAX_LINE - 1
    first = width - 3
    chunks = [value[:first], *(value[i : i + width] for i in range(first, len(value), width))]
    return "\r\n ".join(chunk for chunk in chunks if chunk).encode("ascii")
