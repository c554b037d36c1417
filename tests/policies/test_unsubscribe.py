"""The unsubscribe policy: the body-link and header detectors against the corpus labels and
hand-written messages for what the corpus lacks, the verdicts, and the config loader."""

from __future__ import annotations

import csv
import itertools
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest

from policies.base import Action, Transaction
from policies.message import ParsedMessage
from policies.unsubscribe import (
    ONE_CLICK_VALUE,
    UnsubscribePolicy,
    find_unsubscribe_links,
    inspect_list_unsubscribe,
    load_vocabulary,
)
from proxy.config.settings import ConfigError, load_config_text
from proxy.relay import rawmsg

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
MANIFEST = list(
    csv.DictReader(
        (CORPUS / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE
    )
)
VOCABULARY = load_vocabulary()
#: Labels as a reader sees the message, where that differs from the corpus label (see the file).
READER_VIEW = {
    row["file"]: row
    for row in csv.DictReader(
        (CORPUS / "READER_VIEW.tsv").read_text(encoding="utf-8").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE
    )
}


def parse(raw: bytes) -> ParsedMessage:
    """The message as the proxy's policies see it: line endings normalised, parsed once."""
    return ParsedMessage(rawmsg.normalize_newlines(raw))


def corpus_message(name: str) -> ParsedMessage:
    return parse((CORPUS / "messages" / name).read_bytes())


def build(
    *,
    text: str | None = None,
    html: str | None = None,
    charset: str = "utf-8",
    cte: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A message with a text and/or HTML body, encoded as asked."""
    msg = EmailMessage()
    msg["From"] = "News <news@shop.example>"
    msg["To"] = "klant@example.nl"
    msg["Subject"] = "Nieuws"
    for name, value in (headers or {}).items():
        msg[name] = value
    kwargs: dict[str, Any] = {"charset": charset}
    if cte:
        kwargs["cte"] = cte
    if text is not None:
        msg.set_content(text, **kwargs)
        if html is not None:
            msg.add_alternative(html, subtype="html", **kwargs)
    else:
        msg.set_content(html or "", subtype="html", **kwargs)
    return msg.as_bytes(policy=SMTP)


def body_link(raw: bytes | ParsedMessage) -> str | None:
    message = raw if isinstance(raw, ParsedMessage) else parse(raw)
    findings = find_unsubscribe_links(message, VOCABULARY)
    return findings[0].target if findings else None


def transaction(raw: bytes, message_class: str = "commercial") -> Transaction:
    return Transaction(
        txn_id="T1",
        listener="local",
        client_ip="127.0.0.1",
        mail_from="news@shop.example",
        recipients=["klant@example.nl"],
        message_class=message_class,
        message=parse(raw),
    )


def policy(**options: Any) -> UnsubscribePolicy:
    return UnsubscribePolicy(UnsubscribePolicy.Options(**options))


# ---- the corpus -------------------------------------------------------------------------------


@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"] for r in MANIFEST])
def test_corpus_body_link_matches_the_label(row: dict[str, str]) -> None:
    found = body_link(corpus_message(row["file"]))
    expected = READER_VIEW.get(row["file"], row)["has_unsubscribe_link_in_body"]
    assert ("y" if found else "n") == expected, (found, row["notes"])


def test_reader_view_only_overrides_links_a_reader_cannot_see() -> None:
    """Each override turns a labelled link into none, and the message still has the link
    somewhere in its text parts: only what the reader sees differs."""
    for name, row in READER_VIEW.items():
        assert row["has_unsubscribe_link_in_body"] == "n" and row["reason"]
        labelled = next(r for r in MANIFEST if r["file"] == name)
        assert labelled["has_unsubscribe_link_in_body"] == "y"
        message = corpus_message(name)
        assert any(r.links for r in message.readable_texts if r.content_type == "text/plain" or not r.displayed)


@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"] for r in MANIFEST])
def test_corpus_header_detectors_match_the_labels(row: dict[str, str]) -> None:
    header = inspect_list_unsubscribe(corpus_message(row["file"]))
    assert ("y" if header.present else "n") == row["has_list_unsubscribe_header"]
    assert ("y" if header.post_values else "n") == row["has_list_unsubscribe_post"]
    # The one file with a Post header is a real RFC 8058 newsletter: it passes in full.
    assert header.one_click == (row["has_list_unsubscribe_post"] == "y")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # the link the policy reports is the real one, not a neighbour of the keyword
        ("many-recipients-04.eml", "http://www.saving-much.com/removeme.html"),
        ("newsletter-22.eml", "http://advertise-bz.cn/mach/view.php?id=5&Email=user@example.com"),
        ("many-recipients-01.eml", "http://61.172.250.143/remove/remove1.html"),  # QP sent as 7bit
        ("many-recipients-02.eml", "mailto:remv0615a@bk.ru?subject=STOP_GN724"),  # "no longer wish", STOP
        ("mailing-list-08.eml", "freebsd-test-unsubscribe@freebsd.org"),  # a designated address
        ("newsletter-18.eml", "http://www.geheimesgeld.ru/unsubscribe.php?id=78684302557913"),  # "abmelden"
    ],
)
def test_corpus_reports_the_actual_unsubscribe_link(name: str, expected: str) -> None:
    assert body_link(corpus_message(name)) == expected


def test_corpus_header_validity() -> None:
    """Every List-Unsubscribe in the corpus has an https: or mailto: URI, except none; the
    http: URIs of old Mailman lists are seen but not counted as https."""
    for row in MANIFEST:
        header = inspect_list_unsubscribe(corpus_message(row["file"]))
        if header.present:
            assert header.valid, row["file"]
            assert all(u.lower().startswith("http:") for u in header.http)
            assert not set(header.http) & set(header.https)


# ---- hand-written bodies ----------------------------------------------------------------------

FOUND = [
    pytest.param(
        build(
            html="<p>Je ontvangt deze nieuwsbrief omdat je klant bent.</p>"
            '<p><a href="https://shop.example/nb?u=1">Afmelden</a> | <a href="https://shop.example/v">Online</a></p>'
        ),
        "https://shop.example/nb?u=1",
        id="nl-afmelden-in-newsletter",
    ),
    pytest.param(
        build(text="Wil je onze mails niet meer? Schrijf je hier uit: https://shop.example/s?id=9\n"),
        "https://shop.example/s?id=9",
        id="nl-schrijf-je-uit-plain",
    ),
    pytest.param(
        build(text="Geen nieuwsbrief meer ontvangen? Meld je hier af:\n\nhttps://shop.example/nb?u=3\n"),
        "https://shop.example/nb?u=3",
        id="nl-meld-je-af-in-newsletter",
    ),
    pytest.param(
        build(
            html='<p>Si no deseas recibir más correos, <a href="https://tienda.example/b?id=3">date de baja</a>.</p>'
        ),
        "https://tienda.example/b?id=3",
        id="es-darse-de-baja",
    ),
    pytest.param(
        build(html='<p>Newsletter <a href="https://laden.example/n?x=1">abbestellen</a></p>', charset="iso-8859-1"),
        "https://laden.example/n?x=1",
        id="de-abbestellen",
    ),
    pytest.param(
        build(
            html='<p>Vous pouvez vous <a href="https://boutique.example/l?e=2">désabonner</a> à tout moment.</p>',
            charset="iso-8859-1",
            cte="quoted-printable",
        ),
        "https://boutique.example/l?e=2",
        id="fr-desabonner-qp-latin1",
    ),
    pytest.param(
        build(html='<p>Pour ne plus recevoir nos offres, <a href="https://b.example/x/désinscription">cliquez</a></p>'),
        "https://b.example/x/désinscription",
        id="fr-url-token-with-accent",
    ),
    pytest.param(
        build(
            text="Plain part without a link.",
            html='<div>If you wish to unsubscribe, <a href="https://news.example/t/8f3a">click here</a>.</div>',
            cte="base64",
        ),
        "https://news.example/t/8f3a",
        id="en-keyword-before-anchor-base64",
    ),
    pytest.param(
        build(html='<p><a href="https://news.example/t/77">Click here</a> to unsubscribe from these emails.</p>'),
        "https://news.example/t/77",
        id="en-keyword-after-anchor",
    ),
    pytest.param(
        build(html='<td><a href="https://news.example/remove?u=5">Remove</a></td>'),
        "https://news.example/remove?u=5",
        id="en-remove-with-removal-url",
    ),
    pytest.param(
        build(text="To stop these emails, write to mailto:lists@news.example?subject=STOP\n"),
        "mailto:lists@news.example?subject=STOP",
        id="en-stop-mailto",
    ),
    pytest.param(
        build(text="To unsubscribe, send an empty message to leave-news@lists.example.\n"),
        "leave-news@lists.example",
        id="en-designated-address",
    ),
    pytest.param(
        build(
            html='<p><a href="https://news.example/u/1"><img src="https://cdn.example/u.png" alt="Unsubscribe"></a></p>'
        ),
        "https://news.example/u/1",
        id="en-image-link-with-alt",
    ),
    pytest.param(
        build(
            html='<p>Click <a href="https://news.example/u/1?a=b&amp;c=d">here</a> to opt-out</p>',
            cte="quoted-printable",
        ),
        "https://news.example/u/1?a=b&c=d",
        id="en-opt-out-entity-in-href",
    ),
    pytest.param(
        build(html="<p>Unsubscribe:\n<br>\n<a href=\"https://news.example/x\">here</a></p><!-- <a href='x'>"),
        "https://news.example/x",
        id="en-unclosed-comment-after-link",
    ),
    pytest.param(
        build(html='<p style="display:none">preheader</p><p><a href="https://n.example/u">Uitschrijven</a></p>'),
        "https://n.example/u",
        id="nl-visible-after-hidden-preheader",
    ),
    pytest.param(
        build(
            html='<html><head><base href="https://n.example/mail/"></head>'
            '<body><p><a href="unsubscribe?id=7">Unsubscribe</a></p></body></html>'
        ),
        "https://n.example/mail/unsubscribe?id=7",
        id="relative-link-under-base-href",
    ),
    pytest.param(
        build(html='<p><a href="https://n.example/abmelden?id=4">Hier</a> vom Newsletter abmelden.</p>'),
        "https://n.example/abmelden?id=4",
        id="de-newsletter-abmelden",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), FOUND)
def test_unsubscribe_link_found(raw: bytes, expected: str) -> None:
    assert body_link(raw) == expected


def test_quoted_printable_declared_as_7bit_is_read_both_ways() -> None:
    """Many-recipients-01's flaw on its own: the markup keeps =3D and soft line breaks."""
    raw = (
        b"From: a@shop.example\r\nTo: b@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        b'<p>If you no longer want our offers, <a href=3D"http://shop.example/rem=\r\n'
        b'ove?id=3D42">click here</a></p>\r\n'
    )
    message = parse(raw)
    assert [r.repaired for r in message.readable_texts] == [False, True]
    assert body_link(message) == "http://shop.example/remove?id=42"


NOT_FOUND = [
    pytest.param(
        build(
            html='<p>Welkom terug! <a href="https://portal.example.nl/inloggen">Inloggen</a> | '
            '<a href="https://portal.example.nl/mijn-account">Mijn account</a> | '
            '<a href="https://portal.example.nl/sessie/uit">Afmelden</a></p>'
        ),
        id="nl-afmelden-means-log-out",
    ),
    pytest.param(
        build(
            html='<p>Sie sind angemeldet. <a href="https://shop.example/konto">Mein Konto</a> '
            '<a href="https://shop.example/x?a=1">Abmelden</a></p>'
        ),
        id="de-abmelden-means-log-out",
    ),
    pytest.param(
        build(html='<p>Nieuws! <a href="https://portal.example.nl/logout">Afmelden</a></p>'),
        id="nl-afmelden-to-logout-url",
    ),
    pytest.param(
        build(text="Niet jij? Meld je af op alle apparaten en wijzig je wachtwoord: https://portal.example.nl/b\n"),
        id="nl-meld-je-af-means-sign-out",
    ),
    pytest.param(
        build(html='<div style="display:none"><a href="https://n.example/unsubscribe">Unsubscribe</a></div><p>Hi</p>'),
        id="hidden-display-none",
    ),
    pytest.param(
        build(html='<div style="visibility: hidden"><a href="https://n.example/u">Unsubscribe</a></div>'),
        id="hidden-visibility",
    ),
    pytest.param(
        build(html='<div hidden><p><a href="https://n.example/u">Unsubscribe</a></p></div>'),
        id="hidden-attribute",
    ),
    pytest.param(
        build(html='<span style="font-size:0px;"><a href="https://n.example/u">Unsubscribe</a></span>'),
        id="hidden-font-size-0",
    ),
    pytest.param(
        build(html='<table style="mso-hide:all"><tr><td><a href="https://n.example/optout">x</a></td></tr></table>'),
        id="hidden-mso-hide",
    ),
    pytest.param(
        build(html='<a style="DISPLAY: NONE !important" href="https://n.example/unsubscribe">Unsubscribe</a>'),
        id="hidden-anchor-itself",
    ),
    pytest.param(
        build(
            html='<div style="max-height:0;overflow:hidden">Unsubscribe <a href="https://n.example/u">here</a></div>'
        ),
        id="hidden-zero-height",
    ),
    pytest.param(
        build(html='<!-- <a href="https://n.example/unsubscribe">Unsubscribe</a> --><p>Hello</p>'),
        id="in-comment",
    ),
    pytest.param(
        build(
            html="<html><head><title>Unsubscribe</title><style>a{}</style>"
            "<script>var u = '<a href=\"https://n.example/unsubscribe\">Unsubscribe</a>';</script>"
            "</head><body><p>Hello</p></body></html>"
        ),
        id="in-head-script-style",
    ),
    pytest.param(
        build(html='<p><a href="https://n.example/unsubscribe"></a>Hello</p>'),
        id="anchor-without-content",
    ),
    pytest.param(
        build(html='<p><a href="https://n.example/unsubscribe"><img src="p.gif" width="1" height="1"></a>Hi</p>'),
        id="tracking-pixel-link",
    ),
    pytest.param(
        build(html='<p>Unsubscribe at any time in <a href="javascript:void(0)">settings</a></p>'),
        id="javascript-href",
    ),
    pytest.param(
        build(html='<p><a href="unsubscribe?id=1">Unsubscribe</a> <a href="mailto:?subject=unsubscribe">or</a></p>'),
        id="relative-href-and-mailto-without-address",
    ),
    pytest.param(
        build(text="To be removed, reply to this email with the word REMOVE in the subject.\n"),
        id="instruction-without-target",
    ),
    pytest.param(
        build(text="You can unsubscribe at any time.\n\nVisit our shop: https://shop.example/sale\n"),
        id="keyword-in-another-sentence",
    ),
    pytest.param(
        build(text="_______________\nAnnounce mailing list\nhttps://lists.example/mailman/listinfo/announce\n"),
        id="listinfo-footer-only",
    ),
    pytest.param(
        build(text="> List-Unsubscribe: <https://lists.example/mailman/listinfo/x>,\n> Precedence: bulk\n"),
        id="quoted-list-unsubscribe-header",
    ),
    pytest.param(
        build(html='<p>Remove this item: <a href="https://shop.example/cart?item=5">remove</a></p>'),
        id="remove-without-removal-url",
    ),
    pytest.param(
        build(text="Your order ships today. Track it at https://shop.example/track/123\n"),
        id="transactional-link",
    ),
]


@pytest.mark.parametrize("raw", NOT_FOUND)
def test_no_unsubscribe_link_found(raw: bytes) -> None:
    assert body_link(raw) is None


def test_links_inside_attached_messages_do_not_count() -> None:
    inner = build(html='<p><a href="https://n.example/unsubscribe">Unsubscribe</a></p>')
    outer = EmailMessage()
    outer["From"], outer["To"], outer["Subject"] = "a@shop.example", "b@example.org", "Fwd"
    outer.set_content("See the attached message.")
    outer.add_attachment(inner, maintype="message", subtype="rfc822")
    assert body_link(outer.as_bytes(policy=SMTP)) is None


def test_links_in_attachments_do_not_count() -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@shop.example", "b@example.org", "Report"
    msg.set_content("The report is attached.")
    msg.add_attachment("To unsubscribe visit https://n.example/unsubscribe", subtype="plain", filename="notes.txt")
    assert body_link(msg.as_bytes(policy=SMTP)) is None


# ---- admins' words ----------------------------------------------------------------------------

ITALIAN = build(html='<p>Per non ricevere più email, <a href="https://negozio.example/c?id=1">disiscriviti</a>.</p>')


def test_extra_words_extend_the_keywords() -> None:
    assert body_link(ITALIAN) is None
    extended = load_vocabulary(extra_words={"it": ("disiscriviti",)})
    assert [f.target for f in find_unsubscribe_links(parse(ITALIAN), extended)] == ["https://negozio.example/c?id=1"]


def test_words_file_extends_the_lists(tmp_path: Path) -> None:
    words = tmp_path / "words.yaml"
    words.write_text("languages:\n  it:\n    keywords: [disiscriviti, cancellati]\nurl_tokens:\n  strong: [cancella]\n")
    vocabulary = load_vocabulary(words_file=str(words))
    assert find_unsubscribe_links(parse(ITALIAN), vocabulary)
    by_url = build(text="Per il vostro profilo: https://negozio.example/cancella?id=1\n")  # the reader sees the URL
    assert find_unsubscribe_links(parse(by_url), vocabulary)
    assert not find_unsubscribe_links(parse(by_url), VOCABULARY)
    # Behind a word that says nothing, the same URL is no way out the reader can see.
    hidden_url = build(html='<p><a href="https://negozio.example/cancella?id=1">qui</a></p>')
    assert not find_unsubscribe_links(parse(hidden_url), vocabulary)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("languages: [a, b]\n", "'languages' must map"),
        ("languages:\n  it:\n    keyword: [x]\n", "unknown list"),
        ("languages:\n  it:\n    keywords: x\n", "expected a list"),
        ("url_tokens:\n  medium: [x]\n", "unknown list"),
        ("words: []\n", "unknown key"),
        ("languages: {it: {keywords: [a\n", "not valid YAML"),
    ],
)
def test_bad_words_file_is_refused_when_the_options_are_built(tmp_path: Path, content: str, message: str) -> None:
    words = tmp_path / "words.yaml"
    words.write_text(content)
    with pytest.raises(ValueError, match=message):
        UnsubscribePolicy.Options(words_file=str(words))


def test_missing_words_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the words file"):
        UnsubscribePolicy.Options(words_file=str(tmp_path / "absent.yaml"))


# ---- the header detector ----------------------------------------------------------------------

HTTPS = "<https://news.example/u/abc123>"


@pytest.mark.parametrize(
    ("fields", "valid", "one_click", "problems"),
    [
        ({"List-Unsubscribe": HTTPS, "List-Unsubscribe-Post": ONE_CLICK_VALUE}, True, True, []),
        (
            {
                "List-Unsubscribe": f"<mailto:u@news.example?subject=unsub>, {HTTPS}",
                "List-Unsubscribe-Post": ONE_CLICK_VALUE,
            },
            True,
            True,
            [],
        ),
        ({"List-Unsubscribe": HTTPS}, True, False, ["no_post_header"]),
        (
            {"List-Unsubscribe": HTTPS, "List-Unsubscribe-Post": "List-Unsubscribe=one-click"},
            True,
            False,
            ["post_value"],
        ),
        ({"List-Unsubscribe": HTTPS, "List-Unsubscribe-Post": "One-Click"}, True, False, ["post_value"]),
        (
            {"List-Unsubscribe": "<http://news.example/u>", "List-Unsubscribe-Post": ONE_CLICK_VALUE},
            False,
            False,
            ["no_https_uri"],
        ),
        (
            {"List-Unsubscribe": "<mailto:u@news.example>", "List-Unsubscribe-Post": ONE_CLICK_VALUE},
            True,
            False,
            ["no_https_uri"],
        ),
        (
            {"List-Unsubscribe": "https://news.example/u (no brackets)"},
            False,
            False,
            ["no_https_uri", "no_post_header"],
        ),
        ({"List-Unsubscribe": "<https://>, <mailto:nobody>"}, False, False, ["no_https_uri", "no_post_header"]),
        ({}, False, False, ["no_https_uri", "no_post_header"]),
    ],
)
def test_list_unsubscribe_header(fields: dict[str, str], valid: bool, one_click: bool, problems: list[str]) -> None:
    header = inspect_list_unsubscribe(parse(build(text="x", headers=fields)))
    assert header.present == ("List-Unsubscribe" in fields)
    assert header.valid is valid
    assert header.one_click is one_click
    assert header.one_click_problems == problems


def test_list_unsubscribe_folded_and_with_comments() -> None:
    raw = (
        b"From: a@news.example\r\nTo: b@example.org\r\nSubject: x\r\n"
        b"List-Unsubscribe: (preferred) <https://news.example/u/\r\n very-long-token>,\r\n"
        b"  <mailto:u@news.example?subject=unsubscribe>\r\n"
        b"List-Unsubscribe-Post:\r\n List-Unsubscribe=One-Click\r\n\r\nbody\r\n"
    )
    header = inspect_list_unsubscribe(parse(raw))
    assert header.https == ("https://news.example/u/very-long-token",)
    assert header.mailto == ("mailto:u@news.example?subject=unsubscribe",)
    assert header.one_click


def test_repeated_post_header_is_not_one_click() -> None:
    raw = (
        b"From: a@news.example\r\nTo: b@example.org\r\nList-Unsubscribe: <https://news.example/u>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"\r\nbody\r\n"
    )
    assert inspect_list_unsubscribe(parse(raw)).one_click_problems == ["post_header_repeated"]


# ---- verdicts ---------------------------------------------------------------------------------

WITH_LINK = build(html='<p><a href="https://news.example/unsubscribe?u=1">Unsubscribe</a></p>')
WITHOUT_LINK = build(html="<p>Big sale!</p>")
ONE_CLICK = {"List-Unsubscribe": HTTPS, "List-Unsubscribe-Post": ONE_CLICK_VALUE}


async def test_accepts_commercial_mail_with_a_body_link() -> None:
    verdict = await policy().check_message(transaction(WITH_LINK))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert verdict.evidence["body_link"] == "https://news.example/unsubscribe?u=1"
    assert verdict.evidence["required"] == ["body"]
    assert verdict.evidence["header"] is False


async def test_rejects_without_a_body_link_in_both_languages() -> None:
    verdict = await policy().check_message(transaction(WITHOUT_LINK))
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert "visible unsubscribe link" in verdict.reply.text
    assert " / NL: " in verdict.reply.text and "afmeldlink" in verdict.reply.text
    assert verdict.evidence == {"required": ["body"], "body_link": None, "header": False, "one_click": False,
                                "one_click_problems": ["no_https_uri", "no_post_header"]}  # fmt: skip


@pytest.mark.parametrize(
    ("language", "present", "absent"),
    [("en", "unsubscribe link", "NL:"), ("nl", "afmeldlink", "unsubscribe link"), ("both", "NL:", "\n")],
)
async def test_reply_language(language: str, present: str, absent: str) -> None:
    verdict = await policy(language=language).check_message(transaction(WITHOUT_LINK))
    assert verdict is not None and verdict.reply is not None
    assert present in verdict.reply.text and absent not in verdict.reply.text


async def test_require_header_and_one_click() -> None:
    strict = policy(require=("body", "header", "one_click"))
    verdict = await strict.check_message(transaction(build(html="<p>Sale</p>", headers={"List-Unsubscribe": HTTPS})))
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply is not None
    text = verdict.reply.text
    assert "visible unsubscribe link" in text
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in text
    assert "add List-Unsubscribe:" not in text  # the header is there; only the Post field is missing
    good = build(html='<p><a href="https://news.example/unsubscribe">Unsubscribe</a></p>', headers=ONE_CLICK)
    verdict = await strict.check_message(transaction(good))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert verdict.evidence["one_click"] is True


async def test_http_only_header_is_named_in_the_reply() -> None:
    raw = build(html="<p>x</p>", headers={"List-Unsubscribe": "<http://news.example/u>"})
    verdict = await policy(require=("header",)).check_message(transaction(raw))
    assert verdict is not None and verdict.reply is not None
    assert "http: only, use https:" in verdict.reply.text
    assert verdict.evidence["header_uris"] == ["http://news.example/u"]


@pytest.mark.parametrize(
    ("fields", "require", "item"),
    [
        ({"List-Unsubscribe": "https://news.example/u"}, ("header",), "in angle brackets: <https://...>"),
        ({"List-Unsubscribe": "<ftp://news.example/u>"}, ("header",), "needs an https: or mailto: URI in <>"),
        ({"List-Unsubscribe": "<ftp://news.example/u>"}, ("header", "one_click"), "needs an https: URI in <>"),
        ({"List-Unsubscribe": "<mailto:u@news.example>"}, ("header", "one_click"), "one-click needs an https: URI"),
        (
            {"List-Unsubscribe": f"{HTTPS}", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click; x=y"},
            ("one_click",),
            "must be exactly List-Unsubscribe=One-Click",
        ),
    ],
)
async def test_reply_names_the_header_fault(fields: dict[str, str], require: tuple[str, ...], item: str) -> None:
    verdict = await policy(require=require, language="en").check_message(transaction(build(text="x", headers=fields)))
    assert verdict is not None and verdict.reply is not None
    assert item in verdict.reply.text
    assert verdict.reply.text.count("URI") <= 1  # one item about the URI, not one per requirement


async def test_one_click_senders_must_send_one_click_headers() -> None:
    bulk = policy(one_click_senders=("*.example", "news.other.test"))
    verdict = await bulk.check_message(transaction(WITH_LINK))  # From: news@shop.example
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply is not None
    assert verdict.evidence["one_click_sender"] is True
    assert "add List-Unsubscribe: <https://...>" in verdict.reply.text
    assert "List-Unsubscribe-Post" in verdict.reply.text
    other = policy(one_click_senders=("news.other.test",))
    verdict = await other.check_message(transaction(WITH_LINK))
    assert verdict is not None and verdict.action is Action.ACCEPT


async def test_every_reply_is_one_short_ascii_line() -> None:
    """All combinations of missing items, in every language, fit one SMTP reply line."""
    headers_cases: list[dict[str, str]] = [
        {},
        {"List-Unsubscribe": "<http://n.example/u>", "List-Unsubscribe-Post": "wrong"},
        {"List-Unsubscribe": "garbage"},
        {"List-Unsubscribe": "https://n.example/unbracketed", "List-Unsubscribe-Post": "a, b"},
        {"List-Unsubscribe": "<mailto:u@n.example>"},
    ]
    requirements = ("body", "header", "one_click")
    rejected = 0
    for language, headers, size in itertools.product(("en", "nl", "both"), headers_cases, (1, 2, 3)):
        for require in itertools.combinations(requirements, size):
            verdict = await policy(require=require, language=language).check_message(
                transaction(build(html="<p>x</p>", headers=headers))
            )
            assert verdict is not None
            if verdict.action is Action.ACCEPT:  # a mailto: header is all "header" asks for
                assert require == ("header",) and "mailto" in headers.get("List-Unsubscribe", "")
                continue
            rejected += 1
            assert verdict.reply is not None
            line = verdict.reply.line()
            assert line.isascii() and len(line) <= 510, line
            assert verdict.reason.startswith("missing: ")
    assert rejected == 3 * (5 * 7 - 1)


async def test_no_message_no_verdict() -> None:
    txn = Transaction(txn_id="T", listener="local", client_ip="127.0.0.1")
    assert await policy().check_message(txn) is None


# ---- config -----------------------------------------------------------------------------------

CONFIG = """
listeners:
  - name: local
    address: 127.0.0.1:0
policies:
  - name: unsubscribe
{options}
"""


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    from policies import REGISTRY

    monkeypatch.setitem(REGISTRY, "unsubscribe", UnsubscribePolicy)


@pytest.mark.usefixtures("registered")
async def test_config_loader_builds_the_policy(tmp_path: Path) -> None:
    words = tmp_path / "words.yaml"
    words.write_text("languages:\n  it:\n    keywords: [disiscriviti]\n")
    options = (
        "    require: [body, one_click]\n"
        "    one_click_senders: ['*.bulk.example']\n"
        "    extra_words: {nl: [uitschrijflink], en: [leave this list]}\n"
        f"    words_file: {words}\n"
        "    language: nl\n"
    )
    settings = load_config_text(CONFIG.format(options=options))
    (entry,) = settings.policies
    assert entry.classes == ("commercial",)
    assert entry.options.require == ("body", "one_click")
    assert entry.options.extra_words == {"nl": ("uitschrijflink",), "en": ("leave this list",)}
    instance = entry.policy_class(entry.options, {})
    assert isinstance(instance, UnsubscribePolicy)
    verdict = await instance.check_message(transaction(ITALIAN))
    assert verdict is not None and verdict.action is Action.REJECT  # body found, one-click missing
    assert verdict.evidence["body_link"] == "https://negozio.example/c?id=1"
    assert verdict.reply is not None and "NL:" not in verdict.reply.text
    assert "voeg List-Unsubscribe-Post: List-Unsubscribe=One-Click toe" in verdict.reply.text


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("    requires: [body]\n", "unknown key; did you mean 'require'?"),
        ("    require: [body, footer]\n", "must be one of body, header, one_click"),
        ("    language: de\n", "must be one of en, nl, both"),
        ("    one_click_senders: ['news@bulk.example']\n", "is not a domain glob"),
        ("    extra_words: [afmelden]\n", "expected a mapping"),
        ("    words_file: /nonexistent/words.yaml\n", "cannot read the words file"),
        ("    require: [body, body]\n", "requirement twice"),
    ],
)
def test_config_loader_refuses_bad_options(options: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(CONFIG.format(options=options))
    assert message in str(caught.value)


@pytest.mark.usefixtures("registered")
async def test_pipeline_runs_the_policy_for_commercial_mail_only() -> None:
    from proxy.relay.pipeline import Pipeline

    pipeline = Pipeline(load_config_text(CONFIG.format(options="    language: en\n")).policies)
    decision = await pipeline.check_message(transaction(WITHOUT_LINK, "commercial"))
    assert decision.action is Action.REJECT and decision.reply is not None
    assert decision.reply.line() == (
        "550 5.7.1 Commercial mail needs an unsubscribe option: add a visible unsubscribe link to the text"
    )
    assert decision.results[0].evidence["body_link"] is None
    transactional = await pipeline.check_message(transaction(WITHOUT_LINK, "transactional"))
    assert transactional.accepted and transactional.results == []


# ---- bad inputs (reliability anchors 4.2, C01-C28) --------------------------------------------

LINK_LINE = b"To unsubscribe visit https://n.example/unsubscribe?id=1\r\n"
HEAD = b"From: a@shop.example\r\nTo: b@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"


def nested(depth: int, leaf: bytes) -> bytes:
    opening = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return HEAD + opening + b"Content-Type: text/plain\r\n\r\n" + leaf + closing


BAD_INPUTS: list[tuple[str, bytes, bool | None]] = [
    # (case, message, unsubscribe link expected: True / False / None = either, only no crash)
    ("C01-nested-40", nested(40, LINK_LINE), True),
    ("C02-multipart-without-boundary", HEAD + b"Content-Type: multipart/mixed\r\n\r\n" + LINK_LINE, True),
    (
        "C03-close-boundary-missing",
        HEAD
        + b'Content-Type: multipart/alternative; boundary="x"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n'
        + LINK_LINE,
        True,
    ),
    ("C04-boundary-never-appears", HEAD + b'Content-Type: multipart/mixed; boundary="nope"\r\n\r\n' + LINK_LINE, True),
    ("C05-unknown-charset", HEAD + b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\n" + LINK_LINE, True),
    ("C05-bytes-codec-charset", HEAD + b"Content-Type: text/plain; charset=rot13\r\n\r\n" + LINK_LINE, True),
    ("C05-python-only-codec", HEAD + b"Content-Type: text/plain; charset=unicode_escape\r\n\r\n" + LINK_LINE, True),
    (
        "C06-invalid-base64",
        HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64===\r\n",
        False,
    ),
    (
        "C06-qp-soft-break-in-href",
        HEAD + b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b'<a href=3D"https://n.example/unsub=\r\nscribe?id=3D1">Unsubscribe</a> =ZZ\r\n',
        True,
    ),
    (
        "C06-uuencode",
        HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n" + LINK_LINE,
        None,
    ),
    (
        "C07-header-line-without-colon",
        b"Subject: x\r\nThis line has no colon\r\nTo: h@victim.example\r\n\r\nhi\r\n",
        False,
    ),
    ("C09-long-subject", b"Subject: " + b"word " * 20_000 + b"\r\n\r\n" + LINK_LINE, True),
    ("C10-many-header-fields", b"".join(b"X-F%d: v\r\n" % i for i in range(20_000)) + b"\r\n" + LINK_LINE, True),
    (
        "C12-undecodable-bytes",
        b"From: J\xf6rg <j@example.org>\r\nSubject: caf\xc3\xa9 \xc3\r\n\r\n\xff\xfe " + LINK_LINE,
        True,
    ),
    ("C24-nul", HEAD + b"\r\nText\x00 " + LINK_LINE, True),
    ("C25-empty", b"", False),
    ("C26-headers-only", b"From: a@example.org\r\nList-Unsubscribe: <https://n.example/u>", False),
    ("C26-body-only", b"\r\n" + LINK_LINE, True),
    ("C28-many-received", b"Received: from x\r\n" * 51 + b"\r\n" + LINK_LINE, True),
    (
        "utf-16-body",
        HEAD + b"Content-Type: text/plain; charset=utf-16\r\n\r\n" + LINK_LINE.decode().encode("utf-16"),
        True,
    ),
    ("html-many-unclosed-comments", HEAD + b"Content-Type: text/html\r\n\r\n" + b"<!--" * 50_000, False),
    ("html-many-unclosed-tags", HEAD + b"Content-Type: text/html\r\n\r\n" + b"<a " * 60_000, False),
    ("html-many-attributes", HEAD + b"Content-Type: text/html\r\n\r\n" + b"<a x=" * 40_000 + b">", False),
    (
        "html-deep-hidden-nesting",
        HEAD
        + b"Content-Type: text/html\r\n\r\n"
        + b'<div style="display:none">' * 2_000
        + b'<a href="https://n.example/unsubscribe">Unsubscribe</a>',
        False,
    ),
    (
        "html-many-links",
        HEAD + b"Content-Type: text/html\r\n\r\n" + b'<a href="https://n.example/p">x</a> ' * 20_000,
        False,
    ),
    ("text-long-address-runs", HEAD + b"\r\n" + b"a." * 100_000 + b"a@" * 100_000, False),
]


@pytest.mark.timeout(30)  # a quadratic scan would hang here; the linear one takes well under a second
@pytest.mark.parametrize(("raw", "expected"), [pytest.param(r, e, id=c) for c, r, e in BAD_INPUTS])
def test_bad_inputs_never_crash(raw: bytes, expected: bool | None) -> None:
    from policies.recipients import count_visible_recipients

    message = parse(raw)
    found = body_link(message)
    if expected is not None:
        assert (found is not None) is expected, found
    header = inspect_list_unsubscribe(message)
    assert header.one_click is False
    assert count_visible_recipients(message).visible in (0, 1)


def test_mime_nesting_beyond_the_limit_is_refused_before_any_policy() -> None:
    """C01: 1000 levels exhaust the stdlib parser; ParsedMessage says so instead of crashing
    (the proxy answers 554 5.6.0), and the policies never see the message."""
    from policies.message import MessageParseError

    with pytest.raises(MessageParseError):
        parse(nested(1000, LINK_LINE))
