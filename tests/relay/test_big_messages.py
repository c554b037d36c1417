"""Big messages through the proxy: delivered whole, and let go of once they are on record.

The memory figures themselves (peak growth per 25 MB message, RSS after the load) are in
``bench/big_messages.py``; here are the promises that make them hold, checked without
timing: the upstream receives the exact message, the parsed message is freed as soon as
the transaction ends (not when the garbage collector next runs: the session's objects form
reference cycles), and glibc's allocator is tuned where it exists.
"""

from __future__ import annotations

import base64
import gc
from collections.abc import Iterator

import pytest

from policies.message import LEAN_PARSE_ABOVE, ParsedMessage
from proxy.observability import memory
from tests.conftest import Proxy, submit
from tests.fakes import FakeUpstream


def big_message(size: int) -> bytes:
    attachment = base64.encodebytes(b"\x00\x01binary\xff" * (size // 13)).replace(b"\n", b"\r\n")
    return (
        b"From: orders@shop.example\r\nTo: customer@example.net\r\nSubject: your invoice\r\n"
        b"Date: Mon, 02 Mar 2026 10:00:00 +0100\r\nMessage-ID: <big@shop.example>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="sep"\r\n\r\n'
        b"--sep\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour invoice is attached.\r\n"
        b"..a line that starts with a dot, stuffed on the way in and out\r\n"
        b"--sep\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=i.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + attachment + b"--sep--\r\n"
    )


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Only reference counting frees objects during the test, as between two collections."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def parsed_messages_alive(min_size: int) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, ParsedMessage) and len(o.raw) >= min_size)


async def test_a_big_message_arrives_whole_and_is_let_go_of_at_the_end(
    proxy: Proxy, upstream: FakeUpstream, no_automatic_gc: None
) -> None:
    content = big_message(3 * LEAN_PARSE_ABOVE)
    code, text = await submit(proxy.port, content, sender="orders@shop.example", recipients=["customer@example.net"])
    assert code == 250, text
    (received,) = upstream.messages
    # The proxy added its Message-ID only when missing; here the message is as sent, byte for byte
    # (aiosmtpd at the upstream unstuffs what sendguard stuffed).
    assert received.content.endswith(content.split(b"\r\n", 5)[5])
    assert parsed_messages_alive(LEAN_PARSE_ABOVE) == 0


def test_the_allocator_is_tuned_on_glibc() -> None:
    # This machine runs glibc (Debian); elsewhere tune_allocator is a no-op returning False.
    assert memory.tune_allocator() is True
    memory.release_memory(memory.BIG_MESSAGE)  # trims; never raises
    memory.release_memory(0)
