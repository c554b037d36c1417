"""Blocklist watch, SPF evaluation and the sender-domain preflight, against the loopback DNS
server only (tests/dnsserver.py) - never the Internet's DNS."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest
import yaml

from proxy.cli import dns as dns_cli
from proxy.reputation.blocklists import BlocklistWatcher, Listing, blocklist_query_name, interpret_blocklist_answer
from proxy.reputation.dkim import (
    DKIMConfig,
    DKIMKeyConfig,
    Signer,
    dns_txt_strings,
    generate_private_key,
    write_private_key,
)
from proxy.reputation.preflight import OrgDomains, preflight, render_report
from proxy.reputation.resolver import BlocklistConfig, BlocklistZone, DNSConfig, ResolverConfig, build_resolver
from proxy.reputation.spf import spf_check
from proxy.schema import Converter, Duration, compose
from tests.dnsserver import DNSServer, Zone


class FaultyDNSServer(DNSServer):
    """The test DNS server, answering SERVFAIL for names under the given suffixes."""

    def __init__(self, zone: Zone | None = None, servfail: tuple[str, ...] = ()) -> None:
        super().__init__(zone)
        self.servfail = servfail

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        name = query.question[0].name.to_text().lower().rstrip(".")
        if any(name == s or name.endswith("." + s) for s in self.servfail):
            self.queries.append((name, "SERVFAIL"))
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        return super().answer(wire)


@pytest.fixture
async def server() -> AsyncIterator[FaultyDNSServer]:
    dns_server = await FaultyDNSServer(servfail=("broken.test",)).start()
    yield dns_server
    await dns_server.stop()


@pytest.fixture
def silent_port() -> AsyncIterator[int]:
    """A UDP port on loopback where nothing ever answers: every lookup times out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def silent_resolver(port: int) -> object:
    return build_resolver(ResolverConfig((f"127.0.0.1:{port}",), Duration(0.3)))


# ---- blocklists ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "zone", "name"),
    [
        ("203.0.113.10", "zen.spamhaus.org", "10.113.0.203.zen.spamhaus.org"),
        ("::ffff:203.0.113.10", "zen.spamhaus.org", "10.113.0.203.zen.spamhaus.org"),
        (
            "2001:db8:1::25",
            "zen.spamhaus.org",
            "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.zen.spamhaus.org",  # 32 nibbles,
        ),
        ("Example.COM", "dbl.spamhaus.org.", "example.com.dbl.spamhaus.org"),
    ],
)
def test_query_names_follow_rfc_5782(target: str, zone: str, name: str) -> None:
    assert blocklist_query_name(target, zone) == name
    if ":" in target and "ffff" not in target:
        assert len(name.removesuffix(".zen.spamhaus.org").split(".")) == 32


@pytest.mark.parametrize(
    ("zone", "answers", "status", "meaning"),
    [
        ("bl.spamcop.net", [], "clean", ""),
        ("bl.spamcop.net", ["127.0.0.2"], "listed", "listed (code 127.0.0.2)"),
        ("zen.spamhaus.org", ["127.0.0.2", "127.0.0.10"], "listed", "SBL"),
        ("zen.spamhaus.org", ["127.0.0.10"], "listed", "PBL"),
        ("dbl.spamhaus.org", ["127.0.1.2"], "listed", "DBL: spam domain"),
        ("zen.spamhaus.org", ["127.255.255.254"], "refused", "public or open resolver"),
        ("zen.spamhaus.org", ["127.255.255.252"], "refused", "typing error"),
        ("dbl.spamhaus.org", ["127.0.1.255"], "refused", "IP address was asked"),
        ("multi.uribl.test", ["127.0.0.1"], "refused", "refused the query"),
        ("bl.spamcop.net", ["198.51.100.7"], "unknown", "rewrites NXDOMAIN"),
    ],
)
def test_answers_are_interpreted_not_just_counted(zone: str, answers: list[str], status: str, meaning: str) -> None:
    got_status, got_meaning = interpret_blocklist_answer(zone, answers)
    assert got_status == status
    assert meaning in got_meaning


WATCH_ZONES = (
    BlocklistZone("zen.test", "ip", ipv6=True, pause_commercial=True),
    BlocklistZone("bl.test", "ip"),
    BlocklistZone("dbl.test", "domain"),
)


async def test_watcher_reports_listings_pauses_and_clears(server: FaultyDNSServer) -> None:
    for zone in ("zen.test", "bl.test"):
        server.set(f"2.0.0.127.{zone}", "A", ["127.0.0.2"])  # RFC 5782 test entries
    server.set("10.113.0.203.zen.test", "A", ["127.0.0.2"])
    server.set("10.113.0.203.zen.test", "TXT", ['"Listed: see https://check.zen.test/203.0.113.10"'])
    server.set(blocklist_query_name("2001:db8::25", "zen.test"), "A", ["127.0.0.4"])
    server.set("example.com.dbl.test", "A", ["127.0.1.2"])
    changes: list[list[Listing]] = []
    watcher = BlocklistWatcher(
        BlocklistConfig(zones=WATCH_ZONES),
        server.resolver(),
        ips=["203.0.113.10", "198.51.100.20", "2001:db8::25"],
        domains=["example.com", "example.net"],
        on_change=changes.append,
    )
    snapshot = {(item.target, item.zone): item for item in await watcher.check_now()}
    assert snapshot[("203.0.113.10", "zen.test")].status == "listed"
    assert "check.zen.test" in snapshot[("203.0.113.10", "zen.test")].meaning  # the TXT reason
    assert snapshot[("2001:db8::25", "zen.test")].status == "listed"
    assert ("2001:db8::25", "bl.test") not in snapshot  # bl.test is IPv4-only: skipped, not "clean"
    assert snapshot[("198.51.100.20", "zen.test")].status == "clean"
    assert snapshot[("203.0.113.10", "bl.test")].status == "clean"
    assert snapshot[("example.com", "dbl.test")].status == "listed"
    assert snapshot[("example.net", "dbl.test")].status == "clean"
    assert watcher.gauges() == {("zen.test", "ip"): (2, 0), ("bl.test", "ip"): (0, 0), ("dbl.test", "domain"): (1, 0)}
    assert watcher.is_paused()
    reason = watcher.pause_reason()
    assert reason is not None and "zen.test" in reason
    assert len(changes) == 1

    await watcher.check_now()
    assert len(changes) == 1  # nothing changed, no callback

    server.remove("10.113.0.203.zen.test", "A")
    server.remove(blocklist_query_name("2001:db8::25", "zen.test"), "A")
    await watcher.check_now()
    assert len(changes) == 2
    assert not watcher.is_paused()  # dbl.test is listed but does not pause
    assert watcher.gauges()[("zen.test", "ip")] == (0, 0)
    assert watcher.gauges()[("dbl.test", "domain")] == (1, 0)


async def test_dns_trouble_is_unknown_never_clean(server: FaultyDNSServer, silent_port: int) -> None:
    server.set("2.0.0.127.refusing.test", "A", ["127.0.0.2"])
    server.set("10.113.0.203.refusing.test", "A", ["127.255.255.254"])
    zones = (
        BlocklistZone("zone.broken.test", "ip", self_test=False, pause_commercial=True),  # SERVFAIL
        BlocklistZone("refusing.test", "ip", pause_commercial=True),  # 127.255.255.254
        BlocklistZone("misnamed.test", "ip", pause_commercial=True),  # no RFC 5782 test entry
    )
    watcher = BlocklistWatcher(BlocklistConfig(zones=zones), server.resolver(), ips=["203.0.113.10"])
    results = {item.zone: item for item in await watcher.check_now()}
    assert results["zone.broken.test"].status == "unknown"
    assert "SERVFAIL" in results["zone.broken.test"].meaning
    assert results["refusing.test"].status == "refused"
    assert "public or open resolver" not in results["refusing.test"].meaning  # not a Spamhaus zone
    assert results["misnamed.test"].status == "unknown"
    assert "test entry 127.0.0.2" in results["misnamed.test"].meaning
    assert not watcher.is_paused()  # unknown must not stop mail
    assert all(unknown == 1 for _, unknown in watcher.gauges().values())

    timing_out = BlocklistWatcher(
        BlocklistConfig(zones=(BlocklistZone("zen.test", "ip"),)), silent_resolver(silent_port), ips=["203.0.113.10"]
    )
    (item,) = await timing_out.check_now()
    assert item.status == "unknown"
    assert "timed out" in item.meaning or "not answered" in item.meaning


async def test_watcher_task_starts_checks_and_stops(server: FaultyDNSServer) -> None:
    server.set("2.0.0.127.zen.test", "A", ["127.0.0.2"])
    watcher = BlocklistWatcher(BlocklistConfig(zones=WATCH_ZONES[:1]), server.resolver(), ips=["203.0.113.10"])
    watcher.start()
    watcher.start()  # idempotent
    for _ in range(200):
        if watcher.last_check is not None:
            break
        await asyncio.sleep(0.01)
    assert watcher.last_check is not None
    assert ("10.113.0.203.zen.test", "A") in server.queries
    await watcher.stop()
    assert watcher._task is None
    empty = BlocklistWatcher(BlocklistConfig(), server.resolver())
    empty.start()  # nothing configured: no task, nothing queried
    assert empty._task is None
    disabled = BlocklistWatcher(BlocklistConfig(enabled=False), server.resolver(), ips=["203.0.113.10"])
    disabled.start()
    assert disabled._task is None


def test_watcher_from_config_watches_sending_and_dkim_domains() -> None:
    config = DNSConfig(sending_ips=("203.0.113.10", "203.0.113.10"), sending_domains=("example.com",))
    watcher = BlocklistWatcher.from_config(
        config, build_resolver(ResolverConfig(("127.0.0.1",))), dkim_domains=["example.com", "news.example.com"]
    )
    assert watcher.ips == ["203.0.113.10"]
    assert watcher.domains == ["example.com", "news.example.com"]
    assert set(watcher.gauges()) == {(zone.zone, zone.kind) for zone in config.blocklists.zones}


def test_blocklist_and_dns_config_from_yaml() -> None:
    text = """
resolver: {nameservers: ["127.0.0.1:5353", "[::1]:53", "10.0.0.53"], timeout: 2s}
sending_ips: [203.0.113.10, "2001:db8::25"]
sending_domains: [Example.com]
blocklists:
  interval: 15m
  zones:
    - {zone: zen.spamhaus.org, type: ip, ipv6: true, pause_commercial: true}
    - {zone: dbl.spamhaus.org, type: domain}
"""
    node = compose(text, "x.yaml")
    assert node is not None
    converter = Converter("x.yaml")
    config = converter.convert(node, DNSConfig, "dns")
    assert converter.issues == []
    assert config.sending_domains == ("example.com",)
    assert config.blocklists.interval == 900
    assert config.blocklists.zones[1].kind == "domain"
    resolver = build_resolver(config.resolver)
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [  # type: ignore[union-attr]
        ("127.0.0.1", 5353),
        ("::1", 53),
        ("10.0.0.53", 53),
    ]
    for bad, error in [
        ("sending_ips: [not-an-ip]", "not an IP address"),
        ("resolver: {nameservers: [dns.example]}", "not an IP address"),
        ("blocklists: {interval: 10s}", "at least 1m"),
        ("blocklists: {zones: [{zone: a.test, type: url}]}", "must be one of ip, domain"),
    ]:
        node = compose(bad, "x.yaml")
        assert node is not None
        converter = Converter("x.yaml")
        converter.convert(node, DNSConfig, "dns")
        assert any(error in str(issue) for issue in converter.issues), (bad, converter.issues)


# ---- SPF ------------------------------------------------------------------------------------------

SPF_ZONE: Zone = {
    ("plain.test", "TXT"): ['"v=spf1 ip4:203.0.113.0/28 ip6:2001:db8:25::/48 -all"'],
    ("soft.test", "TXT"): ['"v=spf1 ip4:198.51.100.1 ~all"'],
    ("neutral.test", "TXT"): ['"v=spf1 ?all"'],
    ("inc.test", "TXT"): ['"v=spf1 include:_spf.upstream.test -all"'],
    ("_spf.upstream.test", "TXT"): ['"v=spf1 ip4:192.0.2.0/24 ~all"'],
    ("badinc.test", "TXT"): ['"v=spf1 include:nothing.test -all"'],
    ("redir.test", "TXT"): ['"v=spf1 redirect=_spf.upstream.test"'],
    ("badredir.test", "TXT"): ['"v=spf1 redirect=nothing.test"'],
    ("a.test", "TXT"): ['"v=spf1 a a:mail.a.test/30 -all"'],
    ("a.test", "A"): ["198.51.100.5"],
    ("mail.a.test", "A"): ["198.51.100.8"],
    ("mx.test", "TXT"): ['"v=spf1 mx/24 -all"'],
    ("mx.test", "MX"): ["10 mx1.mx.test."],
    ("mx1.mx.test", "A"): ["198.51.100.77"],
    ("two.test", "TXT"): ['"v=spf1 -all"', '"v=spf1 +all"'],
    ("split.test", "TXT"): ['"v=spf1 ip4:203.0.113.10" " -all"'],
    ("exists.test", "TXT"): ['"v=spf1 exists:%{ir}.%{v}.allow.exists.test -all"'],
    ("10.113.0.203.in-addr.allow.exists.test", "A"): ["127.0.0.2"],
    ("macro.test", "TXT"): ['"v=spf1 include:%{d1}.upstream.test -all"'],
    ("test.upstream.test", "TXT"): ['"v=spf1 ip4:203.0.113.10 -all"'],
    ("syntax.test", "TXT"): ['"v=spf1 ipv4:203.0.113.10 -all"'],
    ("ptr.test", "TXT"): ['"v=spf1 ptr -all"'],
    ("loop.test", "TXT"): ['"v=spf1 include:loop.test -all"'],
    ("void.test", "TXT"): ['"v=spf1 a:n1.test a:n2.test a:n3.test ip4:203.0.113.10 -all"'],
    ("servfail.test", "TXT"): ['"v=spf1 include:x.broken.test -all"'],
    ("other.test", "TXT"): ['"google-site-verification=abc"'],
    **{
        (f"many{i}.test", "TXT"): [f'"v=spf1 include:many{i + 1}.test -all"' if i < 11 else '"v=spf1 -all"']
        for i in range(12)
    },
}


@pytest.mark.parametrize(
    ("ip", "domain", "result", "reason"),
    [
        ("203.0.113.10", "plain.test", "pass", "ip4:203.0.113.0/28"),
        ("2001:db8:25::1", "plain.test", "pass", "ip6"),
        ("::ffff:203.0.113.10", "plain.test", "pass", ""),  # IPv4-mapped evaluated as IPv4
        ("203.0.113.99", "plain.test", "fail", "all"),
        ("203.0.113.10", "soft.test", "softfail", ""),
        ("203.0.113.10", "neutral.test", "neutral", ""),
        ("192.0.2.55", "inc.test", "pass", "_spf.upstream.test"),
        ("203.0.113.10", "inc.test", "fail", ""),  # include's ~all is no match; the outer -all fails
        ("203.0.113.10", "badinc.test", "permerror", "include:nothing.test"),
        ("192.0.2.55", "redir.test", "pass", ""),
        ("203.0.113.10", "redir.test", "softfail", ""),
        ("203.0.113.10", "badredir.test", "permerror", "redirect=nothing.test"),
        ("198.51.100.5", "a.test", "pass", ""),
        ("198.51.100.9", "a.test", "pass", "mail.a.test/30"),
        ("198.51.100.12", "a.test", "fail", ""),
        ("198.51.100.200", "mx.test", "pass", "mx/24"),
        ("203.0.113.10", "two.test", "permerror", "2 SPF records"),
        ("203.0.113.10", "split.test", "pass", ""),  # strings of one record are concatenated
        ("203.0.113.10", "exists.test", "pass", "exists"),
        ("203.0.113.11", "exists.test", "fail", ""),
        ("203.0.113.10", "macro.test", "pass", ""),
        ("203.0.113.10", "syntax.test", "permerror", "ipv4"),
        ("203.0.113.10", "ptr.test", "fail", ""),
        ("203.0.113.10", "loop.test", "permerror", "more than 10"),
        ("203.0.113.10", "many0.test", "permerror", "more than 10"),
        ("203.0.113.10", "many2.test", "fail", ""),  # 9 includes: within the limit
        ("203.0.113.10", "void.test", "permerror", "found nothing"),
        ("203.0.113.10", "servfail.test", "temperror", "SERVFAIL"),
        ("203.0.113.10", "nothing.test", "none", ""),
        ("203.0.113.10", "other.test", "none", ""),
    ],
)
async def test_spf_check_host(server: FaultyDNSServer, ip: str, domain: str, result: str, reason: str) -> None:
    for (name, rdtype), values in SPF_ZONE.items():
        server.set(name, rdtype, values)
    got = await spf_check(server.resolver(), ip, domain)
    assert got.result == result, got
    assert reason in got.reason
    assert got.lookups <= 11


# ---- the preflight ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    directory = tmp_path_factory.mktemp("keys")
    write_private_key(directory / "rsa.pem", generate_private_key("rsa-sha256"))
    write_private_key(directory / "ed.pem", generate_private_key("ed25519-sha256"))
    write_private_key(directory / "other.pem", generate_private_key("rsa-sha256"))
    return Signer.from_config(
        DKIMConfig(
            keys=(
                DKIMKeyConfig("example.com", "s2026", str(directory / "rsa.pem"), subdomains=True),
                DKIMKeyConfig("example.com", "ed2026", str(directory / "ed.pem"), "ed25519-sha256"),
                DKIMKeyConfig("other.test", "o1", str(directory / "other.pem")),
            )
        )
    )


def txt(value: str) -> list[str]:
    return [" ".join(f'"{part}"' for part in dns_txt_strings(value))]


def publish_good_domain(server: DNSServer, signer: Signer) -> None:
    server.set("example.com", "TXT", ['"v=spf1 ip4:203.0.113.0/28 include:_spf.upstream.test -all"'])
    server.set("_spf.upstream.test", "TXT", ['"v=spf1 ip6:2001:db8:25::/48 ~all"'])
    server.set("_dmarc.example.com", "TXT", ['"v=DMARC1; p=reject; rua=mailto:d@example.com"'])
    for key in signer.keys:
        server.set(key.config.record_name, "TXT", txt(key.dns_record()))


SENDING_IPS = ("203.0.113.10", "2001:db8:25::7")


async def test_preflight_passes_a_well_configured_domain(server: FaultyDNSServer, signer: Signer) -> None:
    publish_good_domain(server, signer)
    report = await preflight(
        server.resolver(), "example.com", sending_ips=SENDING_IPS, dkim_keys=signer.expectations_for("example.com")
    )
    assert {item.name: item.status for item in report.items} == {
        "spf": "pass",
        "dkim": "pass",
        "dmarc": "pass",
        "alignment": "pass",
    }
    assert report.ok()
    assert "1 of 10 DNS lookups" in report.item("spf").summary  # one include: one lookup
    text = render_report(report)
    assert text.splitlines()[-1] == "result: PASS"
    assert "record: v=DMARC1; p=reject" in text


async def test_subdomain_uses_the_organisational_dmarc_and_relaxed_alignment(
    server: FaultyDNSServer, signer: Signer
) -> None:
    publish_good_domain(server, signer)
    server.set("_dmarc.example.com", "TXT", ['"v=DMARC1; p=none; sp=quarantine"'])
    server.set("news.example.com", "TXT", ['"v=spf1 ip4:203.0.113.10 -all"'])
    report = await preflight(
        server.resolver(),
        "news.example.com",
        sending_ips=SENDING_IPS[:1],
        dkim_keys=signer.expectations_for("news.example.com"),
    )
    assert report.item("dmarc").status == "pass"
    assert "sp=quarantine" in report.item("dmarc").summary and "organisational" in report.item("dmarc").summary
    assert report.item("alignment").status == "pass"
    assert "DKIM d=example.com (relaxed)" in report.item("alignment").summary
    # adkim=s: the parent's d= no longer aligns; the envelope's SPF still does (strict aspf not set).
    server.set("_dmarc.example.com", "TXT", ['"v=DMARC1; p=none; adkim=s"'])
    strict = await preflight(
        server.resolver(), "news.example.com", sending_ips=SENDING_IPS[:1],
        dkim_keys=signer.expectations_for("news.example.com"),
    )  # fmt: skip
    assert strict.item("alignment").status == "pass"
    assert (
        "DKIM" not in strict.item("alignment").summary
        and "SPF domain news.example.com" in strict.item("alignment").summary
    )
    bounce = await preflight(
        server.resolver(), "news.example.com", envelope_domain="bounces.esp.test", sending_ips=SENDING_IPS[:1],
        dkim_keys=signer.expectations_for("news.example.com"),
    )  # fmt: skip
    assert bounce.item("alignment").status == "fail"
    assert "not strict-aligned" in bounce.item("alignment").summary


@pytest.mark.parametrize(
    ("change", "item", "summary", "fix"),
    [
        ({("example.com", "TXT"): None}, "spf", "publishes no SPF record", "ip4:203.0.113.10 ip6:2001:db8:25::7 -all"),
        ({("example.com", "TXT"): ['"v=spf1 +all"']}, "spf", "authorises any address", "-all"),
        (
            {("example.com", "TXT"): ['"v=spf1 ip4:203.0.113.10 ~all"']},
            "spf",
            "2001:db8:25::7 (softfail)",
            "ip6:2001:db8:25::7",
        ),
        (
            {("s2026._domainkey.example.com", "TXT"): None},
            "dkim",
            "s2026._domainkey.example.com: no DKIM key",
            "v=DKIM1; k=rsa; p=MII",
        ),
        ({("s2026._domainkey.example.com", "TXT"): ['"v=DKIM1; k=rsa; p="']}, "dkim", "revoked", ""),
        (
            {("ed2026._domainkey.example.com", "TXT"): ['"v=DKIM1; k=rsa; p=MIIBIjANBg"']},
            "dkim",
            "k=rsa, but sendguard signs with ed25519",
            "k=ed25519",
        ),
        ({("s2026._domainkey.example.com", "TXT"): "other"}, "dkim", "not the key sendguard signs with", "publish"),
        ({("_dmarc.example.com", "TXT"): None}, "dmarc", "no DMARC record at _dmarc.example.com", "v=DMARC1; p=none"),
        ({("_dmarc.example.com", "TXT"): ['"v=DMARC1; rua=mailto:x@example.com"']}, "dmarc", "p= is missing", "p=none"),
        (
            {("_dmarc.example.com", "TXT"): ['"v=DMARC1; p=none"', '"v=DMARC1; p=reject"']},
            "dmarc",
            "2 DMARC records",
            "keep one",
        ),
    ],
)
async def test_preflight_names_what_fails_and_how_to_fix_it(
    server: FaultyDNSServer, signer: Signer, change: dict[tuple[str, str], object], item: str, summary: str, fix: str
) -> None:
    publish_good_domain(server, signer)
    for (name, rdtype), values in change.items():
        if values is None:
            server.remove(name, rdtype)
        elif values == "other":  # the other domain's key, published under this selector
            server.set(name, rdtype, txt(signer.keys[2].dns_record()))
        else:
            server.set(name, rdtype, values)  # type: ignore[arg-type]
    report = await preflight(
        server.resolver(), "example.com", sending_ips=SENDING_IPS, dkim_keys=signer.expectations_for("example.com")
    )
    checked = report.item(item)
    assert checked.status == "fail", report
    assert summary in checked.summary
    assert fix in checked.fix
    assert not report.ok()
    assert item in [i.name for i in report.failed()]
    assert render_report(report).splitlines()[-1].startswith("result: FAIL")


async def test_alignment_fails_without_aligned_dkim_or_spf(server: FaultyDNSServer, signer: Signer) -> None:
    server.set("shop.test", "TXT", ['"v=spf1 ip4:198.51.100.1 -all"'])
    server.set("_dmarc.shop.test", "TXT", ['"v=DMARC1; p=none"'])
    report = await preflight(server.resolver(), "shop.test", sending_ips=SENDING_IPS[:1])
    assert report.item("dkim").status == "fail" and "no DKIM key for shop.test" in report.item("dkim").summary
    assert report.item("alignment").status == "fail"
    assert "sign with a key for shop.test" in report.item("alignment").fix


async def test_unreachable_dns_is_unknown_not_fail(silent_port: int, signer: Signer) -> None:
    report = await preflight(
        silent_resolver(silent_port),  # type: ignore[arg-type]
        "example.com",
        sending_ips=SENDING_IPS,
        dkim_keys=signer.expectations_for("example.com"),
    )
    assert {item.status for item in report.items} == {"unknown"}
    assert report.failed() == [] and not report.ok()
    assert "UNKNOWN" in render_report(report)


@pytest.mark.parametrize(
    ("domain", "organisational"),
    [
        ("example.com", "example.com"),
        ("mail.news.example.com", "example.com"),
        ("shop.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("a.b.example.com.au", "example.com.au"),
        ("x.example.co.example", "co.example"),  # unknown suffix: the documented limit
    ],
)
def test_organisational_domain(domain: str, organisational: str) -> None:
    assert OrgDomains().of(domain) == organisational
    assert OrgDomains(["co.example"]).of("x.example.co.example") == "example.co.example"


# ---- sendguard domain check ----------------------------------------------------------------------------


async def test_domain_check_cli_reads_the_config_and_exits_by_result(
    server: FaultyDNSServer, signer: Signer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_good_domain(server, signer)
    config = tmp_path / "sendguard.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listeners": [{"name": "local", "address": "127.0.0.1:2525"}],
                "dkim": {
                    "keys": [
                        {
                            "domain": k.config.domain,
                            "selector": k.config.selector,
                            "key_file": k.config.key_file,
                            "algorithm": k.config.algorithm,
                        }
                        for k in signer.keys
                    ]
                },
                "dns": {"resolver": {"nameservers": [f"127.0.0.1:{server.port}"]}, "sending_ips": list(SENDING_IPS)},
            }
        )
    )
    code = await asyncio.to_thread(dns_cli.main, ["domain", "check", "example.com", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[-1] == "result: PASS"
    assert "PASS    dkim       s2026._domainkey.example.com: published and matching" in out

    server.remove("_dmarc.example.com", "TXT")
    code = await asyncio.to_thread(dns_cli.main, ["domain", "check", "example.com", "--config", str(config), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["ok"] is False
    dmarc = next(item for item in report["items"] if item["item"] == "dmarc")
    assert dmarc["status"] == "fail" and "v=DMARC1" in dmarc["fix"]


async def test_domain_check_cli_without_config(
    server: FaultyDNSServer, signer: Signer, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_good_domain(server, signer)
    base = ["domain", "check", "example.com", "--nameserver", f"127.0.0.1:{server.port}"]
    # Only a selector: checks that a key is published there, whatever it is.
    code = await asyncio.to_thread(dns_cli.main, [*base, "--ip", "203.0.113.10", "--selector", "s2026"])
    out = capsys.readouterr().out
    assert code == 0, out
    # With the key file, the published key must be that key.
    other = signer.keys[2].config.key_file
    code = await asyncio.to_thread(
        dns_cli.main, [*base, "--ip", "203.0.113.10", "--selector", "s2026", "--key-file", other]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "not the key sendguard signs with" in out
    # No IP given: SPF is only validated, which warns; no DKIM selector: DKIM fails.
    code = await asyncio.to_thread(dns_cli.main, base)
    out = capsys.readouterr().out
    assert code == 1
    assert "WARN    spf" in out and "coverage not checked" in out
    assert await asyncio.to_thread(dns_cli.main, [*base, "--ip", "not-an-ip"]) == 2
