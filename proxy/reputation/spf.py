"""An SPF evaluator (RFC 7208) for the sender-domain preflight: ``spf_check`` evaluates a
domain's record for an IP (ip4, ip6, a, mx, include, redirect, exists and macros; ptr is
counted but never matches) within the RFC's lookup limits.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from proxy.reputation.resolver import DNSFailure, IPAddress, resolve_records, txt_records

__all__ = (
    "SPFResult",
    "spf_check",
)

# ---- SPF (RFC 7208) -------------------------------------------------------------------------

SPFResultCode = Literal["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4
SPF_VOID_LOOKUP_LIMIT = 2  # RFC 7208 4.6.4
SPF_MX_LIMIT = 10  # RFC 7208 4.6.4
_QUALIFIERS: dict[str, SPFResultCode] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISM = re.compile(r"^([+\-~?]?)(all|include|a|mx|ptr|ip4|ip6|exists)(?=$|[:/])(.*)$", re.I)
_MODIFIER = re.compile(r"^([a-z][a-z0-9_.\-]*)=(.*)$", re.I)
_MACRO = re.compile(r"%(?:\{([a-z])(\d*)(r?)([.\-+,/_=]*)\}|(.))", re.I)
_DUAL_CIDR = re.compile(r"^(.*?)(?:/(\d{1,2}))?(?://(\d{1,3}))?$")


@dataclass(frozen=True)
class SPFResult:
    result: SPFResultCode
    reason: str
    lookups: int = 0


class _SPFStop(Exception):
    def __init__(self, result: SPFResultCode, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass
class _SPFContext:
    resolver: dns.asyncresolver.Resolver
    ip: IPAddress
    sender: str
    helo: str
    lookups: int = 0
    void_lookups: int = 0

    def count_lookup(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > SPF_LOOKUP_LIMIT:
            raise _SPFStop(
                "permerror", f"more than {SPF_LOOKUP_LIMIT} DNS-querying terms (RFC 7208 4.6.4), at {term!r}"
            )

    def count_void(self, name: str) -> None:
        self.void_lookups += 1
        if self.void_lookups > SPF_VOID_LOOKUP_LIMIT:
            raise _SPFStop(
                "permerror", f"more than {SPF_VOID_LOOKUP_LIMIT} lookups found nothing (RFC 7208 4.6.4), at {name}"
            )

    async def lookup(self, name: str, rdtype: str) -> list[Any]:
        try:
            records = await resolve_records(self.resolver, name, rdtype)
        except DNSFailure as exc:
            raise _SPFStop("temperror", str(exc)) from exc
        except ValueError as exc:
            raise _SPFStop("permerror", str(exc)) from exc
        if not records:
            self.count_void(name)
            return []
        return records

    def expand(self, spec: str, domain: str) -> str:
        """RFC 7208 section 7 macro expansion of a domain-spec."""
        sender_local, _, sender_domain = self.sender.rpartition("@")
        ip = self.ip
        if isinstance(ip, ipaddress.IPv4Address):
            ip_text, version = str(ip), "in-addr"
        else:
            ip_text, version = ".".join(ip.exploded.replace(":", "")), "ip6"
        values = {
            "s": self.sender,
            "l": sender_local or "postmaster",
            "o": sender_domain or domain,
            "d": domain,
            "i": ip_text,
            "p": "unknown",  # validated PTR names are not looked up (RFC 7208 5.5)
            "v": version,
            "h": self.helo or domain,
        }

        def replace(match: re.Match[str]) -> str:
            letter, digits, reverse, delimiters, escape = match.groups()
            if escape is not None:
                if escape == "%":
                    return "%"
                if escape == "_":
                    return " "
                if escape == "-":
                    return "%20"
                raise _SPFStop("permerror", f"bad macro %{escape} in {spec!r}")
            value = values.get(letter.lower())
            if value is None:
                raise _SPFStop("permerror", f"macro %{{{letter}}} is not allowed in {spec!r}")
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                count = int(digits)
                if count == 0:
                    raise _SPFStop("permerror", f"macro with 0 parts in {spec!r}")
                parts = parts[-count:]
            return ".".join(parts)

        expanded = _MACRO.sub(replace, spec)
        while len(expanded) > 253 and "." in expanded:  # RFC 7208 7.3: drop labels from the left
            expanded = expanded.split(".", 1)[1]
        return expanded.rstrip(".")


def _network(ip: IPAddress, host: str, prefix: int) -> bool:
    try:
        return ip in ipaddress.ip_network(f"{host}/{prefix}", strict=False)
    except ValueError:
        return False


def _cidrs(text: str, term: str) -> tuple[str, int, int]:
    match = _DUAL_CIDR.match(text)
    if match is None:
        raise _SPFStop("permerror", f"bad term {term!r}")
    spec, v4, v6 = match.group(1), match.group(2), match.group(3)
    cidr4, cidr6 = int(v4) if v4 else 32, int(v6) if v6 else 128
    if cidr4 > 32 or cidr6 > 128:
        raise _SPFStop("permerror", f"prefix length out of range in {term!r}")
    return spec, cidr4, cidr6


async def _spf_records(ctx: _SPFContext, domain: str) -> str | None:
    try:
        records = await txt_records(ctx.resolver, domain)
    except DNSFailure as exc:
        raise _SPFStop("temperror", str(exc)) from exc
    except ValueError as exc:
        raise _SPFStop("none", str(exc)) from exc
    spf = [r for r in records or () if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")]
    if len(spf) > 1:
        raise _SPFStop("permerror", f"{domain} has {len(spf)} SPF records; RFC 7208 4.5 allows one")
    return spf[0] if spf else None


async def _check_host(ctx: _SPFContext, domain: str) -> tuple[SPFResultCode, str]:
    record = await _spf_records(ctx, domain)
    if record is None:
        return "none", f"{domain} publishes no SPF record"
    terms = record.split()[1:]
    redirect: str | None = None
    seen_modifiers: set[str] = set()
    directives: list[tuple[str, str, str]] = []
    for term in terms:
        directive = _MECHANISM.match(term)
        if directive:
            directives.append((directive.group(1) or "+", directive.group(2).lower(), directive.group(3)))
            continue
        modifier = _MODIFIER.match(term)
        if modifier is None:
            raise _SPFStop("permerror", f"unknown term {term!r} in the SPF record of {domain}")
        name = modifier.group(1).lower()
        if name in ("redirect", "exp"):
            if name in seen_modifiers:
                raise _SPFStop("permerror", f"{name}= appears twice in the SPF record of {domain}")
            seen_modifiers.add(name)
            if name == "redirect":
                redirect = modifier.group(2)
    for qualifier, mechanism, rest in directives:
        if await _matches(ctx, domain, mechanism, rest, f"{qualifier if qualifier != '+' else ''}{mechanism}{rest}"):
            return _QUALIFIERS[qualifier], f"{mechanism}{rest} in the record of {domain} matched"
    if redirect is not None:
        ctx.count_lookup(f"redirect={redirect}")
        target = ctx.expand(redirect, domain)
        result, reason = await _check_host(ctx, target)
        if result == "none":
            raise _SPFStop("permerror", f"redirect={target}: {reason}")
        return result, reason
    return "neutral", f"nothing in the record of {domain} matched"


async def _matches(ctx: _SPFContext, domain: str, mechanism: str, rest: str, term: str) -> bool:
    ip = ctx.ip
    if mechanism == "all":
        if rest:
            raise _SPFStop("permerror", f"bad term {term!r}")
        return True
    if mechanism in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _SPFStop("permerror", f"bad term {term!r}")
        host, _, length = rest[1:].partition("/")
        try:
            network = ipaddress.ip_network(f"{host}/{length or (32 if mechanism == 'ip4' else 128)}", strict=False)
        except ValueError:
            raise _SPFStop("permerror", f"bad network in {term!r}") from None
        if network.version != (4 if mechanism == "ip4" else 6):
            raise _SPFStop("permerror", f"{term!r}: wrong address family")
        return ip in network
    if mechanism in ("include", "exists"):
        if not rest.startswith(":") or len(rest) < 2:
            raise _SPFStop("permerror", f"{term!r} needs a domain")
        ctx.count_lookup(term)
        target = ctx.expand(rest[1:], domain)
        if mechanism == "exists":
            return bool(await ctx.lookup(target, "A"))
        result, reason = await _check_host(ctx, target)
        if result == "pass":
            return True
        if result in ("fail", "softfail", "neutral"):
            return False
        if result == "temperror":
            raise _SPFStop("temperror", reason)
        raise _SPFStop("permerror", f"include:{target}: {reason}")
    if mechanism == "ptr":
        ctx.count_lookup(term)
        return False  # deprecated (RFC 7208 5.5): counted, never matched here
    # a and mx: [:domain-spec][/cidr4][//cidr6]
    spec, cidr4, cidr6 = _cidrs(rest, term)
    if spec and not spec.startswith(":"):
        raise _SPFStop("permerror", f"bad term {term!r}")
    target = ctx.expand(spec[1:], domain) if spec else domain
    ctx.count_lookup(term)
    rdtype = "A" if isinstance(ip, ipaddress.IPv4Address) else "AAAA"
    prefix = cidr4 if isinstance(ip, ipaddress.IPv4Address) else cidr6
    if mechanism == "a":
        return any(_network(ip, r.address, prefix) for r in await ctx.lookup(target, rdtype))
    exchanges = await ctx.lookup(target, "MX")
    if len(exchanges) > SPF_MX_LIMIT:
        raise _SPFStop("permerror", f"{target} has more than {SPF_MX_LIMIT} MX names (RFC 7208 4.6.4)")
    for exchange in exchanges:
        name = exchange.exchange.to_text().rstrip(".")
        if not name:
            continue
        try:
            records = await resolve_records(ctx.resolver, name, rdtype)
        except DNSFailure as exc:
            raise _SPFStop("temperror", str(exc)) from exc
        except ValueError:
            continue
        if any(_network(ip, r.address, prefix) for r in records or ()):
            return True
    return False


async def spf_check(
    resolver: dns.asyncresolver.Resolver, ip: str, domain: str, *, sender: str | None = None, helo: str = ""
) -> SPFResult:
    """RFC 7208 check_host(ip, domain, sender): would mail from ``ip`` for ``domain`` pass?"""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # RFC 7208 5: an IPv4-mapped address is evaluated as IPv4
    ctx = _SPFContext(resolver, address, sender or f"postmaster@{domain}", helo)
    try:
        result, reason = await _check_host(ctx, domain.rstrip(".").lower())
    except _SPFStop as stop:
        return SPFResult(stop.result, stop.reason, ctx.lookups)
    return SPFResult(result, reason, ctx.lookups)
