"""sendguard's own trace field: the ``Received:`` line every hop adds (RFC 5321 4.4).

The field is written the way Postfix writes it, because that is what receivers and their
spam filters parse (SpamAssassin's Received parser knows Postfix's layout)::

    Received: from client.example (host.example [192.0.2.7])
    \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
    \t(Authenticated sender: alice)
    \tby relay.example.com (sendguard) with ESMTPSA id 3f2a9c1b7d20
    \tfor <bob@example.org>; Thu, 03 Dec 2026 18:01:02 +0100

Everything in it that the client chose (the HELO name, the AUTH login) is reduced to
characters that cannot end the field, open or close a comment, or start the date
(CR, LF, ``(``, ``)``, ``;``, ``\\``, non-ASCII): a client can never add a header line or
make the field say something else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from email.utils import formatdate

import dns.asyncresolver
import dns.reversename

from proxy.relay.dsn import xtext_encode
from proxy.reputation.resolver import DNSFailure, resolve_records

__all__ = ("Hop", "client_name", "received_field", "xforward_attributes")

#: A host name as RFC 5321 4.1.2 ``Domain`` allows it (letters, digits, hyphens, dots).
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
#: An address literal (RFC 5321 4.1.3): [192.0.2.1] or [IPv6:2001:db8::1].
_LITERAL = re.compile(r"^\[(IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]$")
#: What may stay of a client-chosen word: printable ASCII without space, comment
#: delimiters, the quoting backslash, the date separator and quotes.
_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\;\"]")

#: Reverse lookups of the client address wait this long at most (Postfix waits for its
#: resolver too; a slow PTR must not hold a transaction for the resolver's whole lifetime).
REVERSE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Hop:
    """What the Received field says about the hop from the client to sendguard."""

    client_ip: str
    #: The client's verified name (forward-confirmed PTR), "localhost" for loopback, or None.
    client_name: str | None
    helo: str | None
    #: Our name (the listener's greeting name).
    by: str
    esmtp: bool = True
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int | None = None
    authenticated: bool = False
    #: The AUTH login, shown only where the listener says so (Postfix's
    #: smtpd_sasl_authenticated_header, off by default: it tells the world a login name).
    auth_user: str | None = None

    @property
    def protocol(self) -> str:
        """RFC 3848's "with" keyword: SMTP, ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls_version else "") + ("A" if self.authenticated else "")


def safe_word(text: str, limit: int = 255) -> str:
    """A client-chosen word as it may stand in the field (Postfix replaces the same with "?")."""
    return _UNSAFE.sub("?", text)[:limit] or "?"


def _address_literal(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "[" + safe_word(ip, 64) + "]"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return f"[{mapped}]" if mapped is not None else f"[IPv6:{address.compressed}]"
    return f"[{address}]"


def _helo_word(helo: str | None, ip: str) -> str:
    """The HELO name as the client gave it when it is a domain or an address literal (RFC 5321
    4.4 asks for what the client said), otherwise made safe."""
    if not helo:
        return _address_literal(ip)
    if _DOMAIN.match(helo) or _LITERAL.match(helo):
        return helo
    return safe_word(helo)


def xforward_attributes(hop: Hop, txn_id: str) -> list[tuple[str, str]]:
    """The client as XFORWARD tells it to the next MTA (XFORWARD_README), values xtext: what
    a Postfix after sendguard then logs and writes in its Received field."""
    unavailable = "[UNAVAILABLE]"
    try:
        address = ipaddress.ip_address(hop.client_ip)
        addr = f"IPV6:{address.compressed}" if address.version == 6 else str(address)
    except ValueError:
        addr = unavailable
    return [
        ("NAME", xtext_encode(hop.client_name) if hop.client_name else unavailable),
        ("ADDR", addr),
        ("PROTO", "ESMTP" if hop.esmtp else "SMTP"),
        ("HELO", xtext_encode(hop.helo[:255]) if hop.helo else unavailable),
        ("IDENT", xtext_encode(txn_id)),
        ("SOURCE", "REMOTE"),
    ]


def received_field(hop: Hop, txn_id: str, recipients: list[str] | tuple[str, ...], *, date: str | None = None) -> bytes:
    """The whole ``Received:`` field, folded, CRLF-terminated, ASCII (RFC 5322 3.6.7).

    ``for <address>`` only with one recipient: with several it would tell each recipient the
    others' addresses (Postfix does the same)."""
    client = hop.client_name or "unknown"
    lines = [f"Received: from {_helo_word(hop.helo, hop.client_ip)} ({client} {_address_literal(hop.client_ip)})"]
    if hop.tls_version:
        bits = f" ({hop.tls_bits}/{hop.tls_bits} bits)" if hop.tls_bits else ""
        lines.append(
            f"(using {safe_word(hop.tls_version, 32)} with cipher {safe_word(hop.tls_cipher or '?', 64)}{bits})"
        )
    if hop.authenticated and hop.auth_user:
        lines.append(f"(Authenticated sender: {safe_word(hop.auth_user, 128)})")
    lines.append(f"by {safe_word(hop.by)} (sendguard) with {hop.protocol} id {safe_word(txn_id, 64)}")
    tail = formatdate(localtime=True) if date is None else date
    if len(recipients) == 1:
        recipient = recipients[0]
        if recipient.isascii() and not _UNSAFE.search(recipient):
            lines.append(f"for <{recipient}>; {tail}")
        else:  # an internationalized or odd address: left out rather than mangled
            lines[-1] += ";"
            lines.append(tail)
    else:
        lines[-1] += ";"
        lines.append(tail)
    return ("\r\n\t".join(lines) + "\r\n").encode("ascii")


async def client_name(resolver: dns.asyncresolver.Resolver, ip: str) -> str | None:
    """The client's name for the Received field: "localhost" for loopback (no lookup), else a
    PTR name whose own A/AAAA records include the address (forward-confirmed, as Postfix's
    ``reverse_client_name`` check: an unconfirmed PTR is anyone's to write), else None."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.is_loopback:
        return "localhost"
    try:
        async with asyncio.timeout(REVERSE_TIMEOUT):
            records = await resolve_records(resolver, dns.reversename.from_address(ip).to_text(), "PTR")
            for record in (records or [])[:3]:
                name = str(record.target.to_text(omit_final_dot=True))
                if not _DOMAIN.match(name):
                    continue
                forward = await resolve_records(resolver, name, "AAAA" if address.version == 6 else "A")
                if any(ipaddress.ip_address(r.address) == address for r in forward or []):
                    return name
    except (TimeoutError, DNSFailure, ValueError):
        return None
    return None
