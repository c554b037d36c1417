"""DNS checks of sendguard's own sending identity: a blocklist watch and a sender-domain preflight.

**Blocklist watch** (``BlocklistWatcher``): every ``interval`` the configured sending IPs
and domains are looked up on the configured DNS blocklists (RFC 5782):

* query names: IPv4 octets reversed (``10.113.0.203.zen.spamhaus.org``), IPv6 as 32
  reversed nibbles (RFC 5782 2.4), domains as they are (``example.com.dbl.spamhaus.org``,
  RFC 5782 3); an IP zone is asked about IPv6 targets only when it says ``ipv6: true``;
* NXDOMAIN is "clean"; an A record in 127.0.0.0/8 is "listed", with the codes (and the
  TXT reason, RFC 5782 2.1) kept for the operator;
* error codes are not listings: 127.255.255.0/24 (Spamhaus: 252 typo in the zone name,
  254 query through a public/open resolver, 255 too many queries), 127.0.1.255 (Spamhaus
  DBL: an IP asked on a domain list) and 127.0.0.1 (URIBL/SURBL-style refusal) make the
  result "refused", which, like a timeout, SERVFAIL or an answer outside 127.0.0.0/8
  (a resolver that rewrites NXDOMAIN), is *unknown*, never "clean";
* IP zones are asked for their RFC 5782 section 5 test entry 127.0.0.2 first; a zone that
  does not list it is misnamed or refusing this resolver, and its results are unknown.

State for metrics: ``gauges()`` gives, per configured zone and target kind, how many
targets are listed and how many are unknown. Labels are (zone, target_kind): both come
from the config, so the series are bounded, and no address ever becomes a label
(DESIGN: labels never carry addresses); which target is listed is in the log line and in
``snapshot()``. A listing on a zone with ``pause_commercial: true`` makes ``is_paused()``
true (an unknown result does not pause: DNS trouble must not stop mail).

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
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
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
from proxy.schema import Duration, doc

__all__ = (
    "BlocklistConfig",
    "BlocklistWatcher",
    "BlocklistZone",
    "CheckItem",
    "DNSConfig",
    "DNSFailure",
    "DomainReport",
    "Listing",
    "OrgDomains",
    "ResolverConfig",
    "SPFResult",
    "blocklist_query_name",
    "build_resolver",
    "check_listing",
    "interpret_blocklist_answer",
    "preflight",
    "render_report",
    "spf_check",
)

log = logging.getLogger("sendguard.dnscheck")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---- config ---------------------------------------------------------------------------------


def _domain(value: str, what: str) -> str:
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
        object.__setattr__(self, "zone", _domain(self.zone, "zone"))

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
        object.__setattr__(self, "sending_domains", tuple(_domain(d, "sending_domains") for d in self.sending_domains))
        object.__setattr__(self, "public_suffixes", tuple(_domain(s, "public_suffixes") for s in self.public_suffixes))


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


async def _resolve(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[Any] | None:
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


async def _txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[str] | None:
    records = await _resolve(resolver, name, "TXT")
    if records is None:
        return None
    # RFC 7208 3.3 / RFC 6376 3.6.2.2: the character-strings of one record are concatenated.
    return [b"".join(record.strings).decode("utf-8", "replace") for record in records]


# ---- blocklists -----------------------------------------------------------------------------

ListingStatus = Literal["clean", "listed", "refused", "unknown", "skipped"]

#: Spamhaus return codes (zen, sbl, xbl, pbl, dbl, and the DQS variants).
SPAMHAUS_CODES: dict[str, str] = {
    "127.0.0.2": "SBL: Spamhaus Block List (spam source)",
    "127.0.0.3": "SBL CSS: snowshoe spam",
    "127.0.0.4": "XBL: exploited host",
    "127.0.0.5": "XBL: exploited host",
    "127.0.0.6": "XBL: exploited host",
    "127.0.0.7": "XBL: exploited host",
    "127.0.0.9": "DROP: hijacked netblock",
    "127.0.0.10": "PBL: end-user range (ISP policy) that should not send to MX directly",
    "127.0.0.11": "PBL: end-user range (Spamhaus policy) that should not send to MX directly",
    "127.0.1.2": "DBL: spam domain",
    "127.0.1.4": "DBL: phishing domain",
    "127.0.1.5": "DBL: malware domain",
    "127.0.1.6": "DBL: botnet C&C domain",
    "127.0.1.102": "DBL: abused legitimate domain (spam)",
    "127.0.1.103": "DBL: abused spammed redirector",
    "127.0.1.104": "DBL: abused legitimate domain (phishing)",
    "127.0.1.105": "DBL: abused legitimate domain (malware)",
    "127.0.1.106": "DBL: abused legitimate domain (botnet C&C)",
    "127.0.1.255": "refused: an IP address was asked on a domain list",
    "127.255.255.252": "refused: typing error in the list's zone name",
    "127.255.255.254": "refused: query through a public or open resolver; use your own resolver or a DQS key",
    "127.255.255.255": "refused: too many queries from this resolver",
}
_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
_REFUSAL_NET = ipaddress.ip_network("127.255.255.0/24")
_REFUSAL_CODES = {"127.0.0.1", "127.0.1.255"}


@dataclass(frozen=True)
class Listing:
    target: str
    target_kind: Literal["ip", "domain"]
    zone: str
    status: ListingStatus
    codes: tuple[str, ...] = ()
    meaning: str = ""
    checked_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "target_kind": self.target_kind,
            "zone": self.zone,
            "status": self.status,
            "codes": list(self.codes),
            "meaning": self.meaning,
            "checked_at": self.checked_at,
        }


def blocklist_query_name(target: str, zone: str) -> str:
    """The name to look up for ``target`` on ``zone`` (RFC 5782 2.1, 2.4, 3)."""
    zone = zone.rstrip(".")
    try:
        address = ipaddress.ip_address(target)
    except ValueError:
        return f"{target.rstrip('.').lower()}.{zone}"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split("."))) + f".{zone}"
    nibbles = address.exploded.replace(":", "")
    return ".".join(reversed(nibbles)) + f".{zone}"


def _is_spamhaus(zone: str) -> bool:
    return zone.endswith((".spamhaus.org", ".spamhaus.net"))


def interpret_blocklist_answer(zone: str, addresses: Sequence[str]) -> tuple[ListingStatus, str]:
    """(status, meaning) for the A records a list answered."""
    if not addresses:
        return "clean", ""
    parsed = []
    for text in addresses:
        try:
            parsed.append(ipaddress.ip_address(text))
        except ValueError:
            return "unknown", f"unparsable answer {text!r}"
    if any(address not in _LOOPBACK_NET for address in parsed):
        return "unknown", (
            f"answer {', '.join(addresses)} is outside 127.0.0.0/8: the resolver rewrites NXDOMAIN "
            "(an ad or filtering service); use a resolver that does not"
        )
    meanings = [SPAMHAUS_CODES.get(text, "") if _is_spamhaus(zone) else "" for text in addresses]
    refusals = [
        text for text, address in zip(addresses, parsed, strict=True)
        if address in _REFUSAL_NET or text in _REFUSAL_CODES
    ]  # fmt: skip
    if refusals and len(refusals) == len(addresses):
        meaning = next((m for m in meanings if m), "") or f"the list refused the query (code {refusals[0]})"
        return "refused", meaning
    listed = [text for text in addresses if text not in refusals]
    described = [SPAMHAUS_CODES[text] for text in listed if _is_spamhaus(zone) and text in SPAMHAUS_CODES]
    return "listed", "; ".join(described) or f"listed (code {', '.join(listed)})"


async def check_listing(
    resolver: dns.asyncresolver.Resolver, target: str, zone: BlocklistZone, *, clock: Callable[[], float] = time.time
) -> Listing:
    """Look ``target`` up on ``zone``; never raises for DNS trouble (that is status unknown)."""
    kind: Literal["ip", "domain"]
    try:
        address = ipaddress.ip_address(target)
        kind = "ip"
    except ValueError:
        address, kind = None, "domain"
    now = clock()
    if kind != zone.kind:
        return Listing(target, kind, zone.zone, "skipped", meaning=f"{zone.zone} lists {zone.kind}s", checked_at=now)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None and not zone.ipv6:
        return Listing(target, kind, zone.zone, "skipped", meaning="the list covers IPv4 only", checked_at=now)
    name = blocklist_query_name(target, zone.zone)
    try:
        records = await _resolve(resolver, name, "A")
    except (DNSFailure, ValueError) as exc:
        return Listing(target, kind, zone.zone, "unknown", meaning=str(exc), checked_at=now)
    addresses = [record.address for record in records or ()]
    status, meaning = interpret_blocklist_answer(zone.zone, addresses)
    if status == "listed":
        # RFC 5782 2.1: the TXT record at the same name usually says why and where to appeal.
        with contextlib.suppress(DNSFailure, ValueError):
            reasons = await _txt(resolver, name)
            if reasons:
                meaning = f"{meaning}: {reasons[0]}"[:500]
    return Listing(target, kind, zone.zone, status, tuple(sorted(addresses)), meaning, now)


async def _zone_self_test(resolver: dns.asyncresolver.Resolver, zone: BlocklistZone) -> str | None:
    """None when the zone lists its RFC 5782 test entry 127.0.0.2, else why it cannot be trusted."""
    name = blocklist_query_name("127.0.0.2", zone.zone)
    try:
        records = await _resolve(resolver, name, "A")
    except (DNSFailure, ValueError) as exc:
        return f"test entry 127.0.0.2 not answered: {exc}"
    addresses = [record.address for record in records or ()]
    status, meaning = interpret_blocklist_answer(zone.zone, addresses)
    if status == "listed":
        return None
    if status == "clean":
        return (
            "the list does not answer its RFC 5782 test entry 127.0.0.2: wrong zone name, "
            "or it refuses queries from this resolver"
        )
    return meaning


class BlocklistWatcher:
    """Checks the sending IPs and domains on the configured lists, now and every interval.

    The lead's app calls ``start()`` once the event loop runs and ``stop()`` on shutdown;
    ``on_change`` is called with the full snapshot after a round in which any result
    changed (to update metrics and log), and ``is_paused()`` answers the pipeline.
    """

    def __init__(
        self,
        config: BlocklistConfig,
        resolver: dns.asyncresolver.Resolver,
        *,
        ips: Iterable[str] = (),
        domains: Iterable[str] = (),
        on_change: Callable[[list[Listing]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.ips = list(dict.fromkeys(str(ipaddress.ip_address(ip)) for ip in ips))
        self.domains = list(dict.fromkeys(_domain(d, "domain") for d in domains))
        self.on_change = on_change
        self.clock = clock
        self.last_check: float | None = None
        self._results: dict[tuple[str, str], Listing] = {}
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls,
        dns_config: DNSConfig,
        resolver: dns.asyncresolver.Resolver,
        *,
        dkim_domains: Iterable[str] = (),
        on_change: Callable[[list[Listing]], None] | None = None,
    ) -> BlocklistWatcher:
        """The watcher for a config: the sending IPs, the sending domains and the DKIM key domains."""
        domains = [*dns_config.sending_domains, *dkim_domains]
        return cls(dns_config.blocklists, resolver, ips=dns_config.sending_ips, domains=domains, on_change=on_change)

    # -- state

    def snapshot(self) -> list[Listing]:
        return list(self._results.values())

    def listed(self) -> list[Listing]:
        return [listing for listing in self._results.values() if listing.status == "listed"]

    def is_paused(self) -> bool:
        """True while a target is listed on a zone marked pause_commercial."""
        return self.pause_reason() is not None

    def pause_reason(self) -> str | None:
        pausing = {zone.zone for zone in self.config.zones if zone.pause_commercial}
        for listing in self.listed():
            if listing.zone in pausing:
                return f"{listing.target} is listed on {listing.zone} ({listing.meaning})"
        return None

    def gauges(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(zone, target_kind) -> (targets listed, targets unknown), for every configured pair
        that has targets: the bounded label set of sendguard_blocklist_listed/_unknown."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for zone in self.config.zones:
            if (zone.kind == "ip" and self.ips) or (zone.kind == "domain" and self.domains):
                out[(zone.zone, zone.kind)] = (0, 0)
        for listing in self._results.values():
            key = (listing.zone, listing.target_kind)
            if key not in out:
                continue
            listed, unknown = out[key]
            if listing.status == "listed":
                listed += 1
            elif listing.status in ("unknown", "refused"):
                unknown += 1
            out[key] = (listed, unknown)
        return out

    # -- checking

    async def check_now(self) -> list[Listing]:
        """One round over every (target, zone) pair; returns the new snapshot."""
        limit = asyncio.Semaphore(self.config.concurrency)

        async def bounded(call: Awaitable[Any]) -> Any:
            async with limit:
                return await call

        zones = list(self.config.zones)
        tests = await asyncio.gather(
            *(bounded(_zone_self_test(self.resolver, z)) if z.tests_itself else _none() for z in zones)
        )
        broken = {zone.zone: problem for zone, problem in zip(zones, tests, strict=True) if problem}
        jobs: list[Awaitable[Listing]] = []
        for zone in zones:
            targets = self.ips if zone.kind == "ip" else self.domains
            for target in targets:
                if zone.zone in broken:
                    kind: Literal["ip", "domain"] = "ip" if zone.kind == "ip" else "domain"
                    jobs.append(_done(Listing(target, kind, zone.zone, "unknown", (), broken[zone.zone], self.clock())))
                else:
                    jobs.append(bounded(check_listing(self.resolver, target, zone, clock=self.clock)))
        results: list[Listing] = list(await asyncio.gather(*jobs))
        changed = self._store(results)
        self.last_check = self.clock()
        if changed and self.on_change is not None:
            try:
                self.on_change(self.snapshot())
            except Exception:
                log.exception("blocklist on_change callback failed")
        return self.snapshot()

    def _store(self, results: list[Listing]) -> bool:
        changed = False
        fresh: dict[tuple[str, str], Listing] = {}
        for listing in results:
            if listing.status == "skipped":
                continue
            key = (listing.target, listing.zone)
            fresh[key] = listing
            before = self._results.get(key)
            if before is not None and (before.status, before.codes) == (listing.status, listing.codes):
                continue
            changed = True
            if listing.status == "listed":
                log.warning("blocklist: %s is LISTED on %s: %s", listing.target, listing.zone, listing.meaning)
            elif listing.status == "clean" and before is not None and before.status == "listed":
                log.info("blocklist: %s is no longer listed on %s", listing.target, listing.zone)
            elif listing.status in ("unknown", "refused"):
                log.warning(
                    "blocklist: cannot tell whether %s is listed on %s: %s",
                    listing.target,
                    listing.zone,
                    listing.meaning,
                )
        changed = changed or set(fresh) != set(self._results)
        self._results = fresh
        return changed

    async def _run(self) -> None:
        while True:
            try:
                await self.check_now()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("blocklist round failed; trying again in %.0fs", self.config.interval)
            await asyncio.sleep(self.config.interval)

    def start(self) -> None:
        """Start the background task (first round at once). Idempotent."""
        if self._task is None or self._task.done():
            if not self.config.enabled:
                return
            if not self.ips and not self.domains:
                log.info("blocklist watch: no sending IPs or domains configured; nothing to watch")
                return
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sendguard-blocklist-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _none() -> None:
    return None


async def _done(listing: Listing) -> Listing:
    return listing


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
            records = await _resolve(self.resolver, name, rdtype)
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
        records = await _txt(ctx.resolver, domain)
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
            records = await _resolve(ctx.resolver, name, rdtype)
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
        records = await _txt(resolver, domain)
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
        records = await _txt(resolver, name)
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
            records = await _txt(resolver, f"_dmarc.{name}")
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
