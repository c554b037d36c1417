"""``sendguard check`` and the live proxy decide alike (issue 14): every corpus message and
every hand-written classifier case goes through both, with one config and one SQLite consent
store seeded once, and for each the class, who gets the message and every refusal's reply
must be the same.

The proxy side is real: a byte-level client on 127.0.0.1 (so that ``RCPT TO:<"bob2"@...>``
arrives exactly as written), the fake upstream recording what it was given. The check side
is ``run_check``, the function behind the command, given the bytes the client sent.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policies.message import ParsedMessage
from proxy.addresses import address_key, envelope_address, relayable_recipient
from proxy.cli.main import Checker
from proxy.config.settings import load_config
from proxy.relay import rawmsg
from proxy.stores.consent import (
    OPTED_IN,
    OPTED_OUT,
    SUPPRESSED,
    ConsentInputError,
    ConsentStoreConfig,
    new_event,
    open_consent_store,
)
from tests.conftest import CORPUS, ROOT, Proxy, RawClient
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]

FIXTURES = ROOT / "tests" / "fixtures" / "classifier"
SENDER = "news@shop.example"
MAX_RECIPIENTS = 12  # corpus messages name up to 48; the first dozen show every path

#: The shipped compliance policies (config/sendguard.yaml), consent decided at RCPT for some
#: listeners' mail and after DATA for the rest is the consent policy's own business.
POLICIES: list[dict[str, Any]] = [
    {"name": "required_headers", "require": ["From", "Date"], "add_missing": ["Date", "Message-ID"]},
    {"name": "visible_recipients", "max_visible": 10, "remedy": "reject"},
    {"name": "unsubscribe", "require": ["body"], "language": "both"},
    {"name": "consent", "topic_header": None, "default_topic": "*"},
]


@dataclass
class Case:
    name: str
    content: bytes  # CRLF line endings, as the client sends it
    sender: str
    recipients: list[str]


@dataclass
class Decision:
    """What became of one message, in terms both sides can state."""

    message_class: str | None
    delivered: list[str]  # address keys of the recipients that get the message
    refusals: dict[str, str] = field(default_factory=dict)  # recipient key or "*" -> reply line


def _sendable(address: str) -> bool:
    """An address a client can give in RCPT TO (the session reads it with envelope_address)."""
    try:
        return relayable_recipient(envelope_address(address))
    except ValueError:
        return False


def cases() -> Iterator[Case]:
    files = [CORPUS / "messages" / name for name in sorted(p.name for p in (CORPUS / "messages").iterdir())]
    files += sorted(FIXTURES.glob("*/*.eml"))
    for number, path in enumerate(files):
        content = rawmsg.normalize_newlines(path.read_bytes())
        message = ParsedMessage(content)
        recipients = [a.addr_spec for a in message.addresses("To", "Cc", "Bcc")]
        recipients = [r for r in recipients if r.isascii() and _sendable(r)][:MAX_RECIPIENTS]
        if not recipients:
            recipients = [f"reader{number}@example.org"]
        # Spellings the session and the check must read alike: a quoted local part that needs
        # no quotes, a domain in capitals.
        if number % 3 == 0:
            recipients.append('"bob2"@example.net')
        if number % 5 == 0:
            recipients.append("Carol@Example.NET")
        yield Case(f"{path.parent.name}/{path.name}", content, SENDER, recipients)


async def seed(database: Path, recipients: set[str]) -> None:
    """Consent for every other recipient, an opt-out and a hard-bounce suppression, through
    the store's own API (the keys it writes are the ones both sides look up)."""
    store = await open_consent_store(ConsentStoreConfig(path=str(database)))
    evidence = {"method": "double_opt_in", "confirmed_at": "2026-01-02", "at": "2026-01-01"}
    events = []
    for address in sorted(recipients)[::2]:
        with contextlib.suppress(ConsentInputError):  # "user@intern": no consent can name it
            events.append(new_event(OPTED_IN, address, source="https://shop.example/signup", **evidence))
    events.append(new_event(OPTED_IN, '"BOB2"@Example.NET', source="https://shop.example/signup", **evidence))
    events.append(new_event(OPTED_IN, "carol@example.net", source="https://shop.example/signup", **evidence))
    events.append(new_event(OPTED_OUT, "carol@example.net", method="link", at="2026-02-01"))
    events.append(
        new_event(
            SUPPRESSED, "bob2@example.net", method="hard_bounce", at="2026-02-01", reason="550 5.1.1 no such user"
        )
    )
    await store.add(*events)
    await store.close()


_TXN_ID = re.compile(r" \[[^\]]+\]$")


def _line(reply: str) -> str:
    return _TXN_ID.sub("", reply)


def checked(result: dict[str, Any], case: Case) -> Decision:
    """The check's answer as a Decision: who gets the message, and each refusal."""
    assert result["action"] != "error", f"{case.name}: check could not judge it: {result['reason']}"
    refusals = {address_key(r): reply for r, reply in (result.get("refused_recipients") or {}).items()}
    data_reply = result["data_reply"]
    if data_reply is not None and not data_reply.startswith("2"):
        refusals["*"] = data_reply
    # Nothing is classified when the client never gets to DATA or the intake refused the bytes
    # (the check judges the message anyway, to list every problem at once).
    known = data_reply is not None and "class" in result
    return Decision(
        result["class"] if known else None, sorted({address_key(r) for r in result["deliver_to"]}), refusals
    )


async def relayed(proxy: Proxy, upstream: FakeUpstream, case: Case) -> Decision:
    """Send the case through the proxy byte by byte; read what the upstream got and the audit."""
    before = len(upstream.messages)
    audited = len(proxy.audit_lines())
    client = await RawClient.connect(proxy.port)
    refusals: dict[str, str] = {}
    accepted = 0
    try:
        assert (await client.cmd("EHLO client.example"))[0] == 250
        body = " BODY=8BITMIME" if not case.content.isascii() else ""
        code, text = await client.cmd(f"MAIL FROM:<{case.sender}>{body}")
        assert code == 250, (case.name, code, text)
        for recipient in case.recipients:
            code, text = await client.cmd(f"RCPT TO:<{recipient}>")
            if code == 250:
                accepted += 1
            else:
                refusals[address_key(recipient)] = f"{code} {text}"
        if accepted:
            assert (await client.cmd("DATA"))[0] == 354
            stuffed = re.sub(rb"(?m)^\.", b"..", case.content)
            if not stuffed.endswith(b"\r\n"):
                stuffed += b"\r\n"
            await client.send(stuffed + b".\r\n")
            code, text = await client.reply(timeout=30)
            if code != 250:
                refusals["*"] = _line(f"{code} {text}")
        await client.cmd("QUIT")
    finally:
        await client.close()
    lines = await proxy.wait_audit(audited + 1)
    audit = lines[-1] if len(lines) > audited else {}
    # What the upstream got from this sender (not the DSNs the retry queue sends meanwhile).
    got = [m for m in upstream.messages[before:] if m.mail_from == case.sender]
    delivered = sorted({address_key(r) for m in got for r in m.rcpt_tos})
    for recipient, copy in (audit.get("copies") or {}).items():
        if copy["fate"] == "refused":
            refusals[address_key(recipient)] = copy["reply"]
    return Decision(audit.get("class"), delivered, refusals)


async def test_check_and_proxy_decide_alike(
    tmp_path: Path, upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    started = time.monotonic()
    all_cases = list(cases())
    database = tmp_path / "consent.db"
    await seed(database, {r for c in all_cases for r in c.recipients})
    proxy = await proxy_factory(
        upstream.address,
        {
            "stores": {"consent": {"path": str(database)}},
            "policies": POLICIES,
            "listeners": [
                {
                    "name": "local",
                    "address": "127.0.0.1:0",
                    "trusted_networks": ["127.0.0.0/8"],
                    "auth": "none",
                    "max_recipients": 100,
                }
            ],
        },
    )
    checker = await Checker.open(load_config(proxy.config_path))  # what run_check opens, once
    differences: list[str] = []
    counts = {"delivered": 0, "refused": 0, "commercial": 0, "suppressed": 0}
    for case in all_cases:
        live = await relayed(proxy, upstream, case)
        result = await checker.check(case.content, sender=case.sender, recipients=case.recipients)
        offline = checked(result, case)
        if "class" not in result:
            # The intake refused the bytes (NUL, MIME depth): the check stops there, where the
            # proxy's client had its RCPT answers first. Nobody gets the message either way.
            live = Decision(live.message_class, live.delivered, {"*": live.refusals.get("*", "")})
        if live != offline:
            differences.append(f"{case.name}:\n  proxy {live}\n  check {offline}")
        counts["delivered"] += bool(live.delivered)
        counts["refused"] += bool(live.refusals)
        counts["commercial"] += live.message_class == "commercial"
        counts["suppressed"] += any("hard-bounced" in r for r in live.refusals.values())
    await checker.close()
    assert not differences, f"{len(differences)} of {len(all_cases)} differ:\n" + "\n".join(differences[:10])
    # Every path was taken: delivered, refused, both classes, the suppression at RCPT.
    assert len(all_cases) > 250
    assert counts["delivered"] > 50 and counts["refused"] > 50 and counts["suppressed"] > 50, counts
    assert 30 < counts["commercial"] < len(all_cases) - 30, counts
    assert time.monotonic() - started < 60
