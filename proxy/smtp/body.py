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
        # The unfinished line is already over the line limit and is not kept: whether the
        # message is "too long" or "too much" waits for its CRLF (aiosmtpd checks the size
        # first, once the whole line is in). ``_last`` is the stream's last byte then, which
        # may be the CR of that CRLF.
        self._doomed = False
        self._last = b""
        self.received = 0  # bytes of the stream so far, dot-stuffing included (as aiosmtpd counts)
        self.state = BodyState.NOMINAL

    def feed(self, piece: bytes) -> None:
        offset = self.received  # where ``piece`` starts in the stream
        self.received += len(piece)
        if self.state is not BodyState.NOMINAL or not piece:
            return
        if self._doomed:
            self._finish_doomed_line(piece, offset)
            return
        data = self._partial + piece if self._partial else piece
        data_offset = offset - len(self._partial)
        cut = data.rfind(b"\r\n")
        lines, partial = (data[: cut + 2], data[cut + 2 :]) if cut != -1 else (b"", data)
        if lines:
            # The CRLF counts towards a line's length (aiosmtpd compares the line with its CRLF).
            if max(map(len, lines.split(b"\r\n"))) + 2 > self._max_line:
                self._fail(self._verdict_for_long_line(lines, data_offset))
                return
            if self._over_size(data_offset + len(lines)):
                self._fail(BodyState.TOO_MUCH)
                return
        if self._over_size(self.received):
            # Every complete line fits; the bytes beyond the limit are in the unfinished
            # line, whose size is checked before its length: "too much" whatever follows.
            self._fail(BodyState.TOO_MUCH)
            return
        if self._too_long(partial):
            self._drop()
            self._doomed = True
            self._last = partial[-1:]
            return
        self._partial = partial
        if lines:
            if lines.startswith(b"."):  # whole lines only: the first byte starts a line
                lines = lines[1:]
            self._out.write(lines.replace(b"\r\n.", b"\r\n"))

    def _over_size(self, received: int) -> bool:
        return self._max_size is not None and 0 < self._max_size < received

    def _long_line_verdict(self, line_end: int) -> BodyState:
        """aiosmtpd's verdict for a line over the limit that ends at ``line_end`` in the stream:
        "too much" if the size limit is passed on or before that line (the size is checked
        first), "too long" if only after it."""
        return BodyState.TOO_MUCH if self._over_size(line_end) else BodyState.TOO_LONG

    def _verdict_for_long_line(self, lines: bytes, lines_offset: int) -> BodyState:
        """The verdict when ``lines`` (whole lines starting at ``lines_offset`` in the stream)
        hold a line over the limit: its first such line decides. Only on a refusal: line by line."""
        end = lines_offset
        for line in lines.split(b"\r\n")[:-1]:
            end += len(line) + 2
            if len(line) + 2 > self._max_line:
                break
        return self._long_line_verdict(end)

    def _finish_doomed_line(self, piece: bytes, offset: int) -> None:
        if self._last == b"\r" and piece.startswith(b"\n"):
            line_end = offset + 1
        else:
            found = piece.find(b"\r\n")
            if found == -1:
                self._last = piece[-1:]
                return
            line_end = offset + found + 2
        self._doomed = False
        self.state = self._long_line_verdict(line_end)

    def _too_long(self, partial: bytes) -> bool:
        """Whether an unfinished line is already too long, its CRLF included; a CR at its end
        may be the first half of that CRLF."""
        return len(partial) - partial.endswith(b"\r") + 2 > self._max_line

    def _fail(self, state: BodyState) -> None:
        self.state = state
        self._drop()

    def _drop(self) -> None:
        """Let go of what was collected at once: nothing of it will be used."""
        self._partial = b""
        self._out = io.BytesIO()

    def message(self) -> bytes:
        """The message, once the end of data has been read (the body before it always ends
        with CRLF, so nothing is left unfinished). The buffer's bytes are returned as they
        are, not copied."""
        if self._partial or self._doomed:  # cannot happen after a real end of data; never drop bytes silently
            raise ValueError("the body does not end with a complete line")
        data = self._out.getvalue()
        self._out = io.BytesIO()
        return data
