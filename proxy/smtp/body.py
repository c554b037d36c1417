"""The message body of DATA, read in blocks instead of one line at a time.

aiosmtpd reads DATA with one ``readuntil(b"\\r\\n")`` per line and keeps every line as its
own bytearray, then joins them: a 25 MB message costs about three times its size in line
objects before the join makes a fourth copy, and one coroutine round trip per line
(issue 15 part 3, issue 9). Here the stream is read up to each ``.\\r\\n`` (or a buffer's
worth at a time), and ``BodyCollector`` takes the pieces, applies aiosmtpd's rules to them
with bytes operations and writes the message into one growing buffer, whose bytes become
the message without another copy.

The rules are exactly aiosmtpd's (>= 1.4.6), so that the end of data, the limits and the
replies do not change (reliability anchors T10, the smuggling cases):

* the data ends only at a line that is exactly ``.`` followed by CRLF, at the start of the
  body or after a CRLF (RFC 5321 4.1.1.4); a bare LF or bare CR never ends a line here;
* a line (CRLF included) longer than the limit makes the whole message "too long"
  (RFC 5321 4.5.3.1.6), more bytes than the size limit make it "too much"; both are only
  answered once the end of data has been read (4.2.5), and the bytes are dropped at once;
* a line that starts with ``.`` loses that first dot (dot-unstuffing, 4.5.2).
"""

from __future__ import annotations

import enum
import io

__all__ = ("END_LINE", "BodyCollector", "BodyState", "ends_data")

#: The end-of-data line, without the CRLF that must come before it.
END_LINE = b".\r\n"


class BodyState(enum.Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too long"  # a line over the line limit
    TOO_MUCH = "too much"  # more bytes than the message size limit


def ends_data(piece: bytes, before: bytes) -> bool:
    """Whether ``piece``, which ends with ``.\\r\\n``, ends the data: the dot must start a
    line. ``before`` is what came before ``piece`` in the body (its last two bytes are
    enough); empty at the start of the body, where a line starts too."""
    if not piece.endswith(END_LINE):
        return False
    preceding = (before[-2:] + piece[: -len(END_LINE)])[-2:]
    return preceding == b"\r\n" or (not before and len(piece) == len(END_LINE))


class BodyCollector:
    """Collects the body of one DATA command from pieces of the stream.

    Pieces come in stream order and never contain the end-of-data line itself. Only whole
    lines are unstuffed and written; the unfinished last line of a piece waits for the next
    (at most one line, so at most the line limit plus one block).
    """

    def __init__(self, *, max_size: int | None, max_line_length: int) -> None:
        self._max_size = max_size
        self._max_line = max_line_length
        self._out = io.BytesIO()
        self._partial = b""  # the unfinished last line
        self.received = 0  # bytes of the stream so far, dot-stuffing included (as aiosmtpd counts)
        self.state = BodyState.NOMINAL

    def feed(self, piece: bytes) -> None:
        self.received += len(piece)
        if self.state is not BodyState.NOMINAL:
            return
        if self._max_size and self.received > self._max_size:
            self._fail(BodyState.TOO_MUCH)
            return
        data = self._partial + piece if self._partial else piece
        cut = data.rfind(b"\r\n")
        if cut == -1:
            self._partial = data
            if self._too_long(data):
                self._fail(BodyState.TOO_LONG)
            return
        lines, self._partial = data[: cut + 2], data[cut + 2 :]
        # The CRLF counts towards a line's length (aiosmtpd compares the line with its CRLF).
        longest = max(map(len, lines.split(b"\r\n"))) + 2
        if longest > self._max_line or self._too_long(self._partial):
            self._fail(BodyState.TOO_LONG)
            return
        if lines.startswith(b"."):  # whole lines only: the first byte starts a line
            lines = lines[1:]
        self._out.write(lines.replace(b"\r\n.", b"\r\n"))

    def _too_long(self, partial: bytes) -> bool:
        """Whether an unfinished line is already too long, its CRLF included; a CR at its end
        may be the first half of that CRLF."""
        return len(partial) - partial.endswith(b"\r") + 2 > self._max_line

    def _fail(self, state: BodyState) -> None:
        self.state = state
        self._partial = b""
        self._out = io.BytesIO()  # drop what was collected at once: nothing of it will be used

    def message(self) -> bytes:
        """The message, once the end of data has been read (the body before it always ends
        with CRLF, so nothing is left unfinished). The buffer's bytes are returned as they
        are, not copied."""
        if self._partial:  # cannot happen after a real end of data; never drop bytes silently
            raise ValueError("the body does not end with a complete line")
        data = self._out.getvalue()
        self._out = io.BytesIO()
        return data
