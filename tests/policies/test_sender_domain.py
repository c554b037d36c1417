"""sender_domain: the preflight as a policy - refusals that name the fix, the cache that makes
it free after the first message, DNS trouble handed to on_error and never cached, monitor mode.

DNS answers come from the loopback server (tests/dnsserver.py); the cache runs on a fake clock.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator

import pytest
import yaml

from policies.base import MESSAGE_CLASSES, Action, PolicyError, Transaction
from policies.message import ParsedMessage
from policies.sender_domain import SenderDomainPolicy
from proxy.config.settings import PolicyEntry
from proxy.relay.pipeline import Pipeline
from proxy.reputation.dkim import (
    DKIMConfig,
    DKIMKeyConfig,
    Signer,
    dns_txt_strings,
    generate_private_key,
    write_private_key,
)
from proxy.reputation.resolver import ResolverConfig, build_resolver
from proxy.schema import Converter, Duration
from tests.dnsserver import DNSServer

_ids = itertools.count(1)
SENDING_IP = "203.0.113.10"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def options(text: str = "{}") -> SenderDomainPolicy.Options:
    converter = Converter("policy.yaml", {})
    node = yaml.compose(text)
    assert node is not None
    parsed = converter.dataclass(node, SenderDomainPolicy.Options, "policies[0]")
    assert converter.issues == [], [str(i) for i in converter.issues]
    return parsed


def txn(sender: str = "news@example.com", mail_from: str | None = None) -> Transaction:
    raw = (
        f"From: News <{sender}>\r\nTo: bob@example.org\r\nSubject: hi\r\n"
        "Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nbody\r\n"
    ).encode()
    return Transaction(
        txn_id=f"t{next(_ids)}",
        listener="local",
        client_ip="127.0.0.1",
        mail_from=sender if mail_from is None else mail_from,
        recipients=["bob@example.org"],
        message=ParsedMessage(raw),
    )


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    path = tmp_path_factory.mktemp("keys") / "example.com.s2026.pem"
    write_private_key(path, generate_private_key("rsa-sha256"))
    return Signer.from_config(DKIMConfig(keys=(DKIMKeyConfig("example.com", "s2026", str(path)),)))


@pytest.fixture
async def server(signer: Signer) -> AsyncIterator[DNSServer]:
    dns_server = await DNSServer().start()
    dns_server.set("example.com", "TXT", [f'"v=spf1 ip4:{SENDING_IP} -all"'])
    dns_server.set("_dmarc.example.com", "TXT", ['"v=DMARC1; p=quarantine"'])
    key = signer.keys[0]
    dns_server.set(key.config.record_name, "TXT", [" ".join(f'"{s}"' for s in dns_txt_strings(key.dns_record()))])
    yield dns_server
    await dns_server.stop()


def make_policy(
    server: DNSServer, signer: Signer | None, text: str = "{}", clock: FakeClock | None = None
) -> SenderDomainPolicy:
    resources = {"dns": server.resolver(), "dkim": signer, "sending_ips": (SENDING_IP,)}
    return SenderDomainPolicy(options(text), resources, clock=clock or FakeClock())


async def test_a_well_configured_domain_passes_and_is_then_free(server: DNSServer, signer: Signer) -> None:
    policy = make_policy(server, signer)
    verdict = await policy.check_message(txn())
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert verdict.evidence["items"] == {"spf": "pass", "dkim": "pass", "dmarc": "pass", "alignment": "pass"}
    asked = len(server.queries)
    assert asked > 0
    for _ in range(20):
        again = await policy.check_message(txn())
        assert again is not None and again.action is Action.ACCEPT
    assert len(server.queries) == asked  # cached: no DNS per message after the first


async def test_concurrent_messages_share_one_lookup(server: DNSServer, signer: Signer) -> None:
    policy = make_policy(server, signer)
    verdicts = await asyncio.gather(*(policy.check_message(txn()) for _ in range(10)))
    assert all(v is not None and v.action is Action.ACCEPT for v in verdicts)
    single = make_policy(server, signer)
    before = len(server.queries)
    await single.check_message(txn())
    one_run = len(server.queries) - before
    assert before == one_run  # the ten concurrent checks cost exactly one preflight


@pytest.mark.parametrize(
    ("zone_change", "fragment"),
    [
        (
            {("example.com", "TXT"): ['"v=spf1 ip4:198.51.100.1 -all"']},
            "fails SPF: SPF does not authorise 203.0.113.10",
        ),
        ({("_dmarc.example.com", "TXT"): None}, "fails DMARC: no DMARC record at _dmarc.example.com"),
        ({("s2026._domainkey.example.com", "TXT"): None}, "fails DKIM: s2026._domainkey.example.com: no DKIM key"),
    ],
)
async def test_a_failing_domain_is_refused_naming_the_item_and_the_fix(
    server: DNSServer, signer: Signer, zone_change: dict[tuple[str, str], list[str] | None], fragment: str
) -> None:
    for (name, rdtype), values in zone_change.items():
        if values is None:
            server.remove(name, rdtype)
        else:
            server.set(name, rdtype, values)
    verdict = await make_policy(server, signer).check_message(txn())
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert fragment in verdict.reply.text
    assert "fix: " in verdict.reply.text
    assert len(verdict.reply.text) <= 450


async def test_require_limits_what_counts(server: DNSServer, signer: Signer) -> None:
    server.remove("_dmarc.example.com", "TXT")
    verdict = await make_policy(server, signer, "require: [spf, dkim]").check_message(txn())
    assert verdict is not None and verdict.action is Action.ACCEPT


async def test_the_upstreams_selector_is_checked_when_sendguard_does_not_sign(
    server: DNSServer, signer: Signer
) -> None:
    server.set(
        "selector1._domainkey.example.com", "TXT", ['"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"']
    )
    with_selector = make_policy(server, None, "dkim_selectors: [selector1]")
    verdict = await with_selector.check_message(txn())
    assert verdict is not None and verdict.action is Action.ACCEPT, verdict
    without = await make_policy(server, None).check_message(txn())
    assert without is not None and without.action is Action.REJECT
    assert without.reply is not None and "sendguard has no DKIM key" in without.reply.text


async def test_a_failure_is_remembered_for_fail_ttl_then_rechecked(server: DNSServer, signer: Signer) -> None:
    clock = FakeClock()
    policy = make_policy(server, signer, "{fail_ttl: 5m, cache_ttl: 1h}", clock)
    server.remove("_dmarc.example.com", "TXT")
    first = await policy.check_message(txn())
    assert first is not None and first.action is Action.REJECT
    server.set("_dmarc.example.com", "TXT", ['"v=DMARC1; p=none"'])  # the operator fixes the DNS
    clock.now += 299
    still = await policy.check_message(txn())
    assert still is not None and still.action is Action.REJECT
    clock.now += 2
    fixed = await policy.check_message(txn())
    assert fixed is not None and fixed.action is Action.ACCEPT
    server.remove("_dmarc.example.com", "TXT")  # a pass is kept for cache_ttl
    clock.now += 3500
    kept = await policy.check_message(txn())
    assert kept is not None and kept.action is Action.ACCEPT


async def test_unreachable_dns_raises_for_on_error_and_is_not_cached(server: DNSServer, signer: Signer) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = build_resolver(ResolverConfig((f"127.0.0.1:{silent.getsockname()[1]}",), Duration(0.3)))
        policy = SenderDomainPolicy(options(), {"dns": resolver, "dkim": signer, "sending_ips": (SENDING_IP,)})
        with pytest.raises(PolicyError, match=r"DNS did not answer for example\.com"):
            await policy.check_message(txn())
        policy.resources = {"dns": server.resolver(), "dkim": signer, "sending_ips": (SENDING_IP,)}
        verdict = await policy.check_message(txn())  # nothing cached from the failure
        assert verdict is not None and verdict.action is Action.ACCEPT
    finally:
        silent.close()
    with pytest.raises(PolicyError, match="needs a DNS resolver"):
        await SenderDomainPolicy(options(), {}).check_message(txn())


async def test_envelope_domain_is_what_spf_checks(server: DNSServer, signer: Signer) -> None:
    server.set("bounce.example.com", "TXT", [f'"v=spf1 ip4:{SENDING_IP} -all"'])
    policy = make_policy(server, signer)
    verdict = await policy.check_message(txn(mail_from="b-123@bounce.example.com"))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert ("bounce.example.com", "TXT") in server.queries
    foreign = await make_policy(server, signer).check_message(txn(mail_from="x@unknown-esp.test"))
    assert foreign is not None and foreign.action is Action.REJECT
    assert foreign.reply is not None and "unknown-esp.test publishes no SPF record" in foreign.reply.text


async def test_in_the_pipeline_monitor_records_and_on_error_tempfails(server: DNSServer, signer: Signer) -> None:
    server.remove("_dmarc.example.com", "TXT")

    def entry(mode: str, on_error: str = "tempfail") -> PolicyEntry:
        return PolicyEntry(
            name="sender_domain", id="sender_domain", mode=mode, on_error=on_error,  # type: ignore[arg-type]
            classes=MESSAGE_CLASSES, timeout=Duration(5), options=options(), policy_class=SenderDomainPolicy,
        )  # fmt: skip

    resources = {"dns": server.resolver(), "dkim": signer, "sending_ips": (SENDING_IP,)}
    monitor = Pipeline((entry("monitor"),), resources)
    decision = await monitor.check_message(txn())
    assert decision.accepted
    assert decision.results[0].action is Action.REJECT and decision.results[0].mode == "monitor"
    enforce = Pipeline((entry("enforce"),), resources)
    refused = await enforce.check_message(txn())
    assert refused.action is Action.REJECT and refused.reply is not None and refused.reply.code == 550
    broken = Pipeline((entry("enforce"),), {})
    deferred = await broken.check_message(txn())
    assert deferred.action is Action.TEMPFAIL and deferred.reply is not None
    assert (deferred.reply.code, deferred.reply.status) == (451, "4.3.0")
    for pipeline in (monitor, enforce, broken):
        await pipeline.close()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("require: [spf, bimi]", "must be one of spf, dkim, dmarc, alignment"),
        ("require: []", "at least one"),
        ("upstream_ips: [mail.example.com]", "not an IP address"),
        ("cache_ttl: soon", "not a duration"),
    ],
)
def test_options_are_checked(text: str, error: str) -> None:
    converter = Converter("policy.yaml", {})
    node = yaml.compose(text)
    assert node is not None
    converter.dataclass(node, SenderDomainPolicy.Options, "policies[0]")
    assert any(error in str(issue) for issue in converter.issues), [str(i) for i in converter.issues]
