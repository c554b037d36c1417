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
from proxy.addresses import address_key
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


#: Corpus messages whose Resent-To/Resent-Cc show addresses beyond To and Cc: the label counts
#: To and Cc only, the policy what a client shows (file -> addresses the Resent-* fields add).
RESENT_EXTRA = {
    "personal-23.eml": 4,
    "personal-24.eml": 4,
    "personal-25.eml": 4,
    "personal-26.eml": 4,
    "many-recipients-13.eml": 4,
    "many-recipients-05.eml": 1,
}


@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"] for r in MANIFEST])
def test_corpus_visible_recipients_exact(row: dict[str, str]) -> None:
    message = parse((CORPUS / "messages" / row["file"]).read_bytes())
    counted = count_visible_recipients(message)
    assert counted.addressed == int(row["visible_recipients"]), row["notes"]
    # Real mail ("Doe, John", encoded names with commas, quoted ";"): no address is found in
    # a display name or comment of To/Cc, so the policy counts no more than the mailboxes ...
    assert counted.in_text == 0
    # ... apart from what Resent-To and Resent-Cc show.
    assert counted.visible == counted.addressed + RESENT_EXTRA.get(row["file"], 0)


# ---- parser traps (reliability anchors 4.2) and disguised recipients (issue 14) ----------------

#: (header lines, what a reader is shown: the addresses counted, ``*`` marking one written in a
#: display name or comment, and the mailboxes: the only addresses mail may go to).
TRAPS: list[tuple[str | bytes, list[str], list[str]]] = [
    # C13: an encoded-word that decodes to an address is a display name: a reader sees both, but
    # only the addr-spec is a mailbox
    (
        "To: =?utf-8?q?ceo=40bank=2Eexample?= <attacker@evil.example>",
        ["attacker@evil.example", "*ceo@bank.example"],
        ["attacker@evil.example"],
    ),
    # C14: a bare encoded-word that decodes to "a@example.com, b@example.com": no mailbox at all,
    # and two addresses every reader sees
    ("To: =?utf-8?b?YUBleGFtcGxlLmNvbSwgYkBleGFtcGxlLmNvbQ==?=", ["*a@example.com", "*b@example.com"], []),
    # C15: the empty group
    ("To: undisclosed-recipients:;", [], []),
    # C16: group members count
    (
        "To: team: a@example.com, b@example.com;, c@example.com",
        ["a@example.com", "b@example.com", "c@example.com"],
        ["a@example.com", "b@example.com", "c@example.com"],
    ),
    # C17: quoted comma in a name is one recipient; an address in a comment is shown
    (
        'To: "Doe, John" <j@example.com>, k@example.com (Kay, Smith <x@evil.example>)',
        ["j@example.com", "k@example.com", "*x@evil.example"],
        ["j@example.com", "k@example.com"],
    ),
    # C18 (CVE-2023-27043): both addresses are in the text every recipient sees; the larger of
    # the strict and the lenient parse is kept, so a malformed field can never hide one
    (
        "To: alice@example.org)<bob@example.org>",
        ["alice@example.org", "bob@example.org"],
        ["alice@example.org", "bob@example.org"],
    ),
    # C19: an address-like display name is shown, but is not a mailbox
    (
        'To: "<victim@example.com>" <attacker@evil.example>',
        ["attacker@evil.example", "*victim@example.com"],
        ["attacker@evil.example"],
    ),
    # C20: two To fields: both count (so does Cc between them)
    (
        "To: first@example.com\r\nCc: c@example.com\r\nTo: second@example.com",
        ["first@example.com", "second@example.com", "c@example.com"],
        ["first@example.com", "second@example.com", "c@example.com"],
    ),
    # C21: field names are case-insensitive
    (
        "to: lower@example.com\r\nCC: upper@example.com",
        ["lower@example.com", "upper@example.com"],
        ["lower@example.com", "upper@example.com"],
    ),
    # the same address in another case, quoted, with a trailing dot or as an IDN counts once
    (
        'To: A@Example.COM, "Again" <a@example.com>, "a"@example.com.\r\nCc: a@EXAMPLE.com, '
        "=?utf-8?q?b=C3=BCcher?= <info@xn--bcher-kva.example>, info@b\u00fccher.example",
        ["A@Example.COM", "info@xn--bcher-kva.example"],
        [
            "A@Example.COM",
            "a@example.com",
            "a@example.com.",
            "a@EXAMPLE.com",
            "info@xn--bcher-kva.example",
            "info@b\u00fccher.example",
        ],
    ),
    # encoded-word names with commas (personal-23 style) and a quoted ";" (many-recipients-11)
    (
        'To: =?utf-8?q?Doe=2C_John?= <j@x.example>, "a;b" <k@x.example>',
        ["j@x.example", "k@x.example"],
        ["j@x.example", "k@x.example"],
    ),
    # Bcc, Resent-Bcc and Reply-To are not shown as recipients; Resent-To and Resent-Cc are
    (
        "To: one@example.com\r\nBcc: hidden@example.com\r\nResent-To: r@example.com\r\n"
        "Resent-Cc: rc@example.com\r\nResent-Bcc: rb@example.com\r\nReply-To: reply@example.com",
        ["one@example.com", "r@example.com", "rc@example.com"],
        ["one@example.com"],
    ),
    # C07: a line without a colon ends the header block: what follows is body text
    ("To: a@example.com\r\nThis line has no colon\r\nCc: hidden@victim.example", ["a@example.com"], ["a@example.com"]),
    # C08: "TO :" (RFC 5322 4.5.3 obsolete syntax) is the To field for Postfix and mail clients,
    # and the parse reads it so; so is a tab before the colon
    ("X-A: 1\r\nTO : hidden@victim.example", ["hidden@victim.example"], ["hidden@victim.example"]),
    ("Cc\t: tab@victim.example", ["tab@victim.example"], ["tab@victim.example"]),
    # C12: undecodable bytes in a display name do not lose the address
    (b"To: \xff\xfe <t@example.com>", ["t@example.com"], ["t@example.com"]),
    # an empty angle address (malformed-33) is nothing
    ('To: "Undisclosed Recipients" <>', [], []),
]


@pytest.mark.parametrize(("block", "shown", "mailboxes"), TRAPS)
def test_address_traps(block: str | bytes, shown: list[str], mailboxes: list[str]) -> None:
    message = headers(block)
    assert [("*" if a.in_text else "") + a.addr_spec for a in message.visible_recipients] == shown
    assert count_visible_recipients(message).visible == len(shown)
    sendable = message.addresses("To", "Cc", "Resent-To", "Resent-Cc")
    assert {a.normalized for a in message.addresses("To", "Cc")} == {address_key(m) for m in mailboxes}
    # What is only written in a name or comment never becomes an address mail goes to.
    assert not any(a.in_text for a in sendable)
    written = {address_key(s[1:]) for s in shown if s.startswith("*")}
    assert not written & {a.normalized for a in sendable}


#: Disguises of a recipient list (issue 14), each against its honest twin: the disguise shows
#: the reader as many addresses as the twin, and counts as many.
DISGUISES: list[tuple[str, str, int]] = [
    ("quoted display name", '"a@x.example, b@y.example, c@w.example" <list@z.example>', 4),
    ("encoded display name", "=?utf-8?q?a=40x=2Eexample=2C_b=40y=2Eexample=2C_c=40w=2Eexample?= <list@z.example>", 4),
    ("base64 display name", "=?utf-8?b?YUB4LmV4YW1wbGUsIGJAeS5leGFtcGxlLCBjQHcuZXhhbXBsZQ==?= <list@z.example>", 4),
    ("bare encoded-word", "=?utf-8?b?YUB4LmV4YW1wbGUsIGJAeS5leGFtcGxlLCBjQHcuZXhhbXBsZQ==?=", 3),
    ("encoded-word inside quotes", '"=?utf-8?q?a=40x=2Eexample?=, b@y.example, c@w.example" <list@z.example>', 4),
    ("comment", "list@z.example (a@x.example, b@y.example, c@w.example)", 4),
    ("encoded comment", "list@z.example (=?utf-8?q?a=40x=2Eexample=2C_b=40y=2Eexample?=) c@w.example", 4),
    ("group name", '"a@x.example, b@y.example": c@w.example;', 3),
]


@pytest.mark.parametrize(("what", "value", "shown"), DISGUISES, ids=[d[0] for d in DISGUISES])
@pytest.mark.parametrize("field", ["To", "Cc", "Resent-To", "Resent-Cc", "TO :"])
def test_disguised_recipients_are_counted(what: str, value: str, shown: int, field: str) -> None:
    message = headers(f"{field}: {value}" if not field.endswith(":") else f"{field} {value}")
    counted = count_visible_recipients(message)
    assert counted.visible == shown, [a.addr_spec for a in message.visible_recipients]
    # The written addresses are exposed, never mailboxes: no copy, no consent look-up for them.
    mailboxes = {a.addr_spec for a in message.addresses("To", "Cc", "Resent-To", "Resent-Cc")}
    assert mailboxes <= {"list@z.example", "c@w.example"}
    assert counted.in_text == shown - len({a.normalized for a in message.visible_recipients if not a.in_text})


#: Positive controls: real names with commas, parentheses and at-signs that are no addresses.
ONE_RECIPIENT = [
    '"Smith, John" <j@x.example>',
    '"Smith, John (Sales)" <j@x.example>',
    "=?utf-8?q?Smith=2C_John?= <j@x.example>",
    '"j@x.example" <j@x.example>',
    '"J@X.Example." <j@x.example>',
    "j@x.example (John Smith)",
    '"John @ Home" <j@x.example>',
    '"Smith, John; Doe, Jane" <j@x.example>',
    "John Smith <j@x.example>",
]


@pytest.mark.parametrize("value", ONE_RECIPIENT)
def test_one_recipient_stays_one(value: str) -> None:
    counted = count_visible_recipients(headers(f"To: {value}"))
    assert (counted.visible, counted.in_text) == (1, 0)


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


# ---- disguised recipients: the verdict and what it tells the sender (issue 14) ----------------


@pytest.mark.parametrize(("what", "value", "shown"), DISGUISES, ids=[d[0] for d in DISGUISES])
async def test_disguised_recipients_are_refused_with_what_to_fix(what: str, value: str, shown: int) -> None:
    verdict = await policy(max_visible=1, language="en").check_message(transaction(headers(f"To: {value}")))
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply is not None
    text = verdict.reply.text
    assert text.startswith(f"Message shows {shown} external recipients in To/Cc (limit 1)")
    # Bcc cannot hide an address written in a name: the reply says to take it out of the text.
    assert "written in display names or comments, which every reader sees: remove them" in text
    assert verdict.evidence["in_text"] >= 2


async def test_resent_fields_are_named_in_the_reply() -> None:
    block = "To: a@x.example\r\nResent-To: b@y.example, c@w.example\r\nResent-Cc: d@v.example"
    verdict = await policy(max_visible=2).check_message(transaction(headers(block)))
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.text.startswith("Message shows 4 external recipients in To/Cc/Resent-To/Resent-Cc (limit 2)")
    assert "in Aan/Cc/Resent-To/Resent-Cc (maximaal 2)" in verdict.reply.text
    assert "display names" not in verdict.reply.text
    assert len(verdict.reply.line()) <= 510


async def test_longest_reply_fits_one_line() -> None:
    block = "Resent-Cc: " + ", ".join(f'"p{i}@x{i}.example" <q{i}@y.example>' for i in range(2000))
    verdict = await policy(max_visible=0).check_message(transaction(headers(block)))
    assert verdict is not None and verdict.reply is not None
    assert (
        "Message shows 4000 external recipients" in verdict.reply.text and "2000 of them written" in verdict.reply.text
    )
    assert verdict.reply.text.isascii() and len(verdict.reply.line()) <= 510


@pytest.mark.parametrize(
    "block",
    [
        "To : a@x.example\r\nTo: b@y.example",
        "To: a@x.example\r\nTO\t: b@y.example",
        "Cc : a@x.example\r\ncc: b@y.example",
    ],
)
async def test_obsolete_spacing_does_not_escape_the_duplicate_rule(block: str) -> None:
    """Two To fields show one list and may deliver another: refused (required_headers), also
    when one of them hides behind the obsolete space before the colon (RFC 5322 4.5.3)."""
    from policies.headers import RequiredHeadersPolicy

    message = headers(block)
    assert count_visible_recipients(message).visible == 2
    refusal = await RequiredHeadersPolicy(RequiredHeadersPolicy.Options()).check_message(transaction(message))
    assert refusal is not None and refusal.action is Action.REJECT and refusal.reply is not None
    assert "appears more than once" in refusal.reply.text


def test_obsolete_field_name_keeps_the_rest_of_the_header() -> None:
    """The stdlib would end the header block at "To :" and read Subject, List-Unsubscribe and
    Content-Type as body text: after canonicalisation every field is a field."""
    message = parse(
        b"From: s@corp.example\r\nTo : a@x.example\r\nSubject : Deals\r\nList-Unsubscribe: <https://u.example/1>\r\n"
        b"Content-Type: text/html\r\n\r\n<p>hi</p>\r\n"
    )
    assert message.header("Subject") == "Deals"
    assert message.has_header("List-Unsubscribe")
    assert [p.content_type for p in message.text_parts] == ["text/html"]
    assert message.raw.startswith(b"From: s@corp.example\r\nTo: a@x.example\r\nSubject: Deals\r\n")
    assert "MissingHeaderBodySeparatorDefect" not in message.defects


@pytest.mark.parametrize(
    "raw",
    [
        b"From: s@corp.example\r\nTo: a@x.example\r\n\r\nNote : this line is body text\r\n",
        b"From: s@corp.example\r\nTo: a@x.example\r\nno colon here\r\nCc : b@y.example\r\n\r\nbody\r\n",
        b"From s@corp.example Mon Jan  1 00:00:00 2026\r\nTo: a@x.example\r\n\r\nX : y\r\n",
    ],
)
def test_canonicalisation_stays_in_the_header_block(raw: bytes) -> None:
    from policies.message import canonical_field_names

    assert canonical_field_names(raw) == raw
    assert count_visible_recipients(parse(raw)).visible == 1


def test_address_scan_is_linear_on_hostile_text() -> None:
    """A display name of 100,000 local-part characters and at-signs without a domain."""
    import time

    hostile = '"' + ("a" * 50_000) + ("@" * 5_000) + ("b." * 20_000) + '" <list@z.example>'
    started = time.perf_counter()
    counted = count_visible_recipients(headers(f"To: {hostile}"))
    assert time.perf_counter() - started < 2.0
    assert counted.visible >= 1
