"""The ``dns:`` config section (resolver, blocklists, sending identity) and the lookups every
DNS check uses (``proxy.reputation.blocklists``, ``spf``, ``preflight``).
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

from proxy.schema import Duration, doc

__all__ = (
    "BlocklistConfig",
    "BlocklistZone",
    "DNSConfig",
    "DNSFailure",
    "IPAddress",
    "ResolverConfig",
    "build_resolver",
    "dns_name",
    "resolve_records",
    "txt_records",
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---- config ---------------------------------------------------------------------------------


def dns_name(value: str, what: str) -> str:
    name = value.strip().rstrip(".").lower()
    if not name or not name.isascii() or ".." in name or len(name) > 253:
        raise ValueError(f"{what}: {value!r} is not a DNS name (write international names in xn-- form)")
    return name


def _parse_nameserver(text: str) -> tuple[str, int]:
    text = text.strip()
    match = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(r"^(\d+\.\d+\.\d+\.\d+):(\d+)$", text)
    host, port = (match.group(1), int(match.group(2))) if match else (text, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"nameserver {text!r} is not an IP address (write 127.0.0.1, 127.0.0.1:5353 or [::1]:53)"
        ) from None
    if not 0 < port < 65536:
        raise ValueError(f"nameserver {text!r}: port out of range")
    return host, port


@dataclass(frozen=True)
class ResolverConfig:
    nameservers: tuple[str, ...] = doc(
        "resolvers to ask (IP, IP:PORT or [IPv6]:PORT); empty: the system's (/etc/resolv.conf). Blocklists "
        "refuse public resolvers: use your own recursive resolver",
        default=(),
    )
    timeout: Duration = doc("time limit for one lookup, retries included", default=Duration(5))

    def __post_init__(self) -> None:
        for server in self.nameservers:
            _parse_nameserver(server)
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")


@dataclass(frozen=True)
class BlocklistZone:
    zone: str = doc("the list's DNS zone, e.g. zen.spamhaus.org")
    kind: Literal["ip", "domain"] = doc("ip: lists addresses; domain: lists domain names", key="type", default="ip")
    ipv6: bool = doc("an ip list that also covers IPv6 (RFC 5782 2.4); else IPv6 targets skip it", default=False)
    pause_commercial: bool = doc("pause commercial mail while a target is listed here", default=False)
    self_test: bool | None = doc(
        "ask for the RFC 5782 test entry first (127.0.0.2) and distrust a zone that lacks it; "
        "default: yes for ip lists",
        default=None,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", dns_name(self.zone, "zone"))

    @property
    def tests_itself(self) -> bool:
        return self.self_test if self.self_test is not None else self.kind == "ip"


DEFAULT_ZONES: tuple[BlocklistZone, ...] = (
    BlocklistZone("zen.spamhaus.org", "ip", ipv6=True, pause_commercial=True),
    BlocklistZone("b.barracudacentral.org", "ip"),  # needs the resolver's IP registered with Barracuda
    BlocklistZone("bl.spamcop.net", "ip"),
    BlocklistZone("dbl.spamhaus.org", "domain", pause_commercial=True),
)


@dataclass(frozen=True)
class BlocklistConfig:
    enabled: bool = doc("watch the sending IPs and domains on DNS blocklists", default=True)
    interval: Duration = doc("time between two rounds of lookups", default=Duration(1800))
    zones: tuple[BlocklistZone, ...] = doc("the lists to ask", default=DEFAULT_ZONES)
    concurrency: int = doc("lookups in flight at once", default=8)

    def __post_init__(self) -> None:
        if self.interval < 60:
            raise ValueError("interval must be at least 1m (blocklists throttle eager clients)")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        zones = [z.zone for z in self.zones]
        if len(zones) != len(set(zones)):
            raise ValueError("a zone is listed twice")


@dataclass(frozen=True)
class DNSConfig:
    resolver: ResolverConfig = doc("how sendguard asks the DNS", default_factory=ResolverConfig)
    sending_ips: tuple[str, ...] = doc(
        "public IPs the upstream MTA sends from: SPF must cover them, the blocklist watch checks them", default=()
    )
    sending_domains: tuple[str, ...] = doc(
        "domains checked on domain blocklists (the DKIM key domains are added)", default=()
    )
    public_suffixes: tuple[str, ...] = doc(
        "multi-label public suffixes to add to the built-in list, for DMARC alignment (e.g. co.example)", default=()
    )
    blocklists: BlocklistConfig = doc("the blocklist watch", default_factory=BlocklistConfig)

    def __post_init__(self) -> None:
        ips: list[str] = []
        for text in self.sending_ips:
            try:
                ips.append(str(ipaddress.ip_address(text.strip())))
            except ValueError:
                raise ValueError(f"sending_ips: {text!r} is not an IP address") from None
        object.__setattr__(self, "sending_ips", tuple(ips))
        object.__setattr__(self, "sending_domains", tuple(dns_name(d, "sending_domains") for d in self.sending_domains))
        object.__setattr__(self, "public_suffixes", tuple(dns_name(s, "public_suffixes") for s in self.public_suffixes))


def build_resolver(config: ResolverConfig) -> dns.asyncresolver.Resolver:
    """An async resolver for the config; reads /etc/resolv.conf when no nameserver is given
    (raises dns.resolver.NoResolverConfiguration when there is none)."""
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for text in config.nameservers:
            host, port = _parse_nameserver(text)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.timeout = float(config.timeout)
    resolver.lifetime = float(config.timeout)
    resolver.cache = dns.resolver.LRUCache(10_000)  # honours each answer's TTL
    return resolver


# ---- lookups --------------------------------------------------------------------------------


class DNSFailure(Exception):
    """A lookup that got no usable answer: timeout, SERVFAIL, REFUSED. Temporary."""


async def resolve_records(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[Any] | None:
    """Records of ``rdtype`` at ``name``: None for NXDOMAIN, [] for no data."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.NoAnswer:
        return []
    except dns.resolver.NoNameservers as exc:
        raise DNSFailure(f"{name} {rdtype}: no server answered (SERVFAIL or REFUSED)") from exc
    except dns.exception.Timeout as exc:
        raise DNSFailure(f"{name} {rdtype}: timed out") from exc
    except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong) as exc:
        raise ValueError(f"{name!r} is not a valid DNS name") from exc
    except dns.exception.DNSException as exc:
        raise DNSFailure(f"{name} {rdtype}: {type(exc).__name__}: {exc}") from exc
    if answer.rrset is None:
        return []
    return list(answer.rrset)


async def txt_records(resolver: dns.asyncresolver.Resolver, name: str) -> list[str] | None:
    records = await resolve_records(resolver, name, "TXT")
    if records is None:
        return None
    # RFC 7208 3.3 / RFC 6376 3.6.2.2: the character-strings of one record are concatenated.
    return [b"".join(record.strings).decode("utf-8", "replace") for record in records]
