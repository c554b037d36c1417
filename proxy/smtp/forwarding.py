"""XCLIENT and XFORWARD: the original client, told by a trusted MTA in front of sendguard.

Both commands are Postfix's (XCLIENT_README, XFORWARD_README): ``XCLIENT attr=value ...`` and
``XFORWARD attr=value ...``, each value xtext-encoded (RFC 3461 4: ``+XX`` for a byte outside
``!``..``~`` or one of ``+`` and ``=``). ``[UNAVAILABLE]`` says the MTA does not know the
attribute, ``[TEMPUNAVAIL]`` (a client NAME only) that its lookup failed for now.

- **XCLIENT** (NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT) replaces the client for
  the rest of the session, as if it had just connected (a new 220 greeting; EHLO again):
  relay authorization, per-IP limits, AUTH lockout and the SASL login included. Postfix
  re-evaluates its access rules with the new address; so does sendguard.
- **XFORWARD** (NAME ADDR PORT PROTO HELO IDENT SOURCE) is what a Postfix with
  ``smtpd_proxy_filter`` sends a before-queue filter that offers it: attributes accumulate
  for the next transaction and are forgotten when it ends. Postfix uses them for logging
  only; sendguard counts the address for its limits, rate limits, audit line and Received
  field, but relay authorization stays the forwarding host's: it has already applied its
  own relay rules, and XFORWARD carries no login, so its authenticated roaming users would
  otherwise be refused.

This module only reads the commands; ``proxy.smtp.session`` applies them.
"""

from __future__ import annotations

import ipaddress
import re

from policies.base import Reply
from proxy.relay.dsn import xtext_decode

__all__ = (
    "XCLIENT_ATTRIBUTES",
    "XFORWARD_ATTRIBUTES",
    "ForwardSyntaxError",
    "parse_attributes",
)

XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"

#: A host name as a forwarded NAME must be (Postfix's valid_hostname: letters, digits,
#: hyphens, dots; at most 255 octets, labels of at most 63).
_HOSTNAME = re.compile(
    r"^(?=.{1,255}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


class ForwardSyntaxError(Exception):
    """A malformed XCLIENT or XFORWARD command; ``reply`` is its 501."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.reply = Reply(501, "5.5.4", text)


def _address(command: str, name: str, value: str) -> str | None:
    if value == UNAVAILABLE:
        return None
    bare = value[5:] if value[:5].upper() == "IPV6:" else value
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        raise ForwardSyntaxError(f"Bad {command} {name} syntax: {value[:64]}") from None


def _port(command: str, name: str, value: str) -> str | None:
    if value == UNAVAILABLE:
        return None
    if not (value.isdigit() and value.isascii() and len(value) <= 5 and int(value) <= 65535):
        raise ForwardSyntaxError(f"Bad {command} {name} syntax: {value[:64]}")
    return value


def _check(command: str, name: str, value: str) -> str | None:
    """The decoded value of one attribute as sendguard keeps it; None: not available."""
    if name in ("ADDR", "DESTADDR"):
        return _address(command, name, value)
    if name in ("PORT", "DESTPORT"):
        return _port(command, name, value)
    if name == "NAME":
        if value in (UNAVAILABLE, TEMPUNAVAIL):
            return None
        if not _HOSTNAME.match(value):
            raise ForwardSyntaxError(f"Bad {command} NAME syntax: {value[:64]}")
        return value
    if value == UNAVAILABLE:
        return None
    if name == "PROTO":
        if command == "XCLIENT" and value.upper() not in ("SMTP", "ESMTP"):
            raise ForwardSyntaxError(f"Bad XCLIENT PROTO syntax: {value[:64]}")
        if len(value) > 64:
            raise ForwardSyntaxError(f"Bad {command} PROTO syntax: {value[:64]}")
        return value.upper()
    if name == "SOURCE" and value.upper() not in ("LOCAL", "REMOTE"):
        raise ForwardSyntaxError(f"Bad XFORWARD SOURCE syntax: {value[:64]}")
    # HELO, LOGIN, IDENT, SOURCE: kept as given, every non-printable byte a "?" (Postfix's
    # printable()); the Received field makes its own words safe (proxy.relay.trace).
    return value


def parse_attributes(command: str, arg: str) -> dict[str, str | None]:
    """The attributes of ``XCLIENT``/``XFORWARD`` ``arg``: upper-case name -> decoded value, None
    for ``[UNAVAILABLE]`` (and a NAME's ``[TEMPUNAVAIL]``). Raises ForwardSyntaxError."""
    allowed = XCLIENT_ATTRIBUTES if command == "XCLIENT" else XFORWARD_ATTRIBUTES
    words = arg.split()
    if not words:
        raise ForwardSyntaxError(f"Syntax: {command} attribute=value...")
    attributes: dict[str, str | None] = {}
    for word in words:
        name, equals, raw = word.partition("=")
        if not equals or not raw or not name:
            raise ForwardSyntaxError("Error: attribute=value expected")
        name = name.upper()
        if name not in allowed:
            raise ForwardSyntaxError(f"Bad {command} attribute name: {_NOT_PRINTABLE.sub('?', name)[:32]}")
        if len(raw) > 255:
            raise ForwardSyntaxError("Error: attribute value too long")
        try:
            decoded = xtext_decode(raw)
        except ValueError:
            raise ForwardSyntaxError(f"Bad {command} {name} syntax: not xtext") from None
        attributes[name] = _check(command, name, _NOT_PRINTABLE.sub("?", decoded))
    return attributes
