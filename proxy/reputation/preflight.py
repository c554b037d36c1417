"""Sender-domain preflight: SPF, DKIM, DMARC and alignment of sendguard's own sending
identity, and the report of it.

**Sender-domain preflight** (``preflight``), what Gmail, Yahoo and Outlook.com require of
bulk senders, checked before sending instead of learnt from 4.7.30/4.7.32 deferrals:

* SPF (RFC 7208): exactly one ``v=spf1`` record; each configured sending IP evaluates to
  ``pass`` (ip4, ip6, a, mx, include, redirect, exists and macros are evaluated; ptr is
  counted but never matches, RFC 7208 5.5 deprecates it); at most 10 DNS-querying terms
  and 2 void lookups (4.6.4). The record is also probed with TEST-NET addresses (RFC
  5737/3849): a record that passes those (``+all``) authorises the whole Internet;
* DKIM: every key sendguard signs with for the domain is published at
  ``selector._domainkey.d`` and *is the same key* (the public half of the configured file);
* DMARC (RFC 7489 6.6.3): a ``v=DMARC1`` record with a valid ``p=`` at ``_dmarc.DOMAIN``,
  or at the organisational domain;
* alignment (RFC 7489 3.1): the From domain aligns with a published DKIM ``d=`` or with the
  SPF-authenticated envelope domain, relaxed or strict as the DMARC record says.

The organisational domain is found without the Public Suffix List: the last two labels,
or three when the last two are a known multi-label public suffix (a built-in subset of
the PSL's ICANN section, plus ``public_suffixes`` from the config). Its limit: names under
*private* suffixes (``github.io``) or unknown multi-label ones get an organisational
domain one label too short, which can only make relaxed alignment look more lenient for
such names.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.reputation.dkim import KeyExpectation, public_key_record
from proxy.reputation.resolver import DNSFailure, txt_records
from proxy.reputation.spf import SPF_LOOKUP_LIMIT, spf_check

__all__ = (
    "CheckItem",
    "DomainReport",
    "OrgDomains",
    "preflight",
    "render_report",
)

# ---- organisational domain ------------------------------------------------------------------

#: Multi-label public suffixes from the ICANN section of the Public Suffix List (a subset).
_PSL_SUBSET = """
    co.uk org.uk me.uk ltd.uk plc.uk net.uk ac.uk gov.uk sch.uk nhs.uk police.uk
    com.au net.au org.au edu.au gov.au asn.au id.au co.nz net.nz org.nz govt.nz ac.nz school.nz
    co.jp ne.jp or.jp ac.jp go.jp ad.jp ed.jp gr.jp lg.jp co.kr or.kr ne.kr re.kr go.kr ac.kr
    com.cn net.cn org.cn gov.cn edu.cn com.hk org.hk net.hk edu.hk gov.hk com.tw org.tw net.tw idv.tw
    com.sg org.sg net.sg edu.sg gov.sg com.my org.my net.my co.id or.id web.id ac.id go.id
    co.th in.th ac.th go.th or.th com.ph org.ph net.ph com.vn net.vn org.vn com.pk org.pk net.pk
    co.in net.in org.in firm.in gen.in ind.in ac.in gov.in co.il org.il net.il ac.il gov.il
    com.tr org.tr net.tr gen.tr co.za org.za net.za web.za gov.za ac.za
    com.br net.br org.br gov.br edu.br art.br com.mx org.mx net.mx gob.mx edu.mx
    com.ar org.ar net.ar gob.ar com.co org.co net.co gov.co com.pe org.pe com.ve co.ve com.ec com.uy com.py
    com.ua org.ua net.ua kiev.ua com.pl net.pl org.pl com.pt org.pt com.gr org.gr co.at or.at ac.at gv.at
    com.es org.es nom.es edu.es gob.es com.mt org.mt com.cy com.ro org.ro co.hu com.eg com.sa com.ng com.gh
    co.ke or.ke co.tz co.ug com.qa com.kw com.bh com.lb co.ma
"""
MULTI_LABEL_SUFFIXES: frozenset[str] = frozenset(_PSL_SUBSET.split())


class OrgDomains:
    """The organisational domain of a name (RFC 7489 3.2) by the simple rule above."""

    def __init__(self, extra_suffixes: Iterable[str] = ()) -> None:
        self.suffixes = MULTI_LABEL_SUFFIXES | {s.strip(".").lower() for s in extra_suffixes}

    def of(self, domain: str) -> str:
        labels = domain.strip(".").lower().split(".")
        if len(labels) <= 2:
            return ".".join(labels)
        # The longest known suffix wins, then one label more (RFC 7489 3.2 step 3).
        for size in range(len(labels) - 1, 1, -1):
            if ".".join(labels[-size:]) in self.suffixes:
                return ".".join(labels[-size - 1 :])
        return ".".join(labels[-2:])

    def aligned(self, one: str, other: str, mode: str) -> bool:
        """RFC 7489 3.1: strict = identical names; relaxed = same organisational domain."""
        one, other = one.strip(".").lower(), other.strip(".").lower()
        if mode == "s":
            return one == other
        return self.of(one) == self.of(other)


# ---- the preflight --------------------------------------------------------------------------

ItemStatus = Literal["pass", "fail", "warn", "unknown"]
ITEMS: tuple[str, ...] = ("spf", "dkim", "dmarc", "alignment")
#: TEST-NET addresses (RFC 5737, RFC 3849) that no SPF record should authorise.
PROBE_IPS = ("192.0.2.1", "2001:db8::1")


@dataclass(frozen=True)
class CheckItem:
    name: str
    status: ItemStatus
    summary: str
    records: tuple[str, ...] = ()
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item": self.name, "status": self.status, "summary": self.summary}
        if self.records:
            out["records"] = list(self.records)
        if self.fix:
            out["fix"] = self.fix
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class DomainReport:
    domain: str
    envelope_domain: str
    items: tuple[CheckItem, ...]
    checked_at: float

    def item(self, name: str) -> CheckItem:
        return next(i for i in self.items if i.name == name)

    def failed(self, required: Iterable[str] = ITEMS) -> list[CheckItem]:
        wanted = set(required)
        return [i for i in self.items if i.name in wanted and i.status == "fail"]

    def unknown(self, required: Iterable[str] = ITEMS) -> list[CheckItem]:
        wanted = set(required)
        return [i for i in self.items if i.name in wanted and i.status == "unknown"]

    def ok(self, required: Iterable[str] = ITEMS) -> bool:
        required = tuple(required)
        return not self.failed(required) and not self.unknown(required)

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "envelope_domain": self.envelope_domain,
            "ok": self.ok(),
            "items": [i.as_dict() for i in self.items],
        }


def _tags(record: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 3.2, RFC 7489 6.4); later duplicates are ignored."""
    out: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            out.setdefault(name.strip().lower(), value.strip())
    return out


async def _spf_item(
    resolver: dns.asyncresolver.Resolver, domain: str, sending_ips: Sequence[str]
) -> tuple[CheckItem, bool]:
    """The SPF item and whether SPF passes for every sending IP (for alignment)."""
    try:
        records = await txt_records(resolver, domain)
    except DNSFailure as exc:
        return CheckItem("spf", "unknown", f"SPF lookup failed: {exc}"), False
    except ValueError as exc:
        return CheckItem("spf", "fail", str(exc)), False
    spf = [r for r in records or () if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")]
    if not spf:
        return CheckItem(
            "spf",
            "fail",
            f"{domain} publishes no SPF record (v=spf1)",
            fix=f'publish a TXT record at {domain}: "v=spf1 {_spf_terms_for(sending_ips)} -all"',
        ), False
    if len(spf) > 1:
        return CheckItem(
            "spf",
            "fail",
            f"{domain} publishes {len(spf)} SPF records; receivers treat that as an error (RFC 7208 4.5)",
            tuple(spf),
            fix="merge them into one v=spf1 record",
        ), False
    record = spf[0]
    # The IPv6 probe only where IPv6 is sent from: an IPv4-only record may run out of void
    # lookups on AAAA queries, which no receiver of IPv4 mail would ever make.
    families = {ipaddress.ip_address(ip).version for ip in sending_ips} | {4}
    probe_ips = [probe for probe in PROBE_IPS if ipaddress.ip_address(probe).version in families]
    probes = await asyncio.gather(*(spf_check(resolver, probe, domain) for probe in probe_ips))
    results = await asyncio.gather(*(spf_check(resolver, ip, domain) for ip in sending_ips))
    lookups = max([r.lookups for r in (*probes, *results)], default=0)
    details: dict[str, Any] = {
        "lookups": lookups,
        "results": {ip: r.result for ip, r in zip(sending_ips, results, strict=True)},
    }
    for result in (*probes, *results):
        if result.result == "temperror":
            return CheckItem("spf", "unknown", f"SPF evaluation hit a DNS failure: {result.reason}", (record,)), False
        if result.result == "permerror":
            return CheckItem(
                "spf",
                "fail",
                f"the SPF record is broken: {result.reason}",
                (record,),
                fix="fix the record; flatten includes if it needs more than 10 DNS lookups",
                details=details,
            ), False
    if any(p.result == "pass" for p in probes):
        return CheckItem(
            "spf",
            "fail",
            "the SPF record authorises any address (TEST-NET addresses pass, e.g. +all)",
            (record,),
            fix="list only your senders and end the record with -all or ~all",
            details=details,
        ), False
    if not sending_ips:
        return CheckItem(
            "spf",
            "warn",
            f"SPF record present and valid ({lookups} of {SPF_LOOKUP_LIMIT} DNS lookups); coverage not checked",
            (record,),
            fix="list the upstream's public sending IPs in dns.sending_ips (or --ip) to check coverage",
            details=details,
        ), False
    uncovered = [ip for ip, result in zip(sending_ips, results, strict=True) if result.result != "pass"]
    if uncovered:
        return CheckItem(
            "spf",
            "fail",
            "SPF does not authorise "
            + ", ".join(f"{ip} ({r.result})" for ip, r in zip(sending_ips, results, strict=True) if ip in uncovered),
            (record,),
            fix=f"add {_spf_terms_for(uncovered)} (or the upstream's include:) to the record",
            details=details,
        ), False
    return CheckItem(
        "spf",
        "pass",
        f"SPF passes for {', '.join(sending_ips)} ({lookups} of {SPF_LOOKUP_LIMIT} DNS lookups)",
        (record,),
        details=details,
    ), True


def _spf_terms_for(ips: Sequence[str]) -> str:
    terms = [f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips]
    return " ".join(terms) if terms else "ip4:YOUR.SENDING.IP"


def _same_public_key(published: str, expected: str, key_type: str) -> bool:
    try:
        got = base64.b64decode(re.sub(r"\s+", "", published), validate=True)
        want = base64.b64decode(expected, validate=True)
    except ValueError:
        return False
    if key_type == "ed25519":
        return got == want
    try:
        got_key = serialization.load_der_public_key(got)
        want_key = serialization.load_der_public_key(want)
    except ValueError:
        return False
    if not isinstance(got_key, rsa.RSAPublicKey) or not isinstance(want_key, rsa.RSAPublicKey):
        return False
    return got_key.public_numbers() == want_key.public_numbers()


async def _dkim_one(resolver: dns.asyncresolver.Resolver, key: KeyExpectation) -> tuple[ItemStatus, str, str, str]:
    """(status, what was seen, the record, how to fix) for one expected key."""
    name = key.record_name
    wanted = public_key_record(key.key_type, key.public_key) if key.public_key else None
    publish = f'publish a TXT record at {name}: "{wanted}"' if wanted else f"publish the selector's key at {name}"
    try:
        records = await txt_records(resolver, name)
    except DNSFailure as exc:
        return "unknown", f"{name}: lookup failed: {exc}", "", ""
    except ValueError as exc:
        return "fail", str(exc), "", ""
    keys = [r for r in records or () if "p=" in r.replace(" ", "")]
    if not keys:
        return "fail", f"{name}: no DKIM key record", "", publish
    if len(keys) > 1:
        return "fail", f"{name}: {len(keys)} key records; verifiers may pick any", " | ".join(keys), "keep one"
    record = keys[0]
    tags = _tags(record)
    if "v" in tags and tags["v"] != "DKIM1":
        return "fail", f"{name}: v={tags['v']} (must be DKIM1)", record, publish
    published_type = tags.get("k", "rsa").lower()
    public = re.sub(r"\s+", "", tags.get("p", ""))
    if not public:
        return "fail", f"{name}: the key is revoked (empty p=)", record, publish
    if key.public_key is not None and published_type != key.key_type:
        return "fail", f"{name}: k={published_type}, but sendguard signs with {key.key_type}", record, publish
    if "h" in tags and "sha256" not in [h.strip().lower() for h in tags["h"].split(":")]:
        return "fail", f"{name}: h={tags['h']} excludes sha256", record, publish
    if "s" in tags and not {"*", "email"} & {s.strip().lower() for s in tags["s"].split(":")}:
        return "fail", f"{name}: s={tags['s']} excludes email", record, publish
    if key.public_key is not None and not _same_public_key(public, key.public_key, key.key_type):
        return "fail", f"{name}: the published key is not the key sendguard signs with", record, publish
    flags = {f.strip().lower() for f in tags.get("t", "").split(":")}
    if "y" in flags:
        return "warn", f"{name}: published in test mode (t=y); receivers may ignore the signature", record, ""
    return "pass", f"{name}: published and matching", record, ""


async def _dkim_item(
    resolver: dns.asyncresolver.Resolver, domain: str, keys: Sequence[KeyExpectation]
) -> tuple[CheckItem, list[str]]:
    """The DKIM item and the d= domains whose keys verify (for alignment)."""
    if not keys:
        return CheckItem(
            "dkim",
            "fail",
            f"sendguard has no DKIM key for {domain} and no selector to check was given",
            fix=f"create one (sendguard dkim keygen {domain} SELECTOR) and add it under dkim.keys, "
            "or name the selector your upstream signs with",
        ), []
    results = await asyncio.gather(*(_dkim_one(resolver, key) for key in keys))
    statuses = [status for status, _, _, _ in results]
    good = [key.domain for key, (status, *_) in zip(keys, results, strict=True) if status in ("pass", "warn")]
    status: ItemStatus
    if "fail" in statuses:
        status = "fail"
    elif "unknown" in statuses:
        status = "unknown"
    elif "warn" in statuses:
        status = "warn"
    else:
        status = "pass"
    summary = "; ".join(seen for _, seen, _, _ in results)
    records = tuple(record for _, _, record, _ in results if record)
    fix = "; ".join(fix for s, _, _, fix in results if fix and s == "fail")
    return CheckItem("dkim", status, summary, records, fix), good


async def _dmarc_item(
    resolver: dns.asyncresolver.Resolver, domain: str, org: OrgDomains
) -> tuple[CheckItem, dict[str, str]]:
    """The DMARC item and the policy's tags (adkim/aspf for alignment)."""
    organisational = org.of(domain)
    candidates = [domain] if organisational == domain else [domain, organisational]
    for index, name in enumerate(candidates):
        try:
            records = await txt_records(resolver, f"_dmarc.{name}")
        except DNSFailure as exc:
            return CheckItem("dmarc", "unknown", f"_dmarc.{name}: lookup failed: {exc}"), {}
        except ValueError as exc:
            return CheckItem("dmarc", "fail", str(exc)), {}
        dmarc = [r for r in records or () if re.match(r"^\s*v\s*=\s*DMARC1\s*(;|$)", r)]
        if not dmarc:
            continue
        if len(dmarc) > 1:
            return CheckItem(
                "dmarc",
                "fail",
                f"_dmarc.{name} has {len(dmarc)} DMARC records, so receivers apply none (RFC 7489 6.6.3)",
                tuple(dmarc),
                fix="keep one",
            ), {}
        tags = _tags(dmarc[0])
        policy_tag = "sp" if index > 0 and "sp" in tags else "p"
        policy = tags.get(policy_tag, "").lower()
        if policy not in ("none", "quarantine", "reject"):
            return CheckItem(
                "dmarc",
                "fail",
                f"_dmarc.{name}: {policy_tag}= is {'missing' if not policy else repr(policy)}",
                (dmarc[0],),
                fix="write p=none (monitor), p=quarantine or p=reject",
            ), {}
        where = "" if index == 0 else f" (from the organisational domain {name})"
        return CheckItem("dmarc", "pass", f"DMARC policy {policy_tag}={policy}{where}", (dmarc[0],)), tags
    return CheckItem(
        "dmarc",
        "fail",
        f"no DMARC record at _dmarc.{domain}" + (f" nor at _dmarc.{organisational}" if len(candidates) > 1 else ""),
        fix=f'publish a TXT record at _dmarc.{organisational}: "v=DMARC1; p=none; rua=mailto:dmarc@{organisational}"',
    ), {}


def _alignment_item(
    domain: str,
    envelope_domain: str,
    dkim_domains: Sequence[str],
    spf_covered: bool,
    dmarc_tags: dict[str, str],
    org: OrgDomains,
) -> CheckItem:
    adkim = dmarc_tags.get("adkim", "r").lower()[:1] or "r"
    aspf = dmarc_tags.get("aspf", "r").lower()[:1] or "r"
    mode = {"r": "relaxed", "s": "strict"}
    dkim_aligned = [d for d in dkim_domains if org.aligned(d, domain, adkim)]
    spf_aligned = spf_covered and org.aligned(envelope_domain, domain, aspf)
    reasons = []
    if dkim_aligned:
        reasons.append(f"DKIM d={dkim_aligned[0]} ({mode.get(adkim, adkim)})")
    if spf_aligned:
        reasons.append(f"SPF domain {envelope_domain} ({mode.get(aspf, aspf)})")
    if reasons:
        return CheckItem("alignment", "pass", f"From {domain} aligned with " + " and ".join(reasons))
    seen = []
    if dkim_domains:
        seen.append(f"DKIM d={', '.join(dkim_domains)} not {mode.get(adkim, adkim)}-aligned")
    else:
        seen.append("no verifiable DKIM signature")
    if not spf_covered:
        seen.append(f"SPF of {envelope_domain} does not pass for the sending IPs")
    elif not spf_aligned:
        seen.append(f"envelope domain {envelope_domain} not {mode.get(aspf, aspf)}-aligned")
    return CheckItem(
        "alignment",
        "fail",
        f"From {domain} is aligned with neither DKIM nor SPF: " + "; ".join(seen),
        fix=f"sign with a key for {domain} (or its organisational domain {org.of(domain)}), "
        f"or send with an envelope sender in {domain} that SPF authorises",
    )


async def preflight(
    resolver: dns.asyncresolver.Resolver,
    domain: str,
    *,
    envelope_domain: str | None = None,
    sending_ips: Sequence[str] = (),
    dkim_keys: Sequence[KeyExpectation] = (),
    org: OrgDomains | None = None,
    clock: Callable[[], float] = time.time,
) -> DomainReport:
    """Check what receivers will check about mail From ``domain``; never raises for DNS
    trouble (those items are "unknown")."""
    domain = domain.strip().rstrip(".").lower()
    envelope = (envelope_domain or domain).strip().rstrip(".").lower()
    org = org or OrgDomains()
    ips = [str(ipaddress.ip_address(ip)) for ip in sending_ips]
    (spf, spf_covered), (dkim_item, dkim_domains), (dmarc, dmarc_tags) = await asyncio.gather(
        _spf_item(resolver, envelope, ips),
        _dkim_item(resolver, domain, dkim_keys),
        _dmarc_item(resolver, domain, org),
    )
    alignment = _alignment_item(domain, envelope, dkim_domains, spf_covered, dmarc_tags, org)
    if alignment.status == "fail" and "unknown" in (spf.status, dkim_item.status):
        alignment = CheckItem("alignment", "unknown", "cannot tell: " + alignment.summary.split(": ", 1)[-1])
    return DomainReport(domain, envelope, (spf, dkim_item, dmarc, alignment), clock())


def render_report(report: DomainReport, required: Iterable[str] = ITEMS) -> str:
    """The report as the operator reads it on a terminal."""
    required = tuple(required)
    lines = [
        f"sender domain {report.domain}"
        + (f" (envelope {report.envelope_domain})" if report.envelope_domain != report.domain else "")
    ]
    for item in report.items:
        lines.append(f"  {item.status.upper():<7} {item.name:<10} {item.summary}")
        for record in item.records:
            lines.append(f"  {'':<7} {'':<10} record: {record}")
        if item.fix:
            lines.append(f"  {'':<7} {'':<10} fix: {item.fix}")
    failed, unknown = report.failed(required), report.unknown(required)
    if failed:
        verdict = f"FAIL ({len(failed)} of {len(required)} checks failed: {', '.join(i.name for i in failed)})"
    elif unknown:
        verdict = f"UNKNOWN (DNS did not answer for: {', '.join(i.name for i in unknown)})"
    else:
        verdict = "PASS"
    lines.append(f"result: {verdict}")
    return "\n".join(lines)
