"""Webhooks against a real receiving aiohttp server on loopback that fails on purpose: what
is told and from where (the API, the one-click endpoint, a hard bounce, a pause), the
signature and its replay window, retries with backoff, durability across a restart, giving
up at max_age, the metrics, and PostgreSQL's one attempt at a time across instances."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.api.state import PostgresApiState, QueuedRow, SQLiteApiState
from proxy.api.webhooks import SIGNATURE_HEADER, sign, verify_signature
from tests.api.harness import SECRET, Api, Receiver, stores_section, until
from tests.conftest import submit
from tests.fakes import FakeUpstream
from tests.services import PostgresTarget
from tests.unsubscribe.harness import config_section, make_config

BOB = "bob@example.org"
FAST = {"retry_min": "100ms", "retry_max": "400ms", "interval": "50ms", "timeout": "2s"}


def hooks(receiver: Receiver, **changes: Any) -> dict[str, Any]:
    return {"webhooks": {"endpoints": [{"url": receiver.url, "secret": SECRET}], **FAST, **changes}}


def sample(api: Api, name: str, **labels: str) -> float:
    value = api.proxy.app.services.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_what_is_told_and_how_it_is_signed(api_factory: Any, receiver: Receiver) -> None:
    api: Api = await api_factory(hooks(receiver))
    table = [
        ("/v1/events", {"address": BOB, "event": "opted_in", "method": "api"}, None),
        ("/v1/events", {"address": "eve@example.org", "event": "opted_out", "method": "import"}, None),
        ("/v1/opt-outs", {"address": BOB, "topic": "newsletter"}, "opted_out"),
        ("/v1/suppressions", {"address": "ann@example.org", "reason": "CRM: closed account"}, "suppressed"),
        ("/v1/suppressions", {"address": "cid@example.org", "method": "complaint", "reason": "FBL"}, "complaint"),
        ("/v1/opt-outs", {"address": "dan@example.org", "method": "complaint"}, "complaint"),
    ]
    expected = []
    for path, body, told in table:
        status, _, _ = await api.call("POST", path, body=body)
        assert status == 201
        if told:
            expected.append((told, body["address"]))
    await until(lambda: len(receiver.received) >= len(expected))
    await asyncio.sleep(0.2)  # nothing more comes (the opt-in is not told)
    got = [(event["type"], event["data"]["record"]["address"]) for event in receiver.events()]
    assert sorted(got) == sorted(expected)
    headers, body = receiver.received[0]
    assert headers["Sendguard-Event"] in ("opted_out", "suppressed", "complaint")
    signature = headers[SIGNATURE_HEADER]
    assert verify_signature(SECRET, signature, body)
    assert not verify_signature(SECRET, signature, body + b" ")  # the body is covered
    assert not verify_signature("another-secret-0123456789", signature, body)
    stamp = int(signature.split(",")[0].removeprefix("t="))
    assert abs(stamp - time.time()) < 30
    old = sign(SECRET, body, int(time.time()) - 3600)  # a captured request replayed an hour later
    assert not verify_signature(SECRET, old, body)


async def test_one_click_bounce_and_pause_are_told(
    api_factory: Any, receiver: Receiver, upstream: FakeUpstream
) -> None:
    unsubscribe = config_section(make_config())
    unsubscribe["mailto"].pop("listen", None)
    api: Api = await api_factory(
        hooks(receiver)
        | {
            "unsubscribe": unsubscribe,
            "bounces": {"suppress_after": 1, "min_recipients": 1, "rate_threshold": 0.01},
        }
    )
    app = api.proxy.app
    # One-click (RFC 8058) on the public pages, as a mailbox provider posts it.
    assert app.unsubscribe is not None
    assert app.unsubscribe_servers is not None
    assert app.unsubscribe_servers.http_bound is not None
    token = app.unsubscribe.issue(BOB, "news@shop.example", "newsletter")
    url = f"http://127.0.0.1:{app.unsubscribe_servers.http_bound[1]}{app.unsubscribe.path('u', token)}"
    async with aiohttp.ClientSession() as session, session.post(url, data={"List-Unsubscribe": "One-Click"}) as r:
        assert r.status == 200
    # A hard bounce through the proxy: the address is suppressed and, one bounce in one try
    # being over the threshold, the sender's commercial mail is paused.
    upstream.faults.rcpt_replies["dead@example.net"] = "550 5.1.1 no such user"
    await submit(api.proxy.port, recipients=["dead@example.net"], sender="alice@shop.example")
    await until(lambda: {e["type"] for e in receiver.events()} >= {"opted_out", "suppressed", "paused"})
    by_type = {e["type"]: e["data"] for e in receiver.events()}
    assert by_type["opted_out"]["record"]["method"] == "one_click"
    assert by_type["suppressed"]["record"]["method"] == "hard_bounce"
    assert by_type["paused"]["scope"] == "sender"
    assert by_type["paused"]["value"] == "shop.example"


async def test_retried_with_backoff_until_delivered(api_factory: Any, receiver: Receiver) -> None:
    receiver.failures = 3
    api: Api = await api_factory(hooks(receiver))
    started = time.monotonic()
    await api.call("POST", "/v1/opt-outs", body={"address": BOB})
    await until(lambda: len(receiver.received) == 1)
    took = time.monotonic() - started
    assert receiver.attempts == 4
    assert took >= 0.1 + 0.2 + 0.4 - 0.05  # 100 ms, doubled, capped at retry_max
    # The receiver has answered; the outbox row and the counter follow a moment later.
    await until(lambda: sample(api, "sendguard_webhook_attempts_total", result="delivered") == 1)
    assert sample(api, "sendguard_webhook_attempts_total", result="retry") == 3
    await until(lambda: sample(api, "sendguard_webhook_outbox", state="pending") == 0)
    ids = {e["id"] for e in receiver.events()}
    assert len(ids) == 1


async def test_the_outbox_survives_a_restart(api_factory: Any, receiver: Receiver, tmp_path: Path) -> None:
    receiver.failures = 10_000
    first: Api = await api_factory(hooks(receiver, retry_min="50ms", retry_max="50ms"))
    await first.call("POST", "/v1/opt-outs", body={"address": BOB})
    await until(lambda: receiver.attempts >= 2)
    await until(lambda: sample(first, "sendguard_webhook_outbox", state="pending") == 1)
    await first.proxy.app.stop()
    receiver.failures = 0
    second: Api = await api_factory(hooks(receiver))
    await until(lambda: len(receiver.received) == 1)
    assert receiver.events()[0]["data"]["record"]["address"] == BOB
    await until(lambda: sample(second, "sendguard_webhook_attempts_total", result="delivered") == 1)


async def test_given_up_after_max_age(api_factory: Any, receiver: Receiver) -> None:
    receiver.failures = 10_000
    api: Api = await api_factory(hooks(receiver, max_age="300ms"))
    await api.call("POST", "/v1/suppressions", body={"address": BOB, "reason": "test"})
    await until(lambda: sample(api, "sendguard_webhook_outbox", state="failed") == 1)
    attempts = receiver.attempts
    assert 1 <= attempts <= 4
    assert sample(api, "sendguard_webhook_attempts_total", result="failed") == 1
    await asyncio.sleep(0.3)
    assert receiver.attempts == attempts  # no more tries


async def test_postgres_outbox_one_attempt_at_a_time_across_instances(
    api_factory: Any, receiver: Receiver, tmp_path: Path, postgres_target: PostgresTarget
) -> None:
    one = await PostgresApiState.open(postgres_target.dsn, 5)
    two = await PostgresApiState.open(postgres_target.dsn, 5)
    try:
        now = time.time()
        await one.enqueue([QueuedRow(receiver.url, "paused", f'{{"n": {n}}}') for n in range(40)], now)
        claims = await asyncio.gather(*(state.claim_due(now, 30, 7) for state in (one, two, one, two, one, two, one)))
        ids = [row.id for claim in claims for row in claim]
        assert len(ids) == len(set(ids)) == 40  # every row once, none twice
        assert await two.claim_due(now, 30, 100) == []  # leased
        assert await one.claim_due(now + 31, 30, 100) != []  # a lease that ran out is taken again
        assert (await two.counts())["pending"] == 40
    finally:
        await one.close()
        await two.close()
    # And a whole sendguard on PostgreSQL delivers through it.
    api: Api = await api_factory(
        hooks(receiver) | {"stores": stores_section(tmp_path, "postgres", "memory", postgres_target, None)}
    )
    await api.call("POST", "/v1/opt-outs", body={"address": BOB})
    await until(lambda: any(e["type"] == "opted_out" and "record" in e["data"] for e in receiver.events()))


async def test_sqlite_outbox_claims_each_row_once(tmp_path: Path) -> None:
    path = str(tmp_path / "consent.db")
    one, two = await SQLiteApiState.open(path), await SQLiteApiState.open(path)
    try:
        now = time.time()
        await one.enqueue([QueuedRow("http://127.0.0.1:1/h", "paused", "{}") for _ in range(30)], now)
        claims = await asyncio.gather(*(state.claim_due(now, 30, 4) for state in (one, two) * 5))
        ids = [row.id for claim in claims for row in claim]
        assert len(ids) == len(set(ids)) == 30
    finally:
        await one.close()
        await two.close()


async def test_an_opt_out_recorded_elsewhere_is_told_once(api_factory: Any, receiver: Receiver) -> None:
    """``sendguard consent revoke`` in its own process (no observer there): the sweep of the log
    finds it; the API's own opt-out is found by both ways and still told once."""
    api: Api = await api_factory(hooks(receiver))
    await until(lambda: api.proxy.app.api_state is not None)
    await asyncio.sleep(0.2)  # the first sweep has set the cursor
    command = [sys.executable, "-m", "proxy", "consent", "revoke", "--config", str(api.proxy.config_path)]
    done = await asyncio.create_subprocess_exec(
        *command, "cli@example.org", "--method", "admin", "--source", "ticket 42", stdout=asyncio.subprocess.PIPE
    )
    await done.communicate()
    assert done.returncode == 0
    await api.call("POST", "/v1/opt-outs", body={"address": BOB})
    await until(lambda: len(receiver.received) >= 2)
    await asyncio.sleep(0.3)
    told = sorted(e["data"]["record"]["address"] for e in receiver.events())
    assert told == sorted([BOB, "cli@example.org"])
    assert all(e["id"].startswith("consent-") for e in receiver.events())


async def test_told_at_once_not_at_the_next_interval(api_factory: Any, receiver: Receiver) -> None:
    api: Api = await api_factory(hooks(receiver, interval="30s"))
    await asyncio.sleep(0.3)  # the first round has run; the next is 30 s away
    started = time.monotonic()
    await api.call("POST", "/v1/opt-outs", body={"address": BOB})
    await until(lambda: len(receiver.received) == 1, timeout=5)
    assert time.monotonic() - started < 5
