"""DKIM signing (RFC 6376) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463), on raw message bytes.

The signer is the last step before the upstream: every change sendguard makes (added
headers, removed fields, footers) happens before it, and nothing touches the bytes after
it. The signature header is *prepended* to the bytes as they are; the message is never
re-serialised by the ``email`` package, which would re-fold headers and break the
signature (reliability anchors C27).

Decisions, each with its reason:

* **Which key.** The key is chosen by the domain of the ``From`` field that the signature
  covers first: with ``h=from`` a verifier hashes the *last* ``From`` instance (RFC 6376
  5.4.2, instances are taken bottom-up), so that is the one whose domain must match ``d=``.
  (Two ``From`` fields are refused earlier by the required_headers policy anyway.) When
  that field names several mailboxes, every distinct domain among them is signed for.
* **Exact domain, parent on request.** Keys whose ``domain`` equals the From domain sign.
  A key marked ``subdomains: true`` *also* signs for every subdomain of its domain: a
  signature with ``d=example.com`` on mail from ``news.example.com`` passes DMARC relaxed
  alignment (RFC 7489 3.1.1) but not strict (``adkim=s``). Several keys for one domain
  (RSA and Ed25519) all sign: RFC 8463 expects dual signing while verifiers catch up.
* **Which fields (h=).** Every configured field is signed once per instance present. The
  ``oversign`` fields are listed once more than they occur, so a field of that name can
  never be added later without breaking the signature (RFC 6376 8.15); an absent field
  is thereby signed as empty. ``From`` is always oversigned (so ``h=`` lists ``from``
  twice for a normal message) and is required by RFC 6376 5.4. ``List-Unsubscribe`` and
  ``List-Unsubscribe-Post`` are always signed and oversigned: RFC 8058 section 4 requires
  the DKIM signature to cover them, and nobody downstream may swap the one-click target.
* **Canonicalisation** defaults to relaxed/relaxed: relaxed header canonicalisation
  survives the re-folding of long fields by relays (the folded ``List-Unsubscribe`` that
  broke signatures in nodemailer#1654) and relaxed body canonicalisation survives
  trailing-whitespace changes.
* **Keys** are read and checked once, at start and on every reload: a missing file, a
  file that is not a private key, an RSA key under 1024 bits (RFC 8301 3.2; Gmail wants
  1024+, 2048 recommended) or a key that does not match its ``algorithm`` is a config
  error with the key path of the entry at fault.

* **Signing** goes through ``cryptography`` (OpenSSL): RSASSA-PKCS1-v1_5 with SHA-256 (RFC
  6376 3.3.1) and Ed25519 over the SHA-256 of the header data (RFC 8463 3). The
  canonicalisation and hashing are sendguard's own (``dkim_canon``, which says why): the
  body is hashed in blocks from a view, and ``sign_fields`` returns only the signature
  fields, so a 25 MB message is signed without copying it.

Signing is CPU work (about 1 ms per RSA-2048 signature, more for the body hash of a big
message); callers on the event loop use ``await signer.sign_fields_async(head, rest)`` or
``sign_async(message)``, which run it in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import email.utils
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from proxy.reputation import dkim_canon
from proxy.schema import doc

__all__ = (
    "ALWAYS_OVERSIGNED",
    "DEFAULT_OVERSIGNED",
    "DEFAULT_SIGNED_HEADERS",
    "Algorithm",
    "DKIMConfig",
    "DKIMKeyConfig",
    "DKIMKeyError",
    "DKIMSignError",
    "KeyExpectation",
    "LoadedKey",
    "SignResult",
    "SignedFields",
    "Signer",
    "dkim_config_problems",
    "dns_txt_strings",
    "from_domains",
    "generate_private_key",
    "load_key",
    "load_keys",
    "public_key_record",
    "write_private_key",
)

log = logging.getLogger("sendguard.dkim")

#: Fields signed wherever they occur (RFC 6376 5.4.1's list, plus the RFC 8058 pair).
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-ID", "Content-Description",
    "Resent-Date", "Resent-From", "Resent-Sender", "Resent-To", "Resent-Cc", "Resent-Message-ID",
    "In-Reply-To", "References",
    "List-Id", "List-Help", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe", "List-Post",
    "List-Owner", "List-Archive", "Feedback-ID",
)  # fmt: skip

#: Fields signed once more than they occur (RFC 6376 8.15): a copy added later breaks the signature.
DEFAULT_OVERSIGNED: tuple[str, ...] = (
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "List-Unsubscribe", "List-Unsubscribe-Post",
)  # fmt: skip

#: Oversigned whatever the config says: From (RFC 6376 5.4) and the RFC 8058 pair.
ALWAYS_OVERSIGNED: tuple[str, ...] = ("From", "List-Unsubscribe", "List-Unsubscribe-Post")

#: RFC 6376 5.4.1 says the first four SHOULD NOT be signed (relays add or change them); a
#: signed Bcc would tell every recipient that there is one; a DKIM-Signature is never in h=
#: (3.5). The config refuses them all (the list dkimpy refuses).
NEVER_SIGNED = frozenset(("return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"))

#: RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048.
MIN_RSA_BITS = 1024
RECOMMENDED_RSA_BITS = 2048

_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 2.2
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")  # "_" is common in selectors and SPF/DKIM names

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
Canonicalization = Literal["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"]


def _check_dns_name(value: str, what: str) -> str:
    """A lower-case ASCII DNS name without the trailing dot, or ValueError."""
    name = value.strip().rstrip(".").lower()
    if not name.isascii():
        raise ValueError(f"{what} {value!r} must be written in ASCII (use the xn-- form of an international name)")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{what} {value!r} is not a valid DNS name")
    return name


@dataclass(frozen=True)
class DKIMKeyConfig:
    domain: str = doc("signing domain d=: the From domain, or a parent of it with subdomains: true")
    selector: str = doc("selector s=; the public key is published at SELECTOR._domainkey.DOMAIN")
    key_file: str = doc("PEM private key (sendguard dkim keygen writes one; keep it mode 0600)")
    algorithm: Algorithm = doc(
        "rsa-sha256 (RSA, at least 1024 bits, 2048 recommended) or ed25519-sha256 (RFC 8463)",
        default="rsa-sha256",
    )
    subdomains: bool = doc(
        "also sign mail from subdomains of domain (aligns with DMARC relaxed, not strict)", default=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", _check_dns_name(self.domain, "domain"))
        object.__setattr__(self, "selector", _check_dns_name(self.selector, "selector"))
        if not self.key_file.strip():
            raise ValueError("key_file must name a file")

    @property
    def record_name(self) -> str:
        """Where the public key lives in the DNS (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class DKIMConfig:
    keys: tuple[DKIMKeyConfig, ...] = doc("signing keys; none means DKIM signing is off", default=())
    headers: tuple[str, ...] = doc("header fields signed wherever present", default=DEFAULT_SIGNED_HEADERS)
    oversign: tuple[str, ...] = doc(
        "fields signed once more than they occur, so none can be added later (From and the "
        "List-Unsubscribe pair always are)",
        default=DEFAULT_OVERSIGNED,
    )
    canonicalization: Canonicalization = doc(
        "header/body canonicalisation (RFC 6376 3.4); relaxed survives re-folding", default="relaxed/relaxed"
    )
    on_error: Literal["refuse", "send_unsigned"] = doc(
        "when a message cannot be signed: refuse it (5xx if the message is at fault, else 451) or send it unsigned",
        default="refuse",
    )

    def __post_init__(self) -> None:
        for what, names in (("headers", self.headers), ("oversign", self.oversign)):
            for name in names:
                if not _FIELD_NAME.match(name):
                    raise ValueError(f"{what}: {name!r} is not a header field name")
                if name.lower() in NEVER_SIGNED:
                    raise ValueError(f"{what}: {name} must not be signed (RFC 6376 5.4.1)")
        seen: set[tuple[str, str]] = set()
        for key in self.keys:
            pair = (key.domain, key.selector)
            if pair in seen:
                raise ValueError(f"keys: selector {key.selector} of {key.domain} is listed twice")
            seen.add(pair)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def signed_field_names(self) -> tuple[list[str], set[str]]:
        """(field names in signing order, lower-case names to oversign), mandatory ones merged in."""
        order: list[str] = []
        for name in (*ALWAYS_OVERSIGNED, *self.headers, *self.oversign):
            if name.lower() not in order:
                order.append(name.lower())
        oversigned = {n.lower() for n in (*ALWAYS_OVERSIGNED, *self.oversign)}
        return order, oversigned


# ---- keys -----------------------------------------------------------------------------------


class DKIMKeyError(Exception):
    """Keys that cannot be used; ``issues`` holds (key path under dkim:, message) pairs."""

    def __init__(self, issues: list[tuple[str, str]]) -> None:
        self.issues = issues
        super().__init__("; ".join(f"dkim.{path}: {message}" for path, message in issues))


@dataclass(frozen=True)
class LoadedKey:
    """A checked private key, loaded once (parsing and checking an RSA key costs milliseconds,
    more than a signature), and its public half for the DNS."""

    config: DKIMKeyConfig
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False, compare=False)
    public_key: str  # the p= value: base64 SubjectPublicKeyInfo (RSA) or raw 32 bytes (RFC 8463 4.2)
    bits: int | None  # RSA modulus size
    warnings: tuple[str, ...] = ()

    @property
    def key_type(self) -> str:
        return "rsa" if self.config.algorithm == "rsa-sha256" else "ed25519"

    def dns_record(self) -> str:
        """The TXT record value to publish (RFC 6376 3.6.1)."""
        return public_key_record(self.key_type, self.public_key)


@dataclass(frozen=True)
class KeyExpectation:
    """A key the preflight expects to find published: ``selector._domainkey.domain``."""

    domain: str
    selector: str
    algorithm: Algorithm
    public_key: str | None  # None: only check that some key is published there

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def key_type(self) -> str:
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"


def public_key_record(key_type: str, public_key: str) -> str:
    return f"v=DKIM1; k={key_type}; p={public_key}"


def dns_txt_strings(value: str, size: int = 255) -> list[str]:
    """Split a TXT value into character-strings of at most ``size`` bytes (RFC 1035 3.3.14);
    verifiers concatenate them without separators (RFC 6376 3.6.2.2)."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


def _private_key_from_bytes(data: bytes) -> Any:
    """A private key from PEM (PKCS#1 or PKCS#8), or the raw base64 Ed25519 seed that dkimpy's
    dknewkey writes."""
    if b"-----BEGIN" in data:
        return serialization.load_pem_private_key(data, password=None)
    stripped = b"".join(data.split())
    try:
        seed = base64.b64decode(stripped, validate=True)
    except ValueError:
        seed = b""
    if len(seed) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raise ValueError("not a PEM private key (nor a base64 Ed25519 seed)")


def load_key(config: DKIMKeyConfig) -> LoadedKey:
    """Read and check one key file; ValueError with a message for the operator."""
    path = Path(config.key_file)
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"key file not found: {config.key_file}") from None
    except OSError as exc:
        raise ValueError(f"cannot read key file {config.key_file}: {exc.strerror or exc}") from None
    try:
        key = _private_key_from_bytes(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{config.key_file} is not a usable private key ({exc}); create one with: "
            f"sendguard dkim keygen {config.domain} {config.selector}"
        ) from None
    warnings: list[str] = []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"{config.key_file} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if config.algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(
                f"{config.key_file} holds a {_key_kind(key)} key but algorithm is rsa-sha256; "
                "write algorithm: ed25519-sha256 or give an RSA key"
            )
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"{config.key_file} is a {key.key_size}-bit RSA key; DKIM needs at least {MIN_RSA_BITS} bits "
                f"(RFC 8301 3.2), {RECOMMENDED_RSA_BITS} recommended"
            )
        if key.key_size < RECOMMENDED_RSA_BITS:
            warnings.append(f"{config.key_file} is a {key.key_size}-bit RSA key; {RECOMMENDED_RSA_BITS} is recommended")
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return LoadedKey(config, key, base64.b64encode(public).decode("ascii"), key.key_size, tuple(warnings))
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(
            f"{config.key_file} holds a {_key_kind(key)} key but algorithm is ed25519-sha256; "
            "write algorithm: rsa-sha256 or give an Ed25519 key"
        )
    raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return LoadedKey(config, key, base64.b64encode(raw_public).decode("ascii"), None, tuple(warnings))


def _key_kind(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA (not usable for DKIM)"
    return f"{type(key).__name__} (not usable for DKIM)"


def load_keys(config: DKIMConfig) -> list[LoadedKey]:
    """Every key of the config, checked; DKIMKeyError lists every bad one at once."""
    loaded: list[LoadedKey] = []
    issues: list[tuple[str, str]] = []
    for index, key_config in enumerate(config.keys):
        try:
            loaded.append(load_key(key_config))
        except ValueError as exc:
            issues.append((f"keys[{index}].key_file", str(exc)))
    if issues:
        raise DKIMKeyError(issues)
    return loaded


def dkim_config_problems(config: DKIMConfig) -> list[tuple[str, str]]:
    """(key path under ``dkim.``, message) for each unusable key: for ``config check``."""
    try:
        load_keys(config)
    except DKIMKeyError as exc:
        return exc.issues
    return []


# ---- signing --------------------------------------------------------------------------------


class DKIMSignError(Exception):
    """A message could not be signed. ``permanent`` when the message itself is at fault
    (a header line that is not a field), so a retry would fail the same way."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class SignedFields:
    """What signing adds to a message: its DKIM-Signature field(s), to put before the header."""

    #: The DKIM-Signature field(s), each ending with CRLF, top one first; b"" when none.
    fields: bytes = b""
    #: (d=, s=, a=) of each signature, top one first.
    signatures: tuple[tuple[str, str, str], ...] = ()
    #: Why nothing was signed: "no-from", "no-key", or "" when signed.
    skipped: str = ""
    from_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class SignResult:
    message: bytes
    #: (d=, s=, a=) of each signature added, top one first.
    signatures: tuple[tuple[str, str, str], ...] = ()
    #: Why nothing was signed: "no-from", "no-key", or "" when signed.
    skipped: str = ""
    from_domains: tuple[str, ...] = ()


def _ascii_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain or None
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


# The common From forms, read without the email package (a third of a millisecond per field):
# ``local@domain`` and ``Display Name <local@domain>`` (the name quoted or plain words).
# Anything else (comments, groups, several mailboxes, escapes) goes to the full parser.
_LOCAL = r"[^\s\"(),:;<>@\[\\\]]+"
_DOMAIN = r"([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_PLAIN_ADDRESS = re.compile(rf"{_LOCAL}@{_DOMAIN}")
_NAME_ADDRESS = re.compile(rf"(?:\"[^\"\\]*\"|[^\"(),:;<>@\[\\\]]*?)[ \t]*<{_LOCAL}@{_DOMAIN}>")


def from_domains(fields: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """Domains of the mailboxes in the *last* From field, in order, without repeats.

    ``fields`` are (name, raw field) pairs, as ``dkim_canon.header_fields`` gives them."""
    values = [raw.partition(b":")[2] for name, raw in fields if name.lower() == b"from"]
    if not values:
        return []
    raw = values[-1].decode("utf-8", "surrogateescape")
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", raw).strip()
    simple = _PLAIN_ADDRESS.fullmatch(unfolded) or _NAME_ADDRESS.fullmatch(unfolded)
    if simple is not None:
        return [simple.group(1).lower()]
    specs: list[str] = []
    try:
        header = email.policy.default.header_factory("from", unfolded)
        specs = [str(address.addr_spec) for address in header.addresses]
    except Exception:  # a malformed From must not crash the signer; fall back to the lenient parser
        specs = []
    if not any("@" in spec for spec in specs):
        specs = [spec for _, spec in email.utils.getaddresses([unfolded])]
    out: list[str] = []
    for spec in specs:
        if "@" not in spec:
            continue
        domain = _ascii_domain(spec.rsplit("@", 1)[1])
        if domain and domain not in out:
            out.append(domain)
    return out


class Signer:
    """Signs outgoing messages with the configured keys. Build one per config generation."""

    def __init__(self, config: DKIMConfig, keys: Iterable[LoadedKey]) -> None:
        self.config = config
        self.keys = list(keys)
        self._order, self._oversigned = config.signed_field_names()
        header_canon, body_canon = config.canonicalization.split("/")
        self._header_canon: dkim_canon.HeaderCanon = "simple" if header_canon == "simple" else "relaxed"
        self._body_canon: dkim_canon.BodyCanon = "simple" if body_canon == "simple" else "relaxed"
        for key in self.keys:
            for warning in key.warnings:
                log.warning("dkim key %s: %s", key.config.record_name, warning)

    @classmethod
    def from_config(cls, config: DKIMConfig) -> Signer:
        """Load and check every key (blocking file reads: call at start or reload)."""
        return cls(config, load_keys(config))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def keys_for(self, domain: str) -> list[LoadedKey]:
        """Keys that sign mail from ``domain``: exact matches, then parents with subdomains: true."""
        domain = domain.lower().rstrip(".")
        exact = [k for k in self.keys if k.config.domain == domain]
        parents = [
            k for k in self.keys if k.config.subdomains and domain.endswith("." + k.config.domain)
        ]  # fmt: skip
        parents.sort(key=lambda k: -len(k.config.domain))  # nearest parent first
        return exact + parents

    def expectations_for(self, domain: str) -> list[KeyExpectation]:
        """What the DNS must publish for mail from ``domain`` to verify (for the preflight)."""
        return [
            KeyExpectation(k.config.domain, k.config.selector, k.config.algorithm, k.public_key)
            for k in self.keys_for(domain)
        ]

    def header_list(self, fields: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """The h= list for a message: each field once per instance, oversigned ones once more."""
        counts: dict[bytes, int] = {}
        for field_name, _ in fields:
            lowered = field_name.lower()
            counts[lowered] = counts.get(lowered, 0) + 1
        names: list[bytes] = []
        for name in self._order:
            encoded = name.encode("ascii")
            times = counts.get(encoded, 0) + (1 if name in self._oversigned else 0)
            names.extend([encoded] * times)
        return names

    def sign_fields(self, head: bytes, rest: bytes | memoryview) -> SignedFields:
        """The DKIM-Signature field(s) for the message ``head + rest``, which stays as it is.

        ``head`` is the header block (each field with its CRLF) and ``rest`` the rest from the
        blank line on, as ``rawmsg.Outgoing`` holds them: the body is hashed in blocks from
        ``rest`` and never copied whole. Any other split (an empty ``head``) works too, at the
        price of one copy of the message."""
        if not self.keys:
            return SignedFields(skipped="no-key")
        if (len(rest) and bytes(rest[:2]) != b"\r\n") or dkim_canon.has_bare_newline(head):
            # Not split at the blank line, or bare line endings in the header (sendguard repairs
            # those on the way in, so only a caller outside the relay gets here): split anew,
            # as the upstream will receive it.
            message = dkim_canon.normalize_newlines(head + bytes(rest))
            end = dkim_canon.split_message(message)
            head, rest = message[:end], memoryview(message)[end:]
        try:
            fields = dkim_canon.header_fields(head)
        except dkim_canon.HeaderFormatError as exc:
            raise DKIMSignError(f"the header cannot be parsed for signing: {exc}", permanent=True) from exc
        domains = from_domains(fields)
        if not domains:
            return SignedFields(skipped="no-from")
        chosen: list[LoadedKey] = []
        for domain in domains:
            for key in self.keys_for(domain):
                if key not in chosen:
                    chosen.append(key)
        if not chosen:
            return SignedFields(skipped="no-key", from_domains=tuple(domains))
        names = self.header_list(fields)
        body = memoryview(rest)[2:]  # after the blank line (RFC 5322 2.1); empty without one
        body_hash = base64.b64encode(dkim_canon.body_hash(body, self._body_canon)).decode("ascii")
        timestamp = str(int(time.time()))
        out: list[bytes] = []
        signatures: list[tuple[str, str, str]] = []
        for key in chosen:
            # Each signature covers the message as it is; none covers another (DKIM-Signature
            # is never in h=), so their order does not matter to verifiers.
            out.append(self._signature(key, fields, names, body_hash, timestamp))
            signatures.append((key.config.domain, key.config.selector, key.config.algorithm))
        return SignedFields(b"".join(out), tuple(signatures), "", tuple(domains))

    def _signature(
        self,
        key: LoadedKey,
        fields: Sequence[tuple[bytes, bytes]],
        names: Sequence[bytes],
        body_hash: str,
        timestamp: str,
    ) -> bytes:
        """One DKIM-Signature field with its CRLF (RFC 6376 3.5, 3.7)."""
        config = key.config
        # The required tags (3.5: v, a, b, bh, d, h, s) and t=, the signing time. q=dns/txt
        # and i=@d are the defaults and left out.
        tags = [
            ("v", "1"),
            ("a", config.algorithm),
            ("c", f"{self._header_canon}/{self._body_canon}"),
            ("d", config.domain),
            ("s", config.selector),
            ("t", timestamp),
        ]
        unsigned = dkim_canon.signature_field(tags, names, after=[("bh", body_hash)])
        data = dkim_canon.header_hash_input(fields, names, unsigned, self._header_canon)
        try:
            private = key.private_key
            if isinstance(private, rsa.RSAPrivateKey):
                # 3.3.1: RSASSA-PKCS1-v1_5 (RFC 8017 8.2) over the SHA-256 of the header data.
                signature = private.sign(data, padding.PKCS1v15(), hashes.SHA256())
            else:
                # RFC 8463 3: PureEdDSA over the SHA-256 of the header data, not the data itself.
                signature = private.sign(hashlib.sha256(data).digest())
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise DKIMSignError(f"signing with {config.record_name} failed: {exc}", permanent=False) from exc
        value = dkim_canon.fold_signature_value(base64.b64encode(signature).decode("ascii"))
        return unsigned + value + b"\r\n"

    def sign_detailed(self, message: bytes) -> SignResult:
        """Sign ``message`` (CRLF line endings, as relayed) with every key for its From domain."""
        end = dkim_canon.split_message(message)
        signed = self.sign_fields(message[:end], memoryview(message)[end:])
        content = signed.fields + message if signed.fields else message
        return SignResult(content, signed.signatures, signed.skipped, signed.from_domains)

    def sign(self, message: bytes) -> bytes:
        """The message with its DKIM-Signature field(s) prepended (unchanged when no key applies)."""
        return self.sign_detailed(message).message

    async def sign_async(self, message: bytes) -> SignResult:
        """``sign_detailed`` in a worker thread, so the event loop keeps serving sessions."""
        return await asyncio.to_thread(self.sign_detailed, message)

    async def sign_fields_async(self, head: bytes, rest: bytes | memoryview) -> SignedFields:
        """``sign_fields`` in a worker thread (OpenSSL lets go of the GIL while it signs)."""
        return await asyncio.to_thread(self.sign_fields, head, rest)


def generate_private_key(algorithm: Algorithm, bits: int = RECOMMENDED_RSA_BITS) -> bytes:
    """A new private key as PKCS#8 PEM (what openssl and load_key read)."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        if not MIN_RSA_BITS <= bits <= 4096:
            raise ValueError(f"RSA keys for DKIM must have {MIN_RSA_BITS} to 4096 bits (RFC 8301 3.2), not {bits}")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(path: Path, pem: bytes, *, overwrite: bool = False) -> None:
    """Create ``path`` with mode 0600 from the first byte on (never briefly world-readable)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    descriptor = os.open(path, flags, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # O_CREAT honours the umask, and an existing file keeps its mode
        os.write(descriptor, pem)
    finally:
        os.close(descriptor)
