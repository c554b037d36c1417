"""proxy/addresses.py: one reading of an envelope address and one key to compare addresses by,
shared by the SMTP session, ``sendguard check``, the consent store and the recipient counter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from proxy.addresses import address_key, domain_key, domain_spellings, envelope_address, relayable_recipient
from proxy.stores.consent import OPTED_IN, OPTED_OUT, ConsentStoreConfig, new_event, open_consent_store, parse_subject


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ("bob@example.net", "bob@example.net"),
        ('"bob2"@example.net', "bob2@example.net"),  # RFC 5321 4.1.2: the minimum quoting
        ('<"Bob2"@Example.NET.>', "bob2@example.net"),  # brackets, case, the absolute form's dot
        ('"bob smith"@example.net', '"bob smith"@example.net'),  # these quotes are needed
        ('"a\\"b"@example.net', '"a\\"b"@example.net'),
        ('"a\\b"@example.net', "ab@example.net"),  # a quoted-pair of an atext character
        ("info@Bücher.Example", "info@xn--bcher-kva.example"),  # RFC 5890 A-labels
        ("info@xn--bcher-kva.example", "info@xn--bcher-kva.example"),
        ("info@b\udcc3\udcbccher.example", "info@xn--bcher-kva.example"),  # raw UTF-8 read from bytes
        ("x@[192.0.2.1]", "x@[192.0.2.1]"),
        ("postmaster", "postmaster"),
    ],
)
def test_address_key(given: str, key: str) -> None:
    assert address_key(given) == key
    assert address_key(key) == key  # a key is its own key


@pytest.mark.parametrize(
    ("argument", "address"),
    [
        ('<"bob2"@example.net>', "bob2@example.net"),  # what aiosmtpd hands the session
        ('"bob2"@example.net', "bob2@example.net"),
        ('<"bob smith"@example.net>', '"bob smith"@example.net'),
        ("<Bob@Example.NET>", "Bob@Example.NET"),  # the spelling relayed is kept
        ("<>", ""),
    ],
)
def test_envelope_address(argument: str, address: str) -> None:
    assert envelope_address(argument) == address


@pytest.mark.parametrize("argument", ["<bob@example.net> extra", "<bob@example.net.>", "<a@b@c>", "<@>"])
def test_envelope_address_refuses_what_the_session_refuses(argument: str) -> None:
    with pytest.raises(ValueError):
        envelope_address(argument)


@pytest.mark.parametrize(
    ("address", "ok"),
    [("bob@example.net", True), ("no-domain", False), ("a\r\nb@x.example", False), ("a" * 320 + "@x", False)],
)
def test_relayable_recipient(address: str, ok: bool) -> None:
    assert relayable_recipient(address) is ok


def test_domain_spellings_name_the_unicode_form_too() -> None:
    assert domain_key("Bücher.Example.") == "xn--bcher-kva.example"
    assert domain_spellings("bücher.example") == ("xn--bcher-kva.example", "bücher.example")
    assert domain_spellings("example.net") == ("example.net",)
    assert domain_key("*.Corp.Example") == "*.corp.example"  # a glob keeps its star


def test_consent_subjects_use_the_one_key() -> None:
    assert parse_subject('"Bob2"@Example.NET.').value == "bob2@example.net"
    assert parse_subject("@Bücher.example").value == "xn--bcher-kva.example"


async def test_a_record_written_under_the_unicode_spelling_still_counts(tmp_path: Path) -> None:
    """Before keys were A-labels a record kept the domain as typed: an opt-out recorded then
    must still stop mail to the same address written either way."""
    store = await open_consent_store(ConsentStoreConfig(path=str(tmp_path / "consent.db")))
    try:
        evidence = {"method": "double_opt_in", "confirmed_at": "2026-01-02", "at": "2026-01-01"}
        await store.add(new_event(OPTED_IN, "info@bücher.example", source="https://example.com/f", **evidence))
        legacy = new_event(OPTED_OUT, "info@bücher.example", method="link", at="2026-02-01")
        await store.add(dataclasses.replace(legacy, subject="info@bücher.example"))  # the old key
        for spelling in ("info@xn--bcher-kva.example", "INFO@Bücher.Example"):
            basis = await store.basis(spelling)
            assert (basis.allowed, basis.kind) == (False, "opted_out"), spelling
    finally:
        await store.close()
