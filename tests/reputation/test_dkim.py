"""DKIM signing: signatures verify with dkimpy, with Perl's Mail::DKIM and with an independent
verifier written here from RFC 6376/8463; keys come from the loopback DNS server only.

Mail::DKIM (Debian's libmail-dkim-perl 1.20230212) has no Ed25519, so Ed25519 is checked
by dkimpy and by the independent verifier (``cryptography``'s Ed25519, own canonicalisation).
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import email.utils
import hashlib
import os
import re
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import dkim
import dns.resolver
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cli import dns as dns_cli
from proxy.reputation import dkim_canon
from proxy.reputation.dkim import (
    DKIMConfig,
    DKIMKeyConfig,
    DKIMKeyError,
    DKIMSignError,
    Signer,
    dkim_config_problems,
    dns_txt_strings,
    from_domains,
    generate_private_key,
    load_keys,
    write_private_key,
)
from proxy.schema import ConfigError, Converter, compose
from tests.conftest import IN_CI
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream

# ---- keys and the DNS that publishes them --------------------------------------------------------

SMALL_RSA_KEY = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAriMQQMve718b4JrI
kivNR61/z6J/rTzCxJ35kpW+QEQ0dXJCfPRFXUOL4qwA2UAtsb/ANTDJYGXc5hmj
w+bKPwIDAQABAkAUh//Pk/n6AR25UqaZTV7Lt7IdGgyxsTtJkVKurMccrnwiqCW2
hahfTESGaIS/1AivSjBIscot6uaTGnfu0zbxAiEA3iX6ymSyKaHwNVUPIerhFeN1
Ddm25SyxJRS9LSOh8xkCIQDIrCgb77otU1cv5oin7EIer67uS19Krz9Jda/8AALr
FwIgCFJV5bUF84dMb0MDcRrSWbaOkPlB363f6Oqw93rpOykCIQCvZ7QDf08ocVGj
gAnxZhUBh6ULi/x2ZqqWBnXWexgR7wIgBt5Rpp+SqXsJ/NcinDmkKrytHo2iDQO8
S0tYU2sALj4=
-----END PRIVATE KEY-----
"""


@dataclass
class KeyFiles:
    rsa: Path
    ed25519: Path
    rsa_parent: Path


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    directory = tmp_path_factory.mktemp("dkim")
    files = KeyFiles(directory / "rsa.pem", directory / "ed.pem", directory / "parent.pem")
    write_private_key(files.rsa, generate_private_key("rsa-sha256", 2048))
    write_private_key(files.ed25519, generate_private_key("ed25519-sha256"))
    write_private_key(files.rsa_parent, generate_private_key("rsa-sha256", 2048))
    return files


def both_keys(files: KeyFiles, **changes: object) -> DKIMConfig:
    keys = (
        DKIMKeyConfig("example.com", "s2026", str(files.rsa), "rsa-sha256"),
        DKIMKeyConfig("example.com", "ed2026", str(files.ed25519), "ed25519-sha256"),
    )
    return DKIMConfig(keys=keys, **changes)  # type: ignore[arg-type]


def publish(server: DNSServer, signer: Signer) -> None:
    """Each key's TXT record, split into 255-byte strings as the keygen prints it."""
    for key in signer.keys:
        strings = " ".join(f'"{part}"' for part in dns_txt_strings(key.dns_record()))
        server.set(key.config.record_name, "TXT", [strings])


@pytest.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    server = await DNSServer().start()
    yield server
    await server.stop()


def sync_txt(server: DNSServer) -> Callable[[str], str | None]:
    """A blocking TXT lookup against the loopback server, for verifiers run in a thread."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    resolver.lifetime = 5

    def lookup(name: str) -> str | None:
        try:
            answer = resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(b"".join(r.strings) for r in answer).decode("ascii")

    return lookup


async def dkimpy_verify_all(message: bytes, server: DNSServer) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature, top first, keys from the loopback DNS."""
    lookup = sync_txt(server)

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        text = lookup(name.decode() if isinstance(name, bytes) else name)
        return text.encode() if text is not None else None

    def run() -> list[bool]:
        count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n", 1)[0]))
        verifier = dkim.DKIM(message)
        verdicts = []
        for index in range(count):
            try:
                verdicts.append(bool(verifier.verify(index, dnsfunc=dnsfunc)))
            except dkim.DKIMException:  # a body hash mismatch raises instead of returning False
                verdicts.append(False)
        return verdicts

    return await asyncio.to_thread(run)


# ---- an independent verifier (RFC 6376 3.4, 3.7; RFC 8463 3) -----------------------------------------


def _split(message: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[tuple[str, bytes]] = []
    for line in (head + b"\r\n").split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b"\r\n" + line)
        else:
            fields.append((line.split(b":", 1)[0].decode("ascii"), line))
    return fields, body


def _relaxed_header(raw: bytes) -> bytes:
    name, _, value = raw.partition(b":")
    value = re.sub(rb"\r\n", b"", value)
    value = re.sub(rb"[ \t]+", b" ", value).strip(b" ")
    return name.strip().lower() + b":" + value + b"\r\n"


def _body(body: bytes, mode: str) -> bytes:
    if mode == "relaxed":
        lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
        text = b"\r\n".join(lines)
        text = re.sub(rb"(\r\n)*$", b"", text)
        return text + b"\r\n" if text else b""
    text = re.sub(rb"(\r\n)*$", b"", body)
    return text + b"\r\n"


def independent_verify(message: bytes, lookup: Callable[[str], str | None]) -> list[tuple[str, str, bool]]:
    """(d=, a=, valid) for each DKIM-Signature, computed without dkimpy."""
    fields, body = _split(message)
    out: list[tuple[str, str, bool]] = []
    for name, raw in fields:
        if name.lower() != "dkim-signature":
            continue
        value = raw.partition(b":")[2]
        tags = {
            k.strip(): re.sub(r"\s+", "", v)
            for k, _, v in (part.partition("=") for part in value.decode("ascii").split(";"))
            if k.strip()
        }
        header_mode, body_mode = [*tags.get("c", "simple/simple").split("/"), "simple"][:2]
        valid = base64.b64decode(tags["bh"]) == hashlib.sha256(_body(body, body_mode)).digest()
        used: dict[str, int] = {}
        data = b""
        for wanted in tags["h"].lower().split(":"):
            candidates = [i for i, (n, _) in enumerate(fields) if n.lower() == wanted]
            taken = used.get(wanted, 0)
            if taken < len(candidates):
                index = candidates[len(candidates) - 1 - taken]  # bottom-up (RFC 6376 5.4.2)
                data += _relaxed_header(fields[index][1]) if header_mode == "relaxed" else fields[index][1] + b"\r\n"
            used[wanted] = taken + 1
        unsigned = re.sub(rb"(^|;)(\s*b\s*=)[^;]*", rb"\1\2", raw)
        canon = _relaxed_header(unsigned) if header_mode == "relaxed" else unsigned + b"\r\n"
        data += canon[:-2]
        record = lookup(f"{tags['s']}._domainkey.{tags['d']}") or ""
        public = base64.b64decode(dict(p.strip().split("=", 1) for p in record.split(";") if "=" in p)["p"])
        signature = base64.b64decode(tags["b"])
        try:
            if tags["a"] == "rsa-sha256":
                key = serialization.load_der_public_key(public)
                assert isinstance(key, rsa.RSAPublicKey)
                key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            else:
                ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, hashlib.sha256(data).digest())
        except Exception:
            valid = False
        out.append((tags["d"], tags["a"], valid))
    return out


# ---- Mail::DKIM (Perl) ------------------------------------------------------------------------

PERL_VERIFIER = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
my $resolver = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0], recurse => 1,
                                       udp_timeout => 5, tcp_timeout => 5, retry => 1);
Mail::DKIM::DNS::resolver($resolver);   # keys from the loopback server, never the Internet
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) { $line =~ s/\015?\012/\015\012/; $dkim->PRINT($line); }
$dkim->CLOSE;
foreach my $signature ($dkim->signatures) {
    printf "%s %s %s\n", $signature->domain, $signature->algorithm, $signature->result_detail;
}
"""


def need_mail_dkim() -> None:
    """Skip without Mail::DKIM (apt-get install libmail-dkim-perl); fail under CI, which installs it."""
    found = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True, check=False)
    if found.returncode != 0:
        reason = "Mail::DKIM is not installed (apt-get install libmail-dkim-perl); the test needs it"
        if IN_CI:
            pytest.fail(reason + ", and CI must run this test (scripts/install-test-tools installs it)")
        pytest.skip(reason)


async def mail_dkim_verify(message: bytes, server: DNSServer) -> list[str]:
    need_mail_dkim()
    process = await asyncio.create_subprocess_exec(
        "perl", "-e", PERL_VERIFIER, str(server.port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(message), 30)
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()


# ---- messages ---------------------------------------------------------------------------------

LONG_UNSUBSCRIBE = (
    "<https://unsubscribe.example.com/one-click/"
    + "A" * 90
    + "?list=news&campaign=2026-11>,\r\n <mailto:unsubscribe@example.com?subject=unsubscribe-"
    + "B" * 40
    + ">"
)


def newsletter(sender: str = "News <news@example.com>", body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@example.org\r\nSubject: November news\r\n"
        "Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <n1@example.com>\r\n"
        f"List-Unsubscribe: {LONG_UNSUBSCRIBE}\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode() + body


def h_tags(signed: bytes) -> list[list[str]]:
    out = []
    for raw in re.findall(rb"(?ims)^dkim-signature:(.*?)\r\n(?![ \t])", signed):
        unfolded = re.sub(rb"\s+", b"", raw).decode()
        out.append(re.search(r"(?:^|;)h=([^;]*)", unfolded).group(1).lower().split(":"))  # type: ignore[union-attr]
    return out


# ---- tests: signatures verify ---------------------------------------------------------------------


async def test_rsa_and_ed25519_signatures_verify_with_dkimpy_and_independently(
    key_files: KeyFiles, dns_server: DNSServer
) -> None:
    signer = Signer.from_config(both_keys(key_files))
    publish(dns_server, signer)
    result = await signer.sign_async(newsletter())
    assert result.signatures == (
        ("example.com", "s2026", "rsa-sha256"),
        ("example.com", "ed2026", "ed25519-sha256"),
    )
    assert result.message.endswith(newsletter())  # prepended, the original bytes untouched
    assert await dkimpy_verify_all(result.message, dns_server) == [True, True]
    independent = await asyncio.to_thread(independent_verify, result.message, sync_txt(dns_server))
    assert independent == [("example.com", "rsa-sha256", True), ("example.com", "ed25519-sha256", True)]


async def test_mail_dkim_verifies_the_rsa_signature(key_files: KeyFiles, dns_server: DNSServer) -> None:
    signer = Signer.from_config(DKIMConfig(keys=both_keys(key_files).keys[:1]))
    publish(dns_server, signer)
    lines = await mail_dkim_verify(signer.sign(newsletter()), dns_server)
    assert lines == ["example.com rsa-sha256 pass"]


async def test_the_independent_verifier_rejects_a_tampered_message(key_files: KeyFiles, dns_server: DNSServer) -> None:
    # Guards the guard: a verifier that says "valid" to everything would prove nothing.
    signer = Signer.from_config(both_keys(key_files))
    publish(dns_server, signer)
    signed = signer.sign(newsletter())
    tampered_body = signed.replace(b"Hello.", b"Hellx.")
    tampered_subject = signed.replace(b"November news", b"December news")
    for tampered in (tampered_body, tampered_subject):
        verdicts = await asyncio.to_thread(independent_verify, tampered, sync_txt(dns_server))
        assert [valid for _, _, valid in verdicts] == [False, False]
        assert await dkimpy_verify_all(tampered, dns_server) == [False, False]


async def test_signature_survives_transport_through_aiosmtplib(
    key_files: KeyFiles, dns_server: DNSServer, upstream: FakeUpstream
) -> None:
    # Lines that need dot-stuffing, a lone dot, a body without a final CRLF, the folded
    # List-Unsubscribe: what the upstream receives must still verify.
    body = b"First line\r\n.starts with a dot\r\n..two dots\r\n.\r\nlast line without CRLF"
    signer = Signer.from_config(both_keys(key_files))
    publish(dns_server, signer)
    signed = signer.sign(newsletter(body=body))
    await aiosmtplib.send(
        signed, sender="news@example.com", recipients=["bob@example.org"],
        hostname="127.0.0.1", port=upstream.port, start_tls=False, timeout=20,
    )  # fmt: skip
    received = upstream.messages[0].content
    assert b"\r\n.starts with a dot\r\n" in received  # un-stuffed by the receiving server
    assert await dkimpy_verify_all(received, dns_server) == [True, True]
    independent = await asyncio.to_thread(independent_verify, received, sync_txt(dns_server))
    assert [valid for _, _, valid in independent] == [True, True]
    mail_dkim = await mail_dkim_verify(received, dns_server)
    assert mail_dkim[0] == "example.com rsa-sha256 pass"


@pytest.mark.parametrize(
    ("canonicalization", "verifies_after_refolding"),
    [("relaxed/relaxed", True), ("relaxed/simple", True), ("simple/simple", False)],
)
async def test_refolded_list_unsubscribe_needs_relaxed_headers(
    key_files: KeyFiles, dns_server: DNSServer, canonicalization: str, verifies_after_refolding: bool
) -> None:
    # nodemailer#1654: a relay re-folds a long header after signing. Relaxed header
    # canonicalisation (the default) unfolds before hashing, so the signature survives.
    signer = Signer.from_config(DKIMConfig(keys=both_keys(key_files).keys, canonicalization=canonicalization))  # type: ignore[arg-type]
    publish(dns_server, signer)
    signed = signer.sign(newsletter())
    refolded = signed.replace(
        b"?list=news&campaign=2026-11>,\r\n <mailto:", b"?list=news&campaign=2026-11>,\r\n\t  <mailto:"
    )
    assert refolded != signed
    assert await dkimpy_verify_all(refolded, dns_server) == [verifies_after_refolding] * 2


async def test_h_covers_list_unsubscribe_pair_and_oversigns_from(key_files: KeyFiles) -> None:
    # Even a config that forgets them signs From and the RFC 8058 pair, once more than present.
    signer = Signer.from_config(DKIMConfig(keys=both_keys(key_files).keys, headers=("Subject",), oversign=()))
    with_pair = h_tags(signer.sign(newsletter()))
    assert with_pair[0] == with_pair[1]
    assert with_pair[0] == [
        "from", "from", "list-unsubscribe", "list-unsubscribe",
        "list-unsubscribe-post", "list-unsubscribe-post", "subject",
    ]  # fmt: skip
    transactional = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: receipt\r\n\r\nthanks\r\n"
    without_pair = h_tags(signer.sign(transactional))[0]
    # Absent fields are signed empty once: nobody downstream can add a List-Unsubscribe.
    assert without_pair == ["from", "from", "list-unsubscribe", "list-unsubscribe-post", "subject"]


async def test_default_headers_sign_every_instance_and_oversign_the_singletons(key_files: KeyFiles) -> None:
    signer = Signer.from_config(both_keys(key_files))
    message = newsletter().replace(b"To: bob@example.org\r\n", b"To: bob@example.org\r\nReferences: <a@x>\r\n")
    names = h_tags(signer.sign(message))[0]
    assert names.count("from") == 2 and names.count("subject") == 2 and names.count("to") == 2
    assert names.count("references") == 1  # signed, not oversigned
    assert "received" not in names and "dkim-signature" not in names


@pytest.mark.parametrize(
    ("added", "why"),
    [
        (b"From: Bank <ceo@bank.example>\r\n", "a second From"),
        (b"List-Unsubscribe: <https://evil.example/u>\r\n", "a second List-Unsubscribe"),
        (b"Subject: Re: urgent\r\n", "a second Subject"),
    ],
)
async def test_fields_added_after_signing_break_the_signature(
    key_files: KeyFiles, dns_server: DNSServer, added: bytes, why: str
) -> None:
    signer = Signer.from_config(both_keys(key_files))
    publish(dns_server, signer)
    signed = signer.sign(newsletter())
    head, _, body = signed.partition(b"\r\n\r\n")
    assert await dkimpy_verify_all(signed, dns_server) == [True, True]
    tampered = head + b"\r\n" + added.rstrip(b"\r\n") + b"\r\n\r\n" + body
    assert await dkimpy_verify_all(tampered, dns_server) == [False, False], why
    verdicts = await asyncio.to_thread(independent_verify, tampered, sync_txt(dns_server))
    assert [valid for _, _, valid in verdicts] == [False, False], why


# ---- tests: which key signs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        # example.com itself: its own key, and the parent key, whose domain is exact here too
        ("News <news@example.com>", [("example.com", "s2026"), ("example.com", "parent")]),
        ("news@EXAMPLE.COM", [("example.com", "s2026"), ("example.com", "parent")]),
        ("news@mail.example.com", [("mail.example.com", "m1"), ("example.com", "parent")]),
        ("news@deep.news.example.com", [("example.com", "parent")]),
        ("news@example.org", []),
        ("news@notexample.com", []),
        (
            "a@example.com, b@example.net",
            [("example.com", "s2026"), ("example.com", "parent"), ("example.net", "net1")],
        ),
    ],
)
def test_key_chosen_by_from_domain_exact_then_parents_marked_subdomains(
    key_files: KeyFiles, sender: str, expected: list[tuple[str, str]]
) -> None:
    config = DKIMConfig(
        keys=(
            DKIMKeyConfig("example.com", "s2026", str(key_files.rsa)),
            DKIMKeyConfig("mail.example.com", "m1", str(key_files.rsa)),
            DKIMKeyConfig("example.com", "parent", str(key_files.rsa_parent), subdomains=True),
            DKIMKeyConfig("example.net", "net1", str(key_files.rsa)),
        )
    )
    result = Signer.from_config(config).sign_detailed(newsletter(sender=sender))
    assert [(d, s) for d, s, _ in result.signatures] == expected
    if not expected:
        assert result.skipped == "no-key"
        assert result.message == newsletter(sender=sender)


def test_the_last_from_field_chooses_the_key(key_files: KeyFiles) -> None:
    # RFC 6376 5.4.2: h=from covers the bottom-most From, so that is the one d= must match.
    signer = Signer.from_config(DKIMConfig(keys=(DKIMKeyConfig("example.com", "s2026", str(key_files.rsa)),)))
    two_froms = b"From: a@other.example\r\nTo: b@example.org\r\nFrom: c@example.com\r\n\r\nbody\r\n"
    assert [d for d, _, _ in signer.sign_detailed(two_froms).signatures] == ["example.com"]
    reversed_froms = b"From: c@example.com\r\nTo: b@example.org\r\nFrom: a@other.example\r\n\r\nbody\r\n"
    assert signer.sign_detailed(reversed_froms).skipped == "no-key"


def test_messages_without_from_or_with_a_broken_header(key_files: KeyFiles) -> None:
    signer = Signer.from_config(both_keys(key_files))
    no_from = b"To: b@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    result = signer.sign_detailed(no_from)
    assert (result.message, result.skipped) == (no_from, "no-from")
    with pytest.raises(DKIMSignError) as caught:
        signer.sign(b"From: a@example.com\r\nthis line has no colon\r\n\r\nbody\r\n")
    assert caught.value.permanent


# ---- tests: keys and config ---------------------------------------------------------------------


def test_key_errors_are_reported_per_entry_with_a_fix(key_files: KeyFiles, tmp_path: Path) -> None:
    small = tmp_path / "small.pem"
    small.write_bytes(SMALL_RSA_KEY)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    config = DKIMConfig(
        keys=(
            DKIMKeyConfig("example.com", "ok", str(key_files.rsa)),
            DKIMKeyConfig("example.com", "missing", str(tmp_path / "nope.pem")),
            DKIMKeyConfig("example.com", "garbage", str(garbage)),
            DKIMKeyConfig("example.com", "small", str(small)),
            DKIMKeyConfig("example.com", "wrongalg", str(key_files.rsa), "ed25519-sha256"),
            DKIMKeyConfig("example.com", "wrongalg2", str(key_files.ed25519), "rsa-sha256"),
        )
    )
    problems = dict(dkim_config_problems(config))
    assert set(problems) == {f"keys[{i}].key_file" for i in range(1, 6)}
    assert "key file not found" in problems["keys[1].key_file"]
    assert "sendguard dkim keygen example.com garbage" in problems["keys[2].key_file"]
    assert "512-bit" in problems["keys[3].key_file"] and "RFC 8301" in problems["keys[3].key_file"]
    assert "holds a RSA key but algorithm is ed25519-sha256" in problems["keys[4].key_file"]
    assert "holds a Ed25519 key but algorithm is rsa-sha256" in problems["keys[5].key_file"]
    with pytest.raises(DKIMKeyError) as caught:
        load_keys(config)
    assert len(caught.value.issues) == 5


def test_a_readable_key_file_is_used_with_a_warning(key_files: KeyFiles, tmp_path: Path) -> None:
    loose = tmp_path / "loose.pem"
    loose.write_bytes(key_files.rsa.read_bytes())
    loose.chmod(0o644)
    (loaded,) = load_keys(DKIMConfig(keys=(DKIMKeyConfig("example.com", "s", str(loose)),)))
    assert loaded.bits == 2048
    assert any("chmod 600" in warning for warning in loaded.warnings)


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        (
            "keys: [{domain: example.com, selector: s1, key_file: k.pem, algoritm: rsa-sha256}]",
            "did you mean 'algorithm'",
        ),
        ("keys: [{domain: example.com, selector: s1, key_file: k.pem, algorithm: rsa-sha1}]", "must be one of"),
        ("headers: [From, Received]", "Received must not be signed"),
        ("keys: [{domain: 'exa mple.com', selector: s1, key_file: k.pem}]", "not a valid DNS name"),
        (
            "keys: [{domain: example.com, selector: s1, key_file: a.pem}, {domain: example.com, selector: s1, key_file: b.pem}]",
            "listed twice",
        ),
    ],
)
def test_dkim_section_is_checked_like_the_rest_of_the_config(yaml_text: str, error: str) -> None:
    converter = Converter("sendguard.yaml")
    node = compose(yaml_text, "sendguard.yaml")
    assert node is not None
    converter.convert(node, DKIMConfig, "dkim")
    assert any(error in str(issue) for issue in converter.issues), converter.issues


def test_dkim_section_parses_from_yaml(key_files: KeyFiles) -> None:
    text = yaml.safe_dump(
        {
            "keys": [{"domain": "Example.COM.", "selector": "s2026", "key_file": str(key_files.rsa)}],
            "oversign": ["Subject"],
        }
    )
    node = compose(text, "x.yaml")
    assert node is not None
    converter = Converter("x.yaml")
    config = converter.convert(node, DKIMConfig, "dkim")
    assert converter.issues == []
    assert config.keys[0].domain == "example.com" and config.keys[0].algorithm == "rsa-sha256"
    assert Signer.from_config(config).enabled


# ---- tests: keygen --------------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "strings"), [("rsa", 2), ("ed25519", 1)])
async def test_keygen_writes_a_private_key_and_prints_a_record_that_verifies(
    tmp_path: Path, dns_server: DNSServer, capsys: pytest.CaptureFixture[str], algorithm: str, strings: int
) -> None:
    out = tmp_path / "keys"
    code = await asyncio.to_thread(
        dns_cli.main, ["dkim", "keygen", "example.com", "s2026", "--algorithm", algorithm, "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0
    key_file = out / "example.com.s2026.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    record = re.search(r"^s2026\._domainkey\.example\.com\. IN TXT \( (.*?) \)$", printed, re.S | re.M)
    assert record is not None
    parts = re.findall(r'"([^"]*)"', record.group(1))
    assert len(parts) == strings and all(len(part) <= 255 for part in parts)
    assert f"algorithm: {'rsa-sha256' if algorithm == 'rsa' else 'ed25519-sha256'}" in printed
    # The printed record, published as printed, verifies a signature made with the written key.
    dns_server.set("s2026._domainkey.example.com", "TXT", [record.group(1).replace("\n    ", " ")])
    key_algorithm = "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    signer = Signer.from_config(DKIMConfig(keys=(DKIMKeyConfig("example.com", "s2026", str(key_file), key_algorithm),)))  # type: ignore[arg-type]
    assert await dkimpy_verify_all(signer.sign(newsletter()), dns_server) == [True]


def test_keygen_refuses_to_overwrite_and_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["dkim", "keygen", "example.com", "s1", "--algorithm", "ed25519", "--out", str(tmp_path)]
    assert dns_cli.main(args) == 0
    first = (tmp_path / "example.com.s1.pem").read_bytes()
    assert dns_cli.main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "example.com.s1.pem").read_bytes() == first
    assert dns_cli.main([*args, "--force"]) == 0
    assert (tmp_path / "example.com.s1.pem").read_bytes() != first
    assert dns_cli.main(["dkim", "keygen", "example.com", "s2", "--bits", "512", "--out", str(tmp_path)]) == 2
    assert "RFC 8301" in capsys.readouterr().err
    assert not (tmp_path / "example.com.s2.pem").exists()
    assert dns_cli.main(["dkim", "keygen", "bad domain", "s3", "--out", str(tmp_path)]) == 2


def test_read_section_reports_config_errors_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "sendguard.yaml"
    path.write_text("listeners: []\ndkim:\n  keys:\n    - {domain: example.com, selector: s1}\n")
    with pytest.raises(ConfigError) as caught:
        dns_cli.read_section(str(path), "dkim", DKIMConfig)
    assert "key_file: required key is missing" in str(caught.value)
    assert dns_cli.read_section(str(path), "dns", DKIMConfig) == DKIMConfig()
    assert os.path.exists(path)


# ---- every shape of message, both algorithms, every canonicalisation, three verifiers ----------------
#
# The signer canonicalises by itself (proxy/reputation/dkim_canon.py), so each signature is
# checked by dkimpy, by Mail::DKIM (RSA only: Debian's 1.20230212 has no Ed25519) and by
# OpenDKIM's test mode (`opendkim -t`, RSA and Ed25519, the keys from its TestPublicKeys file),
# on the bytes the upstream receives.


def need_opendkim() -> str:
    """The opendkim program (Debian's opendkim package); skip without it, fail under CI."""
    for candidate in ("/usr/sbin/opendkim", "/usr/bin/opendkim"):
        if os.access(candidate, os.X_OK):
            return candidate
    reason = "opendkim is not installed (apt-get install opendkim); the test needs it"
    if IN_CI:
        pytest.fail(reason + ", and CI must run this test (scripts/install-test-tools installs it)")
    pytest.skip(reason)


async def opendkim_verify(message: bytes, signer: Signer, directory: Path) -> list[tuple[str, str, str]]:
    """(s=, a=, result) of each signature as OpenDKIM's test mode reports it (its
    Authentication-Results field), the public keys read from a file instead of the DNS."""
    program = need_opendkim()
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "keys"
    keys.write_text("".join(f"{key.config.record_name} {key.dns_record()}\n" for key in signer.keys))
    config = directory / "opendkim.conf"
    config.write_text(f"Mode v\nTestPublicKeys {keys}\nSyslog no\n")
    path = directory / "message.eml"
    path.write_bytes(message)
    process = await asyncio.create_subprocess_exec(
        program, "-x", str(config), "-t", str(path), "-vv",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    found = re.findall(r"dkim=(\w+)[^;]*?header\.a=(\S+) header\.s=(\S+) ", text)
    return [(selector, algorithm, result) for result, algorithm, selector in found]


def on_the_wire(message: bytes) -> bytes:
    """What the upstream receives: CRLF line endings, and a final CRLF (RFC 5321 4.1.1.4)."""
    wire = re.sub(rb"\r(?!\n)|(?<!\r)\n", b"\r\n", message)
    return wire if wire.endswith(b"\r\n") else wire + b"\r\n"


def _shape(head: str, body: bytes) -> bytes:
    return head.replace("\n", "\r\n").encode() + body


SHAPES: dict[str, bytes] = {
    "plain": newsletter(),
    "folded headers": _shape(
        "From: News\n\t<news@example.com>\nTo: bob@example.org,\n  carol@example.org\n"
        "Subject: a subject\n  folded once\n\t\tand twice with tabs\n"
        f"List-Unsubscribe: {LONG_UNSUBSCRIBE}\n\n",
        b"Hello.\r\n",
    ),
    "trailing whitespace": _shape(
        "From: news@example.com  \nTo:bob@example.org\nSubject:\t spaced \t out  \t\nX-Empty:\nCc: \n\n",
        b"line with trailing spaces   \r\ntabs\t\tinside\t \r\n \t \r\nlast  \r\n  \r\n\t\r\n",
    ),
    "empty body": _shape("From: news@example.com\nTo: bob@example.org\nSubject: nothing\n\n", b""),
    "no body, no blank line": _shape("From: news@example.com\nTo: bob@example.org\nSubject: header only\n", b""),
    "long lines": _shape(
        "From: news@example.com\nTo: bob@example.org\nSubject: " + "s" * 900 + "\n\n",
        (b"x" * 990 + b"\r\n") * 3 + b"y " * 490 + b"\r\n",
    ),
    "8-bit": _shape(
        "From: Zoë <zoe@example.com>\nTo: bob@example.org\nSubject: Größe café\n\n", "Ça va? €\r\n".encode()
    ),
    "only empty lines": _shape("From: news@example.com\nSubject: x\n\n", b"\r\n\r\n\r\n"),
    "empty lines inside and at the end": _shape(
        "From: news@example.com\nSubject: x\n\n", b"\r\n\r\nfirst\r\n\r\n\r\nsecond\r\n\r\n\r\n\r\n"
    ),
    "last line without CRLF": _shape("From: news@example.com\nSubject: x\n\n", b"first\r\nlast line  "),
    "dots and a lone dot": _shape("From: news@example.com\nSubject: x\n\n", b".starts\r\n..two\r\n.\r\nend\r\n"),
    "bare line feeds": b"From: news@example.com\r\nSubject: x\r\n\r\nunix\nline\n\nends\n",
    "upper-case names, several To": _shape(
        "FROM: news@example.com\nTO: a@example.org\nSubject: x\nTo: b@example.org\nmessage-id: <m@example.com>\n\n",
        b"hi\r\n",
    ),
}


#: OpenDKIM's test mode hands each field over as a milter does, "Name" and value with the
#: whitespace after the colon dropped, and rebuilds it as "Name: value": a field written
#: "To:bob" or "Subject:<TAB>x" then no longer matches a simple-canonicalised signature
#: (dkimpy and Mail::DKIM, which read the bytes, still check those).
MILTER_REWRITES = frozenset({"trailing whitespace"})


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"])
@pytest.mark.parametrize("shape", list(SHAPES))
async def test_every_shape_verifies_with_dkimpy_mail_dkim_and_opendkim(
    key_files: KeyFiles, dns_server: DNSServer, tmp_path: Path, shape: str, canonicalization: str
) -> None:
    signer = Signer.from_config(both_keys(key_files, canonicalization=canonicalization))
    publish(dns_server, signer)
    original = SHAPES[shape]
    result = await signer.sign_async(original)
    assert [a for _, _, a in result.signatures] == ["rsa-sha256", "ed25519-sha256"]
    assert result.message.endswith(original)  # only prepended
    received = on_the_wire(result.message)
    assert await dkimpy_verify_all(received, dns_server) == [True, True], shape
    independent = await asyncio.to_thread(independent_verify, received, sync_txt(dns_server))
    assert [valid for _, _, valid in independent] == [True, True], shape
    if not (canonicalization.startswith("simple/") and shape in MILTER_REWRITES):
        assert await opendkim_verify(received, signer, tmp_path / "opendkim") == [
            ("s2026", "rsa-sha256", "pass"),
            ("ed2026", "ed25519-sha256", "pass"),
        ], shape
    mail_dkim = await mail_dkim_verify(received, dns_server)
    assert mail_dkim[0] == "example.com rsa-sha256 pass", (shape, mail_dkim)


# ---- the body in blocks, the From fast path ----------------------------------------------------------

_BODY_BYTES = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\t", b"\r\n", b"\r\n\r\n", b".", b"\xc3\xa9", b"\n", b"\r"]), max_size=60
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(body=_BODY_BYTES, block_size=st.integers(min_value=1, max_value=9), canon=st.sampled_from(["relaxed", "simple"]))
def test_the_body_hash_does_not_depend_on_the_blocks(body: bytes, block_size: int, canon: str) -> None:
    # Whatever the block boundaries cut (a CRLF, a WSP run, a run of empty lines), the hash is
    # the one of the whole body on the wire, canonicalised by the independent reference above.
    wire = on_the_wire(body) if body else b""
    expected = hashlib.sha256(_body(wire, canon)).digest()
    assert dkim_canon.body_hash(memoryview(body), canon, block_size=block_size) == expected  # type: ignore[arg-type]
    assert dkim_canon.body_hash(body, canon) == expected  # type: ignore[arg-type]


def test_the_from_fast_path_agrees_with_the_email_package() -> None:
    # The common forms are read with two expressions; the email package decides every other.
    values = [
        "news@example.com", "News <news@Example.COM>", '"Doe, John" <john@example.com>', "J. R. Doe <j@mail.example.com>",
        "=?utf-8?q?Zo=C3=AB?= <zoe@example.com>", "<bare@example.com>", "a@example.com, b@example.net",
        "Group: a@example.com;", "john@example.com (John)", '"quoted\\"name" <q@example.com>',
        "x@[192.0.2.1]", "Zoë <zoe@exämple.com>", "undisclosed", "a@b@example.com",
    ]  # fmt: skip
    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("corpus", "messages").glob("*.eml")):
        head = path.read_bytes().split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        found = re.search(rb"(?im)^from:(.*(?:\r?\n[ \t].*)*)", head)
        if found:
            values.append(found.group(1).decode("utf-8", "surrogateescape").strip())
    for value in values:
        raw = f"From: {value}\r\n".encode("utf-8", "surrogateescape")
        fields = [(b"From", raw)]
        fast = from_domains(fields)
        reference = _from_domains_by_the_email_package(value)
        assert fast == reference, value


def _from_domains_by_the_email_package(value: str) -> list[str]:
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", value).strip()
    try:
        specs = [str(a.addr_spec) for a in email.policy.default.header_factory("from", unfolded).addresses]
    except Exception:
        specs = []
    if not any("@" in spec for spec in specs):
        specs = [spec for _, spec in email.utils.getaddresses([unfolded])]
    out: list[str] = []
    for spec in specs:
        if "@" in spec:
            domain = spec.rsplit("@", 1)[1].strip().rstrip(".").lower()
            try:
                domain = domain if domain.isascii() else domain.encode("idna").decode("ascii")
            except UnicodeError:
                continue
            if domain and domain not in out:
                out.append(domain)
    return out
