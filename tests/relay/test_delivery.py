"""The relay without a client: a RelayTransaction and proxy.relay.delivery driven directly,
against a real fake upstream or a maildir. No SMTP session, no client socket: what the
SMTP session, and later a milter, hand to the relay is an envelope and the message bytes."""

from __future__ import annotations

import email
import email.policy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import policies
from policies.base import MESSAGE_CLASSES, MessageEdit, Policy, Transaction, Verdict
from proxy.config.settings import load_config_text
from proxy.observability.logsetup import AuditLog
from proxy.observability.metrics import Metrics
from proxy.relay.classify import Classifier
from proxy.relay.delivery import Delivered, deliver
from proxy.relay.drain import Drainer
from proxy.relay.pipeline import Pipeline
from proxy.relay.runtime import Runtime
from proxy.relay.spool import Spool
from proxy.relay.transaction import RelayTransaction
from proxy.relay.upstream import build_upstream
from proxy.reputation.backoff import Backoff
from proxy.reputation.bounces import Bounces
from proxy.reputation.dkim import Signer
from proxy.reputation.resolver import build_resolver
from proxy.smtp.auth import UserStore
from proxy.smtp.listener import Services
from proxy.stores.limits import MemoryLimitStore
from proxy.stores.pauses import MemoryPauseStore
from tests.conftest import base_config, merge, message
from tests.fakes import FakeUpstream, Faults

RECIPIENTS = ["ann@example.org", "ben@example.org"]


class SplitEveryMessage(Policy):
    name = "test_split"

    async def check_message(self, txn: Transaction) -> Verdict | None:
        return Verdict.accept("split", edit=MessageEdit(split_per_recipient=True))


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(policies.REGISTRY, SplitEveryMessage.name, SplitEveryMessage)


class Relay:
    """One config generation and the process services, as the app builds them, minus sockets."""

    def __init__(self, runtime: Runtime, services: Services, audit_path: Path) -> None:
        self.runtime, self.services, self.audit_path = runtime, services, audit_path

    async def send(self, content: bytes, recipients: list[str], sender: str = "news@example.com") -> Delivered:
        txn = Transaction(
            txn_id="0123456789ab", listener="local", client_ip="127.0.0.1", helo="client.test", mail_from=sender
        )
        t = RelayTransaction.begin(self.runtime, self.services, txn, smtputf8=False)
        reply = await t.mail([])
        assert reply.is_success, reply
        for recipient in recipients:
            assert (await t.rcpt(recipient)).is_success
        delivered = await deliver(t, content)
        await t.end(delivered.outcome, client_reply=delivered.reply, upstream_reply=delivered.upstream_reply)
        assert t.ended
        return delivered

    def audit(self) -> list[dict[str, Any]]:
        self.services.audit.close()  # drains the queue
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[RelayFactory]:
    runtimes: list[Runtime] = []
    audits: list[AuditLog] = []

    async def make(upstream_address: str, changes: dict[str, Any] | None = None) -> Relay:
        config = merge(base_config(tmp_path, upstream_address), changes or {})
        settings = load_config_text(yaml.safe_dump(config))
        audit_path = tmp_path / "audit.jsonl"
        audit = AuditLog(str(audit_path), settings.audit.max_size, settings.audit.keep)
        audits.append(audit)
        services = Services(
            metrics=Metrics("test"),
            audit=audit,
            users=UserStore(str(tmp_path / "users")),
            hostname="relay.test",
            spool=Spool(settings.spool.path),
        )
        pauses, limits = MemoryPauseStore(), MemoryLimitStore()
        resolver = build_resolver(settings.dns.resolver)
        signer = Signer.from_config(settings.dkim)
        resources = {
            "dns": resolver,
            "dkim": signer,
            "sending_ips": settings.dns.sending_ips,
            "limits": limits,
            "metrics_limit_errors": services.metrics.ratelimit_store_error,
            "consent": None,
            "unsubscribe": None,
            "headers_added": {c: settings.headers_added(c) for c in MESSAGE_CLASSES},
        }
        runtime = Runtime(
            settings=settings,
            pipeline=Pipeline(settings.policies, resources=resources, observer=services.metrics),
            classifier=Classifier(settings.classes),
            upstream=build_upstream(settings.upstream, helo_name="relay.test"),
            pauses=pauses,
            limits=limits,
            backoff=Backoff(settings.backoff, pauses, services.metrics),
            bounces=Bounces(settings.bounces, None, pauses, services.metrics),
            signer=signer,
            resolver=resolver,
            generation=1,
        )
        runtimes.append(runtime)
        return Relay(runtime, services, audit_path)

    yield make
    for runtime in runtimes:
        for resource in runtime.resources():
            await resource.close()
    for audit in audits:
        audit.close()


async def test_one_message_goes_upstream_and_the_client_gets_its_reply(
    upstream: FakeUpstream, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(upstream.address)
    delivered = await relay.send(message(), ["bob@example.org"])
    assert delivered.outcome == "delivered"
    assert delivered.reply.code == 250 and delivered.reply.text.endswith("[0123456789ab]")
    assert delivered.upstream_reply is not None and delivered.upstream_reply.code == 250
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.org"]]
    audit = relay.audit()
    assert [(a["txn"], a["outcome"], a["recipients"]) for a in audit] == [
        ("0123456789ab", "delivered", ["bob@example.org"])
    ]
    assert relay.runtime.in_flight == 0


async def test_a_message_the_policies_refuse_never_reaches_the_upstream(
    upstream: FakeUpstream, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(upstream.address)
    without_from = message().replace(b"From: Alice <alice@example.com>\r\n", b"")
    delivered = await relay.send(without_from, ["bob@example.org"])
    assert delivered.reply.code == 550 and delivered.outcome == "rejected"
    assert delivered.upstream_reply is None
    assert upstream.messages == []
    assert relay.audit()[-1]["outcome"] == "rejected"


async def test_copies_and_a_dsn_for_the_refused_one(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]], relay_factory: RelayFactory
) -> None:
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "550 5.7.1 Ben's box refuses"}))
    relay = await relay_factory(upstream.address, {"policies": [{"name": "test_split"}]})
    delivered = await relay.send(message(to="ann@example.org, ben@example.org"), RECIPIENTS)
    assert delivered.outcome == "delivered"
    assert delivered.reply.text.startswith("Delivered as 1 separate copies, one per recipient; 1 refused")
    copies = [m for m in upstream.messages if m.mail_from != "<>"]
    assert [m.rcpt_tos for m in copies] == [["ann@example.org"]]
    shown = email.message_from_bytes(copies[0].content, policy=email.policy.default)
    assert shown.get_all("To") == ["ann@example.org"]
    spool = relay.services.spool
    assert spool is not None
    (queued,) = spool.list_sync()  # the DSN waits in the queue, committed before the reply
    assert (queued.kind, queued.sender, queued.recipient) == ("dsn", "", "news@example.com")
    await Drainer(spool, lambda: relay.runtime, relay.services.metrics, "relay.test").drain()
    assert spool.list_sync() == []
    (dsn,) = [m for m in upstream.messages if m.mail_from == "<>"]
    assert dsn.rcpt_tos == ["news@example.com"]
    assert "Final-Recipient: rfc822; ben@example.org" in dsn.content.decode()
    assert set(relay.audit()[-1]["copies"]) == set(RECIPIENTS)


async def test_maildir_delivery_without_any_socket(tmp_path: Path, relay_factory: RelayFactory) -> None:
    maildir = tmp_path / "maildir"
    relay = await relay_factory(f"maildir:{maildir}")
    delivered = await relay.send(message(subject="Into the maildir"), ["bob@example.org"])
    assert delivered.outcome == "delivered"
    (stored,) = list((maildir / "new").iterdir())
    assert b"Subject: Into the maildir" in stored.read_bytes()
