"""Issue 14: an unsubscribe link counts only where a reader sees it and can tell it is the way
out. Each evasion is judged as a mail client renders it, next to its visible twin; split verbs
around a "here" link; multipart/alternative; and hostile HTML, which must neither crash the
policy nor take long, nor count as a visible link."""

from __future__ import annotations

import time
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from policies import readable
from policies.base import Action
from policies.readable import MAX_DEPTH, render
from tests.hidden_link_cases import EVASIONS, PLAIN_URL, SPLIT_VERBS, URL, VISIBLE_ANYWAY, Evasion, Phrasing
from tests.policies.test_unsubscribe import body_link, build, parse, policy, transaction


@pytest.mark.parametrize("case", EVASIONS, ids=[c.id for c in EVASIONS])
def test_hidden_link_does_not_count(case: Evasion) -> None:
    assert body_link(build(html=case.hidden)) is None


@pytest.mark.parametrize("case", EVASIONS, ids=[c.id for c in EVASIONS])
def test_visible_twin_counts(case: Evasion) -> None:
    expected = PLAIN_URL if "sentence" in case.id else URL
    assert body_link(build(html=case.visible)) == expected


@pytest.mark.parametrize(("html"), [pytest.param(h, id=i) for i, h in VISIBLE_ANYWAY])
def test_styles_that_leave_the_link_visible(html: str) -> None:
    assert body_link(build(html=html)) == URL


@pytest.mark.parametrize("case", EVASIONS[:3], ids=[c.id for c in EVASIONS[:3]])
async def test_policy_refuses_the_hidden_link_and_accepts_its_twin(case: Evasion) -> None:
    refused = await policy().check_message(transaction(build(html=case.hidden)))
    accepted = await policy().check_message(transaction(build(html=case.visible)))
    assert refused is not None and refused.action is Action.REJECT
    assert refused.reply is not None and "visible unsubscribe link" in refused.reply.text
    assert accepted is not None and accepted.action is Action.ACCEPT


def test_hidden_text_is_not_in_the_rendered_text() -> None:
    text = render('<p>Seen <span style="color:#fff">white</span> <span style="font-size:1px">tiny</span></p>').text
    assert "Seen" in text and "white" not in text and "tiny" not in text


# ---- split verbs ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SPLIT_VERBS, ids=[c.id for c in SPLIT_VERBS])
def test_split_verbs_around_a_here_link(case: Phrasing) -> None:
    found = body_link(build(html=case.html))
    assert found == (PLAIN_URL if case.found else None)


# ---- multipart/alternative --------------------------------------------------------------------


def test_link_only_in_the_plain_alternative_does_not_count() -> None:
    raw = build(text=f"To unsubscribe: {URL}\n", html="<p>Our spring collection is here.</p>")
    message = parse(raw)
    assert [(r.content_type, r.displayed) for r in message.readable_texts] == [
        ("text/plain", False),
        ("text/html", True),
    ]
    assert body_link(message) is None


def test_link_in_the_displayed_html_alternative_counts() -> None:
    raw = build(text="Our spring collection.\n", html=f'<p>Stop these mails: <a href="{URL}">unsubscribe</a></p>')
    assert body_link(raw) == URL


def test_plain_text_message_counts() -> None:
    assert body_link(build(text=f"To unsubscribe: {URL}\n")) == URL


def test_html_inside_related_is_the_displayed_alternative() -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "news@shop.example", "klant@example.nl", "News"
    msg.set_content(f"To unsubscribe: {URL}\n")
    msg.add_alternative("<p>Spring sale</p><img src='cid:logo'>", subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG", maintype="image", subtype="png", cid="<logo>")
    message = parse(msg.as_bytes(policy=SMTP))
    assert [r.displayed for r in message.readable_texts] == [False, True]
    assert body_link(message) is None


def test_plain_parts_side_by_side_still_count() -> None:
    """multipart/mixed shows every part: a text part next to an HTML one is seen."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "news@shop.example", "klant@example.nl", "News"
    msg.set_content("<p>Spring sale</p>", subtype="html")
    msg.add_attachment(f"To unsubscribe: {URL}\n", disposition="inline")
    assert body_link(msg.as_bytes(policy=SMTP)) == URL


# ---- hostile HTML ---------------------------------------------------------------------------

TAIL = f'<p>Stop these mails: <a href="{URL}">unsubscribe</a></p>'
HOSTILE = [
    ("deep-nesting-100k", "<div>" * 100_000 + TAIL),
    ("deep-inline-nesting-then-blocks", "<span>" * 20_000 + "<div></div>" * 20_000 + TAIL),
    ("unclosed-anchors-100k", '<a href="https://x.example/">' * 100_000 + TAIL),
    ("unclosed-formatting-100k", "<b><i><font>" * 35_000 + TAIL),
    ("unclosed-tables", "<table><tr><td>" * 30_000 + TAIL),
    ("huge-style-block", "<style>" + ".c{color:red;display:block}" * 40_000 + "</style>" + TAIL),
    ("hiding-rules-on-named-classes-deep", "<style>" + "".join(f".c{i} div{{display:none}}" for i in range(1_000))
     + "</style>" + "".join(f"<div class=c{i}>" for i in range(400)) + TAIL),
    ("many-hiding-rules", "<style>" + "".join(f".c{i} div{{display:none}}" for i in range(5_000)) + "</style>" + TAIL),
    ("pathological-selectors", "<style>" + "div " * 70 + "a{display:none} :has(:has(:has(a))){opacity:0}</style>"
     + "<div>" * 400 + TAIL),
    ("nested-calc", f'<p style="font-size:{"calc(" * 5000}1px{")" * 5000}">' + TAIL),
    ("many-attributes", "<p " + " ".join(f"a{i}=x" for i in range(50_000)) + ">" + TAIL),
    ("distinct-attribute-names", "".join(f"<p a{i}=x>" for i in range(100_000)) + TAIL),
    ("distinct-tag-names", "".join(f"<t{i}></t{i}>" for i in range(100_000)) + TAIL),
    ("unfinished-comment", TAIL + "<!--" * 100_000),
]  # fmt: skip


@pytest.mark.parametrize(("html"), [pytest.param(h, id=i) for i, h in HOSTILE])
def test_hostile_html_is_read_in_bounded_time_without_crashing(html: str) -> None:
    started = time.perf_counter()
    verdict = policy().judge(parse(build(html=html)))
    assert time.perf_counter() - started < 5.0
    assert verdict.action in (Action.ACCEPT, Action.REJECT)


def test_nesting_beyond_the_bound_is_cut_and_not_trusted() -> None:
    rendered = render("<div>" * (MAX_DEPTH + 10) + TAIL)
    assert not rendered.complete
    assert body_link(build(html="<div>" * (MAX_DEPTH + 10) + TAIL)) is None
    assert body_link(build(html="<div>" * 200 + TAIL)) == URL  # deep, but as deep as templates go


def test_style_rules_beyond_the_budget_make_the_part_untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readable, "MATCH_BUDGET", 10)
    html = "<style>p{display:block} a{display:inline} p a{display:inline}</style>" + TAIL
    assert not render(html).complete
    assert body_link(build(html=html)) is None


def test_a_parser_failure_is_an_untrusted_empty_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(source: str) -> None:
        raise RuntimeError("parser failed")

    monkeypatch.setattr(readable, "LexborHTMLParser", broken)
    rendered = render(TAIL)
    assert (rendered.text, rendered.links, rendered.complete) == ("", [], False)
    verdict = policy().judge(parse(build(html=TAIL)))
    assert verdict.action is Action.REJECT
