"""sender_domain: refuse mail whose From domain would fail the receivers' authentication checks.

Gmail, Yahoo and Outlook.com require of bulk senders SPF and DKIM, a DMARC record and a
From domain aligned with one of them (field anchors 1c); they say so only after the fact,
with 4.7.27/4.7.30/4.7.32 deferrals and spam-foldering. This policy runs the same checks
before sending (``proxy.reputation.preflight.preflight``) and refuses with ``550 5.7.1`` naming the
failed item and how to fix it.

Costs nothing per message after the first: a report is cached per (From domain,
envelope domain) for ``cache_ttl`` (``fail_ttl`` for failed reports, so a fix in the DNS
takes effect soon), concurrent messages for one domain share one lookup, and the cache is
bounded (least recently used first out). When the DNS cannot answer, the policy raises
``PolicyError``: the entry's ``on_error`` decides (tempfail: ``451 4.3.0``; accept), and
nothing is cached. Ship it in ``mode: monitor`` first, watch the would-refuse counts, then
enforce.

Resources: ``dns`` (a dns.asyncresolver.Resolver, required), ``dkim`` (the DKIM
``Signer``; its keys for the domain are what must be published), ``sending_ips`` (the
upstream's public IPs; the ``upstream_ips`` option overrides them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from policies.base import Policy, PolicyError, Transaction, Verdict
from proxy.reputation.dkim import KeyExpectation
from proxy.reputation.preflight import DomainReport, OrgDomains, preflight
from proxy.schema import Duration, doc

__all__ = ("SenderDomainPolicy",)

CheckName = Literal["spf", "dkim", "dmarc", "alignment"]


class SenderDomainPolicy(Policy):
    name = "sender_domain"
    description = "From domain has SPF covering the upstream, a published DKIM key, DMARC and alignment"

    @dataclass(frozen=True)
    class Options:
        require: tuple[CheckName, ...] = doc(
            "checks that must pass: spf, dkim, dmarc, alignment (Gmail's bulk-sender rules need all four)",
            default=("spf", "dkim", "dmarc", "alignment"),
        )
        upstream_ips: tuple[str, ...] = doc(
            "public IPs the upstream sends from (default: dns.sending_ips); SPF must pass for each", default=()
        )
        dkim_selectors: tuple[str, ...] = doc(
            "selectors the upstream signs with, checked when sendguard holds no key for the domain", default=()
        )
        cache_ttl: Duration = doc("how long a passing report is reused", default=Duration(3600))
        fail_ttl: Duration = doc(
            "how long a failing report is reused (short, so DNS fixes show)", default=Duration(300)
        )
        max_domains: int = doc("reports kept in memory at most", default=10_000)
        public_suffixes: tuple[str, ...] = doc(
            "multi-label public suffixes beyond the built-in list, for relaxed alignment", default=()
        )

        def __post_init__(self) -> None:
            if not self.require:
                raise ValueError("require needs at least one of spf, dkim, dmarc, alignment")
            for ip in self.upstream_ips:
                try:
                    ipaddress.ip_address(ip)
                except ValueError:
                    raise ValueError(f"upstream_ips: {ip!r} is not an IP address") from None
            if self.max_domains < 1:
                raise ValueError("max_domains must be at least 1")

    def __init__(self, options: Any, resources: Any = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(options, resources)
        self.clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, DomainReport]] = OrderedDict()
        self._pending: dict[tuple[str, str], asyncio.Task[DomainReport]] = {}
        self._org = OrgDomains(self.options.public_suffixes)

    # ---- inputs from resources -----------------------------------------------------------

    def _resolver(self) -> Any:
        resolver = self.resources.get("dns")
        if resolver is None:
            raise PolicyError("sender_domain needs a DNS resolver (resources['dns'])")
        return resolver

    def _sending_ips(self) -> tuple[str, ...]:
        options: SenderDomainPolicy.Options = self.options
        if options.upstream_ips:
            return options.upstream_ips
        return tuple(self.resources.get("sending_ips", ()))

    def _expectations(self, domain: str) -> list[KeyExpectation]:
        signer = self.resources.get("dkim")
        keys: list[KeyExpectation] = list(signer.expectations_for(domain)) if signer is not None else []
        if not keys:
            # The upstream signs (M365 selector1/selector2, Google's google): check that a key is published.
            keys = [KeyExpectation(domain, s, "rsa-sha256", None) for s in self.options.dkim_selectors]
        return keys

    # ---- the check -----------------------------------------------------------------------

    async def report_for(self, domain: str, envelope_domain: str) -> DomainReport:
        """The cached report, or a fresh one. The lookup runs as its own task shared by every
        message for the domain, so a caller that times out does not cancel it for the others,
        and its result still lands in the cache."""
        key = (domain, envelope_domain)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self.clock():
            self._cache.move_to_end(key)
            return cached[1]
        task = self._pending.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fresh_report(key))
            self._pending[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(task)

    async def _fresh_report(self, key: tuple[str, str]) -> DomainReport:
        domain, envelope_domain = key
        return await preflight(
            self._resolver(),
            domain,
            envelope_domain=envelope_domain,
            sending_ips=self._sending_ips(),
            dkim_keys=self._expectations(domain),
            org=self._org,
        )

    def _settle(self, key: tuple[str, str], task: asyncio.Task[DomainReport]) -> None:
        self._pending.pop(key, None)
        if task.cancelled() or task.exception() is not None:  # .exception() marks it retrieved
            return
        report = task.result()
        required = self.options.require
        if report.unknown(required):
            return  # DNS trouble is never cached
        ttl = self.options.cache_ttl if report.ok(required) else self.options.fail_ttl
        self._cache[key] = (self.clock() + ttl, report)
        self._cache.move_to_end(key)
        while len(self._cache) > self.options.max_domains:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        self._pending.clear()

    async def check_message(self, txn: Transaction) -> Verdict | None:
        message = txn.message
        if message is None:
            return None
        senders = message.addresses("From")
        if not senders or "@" not in senders[-1].addr_spec:
            return None  # required_headers refuses a message without a usable From
        # The last From field is the one a DKIM signature covers first (RFC 6376 5.4.2).
        domain = _ascii_domain(senders[-1].addr_spec.rsplit("@", 1)[1])
        if domain is None:
            return Verdict.reject(
                "From domain is not a valid DNS name",
                "The From: address has no valid domain; correct the From: header",
                status="5.1.8",
            )
        envelope = _ascii_domain(txn.mail_from.rsplit("@", 1)[1]) if "@" in txn.mail_from else None
        report = await self.report_for(domain, envelope or domain)
        required = self.options.require
        failed = report.failed(required)
        evidence = {"domain": domain, "items": {i.name: i.status for i in report.items}}
        if failed:
            first = failed[0]
            names = ", ".join(i.name.upper() if i.name != "alignment" else "alignment" for i in failed)
            fix = f"; fix: {first.fix}" if first.fix else ""
            text = _one_line(f"Sender domain {domain} fails {names}: {first.summary}{fix}")
            return Verdict.reject(f"sender domain {domain} fails {names}", text, evidence=evidence)
        unknown = report.unknown(required)
        if unknown:
            raise PolicyError(f"DNS did not answer for {domain}: " + "; ".join(i.summary for i in unknown))
        return Verdict.accept(f"sender domain {domain} passes {', '.join(required)}", evidence=evidence)


def _ascii_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    if not domain or any(c in domain for c in ' \t"<>[]\\'):
        return None
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _one_line(text: str, limit: int = 450) -> str:
    """Reply text: one line, printable, short enough for any client (RFC 5321 4.5.3.1.5: 512)."""
    cleaned = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
