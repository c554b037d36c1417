"""Issue 14's hidden-link evasions through the running proxy: every evasion of
tests/hidden_link_cases.py is refused at DATA with the unsubscribe reply and never reaches the
upstream, and every visible twin, split-verb phrasing and style that leaves the link visible
is relayed. One proxy per table; each message is its own SMTP transaction."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.policy import SMTP

from tests.conftest import Proxy, submit
from tests.fakes import FakeUpstream
from tests.hidden_link_cases import EVASIONS, SPLIT_VERBS, URL, VISIBLE_ANYWAY

ProxyFactory = Callable[..., Awaitable[Proxy]]
#: Everything from the local listener is commercial, so only the unsubscribe policy decides.
CONFIG = {
    "classes": {"rules": [{"class": "commercial", "listeners": ["local"]}]},
    "policies": [{"name": "unsubscribe"}],
}


def newsletter(html: str, text: str | None = None, number: int = 0) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <news@shop.example>"
    msg["To"] = "klant@example.org"
    msg["Subject"] = f"Spring collection {number}"
    msg["Date"] = "Thu, 03 Dec 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<spring-{number}@shop.example>"
    if text is not None:
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    return msg.as_bytes(policy=SMTP)


async def outcomes(proxy: Proxy, messages: list[tuple[str, bytes]]) -> dict[str, tuple[int, str]]:
    results: dict[str, tuple[int, str]] = {}
    for name, raw in messages:
        results[name] = await submit(proxy.port, raw, sender="news@shop.example", recipients=["klant@example.org"])
    return results


async def test_every_hidden_link_is_refused_through_the_proxy(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(upstream.address, CONFIG)
    sent = [(case.id, newsletter(case.hidden, number=i)) for i, case in enumerate(EVASIONS)]
    sent.append(("link-only-in-the-plain-alternative", newsletter("<p>Spring sale</p>", f"Unsubscribe: {URL}\n", 99)))
    results = await outcomes(proxy, sent)
    wrong = {name: result for name, result in results.items() if result[0] != 550}
    assert wrong == {}
    for code, text in results.values():
        assert text.startswith("5.7.1 ") and "visible unsubscribe link" in text, (code, text)
    assert upstream.messages == []


async def test_every_visible_twin_is_relayed_through_the_proxy(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(upstream.address, CONFIG)
    sent = [(case.id, newsletter(case.visible, number=i)) for i, case in enumerate(EVASIONS)]
    sent += [(name, newsletter(html, number=100 + i)) for i, (name, html) in enumerate(VISIBLE_ANYWAY)]
    sent += [(case.id, newsletter(case.html, number=200 + i)) for i, case in enumerate(SPLIT_VERBS) if case.found]
    sent.append(
        (
            "link-in-the-displayed-html-alternative",
            newsletter(f'<p>Stop these mails: <a href="{URL}">unsubscribe</a></p>', "Spring sale\n", 300),
        )
    )
    results = await outcomes(proxy, sent)
    assert {name: result for name, result in results.items() if result[0] != 250} == {}
    assert len(upstream.messages) == len(sent)


async def test_split_verbs_that_are_no_way_out_are_refused_through_the_proxy(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(upstream.address, CONFIG)
    sent = [(case.id, newsletter(case.html, number=i)) for i, case in enumerate(SPLIT_VERBS) if not case.found]
    results = await outcomes(proxy, sent)
    assert sent and {name: code for name, (code, _) in results.items() if code != 550} == {}
    assert upstream.messages == []
