"""Unsubscribe tokens: who, from which sender, about which topic, sealed with AES-256-GCM.

A token travels in a URL (``https://…/u/TOKEN``, ``mailto:…?subject=unsubscribe TOKEN``) and
is all the server gets from a one-click POST: RFC 8058 section 3.2 forbids cookies and
authorization, so the token itself must say whom the request is about and prove that
sendguard made it. Why authenticated encryption (AES-256-GCM) instead of a signed token
(an HMAC over readable fields):

* integrity: the 128-bit GCM tag is a MAC over the ciphertext and the header, so a token
  cannot be forged, altered or enumerated (a random or edited string fails the tag);
* privacy: the recipient's address, the sender and the topic are encrypted, so a token in a
  log line, a proxy's access log or a forwarded mail's header reveals nothing about anyone.
  An HMAC-signed token would carry the address in clear (or need a database lookup).

Layout (then base64url without padding)::

    version (1) | key hint (2) | nonce (12) | GCM(issued (4) | recipient NUL sender NUL topic) + tag (16)

The version and key hint are authenticated as associated data. The key hint (the first two
bytes of SHA-256 of the key id) picks the key without trying them all; it says which key
made a token and nothing else. The AES key and the CSRF key are derived from the configured
secret with HKDF-SHA256 under different labels, so one secret never serves two algorithms.

Nonces are random (96 bits); NIST SP 800-38D bounds one key to 2**32 random-nonce
encryptions, far above a year of any sender's mail, which is why keys rotate (yearly is
plenty): the first configured key issues, every configured key verifies, and a token dies
with its key when the key is removed from the config.

A 22-character address, a 17-character sender domain and a 10-character topic make a
115-character token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = (
    "CSRF_MAX_AGE",
    "MAX_TOKEN_CHARS",
    "MIN_SECRET_BYTES",
    "TokenCodec",
    "TokenError",
    "TokenExpired",
    "TokenKey",
    "UnsubscribeToken",
    "decode_secret",
    "new_secret",
)

VERSION = 1
MIN_SECRET_BYTES = 32
#: Longer strings are refused before any decoding (a token for a 254-character address is ~450).
MAX_TOKEN_CHARS = 1024
#: Clock skew tolerated between the instance that issued a token and the one reading it.
FUTURE_SKEW = 300
#: A CSRF value is good for this long: a page left open over lunch still works.
CSRF_MAX_AGE = 4 * 3600

_HEADER = struct.Struct(">B2s")
_NONCE_BYTES = 12
_TAG_BYTES = 16
_MIN_BYTES = _HEADER.size + _NONCE_BYTES + 4 + 2 + _TAG_BYTES  # two separators, empty fields
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_-]+$")
_CSRF_MAC_BYTES = 16


class TokenError(Exception):
    """Not a token of ours: malformed, forged, altered, or made with a key no longer configured."""


class TokenExpired(TokenError):
    """An authentic token older than the configured lifetime; ``token`` is what it says."""

    def __init__(self, token: UnsubscribeToken) -> None:
        super().__init__("the token has expired")
        self.token = token


@dataclass(frozen=True, slots=True)
class UnsubscribeToken:
    """What a token says: the recipient, the sender (From domain) and topic of the mail it
    came in, when it was made and with which key."""

    recipient: str
    sender: str
    topic: str
    issued_at: int  # seconds since the epoch
    key_id: str


def decode_secret(text: str) -> bytes:
    """A key secret from its base64 text (standard or URL-safe alphabet, padding optional)."""
    cleaned = "".join(text.split())
    try:
        secret = base64.urlsafe_b64decode(cleaned.replace("+", "-").replace("/", "_") + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("secret is not base64 (make one with: sendguard unsubscribe keygen)") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} random bytes are needed "
            "(make one with: sendguard unsubscribe keygen)"
        )
    return secret


def new_secret() -> str:
    """32 fresh random bytes, base64: a new key secret."""
    return base64.b64encode(os.urandom(MIN_SECRET_BYTES)).decode("ascii")


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"sendguard/unsubscribe/" + label).derive(secret)


def _key_hint(key_id: str) -> bytes:
    return hashlib.sha256(key_id.encode("utf-8")).digest()[:2]


@dataclass(frozen=True)
class TokenKey:
    """One configured key: its id and the keys derived from its secret."""

    id: str
    aead: AESGCM
    csrf_key: bytes
    hint: bytes

    @classmethod
    def from_secret(cls, key_id: str, secret: bytes) -> TokenKey:
        if not key_id:
            raise ValueError("a key needs an id")
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a key secret needs at least {MIN_SECRET_BYTES} bytes")
        return cls(key_id, AESGCM(_derive(secret, b"token/v1")), _derive(secret, b"csrf/v1"), _key_hint(key_id))

    @classmethod
    def from_base64(cls, key_id: str, text: str) -> TokenKey:
        return cls.from_secret(key_id, decode_secret(text))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _TOKEN_CHARS.match(text):
        raise TokenError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("not base64url") from None
    # One token, one spelling: the unused low bits of the last character must be zero, so the
    # per-token rate limit cannot be dodged with a sibling spelling of the same bytes.
    if _b64encode(data) != text:
        raise TokenError("not canonical base64url")
    return data


class TokenCodec:
    """Issues and reads tokens with the configured keys (the first issues, all verify)."""

    def __init__(self, keys: Sequence[TokenKey], ttl: float) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        if ttl <= 0:
            raise ValueError("the token lifetime must be positive")
        self.keys = tuple(keys)
        self.ttl = float(ttl)

    @property
    def issuing_key(self) -> TokenKey:
        return self.keys[0]

    # ---- tokens -------------------------------------------------------------------------------

    def issue(self, recipient: str, sender: str, topic: str, *, now: float | None = None) -> str:
        for name, value in (("recipient", recipient), ("sender", sender), ("topic", topic)):
            if "\x00" in value:
                raise ValueError(f"{name} contains NUL")
        issued = int(time.time() if now is None else now)
        key = self.issuing_key
        header = _HEADER.pack(VERSION, key.hint)
        nonce = os.urandom(_NONCE_BYTES)
        plaintext = struct.pack(">I", issued) + "\x00".join((recipient, sender, topic)).encode("utf-8")
        token = _b64encode(header + nonce + key.aead.encrypt(nonce, plaintext, header))
        if len(token) > MAX_TOKEN_CHARS:  # read() would refuse it: a dead link must never be sent
            raise ValueError(f"recipient, sender and topic are too long for a token ({len(token)} characters)")
        return token

    def read(self, text: str, *, now: float | None = None, allow_expired: bool = False) -> UnsubscribeToken:
        """The token's content. Raises ``TokenError`` for anything not made by a configured key,
        and ``TokenExpired`` for a token older than the lifetime unless ``allow_expired``."""
        if not text or len(text) > MAX_TOKEN_CHARS:
            raise TokenError("no token, or too long")
        data = _b64decode(text)
        if len(data) < _MIN_BYTES:
            raise TokenError("too short")
        version, hint = _HEADER.unpack_from(data)
        if version != VERSION:
            raise TokenError(f"unknown token version {version}")
        header = data[: _HEADER.size]
        nonce = data[_HEADER.size : _HEADER.size + _NONCE_BYTES]
        sealed = data[_HEADER.size + _NONCE_BYTES :]
        for key in self.keys:
            if key.hint != hint:
                continue
            try:
                plaintext = key.aead.decrypt(nonce, sealed, header)
            except InvalidTag:
                continue
            token = self._unpack(plaintext, key.id)
            moment = time.time() if now is None else now
            if token.issued_at > moment + FUTURE_SKEW:
                raise TokenError("issued in the future")
            if moment - token.issued_at > self.ttl and not allow_expired:
                raise TokenExpired(token)
            return token
        raise TokenError("not made by a configured key")

    @staticmethod
    def _unpack(plaintext: bytes, key_id: str) -> UnsubscribeToken:
        (issued,) = struct.unpack_from(">I", plaintext)
        try:
            fields = plaintext[4:].decode("utf-8").split("\x00")
        except UnicodeDecodeError:
            raise TokenError("bad content") from None
        if len(fields) != 3:
            raise TokenError("bad content")
        recipient, sender, topic = fields
        return UnsubscribeToken(recipient, sender, topic, issued, key_id)

    # ---- CSRF ---------------------------------------------------------------------------------

    def csrf(self, token_text: str, purpose: str, *, now: float | None = None) -> str:
        """A value for a form's hidden field: an HMAC over the token, the form's purpose and
        the time, checked on POST. No cookie or server-side session is needed: only a page
        served for this token can hold a matching value."""
        issued = int(time.time() if now is None else now)
        return f"{issued:x}.{self._csrf_mac(self.issuing_key, token_text, purpose, issued)}"

    def check_csrf(
        self,
        value: str,
        token_text: str,
        purpose: str,
        *,
        now: float | None = None,
        max_age: float = CSRF_MAX_AGE,
    ) -> bool:
        if not value.isascii():  # hmac.compare_digest refuses non-ASCII str: never a 500
            return False
        stamp, dot, mac = value.partition(".")
        if not dot or len(stamp) > 12:
            return False
        try:
            issued = int(stamp, 16)
        except ValueError:
            return False
        moment = time.time() if now is None else now
        if issued > moment + FUTURE_SKEW or moment - issued > max_age:
            return False
        return any(hmac.compare_digest(mac, self._csrf_mac(key, token_text, purpose, issued)) for key in self.keys)

    @staticmethod
    def _csrf_mac(key: TokenKey, token_text: str, purpose: str, issued: int) -> str:
        message = f"{purpose}\x00{token_text}\x00{issued}".encode()
        return _b64encode(hmac.new(key.csrf_key, message, hashlib.sha256).digest()[:_CSRF_MAC_BYTES])
