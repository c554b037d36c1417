"""list_unsubscribe: each recipient's own RFC 8058 headers, https first, add or replace, topic."""

from __future__ import annotations

import urllib.parse

import pytest
import yaml

import policies
from policies.base import Action, PolicyError, Transaction
from policies.list_unsubscribe import ListUnsubscribePolicy
from policies.message import ParsedMessage
from proxy.config.settings import load_config_text
from proxy.relay import rawmsg
from proxy.schema import ConfigError
from proxy.unsubscribe import UnsubscribeService
from tests.unsubscribe.harness import BASE_URL, config_section, make_config

RECIPIENTS = ["ann@example.org", "Ben.Baker@Example.ORG", "cat@example.net"]


def service() -> UnsubscribeService:
    return UnsubscribeService(make_config(), lambda: None)


def txn(extra: str = "", *, recipients: list[str] | None = None, sender: str = "news@mail.shop.example") -> Transaction:
    raw = (
        f"From: Shop <hello@shop.example>\r\nTo: ann@example.org\r\nSubject: Sale\r\n{extra}"
        "Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nSale! Unsubscribe: https://shop.example/unsub\r\n"
    ).encode()
    return Transaction(
        txn_id="t1",
        listener="local",
        client_ip="127.0.0.1",
        mail_from=sender,
        recipients=list(recipients if recipients is not None else RECIPIENTS),
        message_class="commercial",
        message=ParsedMessage(raw),
    )


def policy(resources: dict[str, object] | None = None, **options: object) -> ListUnsubscribePolicy:
    if resources is None:
        resources = {"unsubscribe": service()}
    return ListUnsubscribePolicy(ListUnsubscribePolicy.Options(**options), resources)  # type: ignore[arg-type]


async def test_every_recipient_gets_its_own_one_click_headers() -> None:
    unsubscribe = service()
    verdict = await policy({"unsubscribe": unsubscribe}).check_message(txn("X-Sendguard-Topic: Newsletter\r\n"))
    assert verdict is not None and verdict.action is Action.ACCEPT and verdict.edit is not None
    edit = verdict.edit
    assert edit.fans_out
    assert set(edit.per_recipient) == set(RECIPIENTS)
    tokens = set()
    for recipient, fields in edit.per_recipient.items():
        names = [name for name, _ in fields]
        assert names == ["List-Unsubscribe", "List-Unsubscribe-Post"]
        value, post = fields[0][1], fields[1][1]
        assert post == "List-Unsubscribe=One-Click"
        uris = [uri.strip().strip("<>") for uri in value.split(",")]
        assert uris[0].startswith(BASE_URL + "/u/"), "https first: Gmail uses the first URI"
        assert uris[1].startswith("mailto:unsubscribe@shop.example?subject=unsubscribe%20")
        token_text = uris[0].rsplit("/", 1)[1]
        assert urllib.parse.unquote(uris[1].split("subject=")[1]) == f"unsubscribe {token_text}"
        token = unsubscribe.read(token_text)
        assert (token.recipient, token.sender, token.topic) == (recipient, "shop.example", "newsletter")
        tokens.add(token_text)
        assert rawmsg.format_header("List-Unsubscribe", value).count(b"\r\n") == 1, "never folded (nodemailer#1654)"
    assert len(tokens) == len(RECIPIENTS)
    assert verdict.evidence == {
        "existing_header": "keep",
        "sender": "shop.example",
        "topic": "newsletter",
        "recipients": 3,
        "key_id": "k2026",
    }


async def test_without_mailto_only_the_https_uri() -> None:
    unsubscribe = UnsubscribeService(make_config(mailto=None), lambda: None)
    verdict = await policy({"unsubscribe": unsubscribe}).check_message(txn(recipients=["ann@example.org"]))
    assert verdict is not None and verdict.edit is not None
    value = verdict.edit.per_recipient["ann@example.org"][0][1]
    assert value.startswith(f"<{BASE_URL}/u/") and value.endswith(">") and "mailto" not in value


@pytest.mark.parametrize(
    ("extra", "existing", "edited"),
    [
        ("", "keep", True),
        ("List-Unsubscribe: <https://sender.example/u/1>\r\n", "keep", False),
        (
            "List-Unsubscribe: <https://sender.example/u/1>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
            "replace",
            True,
        ),
        ("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", "keep", True),
    ],
)
async def test_keep_or_replace_an_existing_header(extra: str, existing: str, edited: bool) -> None:
    verdict = await policy(existing_header=existing).check_message(txn(extra))
    assert verdict is not None and verdict.action is Action.ACCEPT
    if not edited:
        assert verdict.edit is None
        assert "left as it is" in verdict.reason
        return
    assert verdict.edit is not None
    assert verdict.edit.remove == ("List-Unsubscribe", "List-Unsubscribe-Post")
    assert len(verdict.edit.per_recipient) == 3


@pytest.mark.parametrize(
    ("extra", "options", "topic"),
    [
        ("", {}, "*"),
        ("", {"default_topic": "Offers"}, "offers"),
        ("X-Sendguard-Topic: offers\r\n", {}, "offers"),
        ("X-Sendguard-Topic: offers\r\nX-Sendguard-Topic: news\r\n", {"default_topic": "general"}, "general"),
        ("X-Sendguard-Topic: not a topic!\r\n", {}, "*"),
        ("X-Topic: shoes\r\n", {"topic_header": "X-Topic"}, "shoes"),
        ("X-Sendguard-Topic: offers\r\n", {"topic_header": None, "default_topic": "news"}, "news"),
    ],
)
async def test_topic(extra: str, options: dict[str, object], topic: str) -> None:
    unsubscribe = service()
    verdict = await policy({"unsubscribe": unsubscribe}, **options).check_message(
        txn(extra, recipients=["a@b.example"])
    )
    assert verdict is not None and verdict.edit is not None
    link = verdict.edit.per_recipient["a@b.example"][0][1].split(",")[0].strip("<>")
    assert unsubscribe.read(link.rsplit("/", 1)[1]).topic == topic


async def test_the_sender_is_the_from_domain_else_the_envelope() -> None:
    unsubscribe = service()
    verdict = await policy({"unsubscribe": unsubscribe}).check_message(txn(recipients=["a@b.example"]))
    assert verdict is not None and verdict.evidence["sender"] == "shop.example"
    no_from = txn(recipients=["a@b.example"])
    assert no_from.message is not None
    no_from.message = ParsedMessage(b"To: a@b.example\r\nSubject: x\r\n\r\nbody\r\n")
    verdict = await policy({"unsubscribe": unsubscribe}).check_message(no_from)
    assert verdict is not None and verdict.evidence["sender"] == "mail.shop.example"


async def test_recipients_that_are_not_addresses_get_no_link() -> None:
    verdict = await policy().check_message(txn(recipients=["postmaster", "ann@example.org"]))
    assert verdict is not None and verdict.edit is not None
    assert list(verdict.edit.per_recipient) == ["ann@example.org"]
    assert verdict.evidence["skipped"] == ["postmaster"]
    verdict = await policy().check_message(txn(recipients=["postmaster"]))
    assert verdict is not None and verdict.edit is None


async def test_without_the_service_the_policy_fails_loudly() -> None:
    with pytest.raises(PolicyError, match="unsubscribe: section"):
        await policy({}).check_message(txn())


async def test_nothing_before_data() -> None:
    before = txn()
    before.message = None
    assert await policy().check_message(before) is None


def _section() -> str:
    """The unsubscribe: section of a config, as YAML."""
    return "unsubscribe:\n" + "".join(
        "  " + line + "\n" for line in yaml.safe_dump(config_section(make_config())).splitlines()
    )


def test_the_config_entry_and_its_instruction_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(policies.REGISTRY, "list_unsubscribe", ListUnsubscribePolicy)
    config = (
        _section() + "listeners:\n  - {name: local, address: 127.0.0.1:2525}\npolicies:\n  - name: list_unsubscribe\n"
    )
    text = (
        config + "    mode: monitor\n    existing_header: replace\n    topic_header: X-Topic\n    default_topic: News\n"
    )
    settings = load_config_text(text, environ={})
    (entry,) = settings.policies
    assert (entry.mode, entry.classes) == ("monitor", ("commercial",))
    options = entry.options
    assert (options.existing_header, options.topic_header, options.default_topic) == ("replace", "X-Topic", "news")
    assert "X-Topic" in settings.instruction_headers, "the proxy strips the topic header before relaying"
    assert settings.needs("unsubscribe")
    for bad, problem in (
        ("    existing_header: swap\n", "must be one of"),
        ("    topic_header: 'X Topic'\n", "not a header field name"),
    ):
        with pytest.raises(ConfigError, match=problem):
            load_config_text(config + bad, environ={})


def test_the_policy_needs_the_unsubscribe_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(policies.REGISTRY, "list_unsubscribe", ListUnsubscribePolicy)
    config = "listeners:\n  - {name: local, address: 127.0.0.1:2525}\npolicies:\n  - name: list_unsubscribe\n"
    with pytest.raises(ConfigError, match=r"policies\[0\]: list_unsubscribe needs the unsubscribe: section enabled"):
        load_config_text(config, environ={})
    same_port = _section().replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:9025")
    with pytest.raises(ConfigError, match=r"must differ from http\.address"):
        load_config_text(same_port + config + "http: {address: 127.0.0.1:9025}\n", environ={})


def test_footer_edit_gives_each_recipient_its_own_link() -> None:
    from policies.list_unsubscribe import footer_edit
    from proxy.unsubscribe.footer import append_footer

    unsubscribe = service()
    transaction = txn(recipients=["ann@example.org", "postmaster", "ben@example.org"])
    edit = footer_edit(unsubscribe, transaction, "offers")
    assert edit is not None and edit.fans_out
    assert list(edit.per_recipient_footer) == ["ann@example.org", "ben@example.org"]
    for recipient, (text, markup) in edit.per_recipient_footer.items():
        url = text.rsplit(" ", 1)[1]
        token = unsubscribe.read(url.rsplit("/", 1)[1])
        assert (token.recipient, token.sender, token.topic) == (recipient, "shop.example", "offers")
        assert f'href="{url}"' in markup and "Afmelden" in markup, "the first configured language (nl)"
        assert transaction.message is not None
        assert url in append_footer(transaction.message.raw, text, markup).decode()
    no_text = txn(recipients=["ann@example.org"])
    no_text.message = ParsedMessage(b"From: a@shop.example\r\nContent-Type: application/pdf\r\n\r\nJVBERi0K\r\n")
    assert footer_edit(unsubscribe, no_text, "*") is None
