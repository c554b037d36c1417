"""Issue 11's "done when", end to end through a real running sendguard, on SQLite and on the real
PostgreSQL (with Redis for the shared state there):

* a CRM keeps consent in step through the real API server (idempotent writes, reads) and hears
  of opt-outs and complaints at a real local HTTP receiver, signed;
* a Mailchimp export imports in one CLI command;
* an ARF feedback report sent to the mailto listener opts the recipient out;
* ``sendguard consent erase`` leaves nothing personal in any table of the consent database, in
  the retry queue or in the bounce counter, and the live proxy still refuses commercial mail to
  the address;
* the report for the period shows all of it (erasures, a pause that held no mail, the
  complaint), and the evidence packs for the erased and the complaining address say what
  happened, without the erased address anywhere.
"""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.api.webhooks import SIGNATURE_HEADER, verify_signature
from proxy.cli.consent import build_parser, run_consent
from proxy.cli.report import build_report
from proxy.config.settings import load_config
from proxy.reputation.bounces import address_counter
from proxy.reputation.dkim import generate_private_key, write_private_key
from proxy.stores.pauses import Pause
from tests.api.harness import SECRET, WRITER, Receiver, api_section, until
from tests.conftest import Proxy
from tests.fakes import FakeUpstream
from tests.services import PostgresTarget
from tests.unsubscribe.harness import Relay, start_relay
from tests.unsubscribe.test_complaints_relay import FBL, isp_headers_report
from tests.unsubscribe.test_complaints_relay import report as send_report
from tests.unsubscribe.test_end_to_end import SENDER, newsletter
from tests.unsubscribe.test_erasure_relay import send

ProxyFactory = Callable[..., Awaitable[Proxy]]
KEY = "erasure-key-of-the-end-to-end-test-0123456789"
EXPORT = Path(__file__).resolve().parents[1] / "fixtures" / "exports" / "mailchimp_subscribed.csv"
ANNA = "anna.jansen@example.nl"  # from the Mailchimp export; erased
PIET = "piet@example.org"  # from the Mailchimp export
CAROL = "carol@example.org"  # through the API; complains
DAVE = "dave@example.org"  # opts out through the API
#: Anna's personal data as it was recorded: her address (also in upper case), her sign-up IP and
#: the Mailchimp id from the export.
ANNA_TRACES = (ANNA, ANNA.upper(), "198.51.100.23", "182736451")
FAST = {"retry_min": "100ms", "retry_max": "400ms", "interval": "50ms", "timeout": "2s"}
BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]


@dataclass
class Setup:
    relay: Relay
    backend: str
    pg: PostgresTarget | None

    @property
    def proxy(self) -> Proxy:
        return self.relay.proxy


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any], PostgresTarget | None]:
    """The stores section: SQLite and memory, or PostgreSQL and Redis."""
    if request.param == "sqlite":
        return "sqlite", {"consent": {"path": str(tmp_path / "consent.db"), "erasure_key": KEY}}, None
    pg = request.getfixturevalue("postgres_target")
    redis = request.getfixturevalue("redis_target")
    stores = {
        "consent": {"backend": "postgres", "dsn": pg.dsn, "erasure_key": KEY},
        "state": {"backend": "redis", "url": redis.url, "key_prefix": redis.prefix},
    }
    return "postgres", stores, pg


@pytest.fixture
async def setup(
    backend: tuple[str, dict[str, Any], PostgresTarget | None],
    proxy_factory: ProxyFactory,
    upstream: FakeUpstream,
    receiver: Receiver,
    tmp_path: Path,
) -> AsyncIterator[Setup]:
    name, stores, pg = backend
    key = tmp_path / "dkim-ed25519.pem"
    write_private_key(key, generate_private_key("ed25519-sha256"))
    extra = {
        "dkim": {
            "keys": [{"domain": "shop.example", "selector": "s1", "key_file": str(key), "algorithm": "ed25519-sha256"}]
        },
        "stores": stores,
        "api": api_section(),
        "webhooks": {"endpoints": [{"url": receiver.url, "secret": SECRET}], **FAST},
        "complaints": {"address": FBL},
        # A copy refused for now waits an hour: it is in the queue when the address is erased.
        "spool": {"path": str(tmp_path / "spool.db"), "retry_min": "1h", "retry_max": "2h"},
    }
    async for relay in start_relay(proxy_factory, upstream.address, tmp_path, extra=extra):
        yield Setup(relay, name, pg)


async def api(setup: Setup, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    import aiohttp

    server = setup.proxy.app.api_server
    assert server is not None and server.bound is not None
    headers = {"Authorization": f"Bearer {WRITER}"}
    if key:
        headers["Idempotency-Key"] = key
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"http://127.0.0.1:{server.bound[1]}{path}", json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def consent_cli(setup: Setup, *argv: str) -> tuple[int, str, str]:
    command, *rest = argv
    args = build_parser().parse_args(["consent", command, "--config", str(setup.proxy.config_path), *rest])
    out, err = io.StringIO(), io.StringIO()
    return await run_consent(args, out=out, err=err), out.getvalue(), err.getvalue()


async def report_cli(setup: Setup, fmt: str = "json", **options: str | None) -> str:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    args = argparse.Namespace(
        config=str(setup.proxy.config_path),
        start=options.get("start", today),
        end=options.get("end", today),
        sender_domain=None,
        address=options.get("address"),
        format=fmt,
        out=None,
        audit_log=None,
    )
    out, err = io.StringIO(), io.StringIO()
    code = await build_report(args, load_config(setup.proxy.config_path), out=out, err=err)
    assert code == 0, err.getvalue()
    return out.getvalue()


async def everything_stored(setup: Setup, tmp_path: Path) -> dict[str, str]:
    """Every row of every table sendguard keeps, as text, by table: the consent database (its
    events, the API's idempotency keys and webhook outbox, ...), and the retry queue. For SQLite
    also the files' bytes (free pages and the WAL), which an erasure must not leave readable."""
    found: dict[str, str] = {}

    def sqlite_tables(path: Path, label: str) -> None:
        with sqlite3.connect(path) as db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                rows = db.execute(f'SELECT * FROM "{table}"').fetchall()
                found[f"{label}:{table}"] = "\n".join(
                    " ".join(v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row) for row in rows
                )

    sqlite_tables(tmp_path / "spool.db", "spool")
    found["spool files"] = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.glob("spool.db*"))
    if setup.backend == "sqlite":
        sqlite_tables(tmp_path / "consent.db", "consent")
        found["consent files"] = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.glob("consent.db*"))
    else:
        assert setup.pg is not None
        async with await psycopg.AsyncConnection.connect(setup.pg.dsn) as conn:
            cursor = await conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (setup.pg.schema,)
            )
            for (table,) in await cursor.fetchall():
                rows = await (await conn.execute(f'SELECT t::text FROM "{table}" t')).fetchall()
                found[f"consent:{table}"] = "\n".join(row[0] for row in rows)
    return found


def traces_in(stored: dict[str, str], traces: tuple[str, ...]) -> list[str]:
    return [
        f"{trace} in {where}" for where, text in stored.items() for trace in traces if trace.lower() in text.lower()
    ]


async def test_a_crm_an_import_a_complaint_and_an_erasure_then_the_report(
    setup: Setup, upstream: FakeUpstream, receiver: Receiver, tmp_path: Path
) -> None:
    started = time.time()
    app = setup.proxy.app
    store = setup.relay.store

    # -- the CRM records consent through the API; a retried request records once
    body = {"address": CAROL, "event": "opted_in", "method": "web_form", "topic": "newsletter",
            "sender": "shop.example", "source": "https://shop.example/signup"}  # fmt: skip
    first = await api(setup, "POST", "/v1/events", body, key="crm-carol-1")
    again = await api(setup, "POST", "/v1/events", body, key="crm-carol-1")
    assert first[0] == 201 and again == first
    assert len(await store.history(CAROL)) == 1
    assert (await api(setup, "POST", "/v1/opt-outs", {"address": DAVE}, key="crm-dave"))[0] == 201

    # -- a Mailchimp export imports in one command
    code, out, err = await consent_cli(
        setup, "import", str(EXPORT), "--format", "mailchimp", "--topic", "newsletter", "--sender", "shop.example"
    )
    assert code == 0, err
    assert "3 row(s): opted_in 3" in out + err
    # The CRM also records an objection of Anna's to offers: the API's tables now hold her address.
    status, answer = await api(setup, "POST", "/v1/opt-outs", {"address": ANNA.upper(), "topic": "offers"}, key="k-a")
    assert status == 201 and answer["event"]["address"].lower() == ANNA  # as the CRM spelled it
    status, answer = await api(setup, "GET", f"/v1/addresses/{ANNA}/status?topic=newsletter&sender=shop.example")
    assert status == 200 and answer["allowed"] is True

    # -- mail goes out on that consent; a copy refused for now waits in the retry queue, and a
    # hard bounce whose DSN the sender's mailbox cannot take yet waits there too
    assert (await send(setup.relay, newsletter(CAROL), [CAROL]))[0] == 250
    upstream.faults.data_replies[ANNA] = "451 4.2.0 mailbox busy"
    assert (await send(setup.relay, newsletter(PIET), [ANNA, PIET]))[0] == 250
    upstream.faults.data_replies.update({ANNA: "550 5.1.1 no such user", SENDER: "452 4.2.2 mailbox full"})
    assert (await send(setup.relay, newsletter(PIET, "Second sale"), [ANNA, PIET]))[0] == 250
    del upstream.faults.data_replies[ANNA]  # the sender's mailbox stays full: its DSN waits
    queued = app.services.spool.list_sync() if app.services.spool is not None else []
    assert sorted((e.kind, e.recipient.lower()) for e in queued) == [("copy", ANNA), ("dsn", SENDER)]
    assert await app.runtime.pauses.count(address_counter(ANNA), 3600) == 1

    # -- a feedback report opts Carol out; the next newsletter to her is refused
    code, text = await send_report(setup.relay, isp_headers_report(CAROL))
    assert code == 250 and "Complaint recorded" in text
    code, text = await send(setup.relay, newsletter(CAROL, "Next sale"), [CAROL])
    assert code == 550 and "opted out" in text

    # -- a pause that holds no mail (an upstream's throttle for a sender that sends nothing now)
    await app.runtime.pauses.pause(
        Pause("sender", "quiet.example", time.time() + 600, "421 4.7.0 try again later", "backoff:upstream-throttle")
    )

    # -- the CRM hears of the opt-outs and the complaint, signed
    def told() -> set[tuple[str, str]]:
        return {(e["type"], str(e["data"].get("record", {}).get("address", "")).lower()) for e in receiver.events()}

    await until(lambda: told() >= {("opted_out", DAVE), ("opted_out", ANNA), ("complaint", CAROL), ("paused", "")})
    for headers, raw in receiver.received:
        assert verify_signature(SECRET, headers[SIGNATURE_HEADER], raw)

    before = await everything_stored(setup, tmp_path)
    assert traces_in(before, ANNA_TRACES), "the test must start with Anna's data in the stores"

    # -- the erasure
    code, out, err = await consent_cli(setup, "erase", ANNA.upper(), "--via", "e-mail to privacy@shop.example")
    assert code == 0, err
    assert out.startswith(f"erased {ANNA}: ")
    assert "webhook outbox rows 1" in out and "idempotency answers 1" in out and "retry queue rows 2" in out
    assert "bounce counters 1" in out if setup.backend == "postgres" else "bounce counters" not in out

    after = await everything_stored(setup, tmp_path)
    assert traces_in(after, ANNA_TRACES) == []
    assert PIET in after["consent files" if setup.backend == "sqlite" else "consent:consent_events"]
    if setup.backend == "postgres":  # Redis is reached from the command; memory only in the proxy
        assert await app.runtime.pauses.count(address_counter(ANNA), 3600) == 0
    # A retry of the CRM's request with its key records nothing again and names no one.
    status, answer = await api(setup, "POST", "/v1/opt-outs", {"address": ANNA.upper(), "topic": "offers"}, key="k-a")
    assert status == 201 and ANNA not in json.dumps(answer).lower() and answer["event"]["address"].startswith("erased:")

    # -- commercial mail to her is still refused by the live proxy; the queued copy never went
    code, text = await send(setup.relay, newsletter(ANNA, "After the erasure"), [ANNA])
    assert code == 550 and "suppressed" in text
    assert not [m for m in upstream.messages if ANNA in [r.lower() for r in m.rcpt_tos]][1:], "only the first try"
    assert (await send(setup.relay, newsletter(PIET, "Still for Piet"), [PIET]))[0] == 250
    code, out, _ = await consent_cli(setup, "show", ANNA)
    assert code == 0 and "ERASED at " in out and "198.51.100.23" not in out and "[personal data erased " in out

    # -- the report for the period shows it all, and never Anna's address
    await setup.proxy.wait_audit(9)
    report = json.loads(await report_cli(setup))
    assert ANNA not in json.dumps(report).lower()
    assert report["erasures"]["total"] == 1
    (erasure,) = report["erasures"]["events"]
    assert erasure["events_erased"] == 2 and erasure["requested"] == "requested via e-mail to privacy@shop.example"
    assert datetime.fromisoformat(erasure["at"]).timestamp() >= started - 1
    pauses = {p["source"]: p for p in report["pauses"]}
    quiet = pauses["backoff:upstream-throttle"]
    assert (quiet["transactions"], quiet["set"], quiet["paused"]) == (0, 1, "sender:quiet.example")
    assert report["opt_outs"]["by_channel"]["complaint"] == 1 and report["opt_outs"]["by_channel"]["api"] == 2
    events = {(e["kind"], e["channel"]): e for e in report["opt_outs"]["events"]}
    assert events[("opted_out", "complaint")]["next_message"]["result"] == "refused"
    # The next message to the erased address is found by its keyed hash: refused, as it must be.
    erased_track = events[("suppressed", "erasure")]
    assert erased_track["subject"].startswith("erased:") and erased_track["next_message"]["result"] == "refused"
    (shop,) = [r for r in report["rates"] if r["sender_domain"] == "shop.example"]
    assert shop["complaints"] == 1
    for fmt in ("html", "csv"):
        rendered = await report_cli(setup, fmt)
        assert ANNA not in rendered.lower() and "backoff:upstream-throttle" in rendered
    assert 'id="erasures-table"' in await report_cli(setup, "html")

    # -- the evidence pack of the erased address says so, and shows only what came after
    pack = json.loads(await report_cli(setup, address=ANNA, start=None, end=None))
    assert ANNA not in json.dumps(pack).lower()
    assert pack["erasure"]["erased"] is True and pack["erasure"]["commercial_mail"] == "refused"
    assert pack["erasure"]["decisions_before_erasure"] >= 2
    assert [(m["result"], m["basis"]) for m in pack["messages"]] == [("refused_policy", "suppressed")]
    assert pack["basis_now"]["allowed"] is False
    html = await report_cli(setup, "html", address=ANNA, start=None, end=None)
    assert 'id="erasure"' in html and ANNA not in html.lower()
    # ... and Carol's shows her complaint and the refusal after it.
    carol = json.loads(await report_cli(setup, address=CAROL, start=None, end=None))
    (complaint,) = [o for o in carol["opt_outs"] if o["channel"] == "complaint"]
    assert complaint["refused_after"] == 1 and complaint["not_honoured"] == 0 and carol["erasure"] is None


async def test_erased_from_the_recipients_page_the_running_proxy_clears_its_own_stores(
    setup: Setup, upstream: FakeUpstream, receiver: Receiver, tmp_path: Path
) -> None:
    """The same erasure asked for on the recipient's page: the running process's erasers reach
    the retry queue, the API's tables and the bounce counter in its own shared state (memory
    too, which the command cannot reach)."""
    import aiohttp

    from tests.unsubscribe.harness import https_link
    from tests.unsubscribe.test_web import csrf_of

    app = setup.proxy.app
    body = {"address": PIET, "event": "opted_in", "method": "web_form", "topic": "newsletter",
            "sender": "shop.example", "ip": "203.0.113.77"}  # fmt: skip
    assert (await api(setup, "POST", "/v1/events", body, key="crm-1"))[0] == 201
    assert (await api(setup, "POST", "/v1/events", {**body, "address": CAROL, "ip": None}, key="crm-3"))[0] == 201
    assert (await api(setup, "POST", "/v1/opt-outs", {"address": PIET, "topic": "offers"}, key="crm-2"))[0] == 201
    assert (await send(setup.relay, newsletter(PIET), [PIET]))[0] == 250
    link = https_link(upstream.messages[-1].content)
    upstream.faults.data_replies.update({PIET: "550 5.1.1 no such user", SENDER: "452 4.2.2 mailbox full"})
    assert (await send(setup.relay, newsletter(CAROL, "Sale"), [PIET, CAROL]))[0] == 250
    upstream.faults.data_replies[PIET] = "451 4.2.0 mailbox busy"
    assert (await send(setup.relay, newsletter(CAROL, "Sale 2"), [PIET, CAROL]))[0] == 250
    assert await app.runtime.pauses.count(address_counter(PIET), 3600) == 1
    await until(lambda: any(e["type"] == "opted_out" for e in receiver.events()))
    assert traces_in(await everything_stored(setup, tmp_path), (PIET, "203.0.113.77"))

    page_url = setup.relay.local(link).replace("/u/", "/p/")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(page_url + "?lang=en") as response:
            page = await response.text()
        async with http.post(
            page_url + "/erase", data={"csrf": csrf_of(page, "/erase"), "lang": "en"}, allow_redirects=False
        ) as response:
            assert response.status == 303 and "done=erased" in response.headers["Location"]

    assert traces_in(await everything_stored(setup, tmp_path), (PIET, "203.0.113.77")) == []
    assert await app.runtime.pauses.count(address_counter(PIET), 3600) == 0
    code, text = await send(setup.relay, newsletter(PIET, "After"), [PIET])
    assert code == 550 and "suppressed" in text
    audit = await setup.proxy.wait_audit(1)
    (erasure,) = [line for line in audit if line.get("event") == "erasure"]
    assert PIET not in json.dumps(erasure)
