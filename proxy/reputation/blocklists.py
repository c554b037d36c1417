"""DNS blocklists of sendguard's own sending IPs and domains: the blocklist watch.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from proxy.reputation.resolver import (
    BlocklistConfig,
    BlocklistZone,
    DNSConfig,
    DNSFailure,
    dns_name,
    resolve_records,
    txt_records,
)

__all__ = (
    "BlocklistWatcher",
    "Listing",
    "blocklist_query_name",
    "check_listing",
    "interpret_blocklist_answer",
)

log = logging.getLogger("sendguard.dnscheck")

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
        records = await resolve_records(resolver, name, "A")
    except (DNSFailure, ValueError) as exc:
        return Listing(target, kind, zone.zone, "unknown", meaning=str(exc), checked_at=now)
    addresses = [record.address for record in records or ()]
    status, meaning = interpret_blocklist_answer(zone.zone, addresses)
    if status == "listed":
        # RFC 5782 2.1: the TXT record at the same name usually says why and where to appeal.
        with contextlib.suppress(DNSFailure, ValueError):
            reasons = await txt_records(resolver, name)
            if reasons:
                meaning = f"{meaning}: {reasons[0]}"[:500]
    return Listing(target, kind, zone.zone, status, tuple(sorted(addresses)), meaning, now)


async def _zone_self_test(resolver: dns.asyncresolver.Resolver, zone: BlocklistZone) -> str | None:
    """None when the zone lists its RFC 5782 test entry 127.0.0.2, else why it cannot be trusted."""
    name = blocklist_query_name("127.0.0.2", zone.zone)
    try:
        records = await resolve_records(resolver, name, "A")
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
        self.domains = list(dict.fromkeys(dns_name(d, "domain") for d in domains))
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
