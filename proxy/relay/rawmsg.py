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
from collections.abc import Iterable, Sequence
from email.header import Header

__all__ = (
    "count_header",
    "format_header",
    "has_bare_newline",
    "header_block_size",
    "normalize_newlines",
    "prepend_headers",
    "remove_headers",
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
