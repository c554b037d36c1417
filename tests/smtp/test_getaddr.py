"""The session's quick reading of MAIL FROM / RCPT TO paths gives exactly what aiosmtpd's own
reading gives (the address and the rest of the line), for every input: the quick path only
takes <dot-atom@host.name>, the rest goes to aiosmtpd."""

from __future__ import annotations

import string
from collections.abc import Callable

from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.smtp.session import _PLAIN_PATH, SendguardSMTP

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
# Atom text, and characters that make a path quoted, literal, commented or wrong.
# Half of each drawn from what the quick path takes, so both paths are well exercised.
LOCAL = st.one_of(st.text(ATEXT + ".", min_size=1, max_size=12), st.text(ATEXT + '.."\\ ()<>@,;:[]é\t', max_size=12))
DOMAIN = st.one_of(
    st.text(string.ascii_letters + string.digits + "-.", min_size=1, max_size=12),
    st.text(string.ascii_letters + string.digits + "-..[]_é ()", max_size=12),
)
TAIL = st.one_of(
    st.just(""),
    st.text(string.ascii_uppercase + "=", min_size=1, max_size=12).map(lambda p: " " + p),
    st.text(string.printable + "é()", max_size=20),
)


def bare_session(local_part_limit: int = 0) -> SendguardSMTP:
    session = object.__new__(SendguardSMTP)  # _getaddr needs no connection, only these two
    session.local_part_limit = local_part_limit
    session.raw_params = []
    return session


def aiosmtpd_reading(session: SendguardSMTP, arg: str) -> tuple[str | None, str | None]:
    return SMTP._getaddr(session, arg)


@settings(max_examples=3000, deadline=None)
@given(local=LOCAL, domain=DOMAIN, tail=TAIL, opening=st.sampled_from(["<", " <", "", "<<"]))
@example(local="ann", domain="example.org", tail=" SIZE=100 BODY=8BITMIME", opening="<")
@example(local="a.b+c", domain="mx-1.example.org", tail="", opening="<")
@example(local="a..b", domain="example.org", tail="", opening="<")
@example(local="ann", domain="example.org.", tail="", opening="<")
@example(local="ann", domain="example.org", tail="> x", opening="<")
@example(local="ann", domain="example.org", tail="NOTIFY=NEVER", opening="<")
@example(local=".ann", domain="example.org", tail="", opening="<")
@example(local="ann", domain="example.org", tail=" (a comment) SIZE=1", opening="<")
@example(local="ann", domain="example.org", tail="(c)", opening="<")
@example(local="ann", domain="example.org", tail=" \t\r\nX", opening="<")
def test_the_quick_reading_agrees_with_aiosmtpd(local: str, domain: str, tail: str, opening: str) -> None:
    arg = f"{opening}{local}@{domain}>{tail}"
    session = bare_session()
    # Both readings, or how each failed (aiosmtpd's parser raises on a few broken domains,
    # and then the quick path must have passed the input on to it).
    ours = outcome(lambda: session._getaddr(arg))
    theirs = outcome(lambda: aiosmtpd_reading(bare_session(), arg))
    assert ours == theirs
    if isinstance(theirs, tuple) and theirs[0] != "raised":
        rest = theirs[1]
        assert session.raw_params == (rest.split() if rest else [])


def outcome(read: Callable[[], tuple[str | None, str | None]]) -> tuple[str | None, str | None]:
    try:
        return read()
    except Exception as exc:  # compared below, never hidden
        return "raised", type(exc).__name__


def test_the_quick_reading_takes_the_everyday_paths_and_keeps_the_local_part_limit() -> None:
    assert _PLAIN_PATH.match("<news@shop.example> SIZE=4096")
    assert not _PLAIN_PATH.match('<"a b"@shop.example>')
    assert not _PLAIN_PATH.match("<a@[192.0.2.1]>")
    assert not _PLAIN_PATH.match("<>")
    assert bare_session(local_part_limit=3)._getaddr("<anna@example.org>") == (None, None)
    assert bare_session(local_part_limit=4)._getaddr("<anna@example.org> X=1") == ("anna@example.org", "X=1")
