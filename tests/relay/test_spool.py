"""The retry queue of per-recipient copies (issue 15, part 1): the client gets 250 only when
every copy was accepted by the upstream or is committed to the queue file; the process's
worker delivers queued copies later, turns final failures into DSNs, and retries DSNs too.

Real sockets: the proxy, a fault-injecting fake upstream; the queue file is opened here with
sqlite3 to see what is on disk."""

from __future__ import annotations

import email
import email.policy
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

import policies
from policies.ratelimit import RateLimitPolicy
from proxy.relay.spool import Queued, Spool
from tests.conftest import ROOT, Proxy, eventually, message, submit
from tests.fakes import FakeUpstream, Faults

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]

SENDER = "news@example.com"
RECIPIENTS = ["ann@example.org", "ben@example.org", "cat@example.org"]
CONTENT = message(sender=SENDER, to=", ".join(RECIPIENTS))


def split_config(tmp_path: Path, **spool: Any) -> dict[str, Any]:
    """visible_recipients with remedy: split (three visible addresses, two allowed: one copy
    each), and a queue worker that looks every 0.1 s."""
    return {
        "policies": [{"name": "visible_recipients", "max_visible": 2, "remedy": "split"}],
        "spool": {"path": str(tmp_path / "spool.db"), "interval": "100ms", "retry_min": "100ms", **spool},
    }


def rows(tmp_path: Path) -> list[sqlite3.Row]:
    """What the queue file holds, read with sqlite3 directly (the proxy's view plays no part)."""
    db = sqlite3.connect(tmp_path / "spool.db")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM queue ORDER BY id").fetchall()
    finally:
        db.close()


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    value = proxy.app.services.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def copies_to(upstream: FakeUpstream, recipient: str) -> int:
    return sum(1 for m in upstream.messages if m.rcpt_tos == [recipient] and m.mail_from == SENDER)


def dsns(upstream: FakeUpstream) -> list[str]:
    return [m.content.decode() for m in upstream.messages if m.mail_from == "<>"]


async def test_a_copy_refused_for_now_is_on_disk_before_the_250_and_delivered_later(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "451 4.2.0 mailbox busy"}))
    proxy = await proxy_factory(upstream.address, split_config(tmp_path))
    code, text = await submit(proxy.port, CONTENT, sender=SENDER, recipients=RECIPIENTS)
    assert code == 250
    assert "Delivered as 2 separate copies, one per recipient; 1 queued for retry" in text
    # The 250 came after the commit: the row is in the file now, with the exact copy.
    (row,) = rows(tmp_path)
    assert (row["kind"], row["sender"], row["recipient"]) == ("copy", SENDER, "ben@example.org")
    assert row["attempts"] >= 1 and "451 4.2.0 mailbox busy" in row["last_reply"]
    queued = email.message_from_bytes(row["content"], policy=email.policy.default)
    assert queued.get_all("To") == ["ben@example.org"]
    assert stat.S_IMODE(os.stat(tmp_path / "spool.db").st_mode) == 0o600
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["outcome"] == "delivered"
    assert audit["copies"]["ann@example.org"]["fate"] == "delivered"
    assert audit["copies"]["ben@example.org"]["fate"] == "queued"
    assert audit["copies"]["ben@example.org"]["queue_id"] == row["id"]
    assert "451 4.2.0" in audit["copies"]["ben@example.org"]["reply"]
    assert copies_to(upstream, "ben@example.org") == 0

    upstream.faults.data_replies.clear()  # the mailbox is free again: the worker delivers
    assert await eventually(lambda: copies_to(upstream, "ben@example.org") == 1)
    assert await eventually(lambda: rows(tmp_path) == [])
    assert dsns(upstream) == []  # delivered late is delivered: nobody is told of a failure
    assert await eventually(
        lambda: sample(proxy, "sendguard_spool_deliveries_total", kind="copy", result="delivered") == 1
    )
    assert await eventually(lambda: sample(proxy, "sendguard_spool_messages", kind="copy") == 0)


async def test_a_copy_refused_for_good_gets_a_queued_dsn_the_worker_delivers(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "550 5.1.1 no such user"}))
    proxy = await proxy_factory(upstream.address, split_config(tmp_path))
    code, text = await submit(proxy.port, CONTENT, sender=SENDER, recipients=RECIPIENTS)
    assert code == 250
    assert "Delivered as 2 separate copies, one per recipient; 1 refused, reported to the sender" in text
    assert await eventually(lambda: len(dsns(upstream)) == 1)
    (report,) = [m for m in upstream.messages if m.mail_from == "<>"]
    assert report.rcpt_tos == [SENDER]
    assert "Final-Recipient: rfc822; ben@example.org" in dsns(upstream)[0]
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in dsns(upstream)[0]
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["copies"]["ben@example.org"]["fate"] == "refused"
    assert audit["copies"]["ben@example.org"]["reported"] is True
    assert await eventually(lambda: rows(tmp_path) == [])
    assert await eventually(
        lambda: sample(proxy, "sendguard_spool_deliveries_total", kind="dsn", result="delivered") == 1
    )


async def test_a_dsn_refused_for_now_is_retried_and_not_reported_as_sent(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(
        faults=Faults(
            data_replies={"ben@example.org": "550 5.1.1 no such user", SENDER: "452 4.2.2 sender's mailbox full"}
        )
    )
    proxy = await proxy_factory(upstream.address, split_config(tmp_path, retry_min="200ms"))
    code, _ = await submit(proxy.port, CONTENT, sender=SENDER, recipients=RECIPIENTS)
    assert code == 250
    # The DSN is tried, refused for now, and stays in the queue with the refusal on record.
    assert await eventually(lambda: any(r["attempts"] >= 2 for r in rows(tmp_path)))
    (row,) = rows(tmp_path)
    assert (row["kind"], row["sender"], row["recipient"]) == ("dsn", "", SENDER)
    assert "452 4.2.2" in row["last_reply"]
    assert dsns(upstream) == []
    assert sample(proxy, "sendguard_spool_deliveries_total", kind="dsn", result="delivered") == 0
    assert await eventually(
        lambda: sample(proxy, "sendguard_spool_deliveries_total", kind="dsn", result="deferred") >= 2
    )
    upstream.faults.data_replies.pop(SENDER)
    assert await eventually(lambda: len(dsns(upstream)) == 1)
    assert await eventually(lambda: rows(tmp_path) == [])


async def test_all_copies_refused_with_4xx_and_5xx_give_the_client_a_4xx(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    # The first refusal is a 5xx: answering with it would make the client bounce ben's mail,
    # which was refused only for now.
    faults = Faults(
        data_replies={
            "ann@example.org": "550 5.1.1 no such user",
            "ben@example.org": "451 4.2.0 mailbox busy",
            "cat@example.org": "554 5.7.1 refused",
        }
    )
    upstream = await upstream_factory(faults=faults)
    proxy = await proxy_factory(upstream.address, split_config(tmp_path))
    code, text = await submit(proxy.port, CONTENT, sender=SENDER, recipients=RECIPIENTS)
    assert code == 451 and text.startswith("4.2.0 mailbox busy [")
    assert rows(tmp_path) == []  # the client keeps its message: nothing queued, no DSN
    assert upstream.messages == []
    assert (await proxy.wait_audit(1))[-1]["outcome"] == "tempfailed"


async def test_the_queue_survives_a_restart(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "451 4.2.0 mailbox busy"}))
    first = await proxy_factory(upstream.address, split_config(tmp_path))
    code, _ = await submit(first.port, CONTENT, sender=SENDER, recipients=RECIPIENTS)
    assert code == 250
    await first.app.stop()
    (row,) = rows(tmp_path)
    assert row["recipient"] == "ben@example.org"
    upstream.faults.data_replies.clear()
    await proxy_factory(upstream.address, split_config(tmp_path))  # a new process, the same file
    assert await eventually(lambda: copies_to(upstream, "ben@example.org") == 1)
    assert await eventually(lambda: rows(tmp_path) == [])


async def test_a_copy_refused_for_longer_than_max_age_becomes_a_dsn(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "451 4.2.0 mailbox busy"}))
    proxy = await proxy_factory(upstream.address, split_config(tmp_path, max_age="500ms"))
    code, _ = await submit(proxy.port, CONTENT, sender=SENDER, recipients=RECIPIENTS)
    assert code == 250
    assert await eventually(lambda: len(dsns(upstream)) == 1)
    assert "Final-Recipient: rfc822; ben@example.org" in dsns(upstream)[0]
    assert "Status: 5.2.0" in dsns(upstream)[0]  # a temporary refusal, final now
    assert copies_to(upstream, "ben@example.org") == 0
    assert await eventually(lambda: rows(tmp_path) == [])
    assert await eventually(
        lambda: sample(proxy, "sendguard_spool_deliveries_total", kind="copy", result="failed") == 1
    )


def queue_cli(config: Path, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "queue", *args, "--config", str(config)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return result.returncode, result.stdout.decode() + result.stderr.decode()


def test_queue_list_retry_and_drop_through_the_command(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    later = time.time() + 3600
    first, second = spool.add_sync(
        [
            Queued("copy", "txn1", SENDER, "ben@example.org", b"x", later, attempts=1, last_reply="451 4.2.0 busy"),
            Queued("dsn", "txn2", "", SENDER, b"y", later, attempts=3, last_reply="452 4.2.2 full"),
        ]
    )
    config = tmp_path / "sendguard.yaml"
    config.write_text(
        "listeners: [{name: local, address: '127.0.0.1:2525'}]\n"
        f"upstream: {{address: 'maildir:{tmp_path / 'maildir'}'}}\n"
        f"spool: {{path: '{tmp_path / 'spool.db'}'}}\n"
    )
    code, out = queue_cli(config, "list")
    assert code == 0
    assert "ben@example.org" in out and "451 4.2.0 busy" in out and "452 4.2.2 full" in out
    assert f"{first:>6}  copy" in out and f"{second:>6}  dsn" in out

    code, out = queue_cli(config, "retry", str(first))
    assert code == 0 and "1 row(s) due now" in out
    due = {e.id: e.next_attempt for e in spool.list_sync()}
    assert due[first] <= time.time() < due[second]

    assert queue_cli(config, "drop")[0] == 2  # ids or --all
    code, out = queue_cli(config, "drop", str(second))
    assert code == 0 and "1 row(s) dropped" in out
    assert [e.id for e in spool.list_sync()] == [first]
    code, out = queue_cli(config, "drop", "--all")
    assert code == 0 and spool.list_sync() == []
    assert "the queue is empty" in queue_cli(config, "list")[1]


async def test_copies_refused_for_good_are_refunded_and_queued_ones_stay_charged(
    monkeypatch: pytest.MonkeyPatch, upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Part 9: after some copies were delivered, only the refused copies' units come back
    (not the whole charge); a queued copy will still go out, so its unit stays taken."""
    monkeypatch.setitem(policies.REGISTRY, "rate_limit", RateLimitPolicy)
    upstream = await upstream_factory(
        faults=Faults(data_replies={"ben@example.org": "550 5.1.1 no such user", "dan@example.org": "451 4.2.0 busy"})
    )
    config = split_config(tmp_path, retry_min="1h")
    config["policies"].insert(0, {"name": "rate_limit", "limits": [{"key": "client_ip", "rates": ["5/h"]}]})
    proxy = await proxy_factory(upstream.address, config)

    async def send(recipients: list[str]) -> dict[str, aiosmtplib.SMTPResponse]:
        errors, _ = await aiosmtplib.send(
            CONTENT, sender=SENDER, recipients=recipients, hostname="127.0.0.1", port=proxy.port, timeout=10
        )
        return errors

    assert await send(RECIPIENTS) == {}  # 3 units; ben's copy refused for good: 1 comes back
    assert await send(["dan@example.org", "eve@example.org"]) == {}  # 2 more (5 of 5); dan's copy queued
    refused = await send(["fay@example.org", "gus@example.org"])  # room for exactly ben's unit
    assert set(refused) == {"gus@example.org"} and refused["gus@example.org"].code == 451
    # dan's copy waits (retry_min 1h); the DSN for ben may or may not have gone out yet
    assert [r["recipient"] for r in rows(tmp_path) if r["kind"] == "copy"] == ["dan@example.org"]


async def test_what_the_queue_worker_hears_counts_for_bounces_and_backoff(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """A queued copy refused later as a dead address is a hard bounce (suppressed, here after
    one) and counts toward the backoff rules, as if the client had still been waiting."""
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "451 4.2.0 mailbox busy"}))
    config = split_config(tmp_path)
    config["bounces"] = {"suppress_after": 1}
    config["backoff"] = {
        "rules": [
            {"name": "dead", "match": {"status": "5.1.1"}, "threshold": "1/h", "scope": "sender", "duration": "1h"}
        ]
    }
    proxy = await proxy_factory(upstream.address, config)
    assert (await submit(proxy.port, CONTENT, sender=SENDER, recipients=RECIPIENTS))[0] == 250
    upstream.faults.data_replies["ben@example.org"] = "550 5.1.1 no such user"  # now it is gone
    assert await eventually(lambda: sample(proxy, "sendguard_hard_bounces_total") == 1)
    store = proxy.app.runtime.consent
    assert store is not None
    assert await eventually(lambda: sample(proxy, "sendguard_backoff_matches_total", rule="dead") == 1)
    assert [e.kind for e in await store.history("ben@example.org")] == ["suppressed"]


def test_an_erasure_drops_the_copies_to_the_address_and_the_dsns_naming_it(tmp_path: Path) -> None:
    """What an erasure takes from the queue: every copy to the address (any spelling) and the DSN
    that quotes it; another recipient's copy of the same message stays (it is their mail), and
    the old bytes are not left in the file or its WAL."""
    spool = Spool(tmp_path / "spool.db")
    later = time.time() + 3600
    dsn = b"Content-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822; Anna.Jansen@example.nl\r\n"
    spool.add_sync(
        [
            Queued("copy", "t1", SENDER, "Anna.Jansen@Example.NL", b"To: anna\r\n\r\nsale for anna.jansen", later),
            Queued("copy", "t1", SENDER, "piet@example.org", b"To: piet@example.org\r\n\r\nsale", later),
            Queued("dsn", "t2", "", SENDER, dsn, later),
            Queued("dsn", "t3", "", SENDER, b"Final-Recipient: rfc822; piet@example.org\r\n", later),
        ]
    )
    assert sorted(spool.forget_sync(["anna.jansen@example.nl"])) == ["t1", "t2"]
    assert sorted((e.kind, e.recipient) for e in spool.list_sync()) == [("copy", "piet@example.org"), ("dsn", SENDER)]
    files = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.glob("spool.db*"))
    assert "anna.jansen" not in files.lower()
    assert spool.forget_sync(["anna.jansen@example.nl"]) == []
