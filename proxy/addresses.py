"""Foundation: one reading and one normalisation of an e-mail address, for every room.

Two questions, two functions, and every place that asks either goes through them, so that
the live proxy, ``sendguard check``, the consent store and the recipient counter can never
disagree about whether two spellings are one person:

* ``envelope_address``: what an SMTP session takes from ``MAIL FROM:<...>`` / ``RCPT
  TO:<...>`` (RFC 5321 4.1.2): the addr-spec as aiosmtpd reads it, with the stdlib's RFC
  5322 parser, so ``"bob2"@example.net`` is ``bob2@example.net`` (quotes that are not needed
  are dropped, RFC 5321 4.1.2: "a sending system SHOULD transmit the form that uses the
  minimum quoting possible"). This is the address relayed: case and spelling kept.
* ``address_key``: the key two addresses are compared and looked up by (duplicates, consent
  records, the recipient count): the envelope form, then the local part in lower case (RFC
  5321 2.4 leaves its case to the receiving host, and every real mail system ignores it) and
  the domain by ``domain_key`` (lower case, no trailing dot, IDN as A-labels).

Imports the standard library and ``idna`` only (no other room), so ``policies/message.py``
may import it without a cycle.
"""

from __future__ import annotations

import re
from email import _header_value_parser as parser
from email.errors import HeaderParseError

import idna

__all__ = ("address_key", "domain_key", "domain_spellings", "envelope_address", "relayable_recipient")

#: RFC 5322 3.2.3: a dot-atom local part needs no quotes.
_DOT_ATOM = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*"
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def envelope_address(text: str) -> str:
    """The address an SMTP session reads from a MAIL or RCPT argument (``<...>`` optional).

    Raises ``ValueError`` when it is not an RFC 5321 path (the session answers 553). The
    null path ``<>`` is ``""``.
    """
    text = text.strip()
    if text in ("", "<>"):
        return ""
    token: parser.AngleAddr | parser.AddrSpec
    try:
        if text.startswith("<"):
            token, rest = parser.get_angle_addr(text)
        else:
            token, rest = parser.get_addr_spec(text)
    except (HeaderParseError, IndexError) as exc:
        raise ValueError(f"{text!r} is not an address") from exc
    if rest.strip():
        raise ValueError(f"{text!r} is not one address: {rest.strip()!r} follows it")
    address = str(token.addr_spec)
    if address in ("", "<>"):
        raise ValueError(f"{text!r} is not an address")
    return address


def relayable_recipient(address: str) -> bool:
    """Whether an envelope recipient can be relayed: an address with a domain part, no control
    characters, at most 320 octets (RFC 5321 4.5.3.1: 64 + "@" + 255), and valid UTF-8
    (aiosmtpd keeps other bytes as lone surrogates, which no upstream can be sent, RFC 6531).
    The session answers 501 otherwise; ``sendguard check`` refuses the same ``--to``."""
    if _CONTROL.search(address) or len(address) > 320 or "@" not in address:
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8(text: str) -> str:
    """Text with the raw bytes the stdlib keeps as lone surrogates (an RFC 6532 UTF-8 header
    read from bytes) decoded as the UTF-8 they are, so both spellings of a header agree."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def _local_key(local: str) -> str:
    """The local part without quotes it does not need, in lower case (RFC 5321 4.1.2)."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        inner = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if not _DOT_ATOM.fullmatch(inner):
            inner = '"' + inner.replace("\\", "\\\\").replace('"', '\\"') + '"'
        local = inner
    return local.lower()


def domain_key(domain: str) -> str:
    """A domain in one form: lower case, no trailing dot (RFC 1034 3.1: the absolute form
    names the same host), internationalised labels as A-labels (RFC 5890 2.3.2.1, IDNA 2008
    with the UTS 46 mapping browsers and mail clients use), so ``Bücher.example.``,
    ``bücher.example`` and ``xn--bcher-kva.example`` are one. A label IDNA refuses is kept in
    lower case; an address literal (``[192.0.2.1]``, RFC 5321 4.1.3) is kept as written."""
    domain = _utf8(domain).strip().rstrip(".")
    if domain.startswith("[") and domain.endswith("]"):
        return domain.lower()
    lowered = domain.lower()
    if lowered.isascii() and "xn--" not in lowered:
        return lowered
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        pass
    labels = []
    for label in lowered.split("."):
        try:
            labels.append(idna.encode(label, uts46=True).decode("ascii") if not label.isascii() else label)
        except (idna.IDNAError, UnicodeError, ValueError):
            labels.append(label)
    return ".".join(labels)


def domain_spellings(domain: str) -> tuple[str, ...]:
    """``domain_key`` first, then its Unicode spelling when it has one: records written before
    keys were A-labels hold the domain as it was typed, in lower case."""
    key = domain_key(domain)
    if "xn--" not in key:
        return (key,)
    try:
        unicode = idna.decode(key)
    except (idna.IDNAError, UnicodeError, ValueError):
        return (key,)
    return (key, unicode) if unicode != key else (key,)


def address_key(address: str) -> str:
    """The key an address is compared and looked up by: ``local@domain`` with the local part
    unquoted where quotes are not needed and in lower case, the domain by ``domain_key``.
    Surrounding ``<>`` and spaces are ignored; text without ``@`` is only lower-cased."""
    text = _utf8(address).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    if not at:
        return text.lower()
    return f"{_local_key(local)}@{domain_key(domain)}"
