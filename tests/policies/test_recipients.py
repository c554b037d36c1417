"""The visible_recipients policy: the counter against the corpus and the parser traps of the
reliability anchors (4.2), the limits, internal domains, the split remedy and the config loader."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from policies.base import Action, Transaction
from policies.message import ParsedMessage
from policies.recipients import VisibleRecipientsPolicy, count_visible_recipients
from proxy.config.settings import ConfigError, load_config_text
from proxy.relay import rawmsg

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
MANIFEST = list(
    csv.DictReader(
        (CORPUS / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE
    )
)


def parse(raw: bytes) -> ParsedMessage:
    return ParsedMessage(rawmsg.normalize_newlines(raw))


def headers(block: str | bytes) -> ParsedMessage:
    """A message with the given header lines (CRLF added) and a short body."""
    data = block.encode("utf-8") if isinstance(block, str) else block
    return parse(b"From: sender@corp.example\r\n" + data + b"\r\nSubject: t\r\n\r\nbody\r\n")


def count(block: str | bytes, internal: tuple[str, ...] = ()) -> int:
    return count_visible_recipients(headers(block), internal).external


def transaction(message: ParsedMessage, message_class: str = "commercial") -> Transaction:
    return Transaction(
        txn_id="T1",
        listener="local",
        client_ip="127.0.0.1",
        mail_from="sender@corp.example",
        recipients=[a.addr_spec for a in message.visible_recipients],
        message_class=message_class,
        message=message,
    )


def policy(**options: Any) -> VisibleRecipientsPolicy:
    return VisibleRecipientsPolicy(VisibleRecipientsPolicy.Options(**options))


def many(n: int, domain: str = "example.org") -> str:
    return "To: " + ",\r\n ".join(f'"Person {i}" <p{i}@{domain}>' for i in range(n))


# ---- the corpus -------------------------------------------------------------------------------


@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"] for r in MANIFEST])
def test_corpus_visible_recipients_exact(row: dict[str, str]) -> None:
    message = parse((CORPUS / "messages" / row["file"]).read_bytes())
    assert count_visible_recipients(message).visible == int(row["visible_recipients"]), row["notes"]


# ---- parser traps (reliability anchors 4.2) ---------------------------------------------------


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        # C13: an encoded-word that decodes to an address is a display name; the addr-spec counts
        ("To: =?utf-8?q?ceo=40bank=2Eexample?= <attacker@evil.example>", ["attacker@evil.example"]),
        # C14: an encoded-word that decodes to "a@example.com, b@example.com" is no address at all
        ("To: =?utf-8?b?YUBleGFtcGxlLmNvbSwgYkBleGFtcGxlLmNvbQ==?=", []),
        # C15: the empty group
        ("To: undisclosed-recipients:;", []),
        # C16: group members count
        ("To: team: a@example.com, b@example.com;, c@example.com", ["a@example.com", "b@example.com", "c@example.com"]),
        # C17: quoted comma in a name, and a comment that holds an address-like text
        (
            'To: "Doe, John" <j@example.com>, k@example.com (Kay, Smith <x@evil.example>)',
            ["j@example.com", "k@example.com"],
        ),
        # C18 (CVE-2023-27043): both addresses are in the text every recipient sees; the larger of
        # the strict and the lenient parse is kept, so a malformed field can never hide one
        ("To: alice@example.org)<bob@example.org>", ["alice@example.org", "bob@example.org"]),
        # C19: an address-like display name is not an address
        ('To: "<victim@example.com>" <attacker@evil.example>', ["attacker@evil.example"]),
        # C20: two To fields: both count (so does Cc between them)
        (
            "To: first@example.com\r\nCc: c@example.com\r\nTo: second@example.com",
            ["first@example.com", "second@example.com", "c@example.com"],
        ),
        # C21: field names are case-insensitive
        ("to: lower@example.com\r\nCC: upper@example.com", ["lower@example.com", "upper@example.com"]),
        # the same address in another case, and with another name, counts once
        ('To: A@Example.COM, "Again" <a@example.com>\r\nCc: a@EXAMPLE.com', ["A@Example.COM"]),
        # encoded-word names with commas (personal-23 style) and a quoted ";" (many-recipients-11)
        ('To: =?utf-8?q?Doe=2C_John?= <j@x.example>, "a;b" <k@x.example>', ["j@x.example", "k@x.example"]),
        # C22 and friends: Bcc, Resent-*, Reply-To are not visible recipient lists
        (
            "To: one@example.com\r\nBcc: hidden@example.com\r\nResent-To: r@example.com\r\n"
            "Resent-Cc: rc@example.com\r\nReply-To: reply@example.com",
            ["one@example.com"],
        ),
        # C07: a line without a colon ends the header block: what follows is body text
        ("To: a@example.com\r\nThis line has no colon\r\nCc: hidden@victim.example", ["a@example.com"]),
        # C08: "TO :" is not a header field for Python's parser (a Postfix differential)
        ("X-A: 1\r\nTO : hidden@victim.example", []),
        # C12: undecodable bytes in a display name do not lose the address
        (b"To: \xff\xfe <t@example.com>", ["t@example.com"]),
        # an empty angle address (malformed-33) is nothing
        ('To: "Undisclosed Recipients" <>', []),
    ],
)
def test_address_traps(block: str | bytes, expected: list[str]) -> None:
    message = headers(block)
    assert [a.addr_spec for a in message.visible_recipients] == expected
    assert count_visible_recipients(message).visible == len(expected)


def test_lone_line_endings_in_headers_are_counted_like_the_upstream_reads_them() -> None:
    """C23: after normalisation a lone CR or LF is a line break, so Cc is a field of its own."""
    message = parse(b"From: s@corp.example\r\nTo: a@example.com\rCc: b@example.com\nSubject: x\r\n\r\nbody\r\n")
    assert count_visible_recipients(message).visible == 2


def test_forty_recipients() -> None:
    assert count(many(40)) == 40


def test_thousands_of_recipients() -> None:
    """C11 in small: a To field with 2,000 addresses is counted exactly."""
    assert count(many(2000)) == 2000


def test_internal_domains_do_not_count() -> None:
    block = "To: a@corp.example, b@sales.corp.example, c@CORP.EXAMPLE\r\nCc: d@example.org, e@xn--bcher-kva.example"
    assert count(block) == 5
    assert count(block, ("corp.example",)) == 3
    assert count(block, ("corp.example", "*.corp.example")) == 2
    assert count(block, ("*corp.example", "bücher.example")) == 1  # IDNA and ASCII forms compare equal


# ---- verdicts ---------------------------------------------------------------------------------


async def test_rejects_above_the_limit_and_says_use_bcc() -> None:
    verdict = await policy().check_message(transaction(headers(many(37))))
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    text = verdict.reply.text
    assert text.startswith("Message shows 37 external recipients in To/Cc (limit 10); put them in Bcc")
    assert "/ NL: Bericht toont 37 externe ontvangers in Aan/Cc (maximaal 10); zet ze in Bcc" in text
    assert text.isascii() and len(verdict.reply.line()) <= 510
    assert verdict.evidence == {"visible": 37, "external": 37, "limit": 10, "class": "commercial"}


async def test_accepts_up_to_the_limit() -> None:
    verdict = await policy().check_message(transaction(headers(many(10))))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert verdict.edit is None
    assert verdict.evidence["external"] == 10


async def test_one_recipient_over_a_zero_limit() -> None:
    verdict = await policy(max_visible=0, language="en").check_message(transaction(headers("To: a@example.org")))
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.text.startswith("Message shows 1 external recipient in To/Cc (limit 0)")


async def test_undisclosed_recipients_pass() -> None:
    verdict = await policy(max_visible=0).check_message(transaction(headers("To: undisclosed-recipients:;")))
    assert verdict is not None and verdict.action is Action.ACCEPT


async def test_limit_per_class() -> None:
    strict = policy(max_visible=20, max_visible_by_class={"commercial": 1})
    message = headers(many(5))
    commercial = await strict.check_message(transaction(message, "commercial"))
    assert commercial is not None and commercial.action is Action.REJECT
    assert commercial.reply is not None and "(limit 1)" in commercial.reply.text
    transactional = await strict.check_message(transaction(message, "transactional"))
    assert transactional is not None and transactional.action is Action.ACCEPT


async def test_internal_recipients_are_not_counted_against_the_limit() -> None:
    block = many(30, "corp.example") + "\r\nCc: x@example.org, y@example.org"
    verdict = await policy(max_visible=2, internal_domains=("corp.example",)).check_message(transaction(headers(block)))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert verdict.evidence == {"visible": 32, "external": 2, "limit": 2, "class": "commercial"}


async def test_split_remedy_asks_for_one_copy_per_recipient() -> None:
    verdict = await policy(remedy="split").check_message(transaction(headers(many(40))))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert verdict.reply is None
    assert verdict.edit is not None and verdict.edit.split_per_recipient
    assert verdict.evidence["remedy"] == "split"
    below = await policy(remedy="split").check_message(transaction(headers(many(3))))
    assert below is not None and below.edit is None


@pytest.mark.parametrize(("language", "present", "absent"), [("en", "Bcc", "NL:"), ("nl", "ontvangers", "recipients")])
async def test_reply_language(language: str, present: str, absent: str) -> None:
    verdict = await policy(language=language).check_message(transaction(headers(many(11))))
    assert verdict is not None and verdict.reply is not None
    assert present in verdict.reply.text and absent not in verdict.reply.text


async def test_no_message_no_verdict() -> None:
    assert await policy().check_message(Transaction(txn_id="T", listener="l", client_ip="127.0.0.1")) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_visible": -1}, "must not be negative"),
        ({"max_visible_by_class": {"bulk": 3}}, "unknown class 'bulk'"),
        ({"max_visible_by_class": {"commercial": -2}}, "must not be negative"),
        ({"internal_domains": ("user@corp.example",)}, "not a domain glob"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VisibleRecipientsPolicy.Options(**options)


# ---- config -----------------------------------------------------------------------------------

CONFIG = """
listeners:
  - name: local
    address: 127.0.0.1:0
policies:
  - name: visible_recipients
{options}
"""


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    from policies import REGISTRY

    monkeypatch.setitem(REGISTRY, "visible_recipients", VisibleRecipientsPolicy)


@pytest.mark.usefixtures("registered")
async def test_config_loader_builds_the_policy() -> None:
    options = (
        "    max_visible: 5\n"
        "    max_visible_by_class: {commercial: 0}\n"
        "    internal_domains: [corp.example, '*.corp.example']\n"
        "    remedy: split\n"
        "    language: en\n"
    )
    (entry,) = load_config_text(CONFIG.format(options=options)).policies
    assert entry.classes == ("commercial", "transactional")
    assert entry.options.max_visible_by_class == {"commercial": 0}
    instance = entry.policy_class(entry.options, {})
    verdict = await instance.check_message(transaction(headers("To: a@example.org, b@sales.corp.example")))
    assert verdict is not None and verdict.edit is not None and verdict.edit.split_per_recipient
    assert verdict.evidence["external"] == 1


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("    max_visibles: 3\n", "unknown key; did you mean 'max_visible'?"),
        ("    max_visible: ten\n", "expected a whole number"),
        ("    remedy: bcc\n", "must be one of reject, split"),
        ("    max_visible_by_class: {bulk: 1}\n", "unknown class 'bulk'"),
    ],
)
def test_config_loader_refuses_bad_options(options: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(CONFIG.format(options=options))
    assert message in str(caught.value)


@pytest.mark.usefixtures("registered")
async def test_pipeline_runs_the_policy_for_both_classes() -> None:
    from proxy.relay.pipeline import Pipeline

    settings = load_config_text(
        CONFIG.format(options="    max_visible_by_class: {commercial: 2}\n    remedy: reject\n")
    )
    pipeline = Pipeline(settings.policies)
    message = headers(many(5))
    commercial = await pipeline.check_message(transaction(message, "commercial"))
    assert commercial.action is Action.REJECT and commercial.reply is not None
    assert commercial.reply.line().startswith("550 5.7.1 Message shows 5 external recipients in To/Cc (limit 2)")
    transactional = await pipeline.check_message(transaction(message, "transactional"))
    assert transactional.accepted and [r.policy for r in transactional.results] == ["visible_recipients"]
    split = Pipeline(load_config_text(CONFIG.format(options="    max_visible: 2\n    remedy: split\n")).policies)
    decision = await split.check_message(transaction(message, "transactional"))
    assert decision.accepted and [e.split_per_recipient for e in decision.edits] == [True]
