"""The message on its way out without whole-message copies (proxy/relay/rawmsg.py).

``stuffed_blocks`` must put on the wire exactly what aiosmtplib's ``data()`` writes for the
same message (bare CR/LF to CRLF, dot-stuffing, the end-of-data line), whatever the block
size; ``Outgoing.edited`` must give the bytes the whole-message header edits gave; the
Maildir writer must write the file the whole-message conversion wrote.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.relay.rawmsg import Outgoing, prepend_headers, remove_headers, stuffed_blocks
from proxy.relay.upstream import MaildirUpstream


def aiosmtplib_wire(message: bytes) -> bytes:
    """What aiosmtplib 5's execute_data_command writes after DATA."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


def wire(message: Outgoing, size: int) -> bytes:
    return b"".join(stuffed_blocks(message, size))


CASES = {
    "empty": b"",
    "one line": b"Subject: x\r\n\r\nbody\r\n",
    "no final line ending": b"Subject: x\r\n\r\nbody",
    "dot lines": b"Subject: x\r\n\r\n.\r\n..\r\n.dot\r\nend.\r\n",
    "starts with a dot": b".Subject: x\r\n\r\nbody\r\n",
    "bare LF and CR": b"Subject: x\r\n\r\na\n.b\r.c\r\n",
    "ends with CR": b"Subject: x\r\n\r\nbody\r",
    "a dot right after a bare CR": b"a\r.\r\n",
}


@pytest.mark.parametrize("message", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1 << 20])
def test_the_wire_is_what_aiosmtplib_writes(message: bytes, size: int) -> None:
    assert wire(Outgoing(b"", message), size) == aiosmtplib_wire(message)
    head, rest = Outgoing.of(message).head, Outgoing.of(message).rest
    assert wire(Outgoing(head, rest), size) == aiosmtplib_wire(message)


@settings(max_examples=300, deadline=None)
@given(
    message=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x.y"]), max_size=40).map(b"".join),
    size=st.integers(min_value=1, max_value=16),
)
def test_any_message_in_any_block_size(message: bytes, size: int) -> None:
    assert wire(Outgoing(b"", message), size) == aiosmtplib_wire(message)
    # The upstream's view: exactly one end of data, at the very end.
    written = wire(Outgoing(b"", message), size)
    assert written.endswith(b"\r\n.\r\n") or written == b".\r\n"
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", written) is None
    assert written.count(b"\r\n.\r\n") == 1 or (written.startswith(b".\r\n") and written.count(b"\r\n.\r\n") == 0)


@pytest.mark.parametrize(
    ("remove", "add"),
    [
        ((), ()),
        (("X-Class",), ()),
        ((), (("List-Unsubscribe", "<https://u.example/1>"),)),
        (("to", "X-A"), (("To", "b@x"),)),
    ],
)
def test_header_edits_touch_only_the_header_block(remove: tuple[str, ...], add: tuple[tuple[str, str], ...]) -> None:
    message = b"X-Class: bulk\r\nTo: a@x\r\nX-A: 1\r\n\tfolded\r\nSubject: s\r\n\r\nX-Class: in the body\r\n"
    outgoing = Outgoing.of(message).edited(remove, add)
    assert outgoing.to_bytes() == prepend_headers(remove_headers(message, remove), add)
    assert len(outgoing) == len(outgoing.to_bytes())
    assert isinstance(outgoing.rest, memoryview) and outgoing.rest.obj is message  # the body is not copied


def test_a_message_without_a_body_and_one_without_headers() -> None:
    assert Outgoing.of(b"Subject: s\r\n").edited((), (("X", "1"),)).to_bytes() == b"X: 1\r\nSubject: s\r\n"
    assert Outgoing.of(b"\r\nbody\r\n").edited((), (("X", "1"),)).to_bytes() == b"X: 1\r\n\r\nbody\r\n"


@pytest.mark.parametrize("message", list(CASES.values()), ids=list(CASES))
def test_maildir_file_is_the_message_with_lf_line_endings(message: bytes, tmp_path: Path) -> None:
    upstream = MaildirUpstream(str(tmp_path / "Maildir"))
    name = upstream.deliver(Outgoing.of(message), "s@x.example", ["r@y.example"])
    written = (tmp_path / "Maildir" / "new" / name).read_bytes()
    assert written == b"Return-Path: <s@x.example>\nDelivered-To: r@y.example\n" + message.replace(b"\r\n", b"\n")
    assert name.endswith(f",S={len(written)}")


@pytest.mark.parametrize("shift", [-2, -1, 0, 1])
def test_maildir_crlf_split_between_two_blocks(shift: int, tmp_path: Path) -> None:
    from proxy.relay.rawmsg import BLOCK_SIZE

    head = b"Subject: s\r\n\r\n"
    message = head + b"a" * (BLOCK_SIZE - len(head) + shift) + b"\r\n" + b"b\r\n" * 10 + b"bare\rcr\r\n"
    upstream = MaildirUpstream(str(tmp_path / "Maildir"))
    name = upstream.deliver(Outgoing.of(message), "s@x.example", ["r@y.example"])
    written = (tmp_path / "Maildir" / "new" / name).read_bytes()
    assert written.endswith(message[len(head) :].replace(b"\r\n", b"\n"))
