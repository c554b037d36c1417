"""Unsubscribe tokens: round trip, tampering, expiry, key rotation, enumeration, privacy, CSRF."""

from __future__ import annotations

import base64
import os
import random
import string

import pytest

from proxy.unsubscribe.tokens import (
    MAX_TOKEN_CHARS,
    TokenCodec,
    TokenError,
    TokenExpired,
    TokenKey,
    decode_secret,
    new_secret,
)

NOW = 1_800_000_000.0
DAY = 86400.0
KEY_A = TokenKey.from_secret("2026a", bytes(range(32)))
KEY_B = TokenKey.from_secret("2027a", bytes(range(50, 82)))


def codec(*keys: TokenKey, ttl: float = 400 * DAY) -> TokenCodec:
    return TokenCodec(keys or (KEY_A,), ttl)


@pytest.mark.parametrize(
    ("recipient", "sender", "topic"),
    [
        ("bob@example.org", "shop.example", "newsletter"),
        ("Bob.Jansen+news@Example.ORG", "news.shop.example", "*"),
        ("jörg@bücher.example", "bücher.example", "offers.shoes"),
        ("a@b.c", "*", "*"),
        ("x" * 64 + "@" + "d" * 180 + ".example", "shop.example", "t" * 64),
    ],
)
def test_round_trip(recipient: str, sender: str, topic: str) -> None:
    tokens = codec()
    text = tokens.issue(recipient, sender, topic, now=NOW)
    token = tokens.read(text, now=NOW + 10)
    assert (token.recipient, token.sender, token.topic) == (recipient, sender, topic)
    assert token.issued_at == int(NOW)
    assert token.key_id == "2026a"
    assert set(text) <= set(string.ascii_letters + string.digits + "-_"), "URL-safe, no padding"
    assert len(text) <= MAX_TOKEN_CHARS


def test_a_typical_token_is_compact() -> None:
    text = codec().issue("bob.jansen@example.org", "news.shop.example", "newsletter", now=NOW)
    assert len(text) < 120


def test_the_token_reveals_nothing_when_read() -> None:
    text = codec().issue("bob.jansen@example.org", "news.shop.example", "newsletter", now=NOW)
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    for secret in (b"bob", b"jansen", b"example", b"newsletter", b"shop"):
        assert secret not in raw
    # The same content never gives the same token (random nonce): tokens cannot be correlated.
    assert text != codec().issue("bob.jansen@example.org", "news.shop.example", "newsletter", now=NOW)


def test_every_tampered_byte_is_refused() -> None:
    tokens = codec()
    text = tokens.issue("bob@example.org", "shop.example", "newsletter", now=NOW)
    raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    for position in range(len(raw)):
        for flip in (0x01, 0x80):
            changed = bytearray(raw)
            changed[position] ^= flip
            forged = base64.urlsafe_b64encode(bytes(changed)).rstrip(b"=").decode()
            with pytest.raises(TokenError):
                tokens.read(forged, now=NOW)


def test_truncated_and_extended_tokens_are_refused() -> None:
    tokens = codec()
    text = tokens.issue("bob@example.org", "shop.example", "newsletter", now=NOW)
    for forged in (text[:-1], text[:-4], text + "A", text + "AAAA", text[:20], ""):
        with pytest.raises(TokenError):
            tokens.read(forged, now=NOW)


def test_a_sibling_spelling_of_the_same_bytes_is_refused() -> None:
    tokens = codec()
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    same_bytes: list[str] = []
    # A token whose length leaves unused bits in its last character (some lengths leave
    # none): a longer local part changes the length until one does.
    for local in ("b", "bo", "bob", "bobb", "bobby"):
        text = tokens.issue(f"{local}@example.org", "shop.example", "newsletter", now=NOW)
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        same_bytes = [text[:-1] + c for c in alphabet if c != text[-1] and _decodes_to(text[:-1] + c, decoded)]
        if same_bytes:
            break
    assert same_bytes, "no token length with unused bits was found"
    for sibling in same_bytes:
        with pytest.raises(TokenError, match="canonical"):
            tokens.read(sibling, now=NOW)


def _decodes_to(text: str, data: bytes) -> bool:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) == data
    except ValueError:
        return False


def test_random_strings_never_read_as_tokens() -> None:
    tokens = codec()
    rng = random.Random(8058)
    alphabet = string.ascii_letters + string.digits + "-_"
    real_length = len(tokens.issue("bob@example.org", "shop.example", "newsletter", now=NOW))
    for length in (1, 10, 43, 60, real_length - 1, real_length, real_length + 1, 200, MAX_TOKEN_CHARS + 1):
        for _ in range(200):
            candidate = "".join(rng.choice(alphabet) for _ in range(length))
            with pytest.raises(TokenError):
                tokens.read(candidate, now=NOW)
    for junk in ("../../etc/passwd", "abc def", "tok%20en", "é" * 50, "A" * 5000):
        with pytest.raises(TokenError):
            tokens.read(junk, now=NOW)


def test_expiry() -> None:
    tokens = codec(ttl=30 * DAY)
    text = tokens.issue("bob@example.org", "shop.example", "newsletter", now=NOW)
    assert tokens.read(text, now=NOW + 30 * DAY).recipient == "bob@example.org"
    with pytest.raises(TokenExpired) as caught:
        tokens.read(text, now=NOW + 30 * DAY + 1)
    assert caught.value.token.recipient == "bob@example.org", "an expired token still says whose it is"
    assert tokens.read(text, now=NOW + 900 * DAY, allow_expired=True).topic == "newsletter"


def test_a_token_from_the_future_is_refused() -> None:
    tokens = codec()
    text = tokens.issue("bob@example.org", "shop.example", "newsletter", now=NOW + 3600)
    with pytest.raises(TokenError):
        tokens.read(text, now=NOW)
    assert tokens.read(text, now=NOW + 3600 - 200).recipient == "bob@example.org", "small clock skew is fine"


def test_rotation_the_first_key_issues_every_key_verifies() -> None:
    old = codec(KEY_A)
    issued_before = old.issue("bob@example.org", "shop.example", "newsletter", now=NOW)
    rotated = codec(KEY_B, KEY_A)
    issued_after = rotated.issue("bob@example.org", "shop.example", "newsletter", now=NOW)
    assert rotated.read(issued_before, now=NOW).key_id == "2026a"
    assert rotated.read(issued_after, now=NOW).key_id == "2027a"
    with pytest.raises(TokenError):
        old.read(issued_after, now=NOW)  # an instance without the new key yet
    retired = codec(KEY_B)
    with pytest.raises(TokenError):
        retired.read(issued_before, now=NOW)  # the token died with its key


def test_a_key_with_the_same_id_but_another_secret_does_not_verify() -> None:
    impostor = TokenKey.from_secret("2026a", os.urandom(32))
    text = codec(KEY_A).issue("bob@example.org", "shop.example", "newsletter", now=NOW)
    with pytest.raises(TokenError):
        codec(impostor).read(text, now=NOW)


def test_secrets() -> None:
    secret = new_secret()
    assert len(decode_secret(secret)) == 32
    assert decode_secret(base64.urlsafe_b64encode(bytes(40)).decode().rstrip("=")) == bytes(40)
    for bad, problem in (("c2hvcnQ=", "at least 32"), ("not base64 at all!", "not base64"), ("", "at least 32")):
        with pytest.raises(ValueError, match=problem):
            decode_secret(bad)
    with pytest.raises(ValueError):
        TokenKey.from_secret("k", bytes(16))
    with pytest.raises(ValueError):
        TokenCodec([], 10)
    with pytest.raises(ValueError, match="NUL"):
        codec().issue("bob@example.org\x00x", "shop.example", "t")


def test_csrf_values_are_bound_to_token_purpose_time_and_keys() -> None:
    tokens = codec(KEY_A)
    token = tokens.issue("bob@example.org", "shop.example", "newsletter", now=NOW)
    other = tokens.issue("eve@example.org", "shop.example", "newsletter", now=NOW)
    value = tokens.csrf(token, "unsubscribe", now=NOW)
    assert tokens.check_csrf(value, token, "unsubscribe", now=NOW + 60)
    assert not tokens.check_csrf(value, other, "unsubscribe", now=NOW + 60), "another token"
    assert not tokens.check_csrf(value, token, "withdraw", now=NOW + 60), "another form"
    assert not tokens.check_csrf(value, token, "unsubscribe", now=NOW + 5 * 3600), "too old"
    assert not tokens.check_csrf(value, token, "unsubscribe", now=NOW - 3600), "from the future"
    for forged in ("", "x", "0.AAAA", value[:-2] + "AA", "zz." + value.split(".")[1], value + "A"):
        assert not tokens.check_csrf(forged, token, "unsubscribe", now=NOW + 60), forged
    assert codec(KEY_B, KEY_A).check_csrf(value, token, "unsubscribe", now=NOW + 60), "survives a key rotation"
    assert not codec(KEY_B).check_csrf(value, token, "unsubscribe", now=NOW + 60)
