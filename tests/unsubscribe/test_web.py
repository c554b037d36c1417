"""The unsubscribe pages over real HTTP (aiohttp client → the app on 127.0.0.1:0, SQLite store)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.schema import Rate
from proxy.stores.consent import OPTED_IN, OPTED_OUT, ConsentStore, new_event
from proxy.unsubscribe import UnsubscribeKeyConfig, UnsubscribeRateLimits
from proxy.unsubscribe.web import SECURITY_HEADERS
from tests.unsubscribe.harness import SECRET_B, Running, make_config

Factory = Callable[..., Awaitable[Running]]
GMAIL_UA = "Mozilla/5.0 (compatible; Google-List-Unsubscribe)"
ADDRESS = "bob@example.org"


async def opt_outs(store: ConsentStore, address: str = ADDRESS) -> list[Any]:
    return [e for e in await store.history(address) if e.kind == OPTED_OUT]


def link(running: Running, token: str, kind: str = "u") -> str:
    return f"{running.base}/{kind}/{token}"


def csrf_of(page: str, action_suffix: str = "") -> str:
    forms = re.findall(r'<form method="post" action="([^"]+)"><input type="hidden" name="csrf" value="([^"]+)">', page)
    for action, value in forms:
        if action.endswith(action_suffix):
            return value
    raise AssertionError(f"no form ending in {action_suffix!r}")


def assert_security_headers(response: aiohttp.ClientResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "aiohttp" not in response.headers.get("Server", "").lower()
    assert "Set-Cookie" not in response.headers


# ---- one-click (RFC 8058) ----------------------------------------------------------------------------


async def test_one_click_as_gmail_sends_it(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    async with http.post(
        link(running, token),
        data="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": GMAIL_UA},
        allow_redirects=False,
    ) as response:
        assert response.status == 200
        assert "Location" not in response.headers
        assert (await response.text()) == "Unsubscribed\n"
        assert_security_headers(response)
    (event,) = await opt_outs(running.store)
    assert (event.method, event.topic, event.sender) == ("one_click", "newsletter", "shop.example")
    assert event.ip == "127.0.0.1"
    assert event.user_agent == GMAIL_UA
    assert "token key k2026" in event.source
    assert event.reason and "RFC 8058" in event.reason
    basis = await running.store.basis(ADDRESS, "newsletter", "shop.example")
    assert not basis.allowed and basis.kind == "opted_out"
    (audit,) = await running.wait_audit(1)
    assert audit["event"] == "unsubscribe"
    assert {k: audit[k] for k in ("recipient", "topic", "method", "source", "result", "record", "key_id")} == {
        "recipient": ADDRESS,
        "topic": "newsletter",
        "method": "one_click",
        "source": "https",
        "result": "recorded",
        "record": event.id,
        "key_id": "k2026",
    }
    registry_value = running.service.metrics.unsubscribes.labels("one_click", "https", "recorded")._value.get()
    assert registry_value == 1


async def test_one_click_as_multipart_and_repeated(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "*")
    for _ in range(3):
        form = aiohttp.MultipartWriter("form-data")
        form.append("One-Click").set_content_disposition("form-data", name="List-Unsubscribe")
        assert form.content_type.startswith("multipart/form-data; boundary=")
        async with http.post(link(running, token), data=form, allow_redirects=False) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
    assert len(await opt_outs(running.store)) == 1, "answered every time, recorded once"
    lines = await running.wait_audit(3)
    assert [line["result"] for line in lines] == ["recorded", "already_on_record", "already_on_record"]
    metrics = running.service.metrics.unsubscribes
    assert metrics.labels("one_click", "https", "repeated")._value.get() == 2


async def test_a_narrower_opt_out_after_a_blanket_one_is_not_recorded_again_but_after_an_opt_in_it_is(
    running_factory: Factory, http: aiohttp.ClientSession
) -> None:
    running = await running_factory()
    await running.store.add(new_event(OPTED_OUT, ADDRESS, method="admin", topic="*", sender="*"))
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    async with http.post(link(running, token), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200
    assert len(await opt_outs(running.store)) == 1
    await running.store.add(new_event(OPTED_IN, ADDRESS, method="web_form", topic="newsletter", sender="shop.example"))
    async with http.post(link(running, token), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200
    assert len(await opt_outs(running.store)) == 2
    assert not (await running.store.basis(ADDRESS, "newsletter", "shop.example")).allowed


async def test_an_expired_token_still_unsubscribes(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    running = await running_factory()
    old = running.service.codec.issue(ADDRESS, "shop.example", "newsletter", now=time.time() - 800 * 86400)
    async with http.post(link(running, old), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200
    assert len(await opt_outs(running.store)) == 1
    async with http.get(link(running, old)) as response:
        page = await response.text()
        assert response.status == 200 and 'id="unsubscribe"' in page
        assert "/p/" not in page, "an old link no longer leads to the data"
    async with http.get(link(running, old, "p")) as response:
        assert response.status == 404
        assert "expired" in (await response.text()).lower() or "verlopen" in (await response.text()).lower()


async def test_store_down_answers_503_and_records_nothing(
    running_factory: Factory, http: aiohttp.ClientSession
) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    await running.store.close()
    async with http.post(link(running, token), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "300"
    async with http.get(link(running, token, "p")) as response:
        assert response.status == 503
        assert response.headers["Retry-After"]


# ---- the confirmation page ----------------------------------------------------------------------------


async def test_get_never_unsubscribes_the_button_does(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    for _ in range(3):  # a link scanner, a preview, the person
        async with http.get(link(running, token), headers={"Accept-Language": "en-GB,en;q=0.9"}) as response:
            assert response.status == 200
            page = await response.text()
            assert_security_headers(response)
    assert await opt_outs(running.store) == []
    assert "<h1>Unsubscribe</h1>" in page and ADDRESS in page and "Newsletter" in page
    assert "<script" not in page and "style=" not in page, "no inline script or style (CSP)"
    csrf = csrf_of(page, f"/u/{token}")
    async with http.post(link(running, token), data={"csrf": csrf, "lang": "en"}, allow_redirects=False) as response:
        assert response.status == 200
        done = await response.text()
    assert "<h1>You are unsubscribed</h1>" in done
    assert f'href="/p/{token}?lang=en"' in done
    (event,) = await opt_outs(running.store)
    assert event.method == "link"


@pytest.mark.parametrize(
    ("form", "status"),
    [
        ({"lang": "en"}, 400),
        ({"csrf": "", "lang": "en"}, 403),
        ({"csrf": "12345.AAAAAAAAAAAAAAAAAAAAAA", "lang": "en"}, 403),
        ({"csrf": "not a value"}, 403),
    ],
)
async def test_the_button_needs_its_csrf_value(
    running_factory: Factory, http: aiohttp.ClientSession, form: dict[str, str], status: int
) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    async with http.post(link(running, token), data=form) as response:
        assert response.status == status
        assert_security_headers(response)
    assert await opt_outs(running.store) == []


async def test_a_csrf_value_of_another_token_or_form_is_refused(
    running_factory: Factory, http: aiohttp.ClientSession
) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    other = running.service.issue("eve@example.org", "shop.example", "newsletter")
    for value in (running.service.codec.csrf(other, "unsubscribe"), running.service.codec.csrf(token, "withdraw")):
        async with http.post(link(running, token), data={"csrf": value}) as response:
            assert response.status == 403
    assert await opt_outs(running.store) == []


async def test_languages(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    cases = [
        ({"Accept-Language": "nl-NL,nl;q=0.9,en;q=0.8"}, "", "Afmelden", "Nieuwsbrief"),
        ({"Accept-Language": "de-DE,en;q=0.5"}, "", "Unsubscribe", "Newsletter"),
        ({"Accept-Language": "fr"}, "", "Afmelden", "Nieuwsbrief"),  # the first configured language
        ({"Accept-Language": "nl"}, "?lang=en", "Unsubscribe", "Newsletter"),
        ({}, "?lang=xx", "Afmelden", "Nieuwsbrief"),
    ]
    for headers, query, title, topic in cases:
        async with http.get(link(running, token) + query, headers=headers) as response:
            page = await response.text()
        assert f"<h1>{title}</h1>" in page, (headers, query)
        assert topic in page
        other = "en" if title == "Afmelden" else "nl"
        assert f'href="/u/{token}?lang={other}"' in page, "a link to the other language"


# ---- invalid tokens, rate limits, headers ----------------------------------------------------------------


async def test_invalid_tokens_get_a_page_that_reveals_nothing(
    running_factory: Factory, http: aiohttp.ClientSession
) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    bodies = set()
    for bad in (tampered, "x", "A" * 115, "A" * 2000, "..%2F..%2Fetc"):
        for method, kind in (("GET", "u"), ("GET", "p"), ("POST", "u"), ("GET", "p/" + bad + "/data")):
            url = f"{running.base}/{kind}/{bad}" if "data" not in kind else f"{running.base}/p/{bad}/data.json"
            async with http.request(method, url, data={"List-Unsubscribe": "One-Click"}) as response:
                assert response.status == 404, (method, kind, bad)
                text = await response.text()
                assert_security_headers(response)
                assert ADDRESS not in text and "example.org" not in text
                if method == "GET":
                    bodies.add(text)
    assert len(bodies) == 1, "every invalid link looks the same"
    assert await opt_outs(running.store) == []


async def test_security_headers_on_every_response(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    running = await running_factory()
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    requests = [
        ("GET", f"/u/{token}", 200),
        ("GET", f"/p/{token}", 200),
        ("GET", f"/p/{token}/data.json", 200),
        ("GET", "/assets/sendguard.css", 200),
        ("GET", "/", 404),
        ("GET", "/nothing/here", 404),
        ("PUT", f"/u/{token}", 405),
        ("GET", f"/p/{token}/topics", 405),
        ("POST", f"/u/{token}", 200),
    ]
    for method, path, status in requests:
        data = {"List-Unsubscribe": "One-Click"} if method == "POST" else None
        async with http.request(method, running.base + path, data=data, allow_redirects=False) as response:
            assert response.status == status, (method, path)
            assert_security_headers(response)
            assert response.headers["Strict-Transport-Security"].startswith("max-age=")


async def test_rate_limits(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    limits = UnsubscribeRateLimits(per_ip=Rate(3, 60), per_token=Rate(2, 60), invalid_per_ip=Rate(2, 600))
    running = await running_factory(make_config(rate_limits=limits))
    pages = [running.service.issue(f"p{i}@example.org", "shop.example", "*") for i in range(4)]
    statuses = []
    for token in pages:
        async with http.get(link(running, token)) as response:
            statuses.append(response.status)
            retry = response.headers.get("Retry-After")
    assert statuses == [200, 200, 200, 429]
    assert retry is not None and 1 <= int(retry) <= 20

    # One-click POSTs come from a mailbox provider's few addresses: limited per token, not per IP.
    token = running.service.issue("q@example.org", "shop.example", "*")
    statuses = []
    for _ in range(3):
        async with http.post(link(running, token), data={"List-Unsubscribe": "One-Click"}) as response:
            statuses.append(response.status)
    assert statuses == [200, 200, 429]
    other = running.service.issue("r@example.org", "shop.example", "*")
    async with http.post(link(running, other), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200

    # Guessing tokens: after two invalid ones, this client's further guesses are refused, but a
    # valid token from the same (shared, provider) address still unsubscribes.
    for _ in range(2):
        async with http.post(link(running, "A" * 100), data={"List-Unsubscribe": "One-Click"}) as response:
            assert response.status == 404
    async with http.post(link(running, "B" * 100), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
    fresh = running.service.issue("s@example.org", "shop.example", "*")
    async with http.post(link(running, fresh), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200


async def test_behind_a_trusted_proxy_the_forwarded_client_counts(
    running_factory: Factory, http: aiohttp.ClientSession
) -> None:
    import ipaddress

    config = make_config(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    running = await running_factory(config)
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    headers = {"X-Forwarded-For": "spoofed, 203.0.113.7, 127.0.0.1"}
    async with http.post(link(running, token), data={"List-Unsubscribe": "One-Click"}, headers=headers) as response:
        assert response.status == 200
    (event,) = await opt_outs(running.store)
    assert event.ip == "203.0.113.7"


# ---- the recipient's page ----------------------------------------------------------------------------


async def test_the_recipient_page_shows_history_and_changes_topics(
    running_factory: Factory, http: aiohttp.ClientSession
) -> None:
    running = await running_factory()
    store = running.store
    await store.add(
        new_event(OPTED_IN, ADDRESS, method="double_opt_in", topic="newsletter", sender="shop.example",
                  source="https://shop.example/signup", ip="198.51.100.4", confirmed_at="2026-01-02T10:00:00Z",
                  at="2026-01-02T09:00:00Z", text_version="v3"),
        new_event(OPTED_IN, "@example.org", method="admin", topic="offers", sender="shop.example", source="B2B contract"),
        new_event(OPTED_IN, "eve@example.org", method="web_form", topic="newsletter", source="someone else"),
    )  # fmt: skip
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    page_url = link(running, token, "p")
    async with http.get(page_url + "?lang=en") as response:
        assert response.status == 200
        page = await response.text()
        assert_security_headers(response)
    assert "Your data at Shop BV" in page and ADDRESS in page
    assert "https://shop.example/signup" in page and "198.51.100.4" in page and "v3" in page
    assert "B2B contract" in page and "(@example.org)" in page, "the domain's records are shown too"
    assert "eve@example.org" not in page and "someone else" not in page, "nobody else's records"
    assert re.search(r'data-topic="newsletter" data-status="opt_in">.*?Subscribed', page)
    assert re.search(r'data-topic="offers" data-status="opt_in"', page)
    assert "privacy@shop.example" in page and "https://shop.example/privacy" in page

    csrf = csrf_of(page, "/topics")
    async with http.post(
        page_url + "/topics",
        data={"csrf": csrf, "topic": "newsletter", "action": "opt_out", "lang": "en"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == f"/p/{token}?lang=en&done=opted_out&topic=newsletter"
    async with http.get(page_url + "?lang=en&done=opted_out&topic=newsletter") as response:
        page = await response.text()
    assert "You are unsubscribed from Newsletter." in page
    assert re.search(r'data-topic="newsletter" data-status="opted_out"', page)
    async with http.post(
        page_url + "/topics",
        data={"csrf": csrf, "topic": "newsletter", "action": "opt_in", "lang": "nl"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303 and "lang=nl&done=opted_in" in response.headers["Location"]
    history = await store.history(ADDRESS)
    address_events = [(e.kind, e.method, e.topic) for e in history if e.subject == ADDRESS]
    assert address_events[-2:] == [
        ("opted_out", "preference_center", "newsletter"),
        ("opted_in", "web_form", "newsletter"),
    ]
    assert (await store.basis(ADDRESS, "newsletter", "shop.example")).allowed, "the later explicit opt-in lifts it"
    latest = history[-1]
    assert latest.ip == "127.0.0.1" and latest.text_version and "token key k2026" in latest.source

    for form in (
        {"csrf": csrf, "topic": "unknown-topic", "action": "opt_in"},
        {"csrf": csrf, "topic": "newsletter", "action": "delete"},
    ):
        async with http.post(page_url + "/topics", data=form) as response:
            assert response.status == 400
    async with http.post(
        page_url + "/topics", data={"csrf": csrf_of(page, "/withdraw"), "topic": "offers", "action": "opt_in"}
    ) as response:
        assert response.status == 403, "the withdraw form's value does not fit the topics form"

    async with http.post(
        page_url + "/withdraw", data={"csrf": csrf_of(page, "/withdraw")}, allow_redirects=False
    ) as response:
        assert response.status == 303 and "done=withdrawn" in response.headers["Location"]
    for topic in ("newsletter", "offers", "anything"):
        assert not (await store.basis(ADDRESS, topic, "shop.example")).allowed
    assert (await store.basis(ADDRESS, "offers", "other.example")).allowed is False  # offers was for shop only


async def test_the_json_download(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    running = await running_factory()
    await running.store.add(
        new_event(OPTED_IN, ADDRESS, method="web_form", topic="newsletter", sender="shop.example", ip="192.0.2.1")
    )
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    async with http.post(link(running, token), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200
    async with http.get(link(running, token, "p") + "/data.json") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        assert response.headers["Content-Disposition"].startswith('attachment; filename="sendguard-data-')
        assert_security_headers(response)
        document = json.loads(await response.read())
    assert document["about"] == ADDRESS
    assert document["controller"] == {
        "name": "Shop BV",
        "contact": "privacy@shop.example",
        "privacy_statement": "https://shop.example/privacy",
    }
    kinds = [(r["event"], r["method"]) for r in document["records"]]
    assert kinds == [("opted_in", "web_form"), ("opted_out", "one_click")]
    assert document["records"][0]["ip"] == "192.0.2.1"
    assert isinstance(document["records"][1]["id"], int)
    status = {s["topic"]: s for s in document["status"]}
    assert status["newsletter"]["basis"] == "opted_out" and status["newsletter"]["allowed"] is False
    assert set(status) >= {"*", "newsletter", "offers"}


async def test_key_rotation_through_a_reload(running_factory: Factory, http: aiohttp.ClientSession) -> None:
    running = await running_factory()
    old_token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    rotated = dataclasses.replace(
        make_config(),
        keys=(UnsubscribeKeyConfig("k2027", SECRET_B), UnsubscribeKeyConfig("k2026", make_config().keys[0].secret)),
    )
    running.service.update(rotated)
    new_token = running.service.issue(ADDRESS, "shop.example", "offers")
    assert running.service.read(new_token).key_id == "k2027"
    for token in (old_token, new_token):
        async with http.get(link(running, token, "p")) as response:
            assert response.status == 200
    running.service.update(dataclasses.replace(rotated, keys=rotated.keys[:1]))
    async with http.get(link(running, old_token, "p")) as response:
        assert response.status == 404, "a token dies with its key"
    async with http.get(link(running, new_token, "p")) as response:
        assert response.status == 200


async def test_https_served_directly_and_starttls_on_the_mailto_listener(
    running_factory: Factory, tls_files: Any
) -> None:
    import aiosmtplib

    config = make_config(tls_cert=str(tls_files.cert_file), tls_key=str(tls_files.key_file))
    running = await running_factory(config)
    token = running.service.issue(ADDRESS, "shop.example", "newsletter")
    assert running.servers.http_bound is not None
    url = f"https://localhost:{running.servers.http_bound[1]}/u/{token}"
    connector = aiohttp.TCPConnector(ssl=tls_files.client_context())
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.post(url, data={"List-Unsubscribe": "One-Click"}) as response:
            assert response.status == 200
            assert_security_headers(response)
    client = aiosmtplib.SMTP(
        hostname="localhost", port=running.mailto_port, start_tls=True, tls_context=tls_files.client_context()
    )
    await client.connect()
    assert client.is_connected and client.get_transport_info("sslcontext") is not None
    await client.sendmail(
        ADDRESS, ["unsubscribe@shop.example"], f"Subject: unsubscribe {token}\r\n\r\nplease\r\n".encode()
    )
    await client.quit()
    events = await opt_outs(running.store)
    assert [e.method for e in events] == ["one_click"], "the second request found the first on record"
    lines = await running.wait_audit(2)
    assert [(line["method"], line["result"]) for line in lines] == [
        ("one_click", "recorded"),
        ("reply", "already_on_record"),
    ]
