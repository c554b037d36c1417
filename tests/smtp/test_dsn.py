"""DSN parameters (RFC 3461) through the real proxy: offered when the upstream offers DSN,
checked, and passed on as the client wrote them, on the shared transaction and on each
per-recipient copy (queued copies too); sendguard's own failure reports follow NOTIFY."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import Proxy, RawClient, eventually, message, submit
from tests.fakes import FakeUpstream, Faults
from tests.relay.test_spool import rows

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]


async def ready(proxy: Proxy) -> None:
    """One message first: sendguard learns what the upstream offers from its EHLO reply."""
    assert (await submit(proxy.port))[0] == 250


async def ehlo(client: RawClient) -> list[str]:
    code, text = await client.cmd("EHLO client.example")
    assert code == 250
    return text.splitlines()


@pytest.mark.parametrize(("upstream_dsn", "offered"), [(True, True), (False, False)])
async def test_dsn_is_offered_when_the_upstream_offers_it(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, upstream_dsn: bool, offered: bool
) -> None:
    upstream = await upstream_factory(dsn=upstream_dsn)
    proxy = await proxy_factory(upstream.address)
    client = await RawClient.connect(proxy.port)
    assert "DSN" not in await ehlo(client)  # nothing known of the upstream yet: not promised
    await client.close()
    await ready(proxy)
    client = await RawClient.connect(proxy.port)
    assert ("DSN" in await ehlo(client)) is offered
    if not offered:  # then its parameters are unknown, as for any MTA without DSN
        code, text = await client.cmd("MAIL FROM:<alice@example.com> RET=HDRS")
        assert (code, text.split(" ")[0]) == (555, "5.5.4"), text
    await client.close()


async def test_the_maildir_upstream_offers_no_dsn(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    proxy = await proxy_factory(f"maildir:{tmp_path / 'maildir'}")
    await ready(proxy)
    client = await RawClient.connect(proxy.port)
    assert "DSN" not in await ehlo(client)
    await client.close()


@pytest.mark.parametrize(
    ("mail", "rcpts", "relayed_mail", "relayed_rcpts"),
    [
        # Keywords in any case, the values of ENVID and ORCPT kept as written (xtext is case-exact).
        (
            "RET=hdrs ENVID=Qx+2B7-aB",
            {"bob@example.org": "NOTIFY=success,Failure ORCPT=rfc822;Bob+2Bx@Example.org"},
            ["RET=HDRS", "ENVID=Qx+2B7-aB"],
            {"bob@example.org": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob+2Bx@Example.org"]},
        ),
        (
            "ENVID=only-this",
            {"bob@example.org": "NOTIFY=NEVER", "carol@example.org": ""},
            ["ENVID=only-this"],
            {"bob@example.org": ["NOTIFY=NEVER"], "carol@example.org": []},
        ),
        (
            "",
            {"bob@example.org": "ORCPT=utf-8;bob@example.org"},
            [],
            {"bob@example.org": ["ORCPT=utf-8;bob@example.org"]},
        ),
    ],
)
async def test_dsn_parameters_reach_the_upstream(
    upstream_factory: UpstreamFactory,
    proxy_factory: ProxyFactory,
    mail: str,
    rcpts: dict[str, str],
    relayed_mail: list[str],
    relayed_rcpts: dict[str, list[str]],
) -> None:
    upstream = await upstream_factory(dsn=True)
    proxy = await proxy_factory(upstream.address)
    await ready(proxy)
    client = await RawClient.connect(proxy.port)
    assert "DSN" in await ehlo(client)
    code, text = await client.cmd(f"MAIL FROM:<alice@example.com> {mail}".strip())
    assert code == 250, text
    for recipient, params in rcpts.items():
        code, text = await client.cmd(f"RCPT TO:<{recipient}> {params}".strip())
        assert code == 250, text
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(message(to=", ".join(rcpts)) + b".\r\n")
    code, text = await client.reply()
    assert code == 250, text
    await client.close()
    got = upstream.messages[-1]
    assert [o for o in got.raw_mail_options if not o.startswith(("SIZE=", "BODY="))] == relayed_mail
    assert got.rcpt_options == relayed_rcpts


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("MAIL FROM:<alice@example.com> RET=PARTIAL", "501 5.5.4 RET must be FULL or HDRS"),
        ("MAIL FROM:<alice@example.com> RET=FULL RET=HDRS", "501 5.5.4 RET given twice"),
        (
            "MAIL FROM:<alice@example.com> ENVID=a+zz",
            "501 5.5.4 ENVID must be xtext",
        ),  # "+" needs two upper-case hex digits
        ("MAIL FROM:<alice@example.com> ENVID=a=b", "501 5.5.4 ENVID must be xtext"),
        ("MAIL FROM:<alice@example.com> ENVID=" + "x" * 101, "501 5.5.4 ENVID must be xtext of at most 100"),
        ("MAIL FROM:<alice@example.com> NOTIFY=NEVER", "555 5.5.4 NOTIFY is not a MAIL parameter"),
        ("RCPT TO:<bob@example.org> RET=HDRS", "555 5.5.4 RET is not a RCPT parameter"),
        ("RCPT TO:<bob@example.org> NOTIFY=NEVER,SUCCESS", "501 5.5.4 NOTIFY must be NEVER"),
        ("RCPT TO:<bob@example.org> NOTIFY=SOMETIMES", "501 5.5.4 NOTIFY must be NEVER"),
        ("RCPT TO:<bob@example.org> NOTIFY=FAILURE,FAILURE", "501 5.5.4 NOTIFY must be NEVER"),
        ("RCPT TO:<bob@example.org> ORCPT=bob@example.org", "501 5.5.4 ORCPT must be addr-type;xtext"),
        ("RCPT TO:<bob@example.org> ORCPT=rfc822;bob+2b@example.org", "501 5.5.4 ORCPT must be addr-type;xtext"),
        ("RCPT TO:<bob@example.org> ORCPT=rfc822;" + "b" * 490 + "@x.org", "501 5.5.4 ORCPT must be addr-type;xtext"),
    ],
)
async def test_bad_dsn_parameters_are_refused_with_what_is_wrong(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, command: str, reply: str
) -> None:
    upstream = await upstream_factory(dsn=True)
    proxy = await proxy_factory(upstream.address)
    await ready(proxy)
    client = await RawClient.connect(proxy.port)
    await ehlo(client)
    if command.startswith("RCPT"):
        assert (await client.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    code, text = await client.cmd(command)
    assert f"{code} {text}".startswith(reply), text
    # The session goes on: a good command after the bad one works.
    if command.startswith("RCPT"):
        assert (await client.cmd("RCPT TO:<bob@example.org> NOTIFY=FAILURE"))[0] == 250
    else:
        assert (await client.cmd("MAIL FROM:<alice@example.com> RET=HDRS"))[0] == 250
    await client.close()


SPLIT = {"policies": [{"name": "visible_recipients", "max_visible": 1, "remedy": "split"}]}


async def test_each_copy_carries_its_recipients_parameters_and_notify_decides_our_reports(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """One copy per recipient: each copy's MAIL carries ENVID and RET, its RCPT that recipient's
    NOTIFY and ORCPT, also when it waits in the retry queue. A copy refused for good is
    reported to the sender only where NOTIFY asks for failures (RFC 3461 4.1)."""
    upstream = await upstream_factory(
        dsn=True,
        faults=Faults(
            data_replies={
                "never@example.org": "550 5.1.1 gone",
                "fail@example.org": "550 5.1.1 gone",
                "later@example.org": "451 4.2.0 busy",
            }
        ),
    )
    proxy = await proxy_factory(
        upstream.address, {**SPLIT, "spool": {"path": str(tmp_path / "spool.db"), "retry_min": "1h"}}
    )
    await ready(proxy)
    client = await RawClient.connect(proxy.port)
    await ehlo(client)
    assert (await client.cmd("MAIL FROM:<alice@example.com> RET=HDRS ENVID=batch-7"))[0] == 250
    params = {
        "ok@example.org": "NOTIFY=SUCCESS ORCPT=rfc822;Ok@example.org",
        "never@example.org": "NOTIFY=NEVER",
        "fail@example.org": "NOTIFY=FAILURE,DELAY",
        "later@example.org": "NOTIFY=DELAY ORCPT=rfc822;Later@example.org",
    }
    for recipient, text in params.items():
        assert (await client.cmd(f"RCPT TO:<{recipient}> {text}"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(message(to=", ".join(params)) + b".\r\n")
    code, text = await client.reply()
    assert code == 250, text
    await client.close()
    delivered = [m for m in upstream.messages if m.rcpt_tos == ["ok@example.org"]]
    assert len(delivered) == 1
    assert delivered[0].raw_mail_options[-2:] == ["RET=HDRS", "ENVID=batch-7"]
    assert delivered[0].rcpt_options == {"ok@example.org": ["NOTIFY=SUCCESS", "ORCPT=rfc822;Ok@example.org"]}
    audit = (await proxy.wait_audit(2))[-1]
    assert audit["copies"]["never@example.org"] == {"fate": "refused", "reply": "550 5.1.1 gone", "reported": False}
    assert audit["copies"]["fail@example.org"]["reported"] is True
    copies = [r for r in rows(tmp_path) if r["kind"] == "copy"]
    assert [(r["recipient"], r["options"].split()[-3:]) for r in copies] == [
        ("later@example.org", ["ENVID=batch-7", "NOTIFY=DELAY", "ORCPT=rfc822;Later@example.org"])
    ]
    # The DSN names the recipient that asked for failures, not the one that said NEVER.
    assert await eventually(lambda: any(m.mail_from == "<>" for m in upstream.messages))  # the worker sends it
    reports = [m.content for m in upstream.messages if m.mail_from == "<>"]
    assert len(reports) == 1
    assert b"Final-Recipient: rfc822; fail@example.org" in reports[0]
    assert b"Final-Recipient: rfc822; never@example.org" not in reports[0]
