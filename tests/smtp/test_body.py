"""The block-wise DATA reader (proxy/smtp/body.py) against aiosmtpd's line-by-line rules.

The reference below is aiosmtpd 1.4.6's loop restated: lines end only at CRLF, the data
ends at the first line that is exactly ".CRLF", a too-long line or too many bytes spoil the
message, a leading dot is removed. The collector must give the same answer for any stream
cut into any pieces, which hypothesis checks; the table holds the cases that matter by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.smtp.body import END_LINE, BodyCollector, BodyState, ends_data


@dataclass(frozen=True)
class Outcome:
    state: BodyState
    message: bytes | None  # None when the stream never ends the data
    rest: bytes  # what follows the end of data (the next commands)


def reference(stream: bytes, max_size: int | None, max_line: int) -> Outcome:
    """aiosmtpd's smtp_DATA loop, one line at a time."""
    state = BodyState.NOMINAL
    lines: list[bytes] = []
    received = 0
    position = 0
    while True:
        end = stream.find(b"\r\n", position)
        if end == -1:
            return Outcome(state, None, b"")
        line = stream[position : end + 2]
        position = end + 2
        if line == END_LINE:
            break
        received += len(line)
        if state is BodyState.NOMINAL and max_size and received > max_size:
            state = BodyState.TOO_MUCH
        if state is BodyState.NOMINAL and len(line) > max_line:
            state = BodyState.TOO_LONG
        if state is BodyState.NOMINAL:
            lines.append(line[1:] if line.startswith(b".") else line)
    message = b"".join(lines) if state is BodyState.NOMINAL else b""
    return Outcome(state, message, stream[position:])


def collect(pieces: list[bytes], max_size: int | None, max_line: int) -> Outcome:
    """The session's loop (read up to each ".CRLF", else a block at a time) over a stream
    that arrives in the given pieces."""
    stream = b"".join(pieces)
    collector = BodyCollector(max_size=max_size, max_line_length=max_line)
    before = b""
    position = 0
    block = max(len(p) for p in pieces) if pieces else 1
    while position < len(stream):
        found = stream.find(END_LINE, position)
        if found != -1 and found + 3 - position <= block + 3:
            piece = stream[position : found + 3]
            position = found + 3
            if ends_data(piece, before):
                collector.feed(piece[:-3])
                state = collector.state
                message = collector.message() if state is BodyState.NOMINAL else b""
                return Outcome(state, message, stream[position:])
        else:
            # Without ".CRLF" in the buffer, asyncio hands over all but the last two bytes.
            take = max(1, min(block, len(stream) - position - 2))
            piece = stream[position : position + take]
            position += take
        collector.feed(piece)
        before = (before + piece)[-2:]
    return Outcome(collector.state, None, b"")


CASES = [
    ("empty message", b".\r\n", Outcome(BodyState.NOMINAL, b"", b"")),
    ("one line", b"a\r\n.\r\n", Outcome(BodyState.NOMINAL, b"a\r\n", b"")),
    ("pipelined QUIT after the dot", b"a\r\n.\r\nQUIT\r\n", Outcome(BodyState.NOMINAL, b"a\r\n", b"QUIT\r\n")),
    ("dot-stuffed line", b"..a\r\n.\r\n", Outcome(BodyState.NOMINAL, b".a\r\n", b"")),
    ("stuffed lone dot", b"a\r\n..\r\n.\r\n", Outcome(BodyState.NOMINAL, b"a\r\n.\r\n", b"")),
    ("a dot ending a sentence", b"end.\r\n.\r\n", Outcome(BodyState.NOMINAL, b"end.\r\n", b"")),
    ("bare LF before the dot does not end", b"a\n.\n\r\n.\r\n", Outcome(BodyState.NOMINAL, b"a\n.\n\r\n", b"")),
    ("LF dot CRLF does not end", b"a\n.\r\nb\r\n.\r\n", Outcome(BodyState.NOMINAL, b"a\n.\r\nb\r\n", b"")),
    ("CR dot CR does not end", b"a\r.\rb\r\n.\r\n", Outcome(BodyState.NOMINAL, b"a\r.\rb\r\n", b"")),
    ("no end", b"a\r\n.b\r\n", Outcome(BodyState.NOMINAL, None, b"")),
    ("line at the limit", b"x" * 8 + b"\r\n.\r\n", Outcome(BodyState.NOMINAL, b"x" * 8 + b"\r\n", b"")),
    ("line over the limit", b"x" * 9 + b"\r\n.\r\n", Outcome(BodyState.TOO_LONG, b"", b"")),
    ("over the size limit", b"abcd\r\n" * 6 + b".\r\n", Outcome(BodyState.TOO_MUCH, b"", b"")),
    # The first spoiled line decides; within one line the size is checked first.
    ("long line past the size limit", b"a\r\n" * 10 + b"x" * 12 + b"\r\n.\r\n", Outcome(BodyState.TOO_MUCH, b"", b"")),
    (
        "long line, then the size limit",
        b"x" * 12 + b"\r\n" + b"abcd\r\n" * 5 + b".\r\n",
        Outcome(BodyState.TOO_LONG, b"", b""),
    ),
    ("size limit, then a long line", b"abcd\r\n" * 6 + b"x" * 12 + b"\r\n.\r\n", Outcome(BodyState.TOO_MUCH, b"", b"")),
    (
        "long line of bare LFs past the limit",
        b"a\r\n" * 9 + b"\n\nxxxxxxx\r\n.\r\n",
        Outcome(BodyState.TOO_MUCH, b"", b""),
    ),
]


@pytest.mark.parametrize(("stream", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("block", [1, 2, 3, 7, 64])
def test_cases_in_pieces_of_any_size(stream: bytes, expected: Outcome, block: int) -> None:
    pieces = [stream[i : i + block] for i in range(0, len(stream), block)]
    assert collect(pieces, max_size=32, max_line=10) == expected
    assert reference(stream, max_size=32, max_line=10) == expected


@settings(max_examples=400, deadline=None)
@given(
    lines=st.lists(
        st.sampled_from([b"a", b".", b"..", b"", b"x" * 9, b"\r", b"\n", b".\r", b"\n.", b"b.c"]).map(
            lambda s: s + b"\r\n"
        )
        | st.sampled_from([b"\n", b"\r", b".", b"a"]),
        max_size=30,
    ),
    block=st.integers(min_value=1, max_value=40),
    max_size=st.none() | st.integers(min_value=1, max_value=120),
)
def test_same_answer_as_aiosmtpd_for_any_stream(lines: list[bytes], block: int, max_size: int | None) -> None:
    stream = b"".join(lines) + b".\r\nNEXT\r\n"
    pieces = [stream[i : i + block] for i in range(0, len(stream), block)]
    assert collect(pieces, max_size=max_size, max_line=12) == reference(stream, max_size=max_size, max_line=12)


def test_ends_data_needs_a_line_start() -> None:
    assert ends_data(b".\r\n", b"")  # the body's first line
    assert ends_data(b"abc\r\n.\r\n", b"")
    assert ends_data(b".\r\n", b"x\r\n")
    assert ends_data(b"\n.\r\n", b"x\r")  # the CRLF split between two reads
    assert not ends_data(b".\r\n", b"x")
    assert not ends_data(b"x.\r\n", b"\r\n")
    assert not ends_data(b"\n.\r\n", b"x")  # a bare LF before the dot
    assert not ends_data(b"abc", b"")


def test_the_message_is_the_buffer_itself_not_a_copy() -> None:
    collector = BodyCollector(max_size=None, max_line_length=1000)
    for _ in range(100):
        collector.feed(b"y" * 998 + b"\r\n")
    message = collector.message()
    assert len(message) == 100_000
    assert message == (b"y" * 998 + b"\r\n") * 100


def test_an_unfinished_line_is_never_dropped_silently() -> None:
    collector = BodyCollector(max_size=None, max_line_length=1000)
    collector.feed(b"abc\r\ndef")
    with pytest.raises(ValueError, match="complete line"):
        collector.message()
