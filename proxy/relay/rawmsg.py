"""The message bytes between the client and the upstream: checks, normalisation and edits.

SMTP smuggling (CVE-2023-51764 family) lives in disagreements about line endings. aiosmtpd
(>= 1.4.6) ends DATA only at CRLF.CRLF but hands us bare CR, bare LF and NUL verbatim, so:

* NUL is always refused (aiosmtplib would forward it);
* bare CR / bare LF are either refused or turned into CRLF *before* any policy parses the
  message, so the bytes the policies judge are the bytes the upstream receives;
* on the way out aiosmtplib dot-stuffs every line that starts with ".", so a "." that a
  bare line ending put at the start of a line can never end the upstream's DATA early.

Header edits work on raw bytes: the message is never re-serialised by the ``email``
package, which would re-fold headers and break signatures (reliability anchors C27).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.header import Header

__all__ = (
    "Outgoing",
    "count_header",
    "format_header",
    "has_bare_newline",
    "header_block_size",
    "normalize_newlines",
    "prepend_headers",
    "remove_headers",
    "stuffed_blocks",
)

_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 2.2: printable ASCII except ":"


def has_bare_newline(data: bytes) -> bool:
    # Counting is ten times faster than the look-behind regex and exact: every CR and every
    # LF belongs to a CRLF pair exactly when all three counts agree.
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def normalize_newlines(data: bytes) -> bytes:
    """Every bare CR and bare LF becomes CRLF, exactly as aiosmtplib sends it."""
    return _BARE_NEWLINE.sub(b"\r\n", data)


def _header_end(data: bytes) -> int:
    """Offset of the blank line that ends the header block (or len(data))."""
    if data.startswith(b"\r\n"):
        return 0
    index = data.find(b"\r\n\r\n")
    return len(data) if index == -1 else index + 2


def header_block_size(data: bytes) -> int:
    return _header_end(data)


def _fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, lowercase name) of each header field, continuation lines included."""
    end = _header_end(data)
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    while pos < end:
        line_end = data.find(b"\r\n", pos, end)
        line_end = end if line_end == -1 else line_end + 2
        line = data[pos:line_end]
        if line[:1] in (b" ", b"\t") and out:
            start, _, name = out[-1]
            out[-1] = (start, line_end, name)
        else:
            name = line.split(b":", 1)[0].strip().lower() if b":" in line else b""
            out.append((pos, line_end, name))
        pos = line_end
    return out


def count_header(data: bytes, name: str) -> int:
    wanted = name.lower().encode("ascii")
    return sum(1 for _, _, field in _fields(data) if field == wanted)


def remove_headers(data: bytes, names: Iterable[str]) -> bytes:
    """Drop every field with one of ``names`` (case-insensitive), with its continuation lines."""
    wanted = {n.lower().encode("ascii") for n in names}
    if not wanted:
        return data
    fields = _fields(data)
    if not any(name in wanted for _, _, name in fields):
        return data
    kept = [data[start:end] for start, end, name in fields if name not in wanted]
    return b"".join(kept) + data[_header_end(data) :]


def format_header(name: str, value: str) -> bytes:
    """One header field as CRLF-terminated bytes, folded, non-ASCII as RFC 2047 words.

    Values from policies never contain CR or LF (checked here), so an added field can
    never inject another (CVE-2024-6923 class).
    """
    if not _HEADER_NAME.match(name):
        raise ValueError(f"bad header field name: {name!r}")
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError(f"header value for {name} contains a line break")
    if value.isascii() and len(name) + 2 + len(value) <= 998:
        return f"{name}: {value}\r\n".encode("ascii")
    encoded = Header(value, charset="utf-8", header_name=name, maxlinelen=78).encode(linesep="\r\n")
    return f"{name}: {encoded}\r\n".encode("ascii")


def prepend_headers(data: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    if not headers:
        return data
    return b"".join(format_header(name, value) for name, value in headers) + data


# ---- the message on its way out, without copying its body -----------------------------------

#: Bytes per write to the upstream (and per block of the Maildir file): big enough that the
#: per-block work is noise, small enough that a block's copy is too.
BLOCK_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message as it leaves: its header block, which the header edits rewrite, and the
    rest (from the blank line on), a view of the received bytes.

    Header edits of a 25 MB message then cost the header block, not another 25 MB (issue 15
    part 3); ``to_bytes`` makes the one copy for the steps that need the whole message in
    one piece (a footer in the body, per-recipient copies, DKIM signing)."""

    head: bytes
    rest: bytes | memoryview

    @classmethod
    def of(cls, data: bytes) -> Outgoing:
        end = _header_end(data)
        return cls(data[:end], memoryview(data)[end:])

    def __len__(self) -> int:
        return len(self.head) + len(self.rest)

    def to_bytes(self) -> bytes:
        if not self.head and isinstance(self.rest, bytes):
            return self.rest
        return b"".join((self.head, self.rest))

    def edited(self, remove: Iterable[str], add: Sequence[tuple[str, str]]) -> Outgoing:
        """The header fields named in ``remove`` dropped, then ``add`` prepended."""
        return Outgoing(prepend_headers(remove_headers(self.head, remove), add), self.rest)

    def prepended(self, fields: bytes) -> Outgoing:
        """Whole header fields (CRLF-terminated, already safe) put on top: a trace field."""
        return Outgoing(fields + self.head, self.rest) if fields else self

    def blocks(self, size: int = BLOCK_SIZE) -> Iterator[bytes | memoryview]:
        if self.head:
            yield self.head
        view = memoryview(self.rest)
        for start in range(0, len(view), size):
            yield view[start : start + size]


def stuffed_blocks(message: Outgoing, size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """What follows the DATA command on the wire, block by block: the message with CRLF line
    endings, every line that starts with "." given a second one (RFC 5321 4.5.2), and the
    end-of-data line. As aiosmtplib's ``data()`` writes it, without its two whole-message
    copies: a bare CR or LF (which sendguard refuses or repairs on the way in, so only a bug
    could leave one) still becomes CRLF, so the upstream can never see an early end of data.
    """
    carry = b""  # a CR at the end of a block, which may be the first half of a CRLF
    at_line_start = True
    wrote_any = False
    for block in message.blocks(size):
        data = carry + bytes(block) if carry else bytes(block)
        carry = b""
        if data.endswith(b"\r"):
            data, carry = data[:-1], b"\r"
        if not data:
            continue
        if has_bare_newline(data):
            data = normalize_newlines(data)
        if at_line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\n.", b"\n..")
        at_line_start = data.endswith(b"\n")
        wrote_any = True
        yield data
    if carry:  # a CR at the very end: a line ending of its own
        yield b"\r\n"
        at_line_start = True
        wrote_any = True
    # An empty message or one without a final line ending gets one (as aiosmtplib sends it).
    yield b".\r\n" if at_line_start and wrote_any else b"\r\n.\r\n"
