"""Every reply constant is well-formed: name carries the code, classes agree (RFC 3463 section 2)."""

from __future__ import annotations

import pytest

from policies.base import Reply, Verdict
from proxy import replies


def constants() -> list[tuple[str, Reply]]:
    return [(name, value) for name, value in vars(replies).items() if isinstance(value, Reply)]


@pytest.mark.parametrize(("name", "reply"), constants())
def test_name_carries_the_code_and_classes_agree(name: str, reply: Reply) -> None:
    assert name.startswith(f"R{reply.code}_")
    assert int(reply.status[0]) == reply.code // 100
    assert reply.text and reply.text[0].isupper()


def test_functions_build_valid_replies() -> None:
    assert (
        replies.r552_message_too_big(25 * 1024 * 1024)
        .line()
        .startswith("552 5.3.4 Message too big: the limit is 25 MB")
    )
    assert replies.r451_upstream_unavailable("abc").line().endswith("(abc)")
    assert replies.r500_line_too_long(1000).code == 500


@pytest.mark.parametrize(
    ("code", "status", "text"),
    [
        (550, "4.7.1", "class mismatch"),
        (451, "5.7.1", "class mismatch"),
        (250, "2.0", "not enhanced"),
        (550, "5.7.1", "two\r\nlines"),
        (600, "5.7.1", "out of range"),
    ],
)
def test_invalid_replies_are_refused(code: int, status: str, text: str) -> None:
    with pytest.raises(ValueError):
        Reply(code, status, text)


def test_verdicts_need_a_matching_reply() -> None:
    with pytest.raises(ValueError):
        Verdict.reject("x", "refused", status="4.7.1", code=451)
    with pytest.raises(ValueError):
        Verdict.tempfail("x", "later", status="5.7.1", code=550)
